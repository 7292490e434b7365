"""Backend ``"numba"`` for the attention decoder: the kernels of ``fastrnn/_numba/decoder_kernels.py``.

Contract: ``fastrnn.backends.reference_decoder`` (tests/test_decoder_contract.py compares every
output and gradient with it). Tensors cross as zero-copy numpy views of contiguous tensors;
outputs are allocated here with torch and filled in place.

Signatures: absent optional inputs (mask, drop, w_feed, the additive score's w_q / b_q / v,
a GRU's c0 and cells) are replaced by tiny dummies of the same rank and dtype plus a boolean
flag, the cell is an int, and inference passes dummies for the saved tensors, so each of the
two kernels (forward, backward) compiles exactly once per dtype: 4 compilations in all for
float32 + float64, then numba's disk cache (``runtime.jit``).

Design (rows independent, weights shared): the batch is cut into blocks of rows, one task per
block, each running the whole time loop with one ``np.dot`` (BLAS) per weight product over its
rows and plain vectorised loops for the per-row work (gates, scores, softmax, context);
``prange`` over blocks, so one parallel region per call and no barrier per step. One block per
thread (``_block``), none under ``MIN_ROWS`` rows. Why, measured at the bench shape (T = S = 50,
B = 32, H = M = 256, L = 1, LSTM, float32, input feeding; bench/decoder_numba_speed.py, one
thread, CPU-time clock, ms, forward inference / backward):

- rows per block 32 (one block): additive 58 / 87, dot 41 / 60;  16 (two blocks): 72 / 107,
  54 / 80;  8: ~2x slower than 32;  1 (per-row GEMVs, the "each worker runs its rows" design
  taken literally): 2.5-4x slower than 32. scipy's OpenBLAS reaches 77-85 GF/s on [32, 256] x
  [256, 1024], 55 at 16 rows, 37 at 8 (it re-packs the weights on every call), and the GEMMs
  are 60-70% of a step; so blocks are as big as the threads allow, and not fixed by B alone
  (fixed blocks would give the same bits on any thread count, at 25-35% of one thread's speed).
  One GEMM over [feed; h] with stacked weights (K = 512) measured slower than two (450 vs
  2 x 196 us), so layer 0 keeps two.
- the other design, one whole-batch GEMM per step then ``prange`` over rows for the row work,
  is the same code as one block on one thread, and on more threads leaves the GEMMs (most of
  the step) serial with 3-4 barriers per step: not kept.

Against the reference backend (same process, interleaved, median of 5; 2-core machine shared
with other jobs): 1 thread (CPU-time clock) LSTM additive 58.5 / 63.0 / 99.6 ms (forward
inference / forward training / backward) vs 91.6 / 94.7 / 193.6 (1.5x / 1.5x / 1.9x); LSTM dot
1.5x / 1.5x / 1.65x; GRU additive 1.4x / 1.4x / 2.1x; GRU dot 1.5x / 1.5x / 1.5x. 2 threads (wall
clock, in a quiet window): LSTM additive 36.4 / 37.8 / 51.6 vs 52.8 / 57.4 / 92.7; LSTM dot
1.7x / 1.45x (training forward / backward); GRU dot 1.8x / 1.8x / 1.75x. Under load the
reference (a barrier per torch op) falls apart first (5-10x slower); numba has one region.

Threads, processes, the cache and scipy's OpenBLAS are the recurrence's
(``fastrnn/_numba/runtime.py``): every call runs inside ``runtime.kernel_call`` and
``runtime.serial_blas`` (OpenBLAS on one thread while the ``prange`` workers call it), and the
first call of a kernel and dtype compiles under the cross-process lock (``runtime.compiling``):
up to ~50 s per dtype for the two kernels (parallel=True) on this loaded 2-core machine, then the cache.
"""
from __future__ import annotations

import numpy as np
import torch

from ..contract.decoder import DecoderGrads, check_decoder_backward, check_decoder_forward, saved_shapes

name = "numba"
dtypes = (torch.float32, torch.float64)

