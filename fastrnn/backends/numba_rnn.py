r"""Backend ``"numba"``: the recurrence as Numba-compiled CPU kernels (``fastrnn._numba``).

Implements the contract documented in ``fastrnn.backends.reference_rnn`` (one layer, one
direction, the whole sequence per call) and is tested against that reference.

How a call runs
---------------
Tensors cross as zero-copy numpy views (``t.detach().contiguous().numpy()``); the kernels
``rnn_kernels.rnn_forward`` / ``rnn_backward`` run the whole time loop in compiled code. Each
step is one BLAS gemm ``h_{t-1} W_hh^T`` (scipy's OpenBLAS, called from the kernel through a
function pointer) and one fused pass over the gates of every active row; LSTM and RNN
accumulate the gemm straight into ``xw`` (the op code hands ``xw`` over as scratch), GRU keeps
the hidden-side ``n`` pre-activation apart in a [B, 3H] scratch buffer. Nothing is allocated
inside the loop.

What is saved (training=True; the same tuples as the reference backend)
------------------------------------------------------------------------
LSTM  ``(h_seq [T,B,Hr], acts [T,B,4H], c_seq [T,B,H][, hu_seq [T,B,H]])``: ``acts`` are the
      activated gates i, f, g, o, written in place over ``xw``; ``hu_seq = o * tanh(c_t)``
      only with a projection (needed for ``grad_w_hr``). Backward recomputes ``tanh(c_t)``.
GRU   ``(h_seq, acts [T,B,3H], hn_seq [T,B,H])``: r, z, n in place over ``xw``;
      ``hn_seq = h_{t-1} W_hn^T + b_hn``.
RNN   ``(h_seq,)``: the derivative of tanh / relu is read off ``h_t``.
Inactive rows (packed sequences) are zero in every saved tensor. ``training=False`` saves
nothing and keeps only [B, H]-sized scratch.

Dtypes and compilation
----------------------
float32 and float64; every call of a kernel has the same argument types for a given dtype
(absent optional tensors are passed as empty arrays), so there are exactly four compiled
signatures: {forward, backward} x {float32, float64}. First use of a dtype compiles both of
its kernels (several seconds) or loads them from the on-disk cache; ``info()`` reports how long
that took and whether it came from the cache.

On-disk cache (choice and why)
------------------------------
On by default; ``FASTRNN_NUMBA_CACHE=0`` turns it off (read when the kernels are first imported).
It is Numba's own ``cache=True``: the files go to ``fastrnn/_numba/__pycache__`` (or, where that
is not writable, Numba's user-wide cache directory, or ``NUMBA_CACHE_DIR`` if set). Numba keys
entries on the kernel source file's timestamp, the argument types, the Numba version and the
host CPU, and writes each file through a temporary name and an atomic rename. Two weaknesses
are handled here: (1) staleness across files -- every function the kernels inline lives in the
single file ``rnn_kernels.py``, whose timestamp is the key; (2) several processes (pytest
workers) compiling the same kernels at once -- the first use of a dtype takes an exclusive
file lock next to the cache, so one process compiles and writes while the others wait and
then load its result. The BLAS function is an argument, not a constant baked into the code,
because a cached kernel must not contain an address from the process that compiled it.

Threads
-------
The kernels themselves are serial; the per-step gemm uses scipy's OpenBLAS thread pool.
``fastrnn.set_num_threads(n)`` sets torch, numba and that OpenBLAS together. Numba can reset
torch's thread count when its OpenMP pool starts (numba#9387): every kernel call here restores
``torch.get_num_threads()`` if it changed.
"""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import torch

from ..ops.recurrence import GATES, check_cell

name = "numba"

_kernels = None            # the fastrnn._numba.rnn_kernels module, or the reason it is unusable
_compile_seconds: dict[str, dict[str, float]] = {}   # dtype name -> kernel name -> seconds


def _load():
    global _kernels
    if _kernels is None:
        try:
            from .._numba import rnn_kernels
            _kernels = rnn_kernels
        except Exception as exc:  # numba or scipy missing or broken
            _kernels = f"numba kernels unavailable: {type(exc).__name__}: {exc}"
    return _kernels


