"""Double backward (create_graph=True, then a second grad) through every layer module, cell and
attention, on every CPU backend: float64 ``gradgradcheck`` and second derivatives equal to
torch's own modules'. The first-order backward stays on the fused kernel."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn.backends import reference_rnn as ref
from fastrnn.contract.sdpa import SdpaMask
from fastrnn.ops.attention import sdpa
from fastrnn.testing import assert_close

from conftest import cpu_backends, rnn_backends

T, B, I, H = 3, 2, 3, 3
f64 = dict(dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _errors_on_warnings():
    # "an autograd kernel was not registered" is a UserWarning: here it is a failure
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


def _module_fn(module, *, packed_lengths=None, reset_mask=None, seed=None):
    """f(x, *params) -> every output tensor of the module (params by name, so gradgradcheck
    perturbs them). ``seed`` re-seeds before each call: the same dropout/zoneout draws."""
    names = [n for n, _ in module.named_parameters()]

    def f(x, *params):
        if seed is not None:
            torch.manual_seed(seed)
        inp = x
        if packed_lengths is not None:
            inp = pack_padded_sequence(x, packed_lengths, enforce_sorted=False)
        kw = {} if reset_mask is None else {"reset_mask": reset_mask}
        out = functional_call(module, dict(zip(names, params)), (inp,), kw)
        flat = []
        for o in out if isinstance(out, tuple) else (out,):
            if isinstance(o, tuple):
                flat += list(o)
            elif hasattr(o, "data") and not isinstance(o, torch.Tensor):  # PackedSequence
                flat.append(o.data)
            else:
                flat.append(o)
        return tuple(flat)
    return f, [p.detach().clone().requires_grad_() for p in module.parameters()]


LAYERS = {
    "lstm": lambda b: fastrnn.LSTM(I, H, backend=b),
    "lstm-proj-bidir-2layers": lambda b: fastrnn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2,
                                                      backend=b),
    "gru": lambda b: fastrnn.GRU(I, H, backend=b),
    "gru-reset_before": lambda b: fastrnn.GRU(I, H, reset_after=False, backend=b),
    "rnn_tanh-bidir": lambda b: fastrnn.RNN(I, H, bidirectional=True, backend=b),
    "rnn_relu": lambda b: fastrnn.RNN(I, H, nonlinearity="relu", backend=b),
    "lstm-layer_norm-peephole": lambda b: fastrnn.LSTM(I, H, layer_norm=True, peephole=True, backend=b),
    "gru-layer_norm": lambda b: fastrnn.GRU(I, H, layer_norm=True, backend=b),
    # training: masks drawn per call; the function re-seeds, so every call draws the same
    "lstm-zoneout-recdrop": lambda b: fastrnn.LSTM(I, H, zoneout=0.3, recurrent_dropout=0.3, backend=b).train(),
    "rnn-zoneout-eval": lambda b: fastrnn.RNN(I, H, zoneout=0.4, backend=b).eval(),
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(LAYERS))
def test_gradgradcheck_layers(backend, case):
    torch.manual_seed(1)
    module = LAYERS[case](backend).double()
    f, params = _module_fn(module, seed=7)
    x = torch.randn(T, B, I, **f64, requires_grad=True)
    # fast mode: random projections of the full second-derivative check (cheap, still exact-vs-numeric)
    assert gradgradcheck(f, (x, *params), fast_mode=True)


@pytest.mark.parametrize("backend", cpu_backends())
def test_gradgradcheck_packed_and_reset(backend):
    torch.manual_seed(2)
    module = fastrnn.LSTM(I, H, bidirectional=True, backend=backend).double()
    f, params = _module_fn(module, packed_lengths=torch.tensor([3, 2, 1]))
    x = torch.randn(T, 3, I, **f64, requires_grad=True)
    assert gradgradcheck(f, (x, *params), fast_mode=True)
    gru = fastrnn.GRU(I, H, backend=backend).double()
    f, params = _module_fn(gru, reset_mask=torch.tensor([[False, True], [True, False], [False, False]]))
    assert gradgradcheck(f, (torch.randn(T, B, I, **f64, requires_grad=True), *params), fast_mode=True)


@pytest.mark.parametrize("backend", cpu_backends())
def test_gradgradcheck_full_lstm(backend):
    """One case in full (not fast) mode: every second-derivative entry against numerics."""
    torch.manual_seed(3)
    module = fastrnn.LSTM(2, 2, backend=backend).double()
    f, params = _module_fn(module)
    x = torch.randn(2, 2, 2, **f64, requires_grad=True)
    assert gradgradcheck(f, (x, *params))


CELLS = {"lstm": (fastrnn.LSTMCell, nn.LSTMCell), "gru": (fastrnn.GRUCell, nn.GRUCell),
         "rnn": (fastrnn.RNNCell, nn.RNNCell)}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell", list(CELLS))
def test_gradgradcheck_cells(backend, cell):
    torch.manual_seed(4)
    module = CELLS[cell][0](I, H, backend=backend).double()
    names = [n for n, _ in module.named_parameters()]
    x = torch.randn(B, I, **f64, requires_grad=True)
    h = torch.randn(B, H, **f64, requires_grad=True)
    c = torch.randn(B, H, **f64, requires_grad=True)

    def f(x, h, c, *params):
        hx = (h, c) if cell == "lstm" else h
        out = functional_call(module, dict(zip(names, params)), (x, hx))
        return out if isinstance(out, tuple) else (out,)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    assert gradgradcheck(f, (x, h, c, *params), fast_mode=True)


# -- second derivatives equal torch's -------------------------------------------------------------

def _penalty_grads(model, x, hx, params):
    """Gradient penalty (WGAN-GP style): d/d(params, x) of |d loss / d x|^2 + loss."""
    out = model(x, hx) if hx is not None else model(x)
    ys = [o for o in (out if isinstance(out, tuple) else (out,))]
    ys = [t for y in ys for t in (y if isinstance(y, tuple) else (y,))]
    loss = sum((y.sin() * (k + 1)).sum() for k, y in enumerate(ys))
    g_x, = torch.autograd.grad(loss, x, create_graph=True)
    penalty = g_x.square().sum() + loss
    return torch.autograd.grad(penalty, [x] + params)


def _twin(fast, torch_cls, **kw):
    ref = torch_cls(**kw).double()
    ref.load_state_dict(fast.state_dict())
    return ref


TORCH_LAYERS = {
    "lstm": (fastrnn.LSTM, nn.LSTM, dict(num_layers=2, proj_size=2)),
    "lstm-bidir-batch_first": (fastrnn.LSTM, nn.LSTM, dict(bidirectional=True, batch_first=True)),
    "gru": (fastrnn.GRU, nn.GRU, dict(num_layers=2, bidirectional=True)),
    "rnn_relu": (fastrnn.RNN, nn.RNN, dict(nonlinearity="relu")),
    "rnn_tanh-no_bias": (fastrnn.RNN, nn.RNN, dict(bias=False)),
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(TORCH_LAYERS))
def test_second_derivative_matches_torch_layers(backend, case):
    fast_cls, torch_cls, kw = TORCH_LAYERS[case]
    kw = dict(input_size=I, hidden_size=H, **kw)
    fast = fast_cls(**kw, backend=backend).double()
    ref = _twin(fast, torch_cls, **kw)
    x = torch.randn(T + 2, B + 1, I, **f64, requires_grad=True)
    got = _penalty_grads(fast, x, None, list(fast.parameters()))
    want = _penalty_grads(ref, x, None, list(ref.parameters()))
    names = ["x"] + [n for n, _ in fast.named_parameters()]
    assert any(w.abs().max() > 1e-3 for w in want), "degenerate case: torch's second derivative is ~0"
    for n, a, b in zip(names, got, want):
        assert_close(a, b, f"{case} d(penalty)/d{n}", grad=True, scale=10)


@pytest.mark.parametrize("backend", cpu_backends())
def test_second_derivative_matches_torch_packed(backend):
    fast = fastrnn.GRU(I, H, bidirectional=True, backend=backend).double()
    ref = _twin(fast, nn.GRU, input_size=I, hidden_size=H, bidirectional=True)
    x = torch.randn(4, 3, I, **f64, requires_grad=True)
    lengths = torch.tensor([2, 4, 1])

    def run(model):
        out, h = model(pack_padded_sequence(x, lengths, enforce_sorted=False))
        loss = out.data.sin().sum() + (2 * h).cos().sum()
        g, = torch.autograd.grad(loss, x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), [x] + list(model.parameters()))
    for n, a, b in zip(["x"] + [n for n, _ in fast.named_parameters()], run(fast), run(ref)):
        assert_close(a, b, f"packed d2/d{n}", grad=True, scale=10)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell", list(CELLS))
def test_second_derivative_matches_torch_cells(backend, cell):
    fast_cls, torch_cls = CELLS[cell]
    fast = fast_cls(I, H, backend=backend).double()
    ref = _twin(fast, torch_cls, input_size=I, hidden_size=H)
    x = torch.randn(B + 1, I, **f64, requires_grad=True)
    h = torch.randn(B + 1, H, **f64)
    hx = (h, torch.randn(B + 1, H, **f64)) if cell == "lstm" else h
    got = _penalty_grads(fast, x, hx, list(fast.parameters()))
    want = _penalty_grads(ref, x, hx, list(ref.parameters()))
    for n, a, b in zip(["x"] + [n for n, _ in fast.named_parameters()], got, want):
        assert_close(a, b, f"{cell} cell d(penalty)/d{n}", grad=True, scale=10)


SDPA_CASES = {
    "plain": dict(),
    "causal-gqa": dict(is_causal=True, enable_gqa=True, kv_heads=2),
    "bool_mask": dict(mask="bool"),
    "float_mask": dict(mask="float"),
    "fully_masked_row": dict(mask="hole"),
}


def _sdpa_inputs(case, L=5, S=6):
    kw = dict(SDPA_CASES[case])
    Hk = kw.pop("kv_heads", 4)
    q = torch.randn(2, 4, L, 3, **f64, requires_grad=True)
    k = torch.randn(2, Hk, S, 3, **f64, requires_grad=True)
    v = torch.randn(2, Hk, S, 2, **f64, requires_grad=True)
    mask = kw.pop("mask", None)
    extra = []
    if mask == "bool":
        kw["attn_mask"] = torch.rand(L, S) < 0.7
    elif mask == "hole":
        m = torch.rand(2, 1, L, S) < 0.7
        m[0, 0, 1] = False  # a query that sees no key: zero output, zero gradient (torch too)
        kw["attn_mask"] = m
    elif mask == "float":
        kw["attn_mask"] = torch.randn(1, 4, L, S, **f64, requires_grad=True)
        extra = [kw["attn_mask"]]
    return q, k, v, kw, extra


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_second_derivative_matches_torch_sdpa(backend, case):
    torch.manual_seed(5)
    q, k, v, kw, extra = _sdpa_inputs(case)
    inputs = [q, k, v] + extra

    def run(fn):
        out = fn(q, k, v, **kw)
        loss = (out.sin() * torch.arange(out.shape[-1], dtype=out.dtype)).sum()
        gs = torch.autograd.grad(loss, inputs, create_graph=True)
        penalty = sum((g * g.cos()).sum() for g in gs)
        return torch.autograd.grad(penalty, inputs)
    got = run(lambda *a, **k: fastrnn.scaled_dot_product_attention(*a, backend=backend, **k))
    want = run(F.scaled_dot_product_attention)
    for n, a, b in zip(["q", "k", "v", "mask"], got, want):
        assert not a.isnan().any(), f"{case} d2/d{n} has NaN"
        assert_close(a, b, f"{case} d2/d{n}", grad=True, scale=10)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", ["plain", "causal-gqa", "float_mask", "dropout"])
def test_gradgradcheck_sdpa(backend, case):
    """At the op level (fixed dropout seed: the same mask every call)."""
    torch.manual_seed(6)
    N, Nk, L, S, E, Ev = 4, 2 if case == "causal-gqa" else 4, 5, 6, 3, 2
    q = torch.randn(N, L, E, **f64, requires_grad=True)
    k = torch.randn(Nk, S, E, **f64, requires_grad=True)
    v = torch.randn(Nk, S, Ev, **f64, requires_grad=True)
    inputs = [q, k, v]
    p, seed = 0.0, None
    if case == "float_mask":
        bias = torch.randn(2, L, S, **f64, requires_grad=True)
        inputs.append(bias)
    if case == "dropout":
        p, seed = 0.3, torch.tensor(1234)

    def f(q, k, v, *bias):
        m = SdpaMask(bias[0], torch.tensor([0, 1, 1, 0])) if bias else None
        return sdpa(backend, q, k, v, m, 0.7, case == "causal-gqa", p, seed)
    assert gradgradcheck(f, inputs, fast_mode=True)


def test_dropout_second_derivative_same_on_every_backend():
    """Dropout masks are the backends' own hash: the second derivative through the fused
    first-order backward and the reference's recomputation must agree backend to backend."""
    torch.manual_seed(8)
    q = torch.randn(3, 5, 4, **f64, requires_grad=True)
    k = torch.randn(3, 7, 4, **f64, requires_grad=True)
    v = torch.randn(3, 7, 2, **f64, requires_grad=True)
    seed = torch.tensor(99)

    def run(backend):
        out = sdpa(backend, q, k, v, None, 0.5, False, 0.4, seed)
        g = torch.autograd.grad(out.sin().sum(), [q, k, v], create_graph=True)
        return torch.autograd.grad(sum(t.square().sum() for t in g), [q, k, v])
    want = run("torch")
    for backend in cpu_backends():
        for n, a, b in zip("qkv", run(backend), want):
            assert_close(a, b, f"{backend} dropout d2/d{n}", grad=True)


