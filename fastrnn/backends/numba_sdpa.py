"""Backend ``"numba"`` for attention: the flash kernels of ``fastrnn/_numba/sdpa_kernels.py``.

Contract: ``fastrnn.backends.reference_sdpa`` (tested against it and against torch). Tensors
cross as zero-copy numpy views, outputs are allocated here and filled in place. Without a mask
the kernels get a strided dummy and ``has_bias=False``, so the argument types depend only on the
dtype and on whether the mask is a broadcast view (numba layout 'A', the usual case) or
contiguous ('C'): at most two compilations per dtype (seconds each; then numba's disk cache).

Threads: the kernels run ``prange`` on numba's pool, sized to ``torch.get_num_threads()`` on
every call; numba may reset torch's count when its OpenMP pool starts (numba#9387), so torch's
is restored if it changed. The tile products (``np.dot``) call scipy's bundled OpenBLAS, whose
own thread pool would fight the ``prange`` workers (numba#6933; measured here: 15x slower,
all time in OpenBLAS's thread wait), so it is set to one thread for the duration of a call and
restored afterwards.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os

import numpy as np
import torch

name = "numba"
dtypes = (torch.float32, torch.float64)

BLOCK_L, BLOCK_S = 64, 128  # query x key tile

try:
    import numba as _numba
    _IMPORT_ERROR = None
except ImportError as exc:
    _numba, _IMPORT_ERROR = None, exc

_kernels = None


def availability(device_type: str) -> str | None:
    if _numba is None:
        return f"numba is not installed ({_IMPORT_ERROR})"
    if device_type != "cpu":
        return f"the numba backend runs on CPU only, not {device_type}"
    return None


def _k():
    global _kernels
    if _kernels is None:
        from .._numba import sdpa_kernels
        _kernels = sdpa_kernels
    return _kernels


# Below this many multiply-adds a call runs on one thread: starting the pool costs more
# (microseconds on an idle machine, milliseconds on a loaded one).
SERIAL_WORK = 1 << 21


def _threads(work):
    n = torch.get_num_threads()
    n_numba = 1 if work < SERIAL_WORK else min(n, _numba.config.NUMBA_NUM_THREADS)
    if _numba.get_num_threads() != n_numba:
        _numba.set_num_threads(n_numba)
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return n_numba


_openblas_lib = None  # None: not looked up; False: not found


def _openblas():
    """scipy's OpenBLAS (the BLAS behind numba's np.dot), or None."""
    global _openblas_lib
    if _openblas_lib is None:
        _openblas_lib = False
        import scipy
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library)
        libdir = os.path.dirname(scipy.__file__) + ".libs"
        for path in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*"))):
            try:
                lib = ctypes.CDLL(path)  # already loaded: the same handle
                lib.scipy_openblas_get_num_threads.restype = ctypes.c_int
                lib.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
            except (OSError, AttributeError):
                continue
            _openblas_lib = lib
            break
    return _openblas_lib or None


@contextlib.contextmanager
def _serial_blas():
    lib = _openblas()
    before = lib.scipy_openblas_get_num_threads() if lib is not None else 1
    if before != 1:
        lib.scipy_openblas_set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            lib.scipy_openblas_set_num_threads(before)


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
    N, L, E = q.shape
    _threads(N * L * k.shape[1] * (E + v.shape[2]))
    out = q.new_empty(N, L, v.shape[-1])
    lse = q.new_empty(N, L)
    dt = _np(q).dtype
    bias, rows, has_bias = _mask_args(mask, q)
    threshold, inv_keep, seed = _dropout_args(dropout_p, seed, dt)
    with _serial_blas():
        _k().sdpa_forward(_np(q), _np(k), _np(v), bias, rows, has_bias, dt.type(scale), bool(causal),
                          threshold, inv_keep, seed, BLOCK_L, BLOCK_S, _np(out), _np(lse))
    return out, lse


def sdpa_backward(grad_out, q, k, v, out, lse, mask, scale, causal, dropout_p, seed):
    N, L, E = q.shape
    Nk, S, _ = k.shape
    threads = _threads(N * L * S * (2 * E + 3 * v.shape[2]))
    chunks = min(-(-S // BLOCK_S), max(1, -(-threads // Nk)))
    grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq_part = q.new_zeros(Nk * chunks if chunks > 1 else 1, (N // Nk) * L if chunks > 1 else 1, E)
    dt = _np(q).dtype
    bias, rows, has_bias = _mask_args(mask, q)
    threshold, inv_keep, seed = _dropout_args(dropout_p, seed, dt)
    with _serial_blas():
        _k().sdpa_backward(_np(grad_out), _np(q), _np(k), _np(v), _np(out), _np(lse), bias, rows,
                           has_bias, dt.type(scale), bool(causal), threshold, inv_keep, seed, BLOCK_L,
                           BLOCK_S, chunks, _np(grad_q), _np(grad_k), _np(grad_v), _np(dq_part))
    return grad_q, grad_k, grad_v
