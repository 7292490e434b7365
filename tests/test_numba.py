"""Numba-specific tests. The shared contract and module tests (test_backend_contract.py,
test_modules.py) already run the numba backend against the reference; this file covers what
only the numba backend has: threads, its own float32 activation functions, NaN / inf
propagation through the compiled kernels, the inference path's scratch buffers, float64
gradcheck through the modules, and the on-disk compile cache."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn import backends
from fastrnn.contract.rnn import GATES, Variant
from fastrnn.testing import assert_close

import contract_harness as harness

numba_rnn = backends.load("numba", "rnn")
pytestmark = pytest.mark.skipif(backends.unavailable_reason("numba", "cpu", "rnn") is not None,
                                reason=f"numba backend unavailable: {backends.unavailable_reason('numba')}")

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


def contract_case(cell, proj, dtype, T=6, B=4, H=5, packed=True):
    G, Hr = GATES[cell] * H, proj or H
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    return dict(xw=r(T, B, G), w_hh=r(G, Hr) * 0.4, b_hh=r(G) * 0.3, h0=r(B, Hr),
                c0=r(B, H) if cell == "lstm" else None, w_hr=r(Hr, H) * 0.4 if proj else None,
                batch_sizes=torch.tensor([4, 4, 3, 2, 2, 1][:T]) if packed else None)


def forward(backend, cell, case, reverse, training):
    args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    return backends.load(backend, "rnn").rnn_forward(cell, **args, reverse=reverse, training=training)


# --------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------
@pytest.fixture
def restore_threads():
    import numba
    saved = torch.get_num_threads(), numba.get_num_threads()
    yield
    numba.set_num_threads(saved[1])
    torch.set_num_threads(saved[0])


def test_set_num_threads_sets_torch_and_numba(restore_threads):
    import numba
    for n in (1, 2):
        fastrnn.set_num_threads(n)
        assert torch.get_num_threads() == n
        assert fastrnn.get_num_threads() == n
        assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)
    with pytest.raises(ValueError):
        fastrnn.set_num_threads(0)


def test_set_num_threads_beyond_numba_pool(restore_threads):
    """More threads than numba started with: torch gets them all, numba its maximum."""
    import numba
    n = numba.config.NUMBA_NUM_THREADS + 1
    fastrnn.set_num_threads(n)
    assert torch.get_num_threads() == n
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS


def test_backend_leaves_torch_threads_alone(restore_threads):
    """Running the numba backend (module forward and backward) never changes torch's count."""
    torch.set_num_threads(1)
    lstm = fastrnn.LSTM(3, 4, backend="numba")
    out, _ = lstm(torch.randn(5, 2, 3))
    out.sum().backward()
    assert torch.get_num_threads() == 1


def test_backend_restores_torch_threads_reset_by_numba(restore_threads, monkeypatch):
    """numba#9387: where numba and torch share one OpenMP runtime, starting numba's pool resets
    torch's thread count. Simulate that inside the kernel; the backend must undo it."""
    k = numba_rnn._kernels_or_raise()
    numba_rnn._ensure_compiled(np.dtype(np.float32))   # before the kernel is swapped out
    real = k.rnn_forward

    class ResettingKernel:
        def __call__(self, *args):
            torch.set_num_threads(2 if torch.get_num_threads() == 1 else 1)
            return real(*args)

    monkeypatch.setattr(k, "rnn_forward", ResettingKernel())
    before = torch.get_num_threads()
    numba_rnn.rnn_forward("gru", **contract_case("gru", 0, torch.float32), reverse=False, training=False)
    assert torch.get_num_threads() == before


# --------------------------------------------------------------------------------------------
# numerics of the compiled kernels
# --------------------------------------------------------------------------------------------
def test_float32_activations_match_torch():
    """The float32 kernels use their own exp; it must be as accurate as torch's float32 (a few
    ulp) over the whole range, and keep NaN, +-inf, huge and tiny arguments right."""
    from numba import njit

    from fastrnn._numba import rnn_kernels as rk

    @njit
    def apply(x, s, t):
        for j in range(x.shape[0]):
            s[j] = rk.sigmoid(x[j])
            t[j] = rk.tanh(x[j])

    special = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30, 1e-3, 0.2499, 0.25, 88.5, -88.5, 1e30, -1e30]
    x = np.concatenate([np.random.default_rng(0).standard_normal(20000) * 6,
                        np.linspace(-100, 100, 20001), special]).astype(np.float32)
    s, t = np.empty_like(x), np.empty_like(x)
    apply(x, s, t)
    x64 = torch.from_numpy(x).double()
    for name, got, exact in [("sigmoid", s, x64.sigmoid()), ("tanh", t, x64.tanh())]:
        got = torch.from_numpy(got).double()
        assert torch.equal(got.isnan(), exact.isnan()), f"{name}: NaN pattern differs"
        fin = ~exact.isnan()
        err = ((got - exact).abs() / exact.abs().clamp_min(1e-6))[fin].max().item()
        assert err < 5e-7, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", CELLS)
