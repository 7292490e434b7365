"""The cpp recurrence with its GEMM fallbacks (MKL sgemm_/dgemm_, then at::mm), built from the
same source with brgemm switched off. Opt-in (two extra builds): FASTRNN_TEST_CPP_FALLBACKS=1;
CI turns it on."""
import os

import pytest
import torch

from fastrnn import backends
from fastrnn.contract.rnn import GATES
from fastrnn.testing import assert_close

pytestmark = pytest.mark.skipif(os.environ.get("FASTRNN_TEST_CPP_FALLBACKS") != "1",
                                reason="set FASTRNN_TEST_CPP_FALLBACKS=1 to build and test the GEMM fallbacks")
SRC = os.path.join(os.path.dirname(__file__), "..", "csrc", "rnn.cpp")
VARIANTS = {"mkl": ["-DFASTRNN_MKL", "-DFASTRNN_NO_BRGEMM"], "aten": ["-DFASTRNN_NO_BRGEMM"]}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    from torch.utils.cpp_extension import load
    mod = load(f"fastrnn_rnn_{request.param}", [SRC],
               extra_cflags=["-O3", "-fopenmp", "-std=c++20"] + VARIANTS[request.param], extra_ldflags=["-fopenmp"],
               build_directory=str(tmp_path_factory.mktemp(request.param)))
    assert mod.gemm_engine() == request.param
    return mod


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_fallback_matches_reference(variant, dtype, cell):
    T, B, H = 3, 19, 70  # several chunks, threaded steps
    G = GATES[cell] * H
    xw = torch.randn(T, B, G, dtype=dtype)
    w_hh, b_hh = torch.randn(G, H, dtype=dtype) * 0.2, torch.randn(G, dtype=dtype)
    h0 = torch.randn(B, H, dtype=dtype)
    c0 = torch.randn(B, H, dtype=dtype) if cell == "lstm" else None
    code = {"lstm": 0, "gru": 1, "rnn_tanh": 2}[cell]
    out = variant.rnn_forward(code, xw.clone(), w_hh, b_hh, h0, c0, None, None, False, True)
    ref = backends.load("torch", "rnn").rnn_forward(cell, xw.clone(), w_hh, b_hh, h0, c0, None, None, False, True)
    assert_close(out[0], ref[0], f"{cell} h_seq")
    g = torch.randn(T, B, H, dtype=dtype)
    back = variant.rnn_backward(code, g, h0, c0, w_hh, None, h0, c0, None, False, list(out[3:]))
    ref_back = backends.load("torch", "rnn").rnn_backward(cell, g, h0, c0, w_hh, None, h0, c0, None, False, ref[3])
    assert_close(back[0], ref_back[0], f"{cell} grad_xw", grad=True)
    assert_close(back[2], ref_back[2], f"{cell} grad_h0", grad=True)
    a = torch.randn(300, 600, dtype=dtype)
    w = torch.randn(70, 600, dtype=dtype)
    assert_close(variant.linear(a, w, None), a @ w.t(), "linear", scale=600 ** 0.5)
    assert_close(variant.mm_tn(a, a[:, :33].contiguous()), a.t() @ a[:, :33], "mm_tn", scale=300 ** 0.5)
