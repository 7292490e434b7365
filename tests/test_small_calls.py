"""The small calls' path (fastrnn/ops/small_calls.py): cells and T = 1 layers as one fused step.

Checked against torch's own modules (outputs, states, every gradient, double backward), that the
path is the one that ran (its profiler range), that every call it turns down still runs or raises
as torch does, and the C++ entry points with bad arguments."""
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.profiler import ProfilerActivity, profile

import fastrnn
from fastrnn import backends
from fastrnn.testing import assert_close

cpp = backends.load("cpp", "rnn")
pytestmark = pytest.mark.skipif(isinstance(cpp, str) or cpp.availability("cpu") is not None,
                                reason="cpp backend unavailable")

B, I, H = 3, 5, 7
CELLS = {"lstm": "LSTMCell", "gru": "GRUCell", "rnn_tanh": "RNNCell", "rnn_relu": "RNNCell"}
LAYERS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


def _pair(cls_name, cell, dtype=torch.float32, **kw):
    if cell.startswith("rnn"):
        kw["nonlinearity"] = cell[4:]
    ref = getattr(nn, cls_name)(I, H, **kw).to(dtype)
    fast = getattr(fastrnn, cls_name)(I, H, backend="cpp", **kw).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _ranges(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def _flat(out):
    return [t for o in (out if isinstance(out, tuple) else (out,)) for t in (o if isinstance(o, tuple) else (o,))]


def _run(module, x, state):
    """Outputs and the gradients of a random projection of every output w.r.t. x, the states and
    every parameter."""
    leaves = [x] + [s for s in _flat(state)] + list(module.parameters())
    out = _flat(module(x, state))
    torch.manual_seed(1)
    loss = sum((o * torch.randn_like(o)).sum() for o in out)
    return out, torch.autograd.grad(loss, leaves)


def _inputs(batch_shape, cell, dtype, state_shape):
    x = torch.randn(*batch_shape, I, dtype=dtype, requires_grad=True)
    h = torch.randn(*state_shape, dtype=dtype, requires_grad=True)
    return x, ((h, torch.randn(*state_shape, dtype=dtype, requires_grad=True)) if cell == "lstm" else h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", list(CELLS))
def test_cells_equal_torch_through_the_step(cell, dtype):
    ref, fast = _pair(CELLS[cell], cell, dtype)
    x, state = _inputs((B,), cell, dtype, (B, H))
    got, want = _run(fast, x, state), _run(ref, x, state)
    for k, (a, b) in enumerate(zip(got[0] + list(got[1]), want[0] + list(want[1]))):
        assert_close(a, b, f"{cell} {k}", grad=k >= len(got[0]))
    names = _ranges(lambda: _run(fast, x, state))
    assert f"fastrnn::{cell}_cell_fwd[cpp]" in names and f"fastrnn::{cell}_cell_bwd[cpp]" in names
    assert f"fastrnn::{cell}_layer_fwd[cpp]" not in names  # not the general path


@pytest.mark.parametrize("cell", list(LAYERS))
@pytest.mark.parametrize("layout", ["time_major", "batch_first", "unbatched", "no_state"])
def test_one_step_layers_equal_torch(cell, layout):
    kw = dict(num_layers=2, bidirectional=True, batch_first=layout == "batch_first")
    ref, fast = _pair(LAYERS[cell], cell, torch.float64, **kw)
    shape = {"time_major": (1, B), "batch_first": (B, 1), "unbatched": (1,), "no_state": (1, B)}[layout]
    x = torch.randn(*shape, I, dtype=torch.float64, requires_grad=True)
    state_shape = (4, H) if layout == "unbatched" else (4, B, H)
    _, state = _inputs((B,), cell, torch.float64, state_shape)
    if layout == "no_state":
        state = None
        got = [fast(x)[0], *_flat(fast(x)[1])]
        want = [ref(x)[0], *_flat(ref(x)[1])]
        for a, b in zip(got, want):
            assert_close(a, b, f"{cell} no state")
        assert f"fastrnn::{cell}_cell_fwd[cpp]" in _ranges(lambda: fast(x))
        return
    got, want = _run(fast, x, state), _run(ref, x, state)
    for k, (a, b) in enumerate(zip(got[0] + list(got[1]), want[0] + list(want[1]))):
        assert a.shape == b.shape
        assert_close(a, b, f"{cell} {layout} {k}", grad=k >= len(got[0]))
    names = _ranges(lambda: _run(fast, x, state))
    assert f"fastrnn::{cell}_cell_fwd[cpp]" in names and f"fastrnn::{cell}_layer_fwd[cpp]" not in names


@pytest.mark.parametrize("cell", list(CELLS))
def test_gradcheck_and_gradgradcheck(cell):
    _, fast = _pair(CELLS[cell], cell, torch.float64)
    names = [n for n, _ in fast.named_parameters()]
    x, state = _inputs((B,), cell, torch.float64, (B, H))

    def f(x, *rest):
        k = 2 if cell == "lstm" else 1
        st = tuple(rest[:k]) if cell == "lstm" else rest[0]
        return _flat(torch.func.functional_call(fast, dict(zip(names, rest[k:])), (x, st)))
    params = [p.detach().clone().requires_grad_() for p in fast.parameters()]
    args = (x, *_flat(state), *params)
    assert f"fastrnn::{cell}_cell_bwd[cpp]" in _ranges(lambda: sum(o.sum() for o in f(*args)).backward())
    assert gradcheck(f, args)
    assert gradgradcheck(f, args, fast_mode=True)


@pytest.mark.skipif(isinstance(cpp, str) or torch.bfloat16 not in cpp.dtypes, reason="no bf16 GEMMs on this CPU")
@pytest.mark.parametrize("cell", list(CELLS))
def test_bf16_step_equals_the_general_path(cell, monkeypatch):
    """A bf16 cell takes the step too, and gives the general path's numbers bit for bit (both
    compute in float32 around bf16 GEMMs: csrc/rnn.cpp, Low)."""
    _, fast = _pair(CELLS[cell], cell, torch.bfloat16)
    x, state = _inputs((B,), cell, torch.bfloat16, (B, H))
    step = _run(fast, x, state)
    names = _ranges(lambda: _run(fast, x, state))
    assert f"fastrnn::{cell}_cell_fwd[cpp]" in names and f"fastrnn::{cell}_layer_fwd[cpp]" not in names
    monkeypatch.setattr(fastrnn.ops.small_calls, "step", lambda *a, **k: None)
    general = _run(fast, x, state)
    assert f"fastrnn::{cell}_layer_fwd[cpp]" in _ranges(lambda: _run(fast, x, state))
    for k, (a, b) in enumerate(zip(step[0] + list(step[1]), general[0] + list(general[1]))):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), f"{cell} {k}"


def test_path_turned_down_runs_or_raises_as_torch():
    ref, fast = _pair("LSTMCell", "lstm")
    x, h, c = torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)
    # strides, dtypes and autocast the step does not take: the general path runs them
    xt = torch.randn(I, B).t()
    assert_close(fast(xt, (h, c))[0], ref(xt, (h, c))[0], "non-contiguous")
    assert "fastrnn::lstm_layer_fwd[cpp]" in _ranges(lambda: fast(xt, (h, c)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x, (h, c))[0].dtype == ref(x, (h, c))[0].dtype
    with pytest.raises(RuntimeError, match="dtype"):  # the general path's own message, as before
        fast(x.double(), (h, c))
    # torch's errors, word for word
    for bad in [(torch.randn(B, I + 1), (h, c)), (x, (torch.randn(B + 1, H), c)), (x, (h, torch.randn(B, H + 1)))]:
        with pytest.raises(RuntimeError) as want:
            ref(*bad)
        with pytest.raises(RuntimeError) as got:
            fast(*bad)
        assert str(got.value) == str(want.value)
    # a layer's state of the wrong shape: torch's message too
    ref_l, fast_l = _pair("GRU", "gru")
    with pytest.raises(RuntimeError) as want:
        ref_l(torch.randn(1, B, I), torch.randn(2, B, H))
    with pytest.raises(RuntimeError) as got:
        fast_l(torch.randn(1, B, I), torch.randn(2, B, H))
    assert str(got.value) == str(want.value)


def test_weights_changed_in_place_are_seen():
    """Nothing is cached between calls: an in-place update (an optimizer step, a copy_ under
    no_grad that leaves _version's meaning to the user) shows at the next call."""
    ref, fast = _pair("GRUCell", "gru")
    x, h = torch.randn(B, I), torch.randn(B, H)
    fast(x, h)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), fast.parameters()):
            p.mul_(1.5)
            q.mul_(1.5)
    assert_close(fast(x, h), ref(x, h), "after an in-place update")


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_and_batch_sizes(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in (1, 8, 15, 16, 40):  # both sides of the pack / in-place threshold (16 rows)
            ref, fast = _pair("LSTMCell", "lstm")
            x, state = _inputs((batch,), "lstm", torch.float32, (batch, H))
            got, want = _run(fast, x, state), _run(ref, x, state)
            for k, (a, b) in enumerate(zip(got[0] + list(got[1]), want[0] + list(want[1]))):
                assert_close(a, b, f"B={batch} {k}", grad=k >= len(got[0]))
    finally:
        torch.set_num_threads(old)


def test_cpp_entry_points_refuse_bad_arguments():
    C = cpp._C
    x, h, c = torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)
    w_ih, w_hh, b = torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H)
    assert len(C.cell_forward(0, x, h, c, w_ih, w_hh, b, b, True)) == 5  # h', c', h_seq, gates, c_seq
    for args in [(0, x, h, None, w_ih, w_hh, b, b), (1, x, h, c, w_ih, w_hh, b, b), (0, x, h, c, w_ih.t(), w_hh, b, b),
                 (0, x.double(), h, c, w_ih, w_hh, b, b), (0, x, h, c, w_ih, w_hh, b[:-1], b),
                 (7, x, h, c, w_ih, w_hh, b, b), (0, x[:0], h[:0], c[:0], w_ih, w_hh, b, b)]:
        assert C.cell_forward(*args, False) == [] and C.cell_step(*args) == []
    out = C.cell_forward(0, x, h, c, w_ih, w_hh, b, b, True)
    with pytest.raises(RuntimeError):
        C.cell_backward(0, h, c, x, h, c, w_ih, w_hh, out[3:], [True] * 7)  # saved tuple short
    with pytest.raises(RuntimeError):
        C.cell_backward(0, h, c, x, h, c, w_ih, w_hh, out[2:], [True] * 6)
    with pytest.raises(RuntimeError):
        C.cell_backward(0, h[:, :-1], c, x, h, c, w_ih, w_hh, out[2:], [True] * 7)


