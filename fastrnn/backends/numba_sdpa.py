"""Backend ``"numba"`` for attention: the flash kernels of ``fastrnn/_numba/sdpa_kernels.py``.

Contract: ``fastrnn.backends.reference_sdpa`` (tested against it and against torch). Tensors
cross as zero-copy numpy views, outputs are allocated here and filled in place. Without a mask
the kernels get a strided dummy and ``has_bias=False``, so the argument types depend only on the
dtype and on whether the mask is a broadcast view (numba layout 'A', the usual case) or
contiguous ('C'): at most two compilations per dtype (seconds each; then numba's disk cache).

Threads, processes and the cache are the recurrence's (``fastrnn/_numba/runtime.py``): every
call runs inside ``runtime.kernel_call``, which gives it ``min(torch.get_num_threads(),
numba.get_num_threads())`` threads (one below ``SERIAL_WORK`` and in a ``fork`` child, where
the kernels take their serial path and open no parallel region), sets numba's count for the
call only and restores torch's if numba reset it (numba#9387); the kernels are cached by
``runtime.jit`` (``FASTRNN_NUMBA_CACHE``, damaged entries rebuilt, read-only installs compile in
memory), and the first call of a signature compiles under the same cross-process lock. The
tile products (``np.dot``) call scipy's bundled OpenBLAS, whose own thread pool would fight the
``prange`` workers (numba#6933; measured here: 15x slower, all time in OpenBLAS's thread wait),
so it is held at one thread while any call runs (``runtime.serial_blas``: reference-counted,
so that concurrent calls from several Python threads neither race on the process-global setting
nor restore it under each other).
"""
from __future__ import annotations

import numpy as np
import torch

from ..contract.checks import check_sdpa_backward, check_sdpa_forward

name = "numba"
dtypes = (torch.float32, torch.float64)

# query x key tile: 96 x 128 x E=64 stays under OpenBLAS's small-matrix limit (m n k <= 1e6:
# unpacked kernels, ~170 GFLOP/s here vs ~105 packed); 96 rows measured ~3% faster than 64 in
# fwd+bwd at 1 thread (bench/results/numba_sdpa_cpu.md)
BLOCK_L, BLOCK_S = 96, 128

try:
    import numba as _numba
    _IMPORT_ERROR = None
except ImportError as exc:
    _numba, _IMPORT_ERROR = None, exc

_kernels = None
_rt = None          # fastrnn._numba.runtime, imported with the kernels


def availability(device_type: str) -> str | None:
    if _numba is None:
        return f"numba is not installed ({_IMPORT_ERROR})"
    if device_type != "cpu":
        return f"the numba backend runs on CPU only, not {device_type}"
    return None


def _k():
    global _kernels, _rt
    if _kernels is None:
        from .._numba import runtime, sdpa_kernels
        _kernels, _rt = sdpa_kernels, runtime
    return _kernels


# Below this many multiply-adds a call runs on one thread: starting the pool costs more
# (microseconds on an idle machine, milliseconds on a loaded one).
SERIAL_WORK = 1 << 21


def _limit(work):
    """A cap on the threads of a call with ``work`` multiply-adds (None: no cap)."""
    return 1 if work < SERIAL_WORK else None


def _first_call(name, arrays):
    """The kernel, and a context for its call (``runtime.first_call``: the cross-process compile
    lock on the first call of this kernel and dtype in this process)."""
    kernel = getattr(_k(), name)
    return kernel, _rt.first_call(kernel, arrays[0].dtype.str)


def _np(t):
    return t.detach().numpy()


def _mask_args(mask, q):
    if mask is None:
        dummy = np.zeros((1, 2, 2), dtype=_np(q).dtype)[:, :, ::2]  # layout 'A', like a broadcast mask
        return dummy, np.zeros(1, dtype=np.int64), False
    return _np(mask.bias), _np(mask.rows.contiguous()), True


def _dropout_args(dropout_p, seed, np_dtype):
    threshold = int(dropout_p * 4294967296.0) if dropout_p > 0 else 0
    inv_keep = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    return threshold, np_dtype.type(inv_keep), int(seed) & 0xFFFFFFFF


def sdpa_forward(q, k, v, mask, scale, causal, dropout_p, seed):
    check_sdpa_forward(q, k, v, mask, scale, causal, dropout_p, seed)
    N, L, E = q.shape
    out = q.new_empty(N, L, v.shape[-1])
    lse = q.new_empty(N, L)
    dt = _np(q).dtype
    bias, rows, has_bias = _mask_args(mask, q)
    threshold, inv_keep, seed = _dropout_args(dropout_p, seed, dt)
    arrays = (_np(q), _np(k), _np(v), bias, rows)
    kernel, first = _first_call("sdpa_forward", arrays)
    with _rt.kernel_call(_limit(N * L * k.shape[1] * (E + v.shape[2]))) as nth, _rt.serial_blas(), first:
        kernel(*arrays, has_bias, dt.type(scale), bool(causal), threshold, inv_keep, seed, BLOCK_L, BLOCK_S,
               nth, _np(out), _np(lse))
    return out, lse


def sdpa_backward(grad_out, q, k, v, out, lse, mask, scale, causal, dropout_p, seed):
    check_sdpa_backward(grad_out, q, k, v, out, lse, mask, scale, causal, dropout_p, seed)
    N, L, E = q.shape
    Nk, S, _ = k.shape
    dt = _np(q).dtype
    bias, rows, has_bias = _mask_args(mask, q)
    threshold, inv_keep, seed = _dropout_args(dropout_p, seed, dt)
    arrays = (_np(grad_out), _np(q), _np(k), _np(v), _np(out), _np(lse), bias, rows)
    kernel, first = _first_call("sdpa_backward", arrays)
    with _rt.kernel_call(_limit(N * L * S * (2 * E + 3 * v.shape[2]))) as nth, _rt.serial_blas(), first:
        # key chunks per key/value row: enough tasks for every thread (dQ then sums per chunk)
        chunks = min(-(-S // BLOCK_S), max(1, -(-nth // Nk)))
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dq_part = q.new_zeros(Nk * chunks if chunks > 1 else 1, (N // Nk) * L if chunks > 1 else 1, E)
        kernel(*arrays, has_bias, dt.type(scale), bool(causal), threshold, inv_keep, seed, BLOCK_L, BLOCK_S,
               chunks, nth, _np(grad_q), _np(grad_k), _np(grad_v), _np(dq_part))
    return grad_q, grad_k, grad_v