def test_nan_and_inf_propagate_like_reference(cell, dtype):
    """A NaN / inf in the input, in h0 and in the incoming gradient reaches exactly the same
    outputs and gradients as in the reference (no fast-math assumption of finite values)."""
    proj = 2 if cell == "lstm" else 0
    case = contract_case(cell, proj, dtype, packed=False)
    case["xw"][1, 0, 0] = float("nan")
    case["xw"][2, 1, -1] = float("inf")
    case["xw"][3, 2, 1] = -float("inf")
    case["h0"][3, 0] = float("nan")
    g = torch.randn(*case["xw"].shape[:2], proj or 5, dtype=dtype)
    g[4, 2, 0] = float("nan")
    results = {}
    for backend in ("torch", "numba"):
        h_seq, h_T, c_T, saved = forward(backend, cell, case, reverse=False, training=True)
        back = backends.load(backend, "rnn").rnn_backward(
            cell, g.clone(), torch.randn(h_T.shape, dtype=dtype, generator=torch.Generator().manual_seed(3)),
            None if c_T is None else torch.ones_like(c_T), case["w_hh"], case["w_hr"], case["h0"], case["c0"],
            None, False, saved)
        results[backend] = dict(h_seq=h_seq, h_T=h_T, c_T=c_T, grad_xw=back[0], grad_hw=back[1],
                                grad_h0=back[2], grad_c0=back[3])
    assert results["torch"]["h_seq"].isnan().any(), "test input did not produce a NaN"
    for name, exp in results["torch"].items():
        act = results["numba"][name]
        if exp is None:
            assert act is None
            continue
        assert torch.equal(act.isnan(), exp.isnan()), f"{cell}/{name}: NaN pattern differs"
        assert torch.equal(act.isinf(), exp.isinf()), f"{cell}/{name}: inf pattern differs"
        fin = torch.isfinite(exp)
        assert_close(act[fin], exp[fin], f"{cell}/{name}", grad=name.startswith("grad"))


@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 2), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0)])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_inference_path_matches_reference(cell, proj, reverse):
    """training=False runs on [B, H] scratch instead of per-step buffers; packed and reverse
    included (the shared contract test covers this path only padded and without bias None)."""
    case = contract_case(cell, proj, torch.float32)
    h_seq, h_T, c_T, saved = forward("numba", cell, case, reverse, training=False)
    ref = forward("torch", cell, case, reverse, training=False)
    assert saved == ()
    for name, a, e in zip(("h_seq", "h_T", "c_T"), (h_seq, h_T, c_T), ref[:3]):
        assert_close(a, e, f"{cell}/{name}")


def _run_contract(backend, cell, case, grads, reverse, variant=None):
    """tests/contract_harness.run, without the saved tuple."""
    out = harness.run(backends.load(backend, "rnn"), cell, case, variant,
                      dict(grad_h_seq=grads[0], grad_h_T=grads[1], grad_c_T=grads[2]), reverse)
    out.pop("saved")
    return out


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 70), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0)])
def test_tiles_groups_and_threads_match_reference(cell, proj, parallel, monkeypatch):
    """Sizes the shared contract test does not reach: full register tiles (16 rows: tiles of
    6 and 8 rows), more hidden units than one unit group (H = 130 > 128, with a ragged last
    panel), several panels per thread, and the parallel step (forced by PAR_MIN_MACS = 0)."""
    monkeypatch.setattr(numba_rnn, "PAR_MIN_MACS", 0 if parallel else 1 << 62)
    T, B, H = 4, 16, 130
    G, Hr = GATES[cell] * H, proj or H
    r = lambda *s: torch.randn(*s)  # noqa: E731
    case = dict(xw=r(T, B, G), w_hh=r(G, Hr) * 0.1, b_hh=r(G) * 0.3, h0=r(B, Hr),
                c0=r(B, H) if cell == "lstm" else None, w_hr=r(Hr, H) * 0.1 if proj else None,
                batch_sizes=torch.tensor([16, 13, 7, 1]))
    active = (torch.arange(B) < case["batch_sizes"].unsqueeze(1)).unsqueeze(-1)
    grads = (r(T, B, Hr) * active, r(B, Hr), r(B, H) if cell == "lstm" else None)
    for reverse in (False, True):
        expected = _run_contract("torch", cell, case, grads, reverse)
        actual = _run_contract("numba", cell, case, grads, reverse)
        for name, exp in expected.items():
            assert_close(actual[name], exp, f"{cell}/{name}/reverse={reverse}", grad=name.startswith("grad"))


