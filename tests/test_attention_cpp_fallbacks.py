"""The cpp attention backend's GEMM fallbacks (MKL sgemm/dgemm without brgemm; ATen without MKL),
built from csrc/sdpa.cpp with switches and checked against the reference backend.

Building two extra copies of the extension takes a minute or two, so this runs only with
FASTRNN_TEST_CPP_FALLBACKS=1 (the default build, tested everywhere else, uses brgemm)."""
import os

import pytest
import torch

from fastrnn.backends import reference_sdpa as ref
from fastrnn.contract.sdpa import SdpaMask
from fastrnn.testing import assert_close

pytestmark = pytest.mark.skipif(os.environ.get("FASTRNN_TEST_CPP_FALLBACKS") != "1",
                                reason="set FASTRNN_TEST_CPP_FALLBACKS=1 (builds two extensions)")

SRC = os.path.join(os.path.dirname(__file__), "..", "csrc", "sdpa.cpp")
VARIANTS = {"mkl": ["-DFASTRNN_MKL", "-DFASTRNN_NO_BRGEMM"], "aten": ["-DFASTRNN_NO_BRGEMM"]}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    from torch.utils.cpp_extension import load
    tag = request.param
    mod = load(f"fastrnn_sdpa_{tag}", [SRC], extra_cflags=["-O3", "-fopenmp"] + VARIANTS[tag],
               extra_ldflags=["-fopenmp"], build_directory=str(tmp_path_factory.mktemp(tag)))
    assert mod.blas == tag
    return mod


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("causal,masked,dropout_p", [(False, True, 0.0), (True, False, 0.3)],
                         ids=["mask", "causal_dropout"])
def test_fallback_matches_reference(variant, dtype, causal, masked, dropout_p):
    N, Nk, L, S, E, Ev = 6, 3, 77, 93, 16, 12
    q, k, v = (torch.randn(N, L, E, dtype=dtype), torch.randn(Nk, S, E, dtype=dtype),
               torch.randn(Nk, S, Ev, dtype=dtype))
    mask = SdpaMask(torch.randn(2, L, S, dtype=dtype), torch.tensor([0, 1, 1, 0, 1, 0])) if masked else None
    bias, rows = (mask.bias, mask.rows) if masked else (None, None)
    g = torch.randn(N, L, Ev, dtype=dtype)
    out, lse = ref.sdpa_forward(q, k, v, mask, 0.3, causal, dropout_p, 5)
    out2, lse2 = variant.sdpa_forward(q, k, v, bias, rows, 0.3, causal, dropout_p, 5, 32, 64)
    assert_close(out2, out, "out")
    assert_close(lse2, lse, "lse")
    expected = ref.sdpa_backward(g, q, k, v, out, lse, mask, 0.3, causal, dropout_p, 5)
    actual = variant.sdpa_backward(g, q, k, v, out, lse, bias, rows, 0.3, causal, dropout_p, 5, 32, 64)
    for name, a, e in zip(("grad_q", "grad_k", "grad_v"), actual, expected):
        assert_close(a, e, name, grad=True)