# Tasks: one block of rows per thread, but no block under MIN_ROWS rows: BLAS re-packs the
# weights on every call, so fewer rows per call cost more per row (measured, 1 thread, bench
# shape: 32-row blocks 25-35% faster than two 16-row blocks, 8-row blocks ~2x slower).
MIN_ROWS = 8
ROW_BLOCK = None   # rows per task (None: the rule above); the benchmark sets it to compare

try:
    import numba as _numba
    _IMPORT_ERROR = None
except ImportError as exc:
    _numba, _IMPORT_ERROR = None, exc

_kernels = None
_rt = None          # fastrnn._numba.runtime, imported with the kernels

# Below this many multiply-adds a call runs on one thread: starting the pool costs more.
SERIAL_WORK = 1 << 21


def availability(device_type: str) -> str | None:
    if _numba is None:
        return f"numba is not installed ({_IMPORT_ERROR})"
    if device_type != "cpu":
        return f"the numba backend runs on CPU only, not {device_type}"
    return None


def _k():
    global _kernels, _rt
    if _kernels is None:
        from .._numba import decoder_kernels, runtime
        _kernels, _rt = decoder_kernels, runtime
    return _kernels


def _first_call(name, dtype):
    """The kernel, and the cross-process compile lock on its first call per dtype here
    (``runtime.first_call``)."""
    kernel = getattr(_k(), name)
    return kernel, _rt.first_call(kernel, dtype)


def _np(t):
    return t.detach().contiguous().numpy()


def _opt(t, ndim, dt):
    """(array, present): a contiguous view of ``t``, or a one-element dummy of rank ``ndim``."""
    if t is None:
        return np.zeros((1,) * ndim, dtype=dt), False
    return _np(t), True