def _variant_case(cell, proj, before, T, B, H, batch_sizes, dtype):
    """Every option the cell takes at once (GRU: reset_after=False instead of layer norm when
    ``before``), random, with zoneout drawn 0/1 as in training."""
    G, Hr = GATES[cell] * H, proj or H
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    case = dict(xw=r(T, B, G), w_hh=r(G, Hr) * 0.1, b_hh=r(G) * 0.3, h0=r(B, Hr),
                c0=r(B, H) if cell == "lstm" else None, w_hr=r(Hr, H) * 0.1 if proj else None,
                batch_sizes=batch_sizes)
    kw = dict(rec_mask=(torch.rand(B, Hr) > 0.3).to(dtype) / 0.7, zoneout_h=(torch.rand(T, B, Hr) < 0.25).to(dtype),
              reset=torch.rand(T, B) < 0.2)
    if before:
        kw.update(reset_after=False)
    else:
        kw.update(ln_hh_weight=1 + 0.2 * r(G), ln_hh_bias=0.2 * r(G))
    if cell == "lstm":
        kw.update(ln_c_weight=1 + 0.2 * r(H), ln_c_bias=0.2 * r(H), peephole=r(3, H) * 0.3,
                  zoneout_c=(torch.rand(T, B, H) < 0.25).to(dtype))
    return case, Variant(**kw)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("cell,proj,before", [("lstm", 0, False), ("lstm", 70, False), ("gru", 0, False),
                                              ("gru", 0, True), ("rnn_tanh", 0, False), ("rnn_relu", 0, False)])
