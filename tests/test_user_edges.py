"""What users outside the team hit first: low precision and autocast, packed input with dropout,
backend names, convert() on subclasses, a failed C++ build, torch.compile from a fresh process."""
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import precision

BACKENDS = [b for b in fastrnn.available_backends("cpu") if b != "triton"]
LAYERS = ["LSTM", "GRU", "RNN"]


def _pair(cls, *args, backend, **kw):
    torch_m = getattr(nn, cls)(*args, **kw)
    fast_m = getattr(fastrnn, cls)(*args, backend=backend, **kw)
    fast_m.load_state_dict(torch_m.state_dict())
    return torch_m, fast_m


def _run_child(code: str, timeout=600):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


# ---- bf16 / fp16 modules and autocast --------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_module_matches_torch(cls, dtype, backend):
    """A module in bf16 / fp16 runs (computing in float32) and stays within the low-precision
    rule: its error against a float64 run is at most a few times torch's own in that dtype."""
    torch.manual_seed(0)
    t, f = _pair(cls, 7, 9, num_layers=2, backend=backend)
    x = torch.randn(5, 3, 7)
    t64 = getattr(nn, cls)(7, 9, num_layers=2).double()
    t64.load_state_dict(t.state_dict())
    exact = t64(x.double())[0]
    t, f = t.to(dtype), f.to(dtype)
    xl = x.to(dtype).requires_grad_()
    y_f, _ = f(xl)
    assert y_f.dtype == dtype
    y_t, _ = t(x.to(dtype))
    err_t = (y_t.double() - exact).abs().max().item()
    err_f = (y_f.double() - exact).abs().max().item()
    assert err_f <= 2 * err_t + 1e-3, (err_f, err_t)
    y_f.float().square().sum().backward()
    assert xl.grad.dtype == dtype and torch.isfinite(xl.grad).all()
    assert all(p.grad.dtype == dtype for p in f.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_follows_torch_policy(backend):
    """Under CPU autocast fastrnn gives each module the dtype torch's gives it (torch 2.13: LSTM
    unpacked, RNN, RNNCell, SDPA in bf16; packed LSTM, GRU, LSTMCell, GRUCell in float32), with the
    values of a run on bf16-rounded inputs and weights."""
    torch.manual_seed(1)
    x = torch.randn(6, 3, 5)
    packed = pack_padded_sequence(x, [6, 4, 2])
    cases = [("LSTM", x), ("LSTM", packed), ("GRU", x), ("RNN", x), ("RNN", packed)]
    for cls, inp in cases:
        t, f = _pair(cls, 5, 8, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_t, y_f = t(inp)[0], f(inp)[0]
        y_t, y_f = (y.data if isinstance(y, torch.nn.utils.rnn.PackedSequence) else y for y in (y_t, y_f))
        assert y_f.dtype == y_t.dtype, (cls, type(inp).__name__, y_f.dtype, y_t.dtype)
        assert (y_f.float() - y_t.float()).abs().max() < 3e-2, cls
    for cls in ("LSTMCell", "GRUCell", "RNNCell"):
        t, f = _pair(cls, 5, 8, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_t, out_f = t(x[0]), f(x[0])
        out_t = out_t[0] if isinstance(out_t, tuple) else out_t
        out_f = out_f[0] if isinstance(out_f, tuple) else out_f
        assert out_f.dtype == out_t.dtype, (cls, out_f.dtype, out_t.dtype)
        assert (out_f.float() - out_t.float()).abs().max() < 3e-2, cls
    q = torch.randn(2, 3, 7, 8)
    mask = torch.randn(7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        b = fastrnn.scaled_dot_product_attention(q, q, q, attn_mask=mask, backend=backend)
    assert b.dtype == a.dtype == torch.bfloat16
    assert (a.float() - b.float()).abs().max() < 2e-2


def test_autocast_does_not_leak_into_kernels():
    """Inside autocast a float32 GRU (left in float32 by torch's policy) computes in float32: the
    op's own GEMMs are not silently run in bf16."""
    torch.manual_seed(2)
    f = fastrnn.GRU(16, 16, backend="torch")
    x = torch.randn(4, 2, 16)
    plain = f(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = f(x)[0]
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=0, atol=1e-6)


def test_precision_cast_rule():
    t32, t64, ti = torch.ones(2), torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.int64)
    a, b, c, d = precision.cast((t32, t64, ti, None), torch.bfloat16)
    assert (a.dtype, b.dtype, c.dtype, d) == (torch.bfloat16, torch.float64, torch.int64, None)
    assert precision.autocast_dtype("lstm", "cpu") is None  # autocast off


def test_mixed_dtypes_still_raise():
    """A low-precision input is not a licence to mix dtypes outside autocast."""
    x = torch.randn(3, 2, 4, dtype=torch.bfloat16)  # float32 weights, bf16 input
    with pytest.raises(ValueError, match="does not match weight dtype"):
        nn.LSTM(4, 5)(x)
    with pytest.raises(ValueError, match="does not match weight dtype"):
        fastrnn.LSTM(4, 5, backend="torch")(x)
    w = [(torch.randn(20, 4), torch.randn(20, 5), None, None, None)]
    h0 = torch.zeros(1, 2, 5, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):
        fastrnn.functional.rnn("lstm", x, h0, h0, w, num_layers=1, bidirectional=False, backend="torch")


# ---- packed input + dropout between layers ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", LAYERS)
def test_packed_dropout_same_numbers_as_torch(cls, backend):
    t, f = _pair(cls, 5, 7, num_layers=3, dropout=0.4, bidirectional=True, backend=backend)
    x = torch.randn(6, 4, 5)
    p = pack_padded_sequence(x, [6, 5, 3, 1], enforce_sorted=False)
    torch.manual_seed(3)
    y_t, h_t = t(p)
    torch.manual_seed(3)
    y_f, h_f = f(p)
    torch.testing.assert_close(y_f.data, y_t.data, rtol=1e-5, atol=1e-5)
    for a, b in zip(h_f if isinstance(h_f, tuple) else (h_f,), h_t if isinstance(h_t, tuple) else (h_t,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- backend names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: fastrnn.LSTM(3, 4, backend="foo"),
    lambda: fastrnn.GRUCell(3, 4, backend="cuda"),
    lambda: fastrnn.Attention(4, backend="fast"),
    lambda: fastrnn.convert(nn.LSTM(3, 4), backend="nope"),
])
def test_unknown_backend_raises_at_construction(make):
    with pytest.raises(ValueError, match="unknown backend"):
        make()


def test_cli_rejects_unknown_and_unusable_backends(tmp_path):
    out = tmp_path / "bench"
    bad = subprocess.run([sys.executable, "-m", "fastrnn", "bench", "--backends", "foo", "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    # triton cannot run on this CPU without the interpreter: an error, not an empty table
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    unusable = subprocess.run([sys.executable, "-m", "fastrnn", "bench", "--backends", "triton", "--ops", "lstm",
                               "--quick", "--out", str(out)], capture_output=True, text=True, env=env)
    assert unusable.returncode == 2 and "cannot run here" in unusable.stderr
    assert not out.exists()


def test_failed_cpp_build_is_reported_once_at_first_use():
    """A missing C++ extension: the first automatic choice warns (what was wanted, why it is
    missing, what runs instead), once; info says why."""
    out = _run_child("""
        import sys, warnings
        sys.modules["fastrnn._C_rnn"] = None   # as if the extension had not been built
        import torch, fastrnn
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m = fastrnn.GRU(3, 4)
            m(torch.randn(2, 1, 3)); m(torch.randn(2, 1, 3))
        msgs = [str(x.message) for x in w if "fastrnn" in str(x.message)]
        print(len(msgs)); print(msgs[0] if msgs else "")
        print(fastrnn.backend_status("cpu")["cpp"])
    """)
    count, msg, status = out.strip().splitlines()[-3:]
    assert count == "1"
    assert "'cpp' is unavailable" in msg and "not built" in msg
    assert "using 'numba'" in msg or "using 'torch'" in msg
    assert "not built" in status


# ---- convert -------------------------------------------------------------------------------------

class _Mixin:
    def helper(self):
        return "mine"


class _UserLSTM(_Mixin, nn.LSTM):
    """A subclass whose forward wraps torch's (as pytorch-forecasting's LSTM does)."""

    def forward(self, x, hx=None):
        out, state = super().forward(x, hx)
        return out * 2, state


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = _UserLSTM(4, 6)
        self.dec = nn.GRU(6, 5)
        self.cell = nn.LSTMCell(4, 6)


def test_convert_warns_about_subclasses_and_reports():
    m = _Model()
    with pytest.warns(UserWarning, match=r"enc \(_UserLSTM\).*subclasses=True"):
        m2, report = fastrnn.convert(m, report=True)
    assert type(m2.enc) is _UserLSTM
    assert isinstance(m2.dec, fastrnn.GRU) and isinstance(m2.cell, fastrnn.LSTMCell)
    rows = {path: result for path, _, result in report}
    assert rows["enc"].startswith("skipped") and rows["dec"] == "GRU" and rows["cell"] == "LSTMCell"


@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_subclass_runs_fused_forward(backend):
    torch.manual_seed(4)
    m = _Model()
    x = torch.randn(5, 3, 4, requires_grad=True)
    ref, _ = m.enc(x)
    g_ref, = torch.autograd.grad(ref.sum(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped
        conv = fastrnn.convert(m, backend=backend, subclasses=(_UserLSTM,))
    enc = conv.enc
    assert isinstance(enc, _UserLSTM) and isinstance(enc, fastrnn.LSTM) and enc.helper() == "mine"
    with torch.profiler.profile() as prof:
        out, _ = enc(x)
    assert any(e.name.startswith("fastrnn::lstm_layer_fwd") for e in prof.events())  # the fused op ran
    g, = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    back = fastrnn.to_torch(conv)
    assert type(back.enc) is _UserLSTM and type(back.dec) is nn.GRU
    assert back.enc.weight_ih_l0 is m.enc.weight_ih_l0


# ---- torch.compile from a fresh process ------------------------------------------------------------

def test_compile_attention_fresh_process():
    """fullgraph compile of the attention function and module before any eager call (the
    registry imports backend modules lazily, which dynamo cannot trace)."""
    out = _run_child("""
        import torch, fastrnn
        q = torch.randn(2, 3, 5, 8, requires_grad=True)
        f = torch.compile(lambda q: fastrnn.scaled_dot_product_attention(q, q, q), backend="aot_eager",
                          fullgraph=True)
        y = f(q); y.sum().backward()
        m = torch.compile(fastrnn.Attention(8, score="general"), backend="aot_eager", fullgraph=True)
        c, _ = m(q, q)
        e = fastrnn.scaled_dot_product_attention(q.detach(), q.detach(), q.detach())
        print(float((y - e).abs().max()), tuple(c.shape))
    """)
    err, shape = out.strip().splitlines()[-1].split(" ", 1)
    assert float(err) < 1e-6 and shape == "(2, 3, 5, 8)"
