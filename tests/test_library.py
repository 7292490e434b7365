"""torch.ops.fastrnn: opcheck on every op and CPU backend, torch.compile(fullgraph=True) equal to
eager (forward and backward) without graph breaks, dynamic sequence length, convert/to_torch."""
import pytest
import torch
import torch._dynamo as dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fastrnn
from fastrnn.contract.rnn import GATES, Variant
from fastrnn.testing import assert_close

from conftest import cpu_backends

T, B, I, H, PROJ = 5, 3, 4, 6, 3


def _layer_args(backend, cell, proj=0, packed=False, variant=None, ln_ih=False):
    G, Hr = GATES[cell] * H, proj or H
    r = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)
    v = Variant() if variant is None else variant
    return (backend, cell, r(T, B, I), r(G, I), r(G, Hr), r(G), r(G), r(B, Hr),
            r(B, H) if cell == "lstm" else None, r(Hr, H) if proj else None,
            torch.tensor([3, 3, 2, 2, 1]) if packed else None, False,
            r(G) if ln_ih else None, r(G) if ln_ih else None, *v)


def _all_options(cell):
    """Every variant tensor a cell takes, random (fresh masks, some resets)."""
    G, f64 = GATES[cell] * H, dict(dtype=torch.float64)
    lstm = cell == "lstm"
    return Variant(
        ln_hh_weight=torch.randn(G, **f64, requires_grad=True), ln_hh_bias=torch.randn(G, **f64, requires_grad=True),
        ln_c_weight=torch.randn(H, **f64, requires_grad=True) if lstm else None,
        ln_c_bias=torch.randn(H, **f64, requires_grad=True) if lstm else None,
        peephole=torch.randn(3, H, **f64, requires_grad=True) if lstm else None,
        rec_mask=torch.bernoulli(torch.full((B, H), 0.7, **f64)) / 0.7,
        zoneout_h=torch.bernoulli(torch.full((T, B, H), 0.3, **f64)),
        zoneout_c=torch.bernoulli(torch.full((T, B, H), 0.3, **f64)) if lstm else None,
        reset=torch.rand(T, B) < 0.3)


LAYER_CASES = {
    "lstm": dict(cell="lstm"),
    "lstm-proj-packed": dict(cell="lstm", proj=PROJ, packed=True),
    "gru": dict(cell="gru"),
    "rnn_relu": dict(cell="rnn_relu"),
    "lstm-variants": dict(cell="lstm", ln_ih=True, variant="all"),
    "gru-variants": dict(cell="gru", ln_ih=True, variant="all"),
    "gru-reset_before": dict(cell="gru", variant=Variant(reset_after=False)),
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_opcheck_rnn_layer(backend, case):
    kw = dict(LAYER_CASES[case])
    if kw.get("variant") == "all":
        kw["variant"] = _all_options(kw["cell"])
    args = _layer_args(backend, **kw)
    torch.library.opcheck(torch.ops.fastrnn.rnn_layer, args)
    # the forward op on its own (what a compiled training graph calls)
    torch.library.opcheck(torch.ops.fastrnn.rnn_layer_fwd, args + (True,),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck_rnn_cell(backend):
    r = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)
    args = (backend, "lstm", r(B, I), r(B, H), r(B, H), r(4 * H, I), r(4 * H, H), r(4 * H), None,
            None, None, *Variant())
    torch.library.opcheck(torch.ops.fastrnn.rnn_cell, args)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", ["plain", "causal", "mask", "dropout"])
def test_opcheck_sdpa(backend, case):
    r = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)
    N, Nk, L, S, E = 4, 2, 5, 7, 3
    bias = rows = seed = None
    if case == "mask":
        bias, rows = torch.randn(2, L, S, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    if case == "dropout":
        seed = torch.tensor(1234)
    args = (backend, r(N, L, E), r(Nk, S, E), r(Nk, S, 4), bias, rows, 0.4, case == "causal",
            0.3 if case == "dropout" else 0.0, seed)
    torch.library.opcheck(torch.ops.fastrnn.sdpa, args)


# -- torch.compile ---------------------------------------------------------------------------

class Seq2Seq(nn.Module):
    """Every fastrnn module family and attention in one model."""

    def __init__(self, backend, **variants):
        super().__init__()
        self.lstm = fastrnn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True,
                                 backend=backend, **variants)
        self.gru = fastrnn.GRU(2 * H, H, backend=backend)
        self.rnn = fastrnn.RNN(H, H, nonlinearity="relu", backend=backend)
        self.cell = fastrnn.LSTMCell(H, H, backend=backend)
        self.gru_cell = fastrnn.GRUCell(H, H, backend=backend)
        self.rnn_cell = fastrnn.RNNCell(H, H, backend=backend)
        self.backend = backend

    def forward(self, x, reset_mask=None):
        kw = {} if reset_mask is None else {"reset_mask": reset_mask}
        y, (h, c) = self.lstm(x, **kw)                    # [B, T, 2H]
        y, _ = self.gru(y.transpose(0, 1))                 # [T, B, H]
        y, _ = self.rnn(y)
        hc = (h[-1], c[-1])
        g = r = h[-1]
        outs = []
        for t in range(y.shape[0]):
            hc = self.cell(y[t], hc)
            g = self.gru_cell(hc[0], g)
            r = self.rnn_cell(g, r)
            outs.append(r)
        q = torch.stack(outs, 1).unsqueeze(1)              # [B, 1, T, H]
        a = fastrnn.scaled_dot_product_attention(q, q, q, is_causal=True, backend=self.backend)
        return a.square().mean() + y.mean()


