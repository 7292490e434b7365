"""Attention benchmarks: fastrnn.scaled_dot_product_attention per backend against
F.scaled_dot_product_attention (torch's CPU flash kernel). Groups "sdpa <shape> <mode>"."""
import pytest
import torch
import torch.nn.functional as F

import fastrnn
from fastrnn.testing import max_error

BACKENDS = [b for b in fastrnn.available_backends("cpu", "sdpa") if b != "triton"]
# (B, H, L, S, E, causal)
SHAPES = {"full": [(4, 8, 512, 512, 64, False), (4, 8, 512, 512, 64, True), (1, 8, 2048, 2048, 64, False)],
          "quick": [(1, 2, 33, 47, 16, False), (1, 2, 33, 33, 16, True)]}


def sid(B, H, L, S, E, causal):
    return f"B{B}_H{H}_L{L}_S{S}_E{E}{'_causal' if causal else ''}"


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = SHAPES[metafunc.config.getoption("--bench-grid")]
        metafunc.parametrize("shape", shapes, ids=[sid(*s) for s in shapes])


@pytest.mark.parametrize("who", ["torch_sdpa"] + BACKENDS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_sdpa(benchmark, shape, mode, who):
    B, H, L, S, E, causal = shape
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, S, E)
    if who == "torch_sdpa":
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        fn = lambda q, k, v: fastrnn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=who)
    with torch.no_grad():  # correctness gate
        assert max_error(fn(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=causal)) < 1e-4
    benchmark.group = f"sdpa {sid(*shape)} {mode}"
    benchmark.extra_info.update(flops_fwd=4 * B * H * L * S * E // (2 if causal else 1))
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v)
    else:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def run():
            fn(qg, kg, vg).sum().backward()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
