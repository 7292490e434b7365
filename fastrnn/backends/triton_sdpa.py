"""Backend ``"triton"`` for attention: the flash kernels of ``fastrnn/_triton/sdpa_kernels.py``.

Contract: ``fastrnn.backends.reference_sdpa``. Forward is one launch (``sdpa_fwd``); backward is
``D = rowsum(dO * out)`` (one torch reduction, O(N L)) and two launches (``sdpa_bwd_dkdv``,
``sdpa_bwd_dq``), deterministic, no atomics. The dropout mask is the reference's hash, computed
in uint32 in the kernels, so forward, backward and every other backend agree bit for bit.

Devices and dtypes: CUDA with float32 / float16 / bfloat16 (float32 accumulation) and float64;
CPU through the Triton interpreter (``TRITON_INTERPRET=1`` before triton is imported; tiny
problems only, it runs one program at a time in numpy). The interpreter has no bfloat16: there
low-precision inputs are computed in float32 and cast back. Float32 ``tl.dot`` is IEEE by default;
``FASTRNN_TRITON_TF32=1`` allows TF32 (about 1e-3 relative error).
"""
from __future__ import annotations

import importlib
import os

import torch

from .. import _triton as _triton_pkg
from ..contract.checks import check_sdpa_backward, check_sdpa_forward

name = "triton"
dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INTERPRETER_DTYPES = (torch.float32, torch.float64)

TF32_ENV = "FASTRNN_TRITON_TF32"
GPU_BLOCKS = (64, 64)          # queries x keys per program on a GPU
INTERPRETER_BLOCKS = (32, 32)  # fewer, larger programs: the interpreter pays per op, not per element

_kernels_module = None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    global _kernels_module
    if _kernels_module is None:
        _kernels_module = importlib.import_module("fastrnn._triton.sdpa_kernels")
    return _kernels_module


def availability(device_type: str) -> str | None:
    return _triton_pkg.availability(device_type, _kernels)


def _split(x: float):
    """float64 -> (hi, lo) float32 pair with hi + lo == x to ~1e-16 (see ``_join``)."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


def _launch_args(q, v, mask, scale, causal, dropout_p, seed):
    """What every launch shares: mask pointers/strides, dropout constants, constexprs."""
    import triton
    import triton.language as tl

    N, L, E = q.shape
    Nk, S, Ev = v.shape
    if mask is None:
        bias, rows, strides = q.new_zeros(1), torch.zeros(1, dtype=torch.int64, device=q.device), (0, 0, 0)
    else:
        bias, rows, strides = mask.bias, mask.rows.contiguous(), mask.bias.stride()
    interpreted = _interpreted() or q.device.type == "cpu"
    BL, BS = INTERPRETER_BLOCKS if interpreted else GPU_BLOCKS
    precision = "tf32" if q.dtype == torch.float32 and os.environ.get(TF32_ENV) == "1" else "ieee"
    threshold = int(dropout_p * 4294967296.0) if dropout_p > 0 else 0
    inv_keep = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    common = (L, S, N // Nk, *_split(scale), int(seed) & 0xFFFFFFFF, threshold, *_split(inv_keep),
              *strides)
    meta = dict(E=E, EV=Ev, BLOCK_E=max(16, triton.next_power_of_2(E)),
                BLOCK_EV=max(16, triton.next_power_of_2(Ev)), BLOCK_L=BL, BLOCK_S=BS,
                HAS_BIAS=mask is not None, CAUSAL=bool(causal), DROPOUT=dropout_p > 0,
                ACC=tl.float64 if q.dtype == torch.float64 else tl.float32, PRECISION=precision)
    return bias, rows, common, meta


def _compute_dtype(*tensors):
    """Tensors in a dtype the current device runs (the interpreter has no bfloat16)."""
    if tensors[0].device.type == "cpu" and tensors[0].dtype not in INTERPRETER_DTYPES:
        return [t.float() for t in tensors], tensors[0].dtype
    return list(tensors), None


def sdpa_forward(q, k, v, mask, scale, causal, dropout_p, seed):
    check_sdpa_forward(q, k, v, mask, scale, causal, dropout_p, seed)
    (q, k, v), cast_back = _compute_dtype(q, k, v)
    if cast_back is not None and mask is not None:
        mask = mask._replace(bias=mask.bias.float())
    N, L, _ = q.shape
    out = q.new_empty(N, L, v.shape[-1])
    lse = torch.empty(N, L, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      device=q.device)
    bias, rows, common, meta = _launch_args(q, v, mask, scale, causal, dropout_p, seed)
    grid = (-(-L // meta["BLOCK_L"]), N)
    _kernels().sdpa_fwd[grid](q, k, v, bias, rows, out, lse, *common, **meta)
    if cast_back is not None:
        out = out.to(cast_back)
    return out, lse


def sdpa_backward(grad_out, q, k, v, out, lse, mask, scale, causal, dropout_p, seed):
    check_sdpa_backward(grad_out, q, k, v, out, lse, mask, scale, causal, dropout_p, seed)
    (grad_out, q, k, v, out), cast_back = _compute_dtype(grad_out, q, k, v, out)
    if cast_back is not None and mask is not None:
        mask = mask._replace(bias=mask.bias.float())
    N, L, _ = q.shape
    Nk, S, _ = k.shape
    delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # D_i [N, L]
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bias, rows, common, meta = _launch_args(q, v, mask, scale, causal, dropout_p, seed)
    _kernels().sdpa_bwd_dkdv[(-(-S // meta["BLOCK_S"]), Nk)](
        q, k, v, grad_out, lse, delta, bias, rows, grad_k, grad_v, *common, **meta)
    _kernels().sdpa_bwd_dq[(-(-L // meta["BLOCK_L"]), N)](
        q, k, v, grad_out, lse, delta, bias, rows, grad_q, *common, **meta)
    if cast_back is not None:
        grad_q, grad_k, grad_v = (t.to(cast_back) for t in (grad_q, grad_k, grad_v))
    return grad_q, grad_k, grad_v