def test_triton_interpreter_second_derivative():
    """triton (through the interpreter): first-order backward on its kernels, second from the
    reference recomputation; one small layer and one attention against torch."""
    if "triton" not in rnn_backends():
        pytest.skip("triton backend unavailable")
    torch.manual_seed(9)
    fast = fastrnn.LSTM(I, H, backend="triton").double()
    ref = _twin(fast, nn.LSTM, input_size=I, hidden_size=H)
    x = torch.randn(T, B, I, **f64, requires_grad=True)
    for n, a, b in zip(["x"] + [n for n, _ in fast.named_parameters()],
                       _penalty_grads(fast, x, None, list(fast.parameters())),
                       _penalty_grads(ref, x, None, list(ref.parameters()))):
        assert_close(a, b, f"triton lstm d2/d{n}", grad=True, scale=10)
    q, k, v, kw, _ = _sdpa_inputs("causal-gqa", L=4, S=4)

    def run(fn):
        g = torch.autograd.grad(fn(q, k, v, **kw).sin().sum(), [q, k, v], create_graph=True)
        return torch.autograd.grad(sum(t.square().sum() for t in g), [q, k, v])
    for n, a, b in zip("qkv", run(lambda *a, **k: fastrnn.scaled_dot_product_attention(*a, backend="triton", **k)),
                       run(F.scaled_dot_product_attention)):
        assert_close(a, b, f"triton sdpa d2/d{n}", grad=True, scale=10)


