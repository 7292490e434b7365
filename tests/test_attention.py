"""fastrnn.scaled_dot_product_attention against F.scaled_dot_product_attention (torch 2.13), for
every backend usable on CPU: outputs and q/k/v gradients on odd shapes, masks, causal, GQA,
dropout, huge logits, fully masked rows, low precision, errors."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastrnn
from fastrnn import backends
from fastrnn.contract.sdpa import SdpaMask
from fastrnn.ops.attention import sdpa
from fastrnn.testing import assert_close, assert_low_precision

BACKENDS = fastrnn.available_backends("cpu", "sdpa")
# FASTRNN_TEST_DEVICE=cuda runs the tests that take DEVICE_BACKENDS on the GPU (bench/gpu_check.py
# does, with compiled triton kernels); the others build their tensors on the CPU and stay there.
DEVICE = os.environ.get("FASTRNN_TEST_DEVICE", "cpu")
DEVICE_BACKENDS = fastrnn.available_backends(DEVICE, "sdpa")
# The triton interpreter runs one program at a time in numpy: it gets the small cases only.
SLOW = {"triton"} if DEVICE == "cpu" else set()


def rand_mask(shape, p_keep=0.7):
    return torch.rand(shape) < p_keep


# (id, q shape, k shape, v shape, kwargs builder, small enough for the interpreter)
CASES = [
    ("3d", (3, 37, 16), (3, 70, 16), (3, 70, 9), lambda: {}, True),
    ("4d_L>S", (2, 3, 41, 8), (2, 3, 19, 8), (2, 3, 19, 12), lambda: {}, True),
    ("2d", (21, 8), (33, 8), (33, 5), lambda: {}, True),
    ("5d_broadcast", (2, 1, 3, 9, 8), (1, 2, 3, 13, 8), (2, 2, 1, 13, 8), lambda: {}, False),
    ("causal_L<S", (2, 3, 37, 16), (2, 3, 70, 16), (2, 3, 70, 16), lambda: dict(is_causal=True), True),
    ("causal_L>S", (2, 2, 70, 16), (2, 2, 37, 16), (2, 2, 37, 16), lambda: dict(is_causal=True), True),
    ("causal_long", (1, 2, 130, 16), (1, 2, 130, 16), (1, 2, 130, 16), lambda: dict(is_causal=True), False),
    ("scale", (2, 3, 17, 8), (2, 3, 29, 8), (2, 3, 29, 8), lambda: dict(scale=0.37), True),
    ("bool_mask_LS", (2, 3, 37, 8), (2, 3, 45, 8), (2, 3, 45, 7),
     lambda: dict(attn_mask=rand_mask((37, 45))), True),
    ("bool_mask_key_padding", (2, 3, 37, 8), (2, 3, 45, 8), (2, 3, 45, 7),
     lambda: dict(attn_mask=rand_mask((2, 1, 1, 45))), True),
    ("bool_mask_full", (2, 3, 37, 8), (2, 3, 45, 8), (2, 3, 45, 7),
     lambda: dict(attn_mask=rand_mask((2, 3, 37, 45))), False),
    ("float_mask_heads", (2, 3, 37, 8), (2, 3, 45, 8), (2, 3, 45, 7),
     lambda: dict(attn_mask=torch.randn(3, 1, 45)), True),
    ("float_mask_batch", (2, 3, 37, 8), (2, 3, 45, 8), (2, 3, 45, 7),
     lambda: dict(attn_mask=torch.randn(2, 1, 37, 45)), False),
    ("float_mask_with_-inf", (2, 3, 37, 8), (2, 3, 45, 8), (2, 3, 45, 7),
     lambda: dict(attn_mask=torch.randn(37, 45).masked_fill(rand_mask((37, 45), 0.4), -math.inf)), True),
    ("gqa", (2, 6, 23, 8), (2, 2, 31, 8), (2, 2, 31, 8), lambda: dict(enable_gqa=True), True),
    ("gqa_mask_scale", (2, 4, 23, 8), (2, 1, 31, 8), (2, 1, 31, 5),
     lambda: dict(enable_gqa=True, scale=0.2, attn_mask=rand_mask((2, 4, 23, 31))), False),
    ("gqa_kv_heads_differ", (2, 4, 9, 8), (2, 2, 11, 8), (2, 1, 11, 8),
     lambda: dict(enable_gqa=True), False),
    ("gqa_causal", (1, 4, 33, 16), (1, 2, 33, 16), (1, 2, 33, 16),
     lambda: dict(enable_gqa=True, is_causal=True), False),
]


def case_params():
    for backend in DEVICE_BACKENDS:
        for case in CASES:
            if backend in SLOW and not case[5]:
                continue
            yield pytest.param(backend, *case[1:5], id=f"{backend}-{case[0]}")


def make_qkv(qs, ks, vs, dtype, logit_scale=1.0, device="cpu"):
    q = torch.randn(qs, dtype=dtype) * logit_scale
    k = torch.randn(ks, dtype=dtype)
    v = torch.randn(vs, dtype=dtype)
    return q.to(device), k.to(device), v.to(device)


def run_both(backend, q, k, v, kwargs, grad_out=None):
    """(torch's output and grads, fastrnn's output and grads) for the same inputs."""
    results = []
    for fn in (F.scaled_dot_product_attention,
               lambda *a, **kw: fastrnn.scaled_dot_product_attention(*a, backend=backend, **kw)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, **kwargs)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        out.backward(grad_out)
        results.append(dict(out=out.detach(), grad_q=leaves[0].grad, grad_k=leaves[1].grad,
                            grad_v=leaves[2].grad))
    return results


def assert_all_close(expected, actual, tag):
    for name, exp in expected.items():
        assert_close(actual[name], exp, f"{tag}/{name}", grad=name.startswith("grad"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend,qs,ks,vs,kwargs", list(case_params()))
def test_matches_torch(backend, qs, ks, vs, kwargs, dtype):
    kw = kwargs()
    if "attn_mask" in kw:
        mask = kw["attn_mask"]
        kw["attn_mask"] = mask.to(DEVICE, dtype if mask.is_floating_point() else mask.dtype)
    q, k, v = make_qkv(qs, ks, vs, dtype, device=DEVICE)
    expected, actual = run_both(backend, q, k, v, kw)
    assert_all_close(expected, actual, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_match_torch(backend):
    """torch 2.13 on CPU returns zeros (not NaN) for a query row that sees no key, and zero
    gradients through it; bool and float (-inf) masks alike."""
    q, k, v = make_qkv((2, 2, 19, 8), (2, 2, 23, 8), (2, 2, 23, 8), torch.float64)
    keep = rand_mask((2, 2, 19, 23))
    keep[0, 1, 3] = False
    keep[1, :, 7] = False
    float_mask = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, -math.inf)
    for mask in (keep, float_mask):
        expected, actual = run_both(backend, q, k, v, dict(attn_mask=mask))
        assert torch.all(expected["out"][0, 1, 3] == 0)  # the premise: torch gives zeros
        assert_all_close(expected, actual, backend)
        assert torch.all(actual["out"][1, :, 7] == 0) and torch.all(actual["grad_q"][1, :, 7] == 0)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_huge_logits_finite(backend):
    """Scores around 1e4: the running max keeps exp in range."""
    q, k, v = make_qkv((2, 2, 17, 8), (2, 2, 29, 8), (2, 2, 29, 8), torch.float64, logit_scale=3e3,
                       device=DEVICE)
    expected, actual = run_both(backend, q, k, v, {})
    for name, t in actual.items():
        assert torch.isfinite(t).all(), f"{backend}/{name} not finite"
    assert_all_close(expected, actual, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_like_torch(backend):
    q, k, v = make_qkv((2, 3, 17, 8), (2, 3, 21, 8), (2, 3, 21, 8), torch.float32)
    q[0, 0, 3, 2] = math.nan  # one query row
    k[1, 2, 5, 0] = math.nan  # every row of one head
    mask = torch.zeros(17, 21)
    mask[9, 4] = math.inf  # +inf score: inf - inf in the softmax, NaN in torch
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    actual = fastrnn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    assert torch.equal(actual.isnan(), expected.isnan())
    assert_close(actual, expected, backend)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", ["L0", "S0", "N0"])
def test_empty(backend, shape):
    L, S, N = (0 if shape == s else n for s, n in (("L0", 5), ("S0", 6), ("N0", 2)))
    q, k, v = make_qkv((N, 2, L, 4), (N, 2, S, 4), (N, 2, S, 3), torch.float64, device=DEVICE)
    expected, actual = run_both(backend, q, k, v, {})
    assert_all_close(expected, actual, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_gradient(backend):
    """A float mask that requires grad gets torch's gradient (summed over its broadcast dims)."""
    q, k, v = make_qkv((2, 3, 13, 8), (2, 3, 17, 8), (2, 3, 17, 8), torch.float64)
    mask_values = torch.randn(3, 1, 17, dtype=torch.float64)
    grads = []
    for fn in (F.scaled_dot_product_attention,
               lambda *a, **kw: fastrnn.scaled_dot_product_attention(*a, backend=backend, **kw)):
        mask = mask_values.clone().requires_grad_()
        fn(q, k, v, attn_mask=mask).pow(2).sum().backward()
        grads.append(mask.grad)
    assert_close(grads[1], grads[0], f"{backend}/grad_mask", grad=True)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision(backend, dtype):
    """CPU backends compute half inputs in float32: error at most 2x torch's own in that dtype."""
    q, k, v = make_qkv((2, 2, 33, 16), (2, 2, 41, 16), (2, 2, 41, 16), torch.float64, device=DEVICE)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    lowp = [t.to(dtype) for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*lowp, is_causal=True)
    actual = fastrnn.scaled_dot_product_attention(*lowp, is_causal=True, backend=backend)
    assert actual.dtype == dtype
    assert_low_precision(actual, expected, ref, f"{backend}/{dtype}")