def test_autograd_edges():
    """The step's C++ autograd node as torch's own ops behave: one output used, inference_mode,
    in-place changes of a saved input detected, threads."""
    ref, fast = _pair("LSTMCell", "lstm")
    x, (h, c) = _inputs((B,), "lstm", torch.float32, (B, H))
    # only c' reaches the loss: grad_h arrives undefined
    got = torch.autograd.grad(fast(x, (h, c))[1].sum(), [x, h, c, fast.weight_hh])
    want = torch.autograd.grad(ref(x, (h, c))[1].sum(), [x, h, c, ref.weight_hh])
    for a, b in zip(got, want):
        assert_close(a, b, "c' only", grad=True)
    with torch.inference_mode():
        out = fast(x, (h, c))[0]
    assert out.is_inference() and not out.requires_grad
    y = x.detach().clone().requires_grad_()
    z = y * 1  # a non-leaf input the node saves
    out = fast(z, (h, c))[0].sum()
    with torch.no_grad():
        z.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
    # several Python threads at once, each with its own graph
    import threading
    results, errors = {}, []

    def work(k):
        try:
            xk = torch.randn(B, I, generator=torch.Generator().manual_seed(k), requires_grad=True)
            results[k] = torch.autograd.grad(fast(xk, (h.detach(), c.detach()))[0].sum(), xk)[0]
            want = torch.autograd.grad(ref(xk, (h.detach(), c.detach()))[0].sum(), xk)[0]
            assert_close(results[k], want, f"thread {k}", grad=True)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4


def test_what_must_see_every_op_gets_the_general_path():
    """Tensor subclasses, dispatch modes, the TorchScript tracer and lazily negated tensors do not
    take the step (it calls no registered op they could see)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    _, fast = _pair("GRUCell", "gru")
    x, h = torch.randn(B, I), torch.randn(B, H)
    with Ops():
        fast(x, h)
    assert any(name.startswith("fastrnn.") for name in Ops.seen), Ops.seen  # the registered op ran

    class Logged(torch.Tensor):
        seen = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})
    out = fast(x.as_subclass(Logged), h)
    assert Logged.seen and isinstance(out, torch.Tensor)

    traced = torch.jit.trace(fast, (x, h), check_trace=False)
    x2 = torch.randn(B, I)
    assert_close(traced(x2, h), fast(x2, h), "traced with other inputs")

    neg = torch._neg_view(-x)  # holds x's negation in memory, reads as x
    assert_close(fast(neg, h), fast(x, h), "negative view")
