"""Module parity with torch.nn for every CPU backend: same weights (strict state_dict), same
outputs, final states and gradients for the input, the initial states and every parameter."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn.testing import assert_close

from conftest import rnn_backends

PAIRS = {"LSTM": (nn.LSTM, fastrnn.LSTM), "GRU": (nn.GRU, fastrnn.GRU), "RNN": (nn.RNN, fastrnn.RNN)}

# (name, module kwargs, input form)
CONFIGS = [
    ("1layer", dict(), "batched"),
    ("2layer_bidir", dict(num_layers=2, bidirectional=True), "batched"),
    ("3layer_batch_first", dict(num_layers=3, batch_first=True), "batched"),
    ("no_bias_bidir", dict(bias=False, bidirectional=True), "batched"),
    ("unbatched_2layer", dict(num_layers=2), "unbatched"),
    ("noncontiguous", dict(batch_first=True), "noncontiguous"),
    ("packed_unsorted_bidir", dict(num_layers=2, bidirectional=True), "packed"),
    ("no_h0", dict(bidirectional=True), "no_h0"),
]
EXTRA = {"LSTM": [("proj", dict(proj_size=3, num_layers=2, bidirectional=True), "batched"),
                  ("proj_packed", dict(proj_size=2), "packed")],
         "RNN": [("relu", dict(nonlinearity="relu", num_layers=2), "batched"),
                 ("relu_packed_bidir", dict(nonlinearity="relu", bidirectional=True), "packed")],
         "GRU": []}
I, H, T, B = 5, 7, 6, 4
LENGTHS = torch.tensor([4, 6, 1, 5])  # unsorted: exercises enforce_sorted=False


def all_cases():
    for kind in PAIRS:
        for name, kw, form in CONFIGS + EXTRA[kind]:
            yield pytest.param(kind, kw, form, id=f"{kind}-{name}")


def make_pair(kind, kw, backend, dtype=torch.float32):
    torch_cls, fast_cls = PAIRS[kind]
    torch.manual_seed(1)
    ref = torch_cls(I, H, dtype=dtype, **kw)
    torch.manual_seed(1)
    fast = fast_cls(I, H, dtype=dtype, backend=backend, **kw)
    for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), fast.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), f"init differs at {n1}"
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def make_inputs(kind, m, form, dtype):
    D = 2 if m.bidirectional else 1
    Hr = getattr(m, "proj_size", 0) or H
    batched = form != "unbatched"
    if form == "noncontiguous":
        x = torch.randn(I, T, B, dtype=dtype).permute(2, 1, 0)  # [B, T, I], not contiguous
        assert not x.is_contiguous()
    elif m.batch_first:
        x = torch.randn(B, T, I, dtype=dtype)
    else:
        x = torch.randn(T, B, I, dtype=dtype) if batched else torch.randn(T, I, dtype=dtype)
    lead = (m.num_layers * D, B) if batched else (m.num_layers * D,)
    h0 = torch.randn(*lead, Hr, dtype=dtype)
    c0 = torch.randn(*lead, H, dtype=dtype)
    hx = None if form == "no_h0" else ((h0, c0) if kind == "LSTM" else h0)
    return x, hx


def run(m, x, hx, form):
    x = x.detach().clone().requires_grad_()
    hx_leaves = None
    if hx is not None:
        hx_leaves = tuple(t.detach().clone().requires_grad_() for t in (hx if isinstance(hx, tuple) else (hx,)))
        hx = hx_leaves if isinstance(hx, tuple) and len(hx_leaves) == 2 else hx_leaves[0]
    inp = pack_padded_sequence(x, LENGTHS, enforce_sorted=False) if form == "packed" else x
    out, hidden = m(inp, hx)
    if form == "packed":
        out, lengths = pad_packed_sequence(out)
        assert torch.equal(lengths, LENGTHS)
    states = hidden if isinstance(hidden, tuple) else (hidden,)
    torch.manual_seed(123)  # same random loss weights for both modules
    loss = (out * torch.randn_like(out)).sum() + sum((s * torch.randn_like(s)).sum() for s in states)
    params = dict(m.named_parameters())
    leaves = [x] + list(hx_leaves or ()) + list(params.values())
    grads = torch.autograd.grad(loss, leaves)
    names = ["x"] + [f"hx[{k}]" for k in range(len(hx_leaves or ()))] + list(params)
    return dict(out=out, **{f"state[{k}]": s for k, s in enumerate(states)}), dict(zip(names, grads))


@pytest.mark.parametrize("backend", rnn_backends())
@pytest.mark.parametrize("kind,kw,form", list(all_cases()))
def test_module_matches_torch(backend, kind, kw, form):
    ref, fast = make_pair(kind, kw, backend)
    x, hx = make_inputs(kind, ref, form, torch.float32)
    out_ref, grad_ref = run(ref, x, hx, form)
    out_fast, grad_fast = run(fast, x, hx, form)
    for name in out_ref:
        assert_close(out_fast[name], out_ref[name], f"{kind}/{backend}/{name}")
    assert grad_ref.keys() == grad_fast.keys()
    for name in grad_ref:
        assert_close(grad_fast[name], grad_ref[name], f"{kind}/{backend}/grad {name}", grad=True)


@pytest.mark.parametrize("backend", rnn_backends())
@pytest.mark.parametrize("kind", list(PAIRS))
def test_dropout_between_layers(backend, kind):
    """Same seed, same dropout masks as torch in training; no dropout in eval."""
    ref, fast = make_pair(kind, dict(num_layers=3, dropout=0.5), backend)
    x = torch.randn(T, B, I)
    for training in (True, False):
        ref.train(training), fast.train(training)
        torch.manual_seed(7)
        y_ref, _ = ref(x)
        torch.manual_seed(7)
        y_fast, _ = fast(x)
        assert_close(y_fast, y_ref, f"{kind}/{backend}/dropout training={training}")


CELLS = {"LSTMCell": (nn.LSTMCell, fastrnn.LSTMCell, {}), "GRUCell": (nn.GRUCell, fastrnn.GRUCell, {}),
         "RNNCell": (nn.RNNCell, fastrnn.RNNCell, {}),
         "RNNCell-relu": (nn.RNNCell, fastrnn.RNNCell, dict(nonlinearity="relu")),
         "LSTMCell-nobias": (nn.LSTMCell, fastrnn.LSTMCell, dict(bias=False))}


@pytest.mark.parametrize("backend", rnn_backends())
@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("form", ["batched", "unbatched", "no_hx"])
def test_cell_matches_torch(backend, name, form):
    torch_cls, fast_cls, kw = CELLS[name]
    torch.manual_seed(2)
    ref = torch_cls(I, H, **kw)
    torch.manual_seed(2)
    fast = fast_cls(I, H, backend=backend, **kw)
    lead = () if form == "unbatched" else (B,)
    x = torch.randn(*lead, I)
    is_lstm = torch_cls is nn.LSTMCell
    hx = None if form == "no_hx" else (
        (torch.randn(*lead, H), torch.randn(*lead, H)) if is_lstm else torch.randn(*lead, H))

    def go(m):
        xl = x.clone().requires_grad_()
        hl = None if hx is None else (tuple(h.clone().requires_grad_() for h in hx) if is_lstm
                                      else hx.clone().requires_grad_())
        out = m(xl, hl)
        outs = out if is_lstm else (out,)
        torch.manual_seed(5)
        loss = sum((o * torch.randn_like(o)).sum() for o in outs)
        leaves = [xl] + ([] if hl is None else list(hl if is_lstm else (hl,))) + list(m.parameters())
        return outs, torch.autograd.grad(loss, leaves)

    (o_ref, g_ref), (o_fast, g_fast) = go(ref), go(fast)
    for k, (a, e) in enumerate(zip(o_fast, o_ref)):
        assert_close(a, e, f"{name}/{backend}/out[{k}]")
    for k, (a, e) in enumerate(zip(g_fast, g_ref)):
        assert_close(a, e, f"{name}/{backend}/grad[{k}]", grad=True)