def test_variant_threads_and_panels_match_reference(cell, proj, before, parallel, monkeypatch):
    """The variant kernels at sizes the shared variant contract test does not reach: several
    weight panels per GEMM phase and per thread, rows split between threads in the row phases
    (the parallel phases forced by PAR_MIN_MACS = 0), several register tiles, a ragged last
    panel (H = 130), packed rows, both directions; every gradient and VariantGrads."""
    monkeypatch.setattr(numba_rnn, "PAR_MIN_MACS", 0 if parallel else 1 << 62)
    T, B, H = 4, 16, 130
    case, variant = _variant_case(cell, proj, before, T, B, H, torch.tensor([16, 13, 7, 1]), torch.float32)
    Hr = proj or H
    active = (torch.arange(B) < case["batch_sizes"].unsqueeze(1)).unsqueeze(-1)
    grads = (torch.randn(T, B, Hr) * active, torch.randn(B, Hr), torch.randn(B, H) if cell == "lstm" else None)
    for reverse in (False, True):
        expected = _run_contract("torch", cell, case, grads, reverse, variant)
        actual = _run_contract("numba", cell, case, grads, reverse, variant)
        for name, exp in expected.items():
            assert_close(actual[name], exp, f"{cell}/{name}/reverse={reverse}", grad=name != "h_seq"
                         and not name.endswith("_T"), scale=10 if name.startswith("vgrad") else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_big_gemms_match_torch(dtype):
    """linear / mm / mm_tn (the op code's GEMMs, run by the numba kernels) against torch at
    sizes with several row blocks and panels, ragged edges, and transposed operands."""
    M, K, N = 200, 70, 130
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    x, w, b = r(M, K), r(N, K), r(N)
    assert_close(numba_rnn.linear(x, w, b), torch.addmm(b, x, w.t()), "linear", scale=10)
    assert_close(numba_rnn.linear(x, w, None), x @ w.t(), "linear (no bias)", scale=10)
    a, bb = r(M, K), r(K, N)
    assert_close(numba_rnn.mm(a, bb), a @ bb, "mm", scale=10)
    assert_close(numba_rnn.mm(a, bb.t().contiguous().t()), a @ bb, "mm (b transposed view)", scale=10)
    a, bb = r(K * 5, M), r(K * 5, N)
    assert_close(numba_rnn.mm_tn(a, bb), a.t() @ bb, "mm_tn", scale=30)
    # N a whole number of panels: B [K, N] is used in place, without packing
    a, bb = r(M, K), r(K, 128)
    assert_close(numba_rnn.mm(a, bb), a @ bb, "mm (unpacked B)", scale=10)
    a, bb = r(K * 5, M), r(K * 5, 128)
    assert_close(numba_rnn.mm_tn(a, bb), a.t() @ bb, "mm_tn (unpacked B)", scale=30)


def test_long_sequence_stays_finite():
    """T = 10k with saturating inputs stays finite (stable activations); the first steps match
    the reference (which is too slow to run all 10k steps here)."""
    case = contract_case("lstm", 0, torch.float32, T=10000, B=2, packed=False)
    case["xw"] *= 20
    h_seq, h_T, c_T, _ = forward("numba", "lstm", case, reverse=False, training=False)
    assert torch.isfinite(h_seq).all() and torch.isfinite(c_T).all()
    head = dict(case, xw=case["xw"][:200])
    ref = forward("torch", "lstm", head, reverse=False, training=False)
    assert_close(h_seq[:200], ref[0], "lstm/h_seq[:200]")


def test_rejects_unsupported_dtype_and_device():
    case = contract_case("gru", 0, torch.float16, packed=False)
    with pytest.raises(TypeError, match="float32 and float64"):
        numba_rnn.rnn_forward("gru", **case, reverse=False, training=False)
    assert "CPU only" in numba_rnn.availability("cuda")
    assert numba_rnn.availability("cpu") is None
    # the GEMMs too, in bfloat16 (which numpy cannot even hold): the same error, not numpy's
    x, w = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(5, 4, dtype=torch.bfloat16)
    for call in (lambda: numba_rnn.linear(x, w, None), lambda: numba_rnn.mm(x, w.t()),
                 lambda: numba_rnn.mm_tn(x.t(), w.t())):
        with pytest.raises(TypeError, match="float32 and float64, not torch.bfloat16"):
            call()


# --------------------------------------------------------------------------------------------
# float64 gradcheck through the modules
# --------------------------------------------------------------------------------------------
GRADCHECK = [
    ("LSTM", dict(proj_size=2, bidirectional=True), True),
    ("LSTM", dict(num_layers=2), False),
    ("GRU", dict(bidirectional=True), True),
    ("RNN", dict(nonlinearity="relu", bidirectional=True), True),
    ("RNN", dict(nonlinearity="tanh"), False),
]


@pytest.mark.parametrize("kind,kw,packed", GRADCHECK,
                         ids=["lstm-proj-bidir-packed", "lstm-2layer", "gru-bidir-packed",
                              "rnn_relu-bidir-packed", "rnn_tanh"])
def test_gradcheck_float64(kind, kw, packed):
    I, H, T, B = 3, 4, 4, 3
    lengths = torch.tensor([4, 2, 3])
    m = getattr(fastrnn, kind)(I, H, backend="numba", dtype=torch.float64, **kw)
    D, L = (2 if m.bidirectional else 1), m.num_layers
    Hr = m.proj_size or H
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(L * D, B, Hr, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(L * D, B, H, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def f(x, h0, c0, *ps):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        hx = (h0, c0) if kind == "LSTM" else h0
        out, hidden = torch.func.functional_call(m, dict(zip(names, ps)), (inp, hx))
        if packed:
            out = pad_packed_sequence(out)[0]
        return (out,) + (hidden if kind == "LSTM" else (hidden,))

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params), atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# compile cache
# --------------------------------------------------------------------------------------------
def _info_in_subprocess(env_extra, warm):
    code = ("import json; from fastrnn.backends import numba_rnn; "
            f"print(json.dumps(numba_rnn.info(warm={warm}), default=str))")
    env = dict(os.environ, **env_extra)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(os.environ.get("FASTRNN_NUMBA_CACHE", "1") == "0", reason="cache disabled")
def test_cache_loads_compiled_kernels_in_a_new_process():
    """After this process compiled (and saved) the float32 kernels, a fresh process loads all
    of them from the cache instead of compiling them."""
    here = numba_rnn.info()
    assert here["cache"]["enabled"] and here["cache"]["dir"]
    there = _info_in_subprocess({}, warm=True)
    kernels = len(there["compile_seconds"]["float32"])
    assert kernels >= 2 and there["cache"]["hits"] == kernels and there["cache"]["misses"] == 0, there
    assert sum(there["compile_seconds"]["float32"].values()) < 5.0, there


def test_cache_can_be_turned_off():
    there = _info_in_subprocess({"FASTRNN_NUMBA_CACHE": "0"}, warm=False)
    assert there["cache"]["enabled"] is False and there["cache"]["dir"] is None
