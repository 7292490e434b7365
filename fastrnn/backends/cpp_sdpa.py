"""C++ backend ``"cpp"`` for attention: thin wrapper over ``fastrnn._C_sdpa`` (csrc/sdpa.cpp).

Same contract as the reference (``reference_sdpa``): flash forward saving ``lse``, FlashAttention-2
backward recomputing the scores, identical dropout bits. Tile products run on oneDNN's brgemm
micro-kernel (``info()["blas"] == "onednn-brgemm"``; fallbacks MKL, then ATen), the softmax /
mask / dropout row math is vectorised per ISA, tasks run on torch's thread pool. Design notes
in the header of ``csrc/sdpa.cpp`` and in ``docs/attention.md``.
"""
from __future__ import annotations

import torch

from ..contract.checks import check_sdpa_backward, check_sdpa_forward

name = "cpp"
dtypes = (torch.float32, torch.float64)

# Tile sizes (queries x keys). Forward: BL x BS scores per task; backward: three such buffers.
FWD_BLOCKS = (64, 256)
BWD_BLOCKS = (64, 128)

try:
    from .. import _C_sdpa as _C
    _IMPORT_ERROR = None
except ImportError as exc:  # not built (FASTRNN_SKIP_CPP_BUILD, failed compile, no compiler)
    _C, _IMPORT_ERROR = None, exc


def availability(device_type: str) -> str | None:
    if _C is None:
        return (f"C++ extension fastrnn._C_sdpa is not built ({_IMPORT_ERROR}); reinstall with "
                "`pip install --no-build-isolation -e .` and read the build log")
    if device_type != "cpu":
        return f"the cpp backend runs on CPU only, not {device_type}"
    return None


def info() -> dict:
    return {"blas": getattr(_C, "blas", None) if _C is not None else None,
            "threads": torch.get_num_threads()}


def _mask(mask):
    return (None, None) if mask is None else (mask.bias, mask.rows.contiguous())


def sdpa_forward(q, k, v, mask, scale, causal, dropout_p, seed):
    check_sdpa_forward(q, k, v, mask, scale, causal, dropout_p, seed)
    bias, rows = _mask(mask)
    out, lse = _C.sdpa_forward(q, k, v, bias, rows, scale, causal, dropout_p, seed, *FWD_BLOCKS)
    return out, lse


def sdpa_backward(grad_out, q, k, v, out, lse, mask, scale, causal, dropout_p, seed):
    check_sdpa_backward(grad_out, q, k, v, out, lse, mask, scale, causal, dropout_p, seed)
    bias, rows = _mask(mask)
    grad_q, grad_k, grad_v = _C.sdpa_backward(grad_out, q, k, v, out, lse, bias, rows, scale, causal,
                                              dropout_p, seed, *BWD_BLOCKS)
    return grad_q, grad_k, grad_v