# -- the first-order path is the fused kernel, the reference only differentiates it ----------------

def test_first_order_backward_does_not_recompute(monkeypatch):
    """Without create_graph nothing runs the reference (the fused backward, as before); with it,
    the first-order gradients still come from the fused kernel and only the second derivative
    recomputes."""
    backend = next(b for b in cpu_backends() if b != "torch") if len(cpu_backends()) > 1 else None
    if backend is None:
        pytest.skip("needs a fused CPU backend")
    calls = []
    real = ref.rnn_forward
    monkeypatch.setattr(ref, "rnn_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = fastrnn.GRU(I, H, backend=backend).double()
    x = torch.randn(T, B, I, **f64, requires_grad=True)
    loss = model(x)[0].sin().sum()
    g1, = torch.autograd.grad(loss, x, retain_graph=True)
    assert g1.grad_fn is None and not calls
    g2, = torch.autograd.grad(loss, x, create_graph=True)
    assert g2.grad_fn is not None and not calls
    assert_close(g2, g1, "first-order gradient under create_graph")
    torch.autograd.grad(g2.sum(), x)
    assert calls, "the second derivative recomputes with the reference"


def test_third_derivative():
    """The double backward is differentiable again (it is built from torch ops under autograd)."""
    fast = fastrnn.RNNCell(2, 2, backend="torch").double()
    ref_cell = _twin(fast, nn.RNNCell, input_size=2, hidden_size=2)
    x = torch.randn(2, 2, **f64, requires_grad=True)

    def d3(model):
        g, = torch.autograd.grad(model(x).sin().sum(), x, create_graph=True)
        gg, = torch.autograd.grad(g.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gg.cos().sum(), x)[0]
    assert_close(d3(fast), d3(ref_cell), "third derivative", grad=True, scale=10)
    for backend in cpu_backends():
        fast.backend = backend
        assert_close(d3(fast), d3(ref_cell), f"{backend} third derivative", grad=True, scale=10)


# -- the reference's own backward is differentiable (issue 2) --------------------------------------

@pytest.mark.parametrize("cell,T_", [("lstm", 1), ("lstm", 4), ("gru", 3), ("rnn_tanh", 3)])
def test_reference_backward_is_differentiable(cell, T_):
    """``rnn_backward`` of the reference, fed with ``saved`` from its forward under autograd, is a
    differentiable function: its gradient equals torch's second derivative of ``rnn_forward``
    (it used to raise an in-place error for LSTM and give a wrong value at T = 1)."""
    torch.manual_seed(10)
    G = {"lstm": 4, "gru": 3, "rnn_tanh": 1}[cell] * H
    xw = torch.randn(T_, B, G, **f64, requires_grad=True)
    w_hh = torch.randn(G, H, **f64, requires_grad=True)
    b_hh = torch.randn(G, **f64, requires_grad=True)
    h0 = torch.randn(B, H, **f64, requires_grad=True)
    c0 = torch.randn(B, H, **f64, requires_grad=True) if cell == "lstm" else None
    inputs = [t for t in (xw, w_hh, b_hh, h0, c0) if t is not None]
    gh, ghT = torch.randn(T_, B, H, **f64), torch.randn(B, H, **f64)
    gcT = torch.randn(B, H, **f64) if cell == "lstm" else None

    h_seq, h_T, c_T, saved = ref.rnn_forward(cell, xw, w_hh, b_hh, h0, c0, None, None, False, True)
    grad_xw, grad_hw, grad_h0, grad_c0, _, _ = ref.rnn_backward(cell, gh, ghT, gcT, w_hh, None, h0, c0,
                                                                None, False, saved)
    # the op code's gradients of w_hh, b_hh from the backend's grad_hw
    h_in = torch.cat([h0.unsqueeze(0), h_seq[:-1]], 0)
    mine = [grad_xw, torch.einsum("tbg,tbh->gh", grad_hw, h_in), grad_hw.sum((0, 1)), grad_h0] + (
        [grad_c0] if cell == "lstm" else [])
    outs = [o for o in (h_seq, h_T, c_T) if o is not None]
    auto = torch.autograd.grad(outs, inputs, [g for g in (gh, ghT, gcT) if g is not None], create_graph=True)
    for n, a, b in zip(["xw", "w_hh", "b_hh", "h0", "c0"], mine, auto):
        assert_close(a, b, f"first order {n}")
    probe = [torch.randn_like(t) for t in mine]
    second_mine = torch.autograd.grad(sum((a * p).sum() for a, p in zip(mine, probe)), inputs, retain_graph=True)
    second_auto = torch.autograd.grad(sum((a * p).sum() for a, p in zip(auto, probe)), inputs)
    for n, a, b in zip(["xw", "w_hh", "b_hh", "h0", "c0"], second_mine, second_auto):
        assert_close(a, b, f"second order {n}", grad=True)


def test_gradcheck_reference_backward_itself():
    """gradcheck on the reference's hand-written backward as a function of everything it reads
    (LSTM with projection, packed, reverse, every variant tensor)."""
    torch.manual_seed(11)
    Hr, G = 2, 4 * H
    r = lambda *s: torch.randn(*s, **f64, requires_grad=True)
    xw, w_hh, b_hh, h0, c0, w_hr = r(T, B, G), r(G, Hr), r(G), r(B, Hr), r(B, H), r(Hr, H)
    gh, ghT, gcT = r(T, B, Hr), r(B, Hr), r(B, H)
    bs = torch.tensor([2, 2, 1])
    variant = fastrnn.contract.rnn.Variant(
        ln_hh_weight=r(G), ln_hh_bias=r(G), ln_c_weight=r(H), ln_c_bias=r(H), peephole=r(3, H),
        rec_mask=torch.tensor([[2.0, 0.0], [2.0, 2.0]], **f64),
        zoneout_h=torch.bernoulli(torch.full((T, B, Hr), 0.3, **f64)),
        zoneout_c=torch.bernoulli(torch.full((T, B, H), 0.3, **f64)),
        reset=torch.tensor([[False, True], [True, False], [False, False]]))

    def f(xw, w_hh, b_hh, h0, c0, w_hr, gh, ghT, gcT):
        saved = ref.rnn_forward("lstm", xw, w_hh, b_hh, h0, c0, w_hr, bs, True, True, variant)[3]
        out = ref.rnn_backward("lstm", gh, ghT, gcT, w_hh, w_hr, h0, c0, bs, True, saved, variant)
        return tuple(t for t in out[:5]) + tuple(t for t in out[5] if t is not None)
    assert gradcheck(f, (xw, w_hh, b_hh, h0, c0, w_hr, gh, ghT, gcT), fast_mode=True)