def _grads(model, loss):
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


def _check_compiled(model, x, backend, **kw):
    torch.manual_seed(1)
    eager = model(x, **kw)
    g_eager = _grads(model, eager)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    torch.manual_seed(1)
    out = compiled(x, **kw)
    g_comp = _grads(model, out)
    assert_close(out, eager, "compiled loss")
    for n in g_eager:
        assert_close(g_comp[n], g_eager[n], f"compiled grad {n}", grad=True)


@pytest.mark.parametrize("backend", cpu_backends())
def test_compile_fullgraph_matches_eager(backend):
    """The whole model in one graph (fullgraph=True raises on any break), AOT autograd's
    forward and backward through the fake kernels, numbers equal to eager."""
    model = Seq2Seq(backend)
    _check_compiled(model, torch.randn(B, T, I), "aot_eager")


def test_compile_inductor():
    """The default compiler (inductor) around the opaque ops, forward and backward."""
    model = Seq2Seq(None)
    _check_compiled(model, torch.randn(B, T, I), "inductor")


@pytest.mark.parametrize("backend", cpu_backends())
def test_compile_variants(backend):
    """Variants in training (masks drawn inside the graph), reset_mask, layer norm."""
    model = Seq2Seq(backend, layer_norm=True, peephole=True, recurrent_dropout=0.2, zoneout=0.1)
    _check_compiled(model, torch.randn(B, T, I), "aot_eager", reset_mask=torch.rand(B, T) < 0.2)


def test_no_graph_breaks():
    model = Seq2Seq(None, layer_norm=True)
    explanation = dynamo.explain(model)(torch.randn(B, T, I))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_dynamic_sequence_length_does_not_recompile():
    model = nn.Sequential(fastrnn.GRU(I, H, batch_first=True))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for steps in (3, 5, 8, 13, 21):
        x = torch.randn(B, steps, I)
        out, h = compiled(x)
        ref, h_ref = model(x)
        assert_close(out, ref, f"T={steps} output")
    # automatic dynamic shapes: one static compile, one dynamic one, then reuse for every T
    assert counter.frame_count <= 2, counter.frame_count


# -- convert / to_torch ------------------------------------------------------------------------

def test_convert_to_torch_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(I, H, 2, proj_size=PROJ), nn.GRUCell(I, H), nn.RNN(I, H, nonlinearity="relu"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters()]
    x = torch.randn(T, B, I)
    ref = model[0](x)[0]
    fast = fastrnn.convert(model, backend="torch")
    assert [type(m) for m in fast] == [fastrnn.LSTM, fastrnn.GRUCell, fastrnn.RNN]
    back = fastrnn.to_torch(fast)
    assert [type(m) for m in back] == [nn.LSTM, nn.GRUCell, nn.RNN]
    assert all(a is b for a, b in zip(back.parameters(), params))  # the same tensors throughout
    assert back.state_dict().keys() == state.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in state.items())
    assert not hasattr(back[0], "backend")
    assert repr(back) == repr(nn.Sequential(nn.LSTM(I, H, 2, proj_size=PROJ), nn.GRUCell(I, H),
                                            nn.RNN(I, H, nonlinearity="relu")))
    assert torch.equal(back[0](x)[0], ref)
    # what to_torch is for: exporters that know torch's RNN ops (TorchScript tracing, ONNX)
    traced = torch.jit.trace(back[0], (x,))
    torch.testing.assert_close(traced(x)[0], ref)
    exported = torch.export.export(back[0], (x,))
    assert any(n.target is torch.ops.aten.lstm.input for n in exported.graph.nodes)
    # a module built by fastrnn (not converted) goes back too
    assert type(fastrnn.to_torch(fastrnn.GRU(I, H))) is nn.GRU


def test_to_torch_refuses_variants():
    with pytest.raises(ValueError, match="layer_norm"):
        fastrnn.to_torch(fastrnn.LSTM(I, H, layer_norm=True))
    with pytest.raises(ValueError, match="reset_after"):
        fastrnn.to_torch(nn.Sequential(fastrnn.GRU(I, H, reset_after=False)))


def test_export_keeps_fastrnn_ops():
    """torch.export of a fastrnn model: the layers stay one fastrnn op each (fake kernels)."""
    model = fastrnn.GRU(I, H, num_layers=2, backend="torch")
    x = torch.randn(T, B, I)
    exported = torch.export.export(model, (x,))
    ops = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.fastrnn.rnn_layer.default) == 2, ops
    torch.testing.assert_close(exported.module()(x)[0], model(x)[0])