# -- gradcheck (float64), with and without dropout ---------------------------------------------

def _contract_fn(backend, mask, causal, dropout_p, seed, scale=0.4):
    seed = torch.tensor(seed) if dropout_p > 0 else None
    return lambda q, k, v: sdpa(backend, q, k, v, mask, scale, causal, dropout_p, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["plain", "dropout"])
def test_gradcheck(backend, dropout_p):
    """Backward is the derivative of forward; with a fixed seed this also proves that backward
    regenerates the very dropout mask forward used."""
    N, Nk, L, S, E, Ev = 4, 2, 5, 7, 3, 4  # GQA group of 2
    q = torch.randn(N, L, E, dtype=torch.float64, requires_grad=True)
    k = torch.randn(Nk, S, E, dtype=torch.float64, requires_grad=True)
    v = torch.randn(Nk, S, Ev, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, L, S, dtype=torch.float64).masked_fill(rand_mask((2, L, S), 0.2), -math.inf)
    bias[0, 1] = -math.inf  # a fully masked row
    mask = SdpaMask(bias, torch.tensor([0, 1, 1, 0]))
    for m, causal in ((mask, False), (None, True)):
        # fast mode (random projections) for the interpreter: a full Jacobian is ~600 calls
        torch.autograd.gradcheck(_contract_fn(backend, m, causal, dropout_p, 12345), (q, k, v),
                                 fast_mode=backend in SLOW)