def availability(device_type: str) -> str | None:
    if device_type != "cpu":
        return f"numba backend runs on CPU only, not {device_type!r}"
    k = _load()
    return k if isinstance(k, str) else None


def _kernels_or_raise():
    k = _load()
    if isinstance(k, str):
        raise RuntimeError(f"fastrnn: backend 'numba' is unavailable: {k}")
    return k


# ---------------------------------------------------------------------------------------------
# compilation: once per dtype and process, under a lock shared by all processes using the cache
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _cache_lock(dispatcher):
    path = getattr(dispatcher.stats, "cache_path", None)
    try:
        import fcntl
        f = open(os.path.join(path, "fastrnn-compile.lock"), "a") if path else None
    except (ImportError, OSError):
        f = None
    if f is None:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _example_args(k, dtype: np.dtype):
    """Tiny arguments with the exact types of every real call (one signature per dtype)."""
    a1, a2, a3 = (np.zeros((1,) * n, dtype) for n in (1, 2, 3))
    bs = np.ones(1, np.int64)
    fwd = (0, k.GEMM[dtype], a3, a2, a1, a2, a2, a2, bs, False, False, a3, a2, a2, a3, a3, a3, a2)
    bwd = (0, k.GEMM[dtype], a3, a2, a2, a2, a2, bs, False, a3, a3, a3, a3, a2, a2, a3, a3, a3, a2)
    return {"rnn_forward": fwd, "rnn_backward": bwd}


def _ensure_compiled(dtype: np.dtype) -> None:
    if dtype.name in _compile_seconds:
        return
    import numba
    k = _kernels_or_raise()
    times = {}
    with _preserve_torch_threads(), _cache_lock(k.rnn_forward):
        for kname, args in _example_args(k, dtype).items():
            t0 = time.perf_counter()
            getattr(k, kname).compile(tuple(numba.typeof(a) for a in args))
            times[kname] = time.perf_counter() - t0
    _compile_seconds[dtype.name] = times


@contextlib.contextmanager
def _preserve_torch_threads():
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:  # numba#9387
            torch.set_num_threads(n)


def info(warm: bool = True) -> dict:
    """What ``python -m fastrnn info`` prints for this backend. With ``warm``, compiles (or loads
    from the cache) the float32 kernels first, so that ``compile_seconds`` is filled in."""
    k = _load()
    if isinstance(k, str):
        return {"available": False, "reason": k}
    import numba
    from .._numba import openblas
    if warm:
        _ensure_compiled(np.dtype(np.float32))
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        layer = f"not started (configured: {numba.config.THREADING_LAYER})"
    stats = {kname: getattr(k, kname).stats for kname in ("rnn_forward", "rnn_backward")}
    return {
        "available": True,
        "numba": numba.__version__,
        "compile_seconds": {dt: dict(v) for dt, v in _compile_seconds.items()},
        "cache": {"enabled": k.CACHE,
                  "dir": stats["rnn_forward"].cache_path if k.CACHE else None,
                  "hits": sum(sum(s.cache_hits.values()) for s in stats.values()),
                  "misses": sum(sum(s.cache_misses.values()) for s in stats.values())},
        "threading_layer": layer,
        "numba_threads": numba.get_num_threads(),
        "blas": f"scipy OpenBLAS ({openblas.corename()}), {openblas.get_num_threads()} threads",
    }


# ---------------------------------------------------------------------------------------------
# the contract
# ---------------------------------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _empty(ndim: int, dtype) -> np.ndarray:
    return np.empty((0,) * ndim, dtype)


def _dtype(t: torch.Tensor, k) -> np.dtype:
    dt = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}.get(t.dtype)
    if dt is None or dt not in k.GEMM:
        raise TypeError(f"fastrnn: backend 'numba' supports float32 and float64, not {t.dtype}")
    return dt


def _batch_sizes(batch_sizes, T: int, B: int) -> np.ndarray:
    if batch_sizes is None:
        return np.full(T, B, np.int64)
    return batch_sizes.detach().to("cpu", torch.int64).contiguous().numpy()


def _run(kernel, dtype: np.dtype, *args) -> None:
    _ensure_compiled(dtype)
    with _preserve_torch_threads():
        kernel(*args)


def rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training):
    check_cell(cell)
    k = _kernels_or_raise()
    xw = xw.detach().contiguous()   # overwritten with the activated gates
    T, B, G = xw.shape
    H, Hr = G // GATES[cell], h0.shape[-1]
    dt = _dtype(xw, k)
    new = lambda *shape: torch.empty(*shape, dtype=xw.dtype)  # noqa: E731
    is_lstm, is_gru, proj = cell == "lstm", cell == "gru", w_hr is not None
    nT = T if training else 1      # per-step tensors: the whole sequence only when saved
    h_seq, h_T = new(T, B, Hr), new(B, Hr)
    c_T = new(B, H) if is_lstm else None
    c_seq = new(nT, B, H) if is_lstm else None
    hu_seq = new(nT, B, H) if proj else None
    hn_seq = new(nT, B, H) if is_gru else None
    e2, e3 = _empty(2, dt), _empty(3, dt)
    opt = lambda t, e: e if t is None else _np(t)  # noqa: E731
    b = _np(b_hh) if b_hh is not None else np.zeros(G, dt)
    _run(k.rnn_forward, dt, k.CELL_CODES[cell], k.GEMM[dt], _np(xw), _np(w_hh), b, _np(h0),
         opt(c0 if is_lstm else None, e2), opt(w_hr, e2), _batch_sizes(batch_sizes, T, B),
         bool(reverse), bool(training), h_seq.numpy(), h_T.numpy(), opt(c_T, e2),
         opt(c_seq, e3), opt(hu_seq, e3), opt(hn_seq, e3), np.empty((B, G) if is_gru else (0, 0), dt))
    if not training:
        saved = ()
    elif is_lstm:
        saved = (h_seq, xw, c_seq) + ((hu_seq,) if proj else ())
    elif is_gru:
        saved = (h_seq, xw, hn_seq)
    else:
        saved = (h_seq,)
    return h_seq, h_T, c_T, saved


def rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved):
    check_cell(cell)
    k = _kernels_or_raise()
    h_seq = saved[0]
    T, B, Hr = h_seq.shape
    G = w_hh.shape[0]
    H = G // GATES[cell]
    dt = _dtype(h_seq, k)
    is_lstm, is_gru, proj = cell == "lstm", cell == "gru", w_hr is not None
    new = lambda *shape: torch.empty(*shape, dtype=h_seq.dtype)  # noqa: E731
    fresh = lambda g, *shape: (torch.zeros(*shape, dtype=h_seq.dtype) if g is None  # noqa: E731
                               else g.detach().to(h_seq.dtype).contiguous().clone())
    e2, e3 = _empty(2, dt), _empty(3, dt)
    grad_xw = new(T, B, G)
    grad_hw = new(T, B, G) if is_gru else grad_xw
    dh = fresh(grad_h_T, B, Hr)                          # becomes grad_h0
    dc = fresh(grad_c_T, B, H) if is_lstm else None      # becomes grad_c0
    g_seq = _np(grad_h_seq) if grad_h_seq is not None else np.zeros((T, B, Hr), dt)
    grad_hproj = new(T, B, Hr) if proj else None
    acts = _np(saved[1]) if (is_lstm or is_gru) else e3
    c_seq = _np(saved[2]) if is_lstm else e3
    hn_seq = _np(saved[2]) if is_gru else e3
    _run(k.rnn_backward, dt, k.CELL_CODES[cell], k.GEMM[dt], g_seq, _np(w_hh),
         _np(w_hr) if proj else e2, _np(h0), _np(c0) if is_lstm else e2, _batch_sizes(batch_sizes, T, B),
         bool(reverse), _np(h_seq), acts, c_seq, hn_seq, dh.numpy(), dc.numpy() if is_lstm else e2,
         grad_xw.numpy(), grad_hw.numpy(), grad_hproj.numpy() if proj else e3,
         np.empty((B, H) if proj else (0, 0), dt))
    grad_w_hr = None
    if proj:  # one GEMM over all steps: sum_t grad_hproj_t^T hu_t
        grad_w_hr = grad_hproj.reshape(T * B, Hr).t() @ saved[3].reshape(T * B, H)
    return grad_xw, grad_hw, dh, dc, grad_w_hr