def _block(B, nth):
    """Rows per task: B split evenly over min(nth, B // MIN_ROWS) tasks (or ROW_BLOCK rows)."""
    nblk = -(-B // ROW_BLOCK) if ROW_BLOCK else max(1, min(nth, B // MIN_ROWS))
    return -(-B // nblk)


def _limit(T, B, S, M, H, G, L):
    """A cap on the threads of a call (None: none): one thread for a small problem."""
    work = T * B * (L * 2 * G * H + S * (M + H) + (M + H) * H)
    return 1 if work < SERIAL_WORK or B < 2 * MIN_ROWS else None


def _common(cell, keys, memory, params, h0, c0, drop, dt):
    p = params
    w_feed, has_feed = _opt(p.w_feed, 2, dt)
    w_q, additive = _opt(p.w_q, 2, dt)
    b_q, _ = _opt(p.b_q, 1, dt)
    v, _ = _opt(p.v, 1, dt)
    c0a, _ = _opt(c0, 3, dt)
    drop_a, has_drop = _opt(drop, 4, dt)
    return dict(code=_k().LSTM if cell == "lstm" else _k().GRU, keys=_np(keys), memory=_np(memory),
                w_feed=w_feed, has_feed=has_feed, w_in=_np(p.w_in), b_in=_np(p.b_in), w_hh=_np(p.w_hh),
                b_hh=_np(p.b_hh), w_q=w_q, b_q=b_q, v=v, additive=additive, w_c=_np(p.w_c), h0=_np(h0), c0=c0a,
                drop=drop_a, has_drop=has_drop)


def decoder_forward(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop, training):
    check_decoder_forward(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop, training)
    T, B, G = xw.shape
    L, _, H = h0.shape
    S, M = memory.shape[1], memory.shape[2]
    dt = _np(xw).dtype
    a = _common(cell, keys, memory, params, h0, c0, drop, dt)
    mask_a, has_mask = (_np(mask), True) if mask is not None else (np.ones((1, 1), dtype=np.bool_), False)
    lstm = cell == "lstm"
    out, attn = xw.new_empty(T, B, H), xw.new_empty(T, B, S)
    h_n = xw.new_empty(L, B, H)
    c_n = xw.new_empty(L, B, H) if lstm else None
    if training:
        shapes = saved_shapes(cell, T, L, B, H, M)
        saved = tuple(xw.new_empty(s) for s in shapes)
        gates, cells, hs, ctx = (_np(s) for s in saved)
        if not lstm:
            cells = np.zeros((1, 1, 1, 1), dtype=dt)
    else:
        saved = ()
        gates = cells = hs = np.zeros((1, 1, 1, 1), dtype=dt)
        ctx = np.zeros((1, 1, 1), dtype=dt)
    c_n_a = _np(c_n) if lstm else np.zeros((1, 1, 1), dtype=dt)
    kernel, first = _first_call("decoder_forward", dt.str)
    with _rt.kernel_call(_limit(T, B, S, M, H, G, L)) as nth, _rt.serial_blas(), first:
        kernel(a["code"], _np(xw), a["keys"], a["memory"], mask_a, has_mask, a["w_feed"], a["has_feed"],
               a["w_in"], a["b_in"], a["w_hh"], a["b_hh"], a["w_q"], a["b_q"], a["v"], a["additive"], a["w_c"],
               a["h0"], a["c0"], _np(feed0), a["drop"], a["has_drop"], bool(training), _block(B, nth), nth,
               _np(out), _np(attn), _np(h_n), c_n_a, gates, cells, hs, ctx)
    return out, attn, h_n, c_n, saved


def decoder_backward(cell, grad_out, grad_attn, grad_h_n, grad_c_n, xw, keys, memory, mask, params,
                     h0, c0, feed0, drop, out, attn, saved):
    check_decoder_backward(cell, grad_out, grad_attn, grad_h_n, grad_c_n, xw, keys, memory, mask, params,
                           h0, c0, feed0, drop, out, attn, saved)
    gates, cells, hs, _ = saved
    T, B, G = xw.shape
    L, _, H = h0.shape
    S, M = memory.shape[1], memory.shape[2]
    dt = _np(xw).dtype
    a = _common(cell, keys, memory, params, h0, c0, drop, dt)
    lstm = cell == "lstm"
    grad_gi = xw.new_empty(T, L, B, G)
    grad_gh = grad_gi if lstm else xw.new_empty(T, L, B, G)
    grad_opre = xw.new_empty(T, B, H)
    grad_q = xw.new_empty(T, B, H) if a["additive"] else None
    grad_v = xw.new_empty(H) if a["additive"] else None
    # new tensors, not zeros_like: the kernel fills C-contiguous buffers (memory may be a transposed view)
    grad_keys, grad_memory = keys.new_zeros(keys.shape), memory.new_zeros(memory.shape)
    grad_h0 = xw.new_empty(L, B, H)
    grad_c0 = xw.new_empty(L, B, H) if lstm else None
    grad_feed0 = xw.new_empty(B, H)
    d1 = np.zeros((1,), dtype=dt)
    d3 = np.zeros((1, 1, 1), dtype=dt)
    kernel, first = _first_call("decoder_backward", dt.str)
    with _rt.kernel_call(_limit(T, B, S, M, H, G, L)) as nth, _rt.serial_blas(), first:
        block = _block(B, nth)
        gv_part = np.zeros((-(-B // block), H if a["additive"] else 1), dtype=dt)  # grad_v per row block
        kernel(a["code"], _np(grad_out), _np(grad_attn), _np(grad_h_n), _np(grad_c_n) if lstm else d3,
               a["keys"], a["memory"], a["w_feed"], a["has_feed"], a["w_in"], a["w_hh"], a["w_q"], a["b_q"], a["v"],
               a["additive"], a["w_c"], a["h0"], a["c0"], a["drop"], a["has_drop"], _np(out), _np(attn),
               _np(gates), _np(cells) if lstm else np.zeros((1, 1, 1, 1), dtype=dt), _np(hs), block, nth,
               _np(grad_gi), _np(grad_gh), _np(grad_opre), _np(grad_q) if grad_q is not None else d3,
               _np(grad_v) if grad_v is not None else d1, _np(grad_keys), _np(grad_memory), _np(grad_h0),
               _np(grad_c0) if lstm else d3, _np(grad_feed0), gv_part)
    return DecoderGrads(grad_gi, grad_gh, grad_opre, grad_q, grad_v, grad_keys, grad_memory, grad_h0, grad_c0,
                        grad_feed0)