# -- dropout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_rate(backend):
    """q = k = 0 makes every weight 1/S; v = I makes out[i, j] = z_ij / S, so the output shows
    the dropout mask itself: keep rate ~ 1 - p, kept entries scaled by 1 / (1 - p)."""
    p, L, S = 0.3, 64, 96 if backend not in SLOW else 32
    q, k = torch.zeros(2, 2, L, 8), torch.zeros(2, 2, S, 8)
    v = torch.eye(S).expand(2, 2, S, S)
    out = fastrnn.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    kept = out != 0
    n = kept.numel()
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"keep rate {rate:.4f}, expected {1 - p}"
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / ((1 - p) * S)))
    # rows and heads get different masks
    assert not torch.equal(kept[0, 0, 0], kept[0, 0, 1]) and not torch.equal(kept[0, 0], kept[1, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_seeded(backend):
    """torch.manual_seed fixes the mask; a new draw changes it; p = 1 gives zeros as torch."""
    q, k, v = make_qkv((2, 2, 19, 8), (2, 2, 23, 8), (2, 2, 23, 8), torch.float32)
    run = lambda p=0.4: fastrnn.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    torch.manual_seed(7)
    a = run()
    torch.manual_seed(7)
    b = run()
    c = run()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(run(1.0), F.scaled_dot_product_attention(q, k, v, dropout_p=1.0))


@pytest.mark.parametrize("backend", [b for b in DEVICE_BACKENDS if b != "torch"])
def test_dropout_matches_reference(backend):
    """Same seed -> the same mask bits as the reference (forward and all gradients)."""
    dtype, device = torch.float64, DEVICE
    N, Nk, L, S, E, Ev = 6, 3, 37, 45, 8, 5
    q = torch.randn(N, L, E, dtype=dtype, device=device)
    k = torch.randn(Nk, S, E, dtype=dtype, device=device)
    v = torch.randn(Nk, S, Ev, dtype=dtype, device=device)
    mask = SdpaMask(torch.randn(1, L, S, dtype=dtype, device=device).expand(1, L, S),
                    torch.zeros(N, dtype=torch.long, device=device))
    g = torch.randn(N, L, Ev, dtype=dtype, device=device)
    res = {}
    for name in ("torch", backend):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = _contract_fn(name, mask, False, 0.25, 987654321)(*leaves)
        out.backward(g)
        res[name] = dict(out=out.detach(), grad_q=leaves[0].grad, grad_k=leaves[1].grad,
                         grad_v=leaves[2].grad)
    assert_all_close(res["torch"], res[backend], f"{backend}/dropout")


def test_dropout_hash_is_uniform():
    """The reference hash: keep rate per row and per column close to 1 - p."""
    ref = backends.load("torch", "sdpa")
    n = torch.arange(4).view(-1, 1, 1)
    i = torch.arange(256).view(1, -1, 1)
    j = torch.arange(256).view(1, 1, -1)
    keep = ref.dropout_keep(99, n, i, j, 0.5).double()
    assert abs(keep.mean().item() - 0.5) < 0.005
    assert (keep.mean(-1) - 0.5).abs().max().item() < 0.15
    assert (keep.mean(-2) - 0.5).abs().max().item() < 0.15


# -- errors -----------------------------------------------------------------------------------

def _bad_inputs():
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 6)
    return {
        "E_mismatch": ((q, k[..., :7], v), {}),
        "S_mismatch": ((q, k, v[..., :4, :]), {}),
        "mask_shape": ((q, k, v), dict(attn_mask=torch.ones(4, 4, dtype=torch.bool))),
        "mask_too_many_dims": ((q, k, v), dict(attn_mask=torch.ones(2, 3, 4, 5, 2, dtype=torch.bool))),
        "mask_and_causal": ((q, k, v), dict(attn_mask=torch.ones(4, 5, dtype=torch.bool), is_causal=True)),
        "mask_int": ((q, k, v), dict(attn_mask=torch.ones(4, 5, dtype=torch.int64))),
        "mask_double_for_float": ((q, k, v), dict(attn_mask=torch.ones(4, 5, dtype=torch.float64))),
        "dtype_mismatch": ((q, k.double(), v), {}),
        "int_inputs": ((q.int(), k.int(), v.int()), {}),
        "batch_mismatch": ((q, k[:, :2], v[:, :2]), {}),
        "gqa_not_divisible": ((torch.randn(2, 4, 4, 8), k, v), dict(enable_gqa=True)),
        "gqa_2d": ((q[0, 0], k[0, 0], v[0, 0]), dict(enable_gqa=True)),
        "1d": ((q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), {}),
        "dropout_above_1": ((q, k, v), dict(dropout_p=1.5)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_raise_like_torch(backend, case):
    args, kwargs = _bad_inputs()[case]
    with pytest.raises(Exception) as torch_err:
        F.scaled_dot_product_attention(*args, **kwargs)
    with pytest.raises(torch_err.type):
        fastrnn.scaled_dot_product_attention(*args, backend=backend, **kwargs)


def test_unknown_backend_says_why():
    q = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="unknown backend"):
        fastrnn.scaled_dot_product_attention(q, q, q, backend="nope")


def test_profiler_names():
    backend = BACKENDS[0]
    q = torch.randn(2, 5, 4, requires_grad=True)
    with torch.profiler.profile() as prof:
        fastrnn.scaled_dot_product_attention(q, q, q, backend=backend).sum().backward()
    names = {e.name for e in prof.events()}
    assert f"fastrnn::sdpa_fwd[{backend}]" in names and f"fastrnn::sdpa_bwd[{backend}]" in names



def test_every_cpu_backend_has_sdpa():
    """The sdpa modules of all backends exist (availability may still depend on the machine)."""
    for name in backends.BACKENDS:
        mod = backends.load(name, "sdpa")
        assert not (isinstance(mod, str) and "does not implement" in mod), f"{name}: {mod}"


def test_required_backends_serve_sdpa():
    """CI's FASTRNN_REQUIRE_BACKENDS (checked for the rnn op by conftest) holds for sdpa too, so a
    backend that fails to build or import cannot silently drop out of the parametrisation."""
    required = [b for b in os.environ.get("FASTRNN_REQUIRE_BACKENDS", "").split(",") if b]
    missing = {b: backends.unavailable_reason(b, "cpu", "sdpa") for b in required}
    assert not {b: r for b, r in missing.items() if r is not None}
