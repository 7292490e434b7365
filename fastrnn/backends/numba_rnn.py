r"""Backend ``"numba"``: the recurrence as Numba-compiled CPU kernels (``fastrnn._numba``).

Implements the contract documented in ``fastrnn.backends.reference_rnn`` (one layer, one
direction, the whole sequence per call) and is tested against that reference.

How a call runs
---------------
Tensors cross as zero-copy numpy views (``t.detach().contiguous().numpy()``); the kernels
``rnn_kernels.rnn_forward`` / ``rnn_backward`` run the whole time loop in compiled code,
``rnn_kernels.gemm`` the op code's big GEMMs (``linear``, ``mm``, ``mm_tn`` below). They
pack ``W_hh`` (and ``W_hr``) once per call into register-tile panels, then each step is, per
thread and per group of hidden units, a register-blocked AVX-512 GEMM tile (``tile_gemm``,
written in LLVM IR) of ``h_{t-1} W_hh^T`` followed at once by the fused cell step on those
units, while the tile is in L1 (see the ``rnn_kernels`` docstring). Activated gates are
written over ``xw`` (the op code hands ``xw`` over as scratch). No BLAS, no per-step allocation.

What is saved (training=True; the same tuples as the reference backend)
------------------------------------------------------------------------
LSTM  ``(h_seq [T,B,Hr], acts [T,B,4H], c_seq [T,B,H][, hu_seq [T,B,H]])``: ``acts`` are the
      activated gates i, f, g, o, written in place over ``xw``; ``hu_seq = o * tanh(c_t)``
      only with a projection (the op code's ``dW_hr = grad_hproj^T hu``). Backward recomputes
      ``tanh(c_t)``.
GRU   ``(h_seq, acts [T,B,3H], hn_seq [T,B,H])``: r, z, n in place over ``xw``;
      ``hn_seq = h_{t-1} W_hn^T + b_hn``.
RNN   ``(h_seq,)``: the derivative of tanh / relu is read off ``h_t``.
Inactive rows (packed sequences) are zero in every saved tensor. ``training=False`` saves
nothing and keeps only [B, H]-sized scratch.

Variants (docs/variants.md)
---------------------------
The same kernels with a variant: their last argument is None for the plain cell (the
contract's checks normalise ``Variant()`` to None) or a tuple of the variant's arrays, absent
options as empty arrays (``rnn_kernels``' variant section); numba compiles the two apart, so
the plain kernel is exactly the plain path above. The whole time loop stays in compiled code.
A layer norm over all G entries of a row needs the row's whole product before any gate, so a
variant step is a few phases, each one parallel region: GEMM phases (weight panels split
between threads, the plain path's register tiles) and row phases (batch rows split between
threads; one pass over a row does the layer-norm statistics, gate math, peephole, cell state,
zoneout, reset and what backward needs); the gate math is the plain step's own. Parameter
gradients (layer norm, peephole) are accumulated per thread in the kernel and summed here.
What is saved is the default layout (``contract.rnn.saved_layout``): the plain tuple (``c_seq``
= c_t after zoneout; GRU ``hn_seq`` = the hidden-side n pre-activation as used), then
``hw_hat, hw_rstd`` (layer norm), ``c_hat, c_rstd`` (LSTM cell layer norm), ``c_new`` /
``h_new`` (LSTM / RNN zoneout).

Dtypes and compilation
----------------------
float32 and float64; every call of a kernel has the same argument types for a given dtype
(absent optional tensors are passed as empty arrays), so the plain path has exactly six compiled
signatures: {rnn_forward, rnn_backward, gemm} x {float32, float64}. First use of a dtype
compiles its three kernels (about 30 s on this 2-core machine, most of it for the parallel
regions) or loads them from the on-disk cache (about 1 s); ``info()`` reports how long that
took and whether it came from the cache. The variants' entry points (rnn_forward_var,
rnn_backward_var: the same kernels with a variant's argument types) add one signature each per
dtype, compiled (or loaded) only on the first call with a variant, under the same lock
(``compile_seconds["<dtype> variant"]``). Each kernel has a single ``prange`` (one dispatcher for
all its phases), which keeps their compile time down.

Big GEMMs
---------
The op code lets a backend run its big GEMMs (``linear``, ``mm``, ``mm_tn`` below). This one
does, with ``rnn_kernels.gemm`` (the same register tiles, on numba's threads): MKL's sgemm,
which torch would use, runs AVX2 code on this AMD CPU (about half the speed), and a GEMM on
torch's OpenMP pool would leave that pool's threads spinning for milliseconds afterwards
(measured: 4.4 ms of CPU burnt in the 30 ms after a torch matmul), competing with the
recurrence that follows on numba's threads.

On-disk cache (choice and why)
------------------------------
On by default; ``FASTRNN_NUMBA_CACHE=0`` turns it off (read when the kernels are first imported).
Numba's cache with fastrnn's checks around it, the same for attention (``fastrnn/_numba/runtime.py``):
the files go to ``fastrnn/_numba/__pycache__`` (or, where that is not writable, ``NUMBA_CACHE_DIR``
or Numba's user-wide cache directory; with none of them writable the kernels compile in memory,
with one warning). Numba keys entries on the kernel source file's timestamp, the argument types,
the Numba version and the host CPU (the kernels bake in the host's vector width), and writes each
file through a temporary name and an atomic rename; fastrnn stores each payload behind its
SHA-256, so a damaged entry is detected, deleted and rebuilt (one warning) instead of failing
every later process. Two more weaknesses are handled: (1) staleness across files -- every
function the kernels inline lives in the single file ``rnn_kernels.py``, whose timestamp is the
key; (2) several processes (pytest workers) compiling the same kernels at once -- the first use
of a dtype takes an exclusive file lock next to the cache (``runtime.compiling``), so one
process compiles and writes while the others wait and then load its result. The thread
count is a kernel argument, not ``numba.get_num_threads()`` called inside: that call embeds
a process-specific address, which makes a function uncacheable.

Threads
-------
A step runs as one ``prange`` region (two with a projection) over numba's threads, each thread
owning a contiguous share of the hidden units (and so of ``W_hh``, which stays in its core's
L2 across steps); a step with fewer than ``PAR_MIN_MACS`` multiply-adds runs on the calling
thread, because waking the pool costs more than it saves. The big GEMMs run on the same pool.
A call uses ``min(torch.get_num_threads(), numba.get_num_threads())`` threads
(``fastrnn.set_num_threads(n)`` sets both), one in a ``fork`` child (DataLoader workers: GNU
OpenMP's pool does not survive ``fork``, so the kernels take their serial path and open no
parallel region); calls from several Python threads at once are safe. All of this lives in
``fastrnn._numba.runtime.kernel_call`` (with the threading layer it picks, and why), which also
restores ``torch.get_num_threads()`` where numba's OpenMP start reset it (numba#9387). Both
pools spin for milliseconds after their last parallel region (GNU OpenMP's default), so work
that alternates between torch ops and numba kernels on a 2-core machine pays for it where the
switch happens.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..contract.checks import check_rnn_backward, check_rnn_forward
from ..contract.rnn import GATES, VariantGrads

name = "numba"

_kernels = None            # the fastrnn._numba.rnn_kernels module, or the reason it is unusable
_runtime = None            # fastrnn._numba.runtime (cache, threads, fork), once the kernels import
_compile_seconds: dict[str, dict[str, float]] = {}   # dtype name -> kernel name -> seconds
PAR_MIN_MACS: int | None = None   # None: the kernels' default


def _load():
    global _kernels, _runtime
    if _kernels is None:
        try:
            from .._numba import rnn_kernels, runtime
            _kernels, _runtime = rnn_kernels, runtime
        except Exception as exc:  # numba missing or broken
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
def _example_args(k, dtype: np.dtype):
    """Tiny arguments with the exact types of every real call (one signature per dtype)."""
    a1, a2, a3 = (np.zeros((1,) * n, dtype) for n in (1, 2, 3))   # (1, ...: the thread count)
    bs = np.ones(1, np.int64)
    fwd = (1, 1, 0, a3, a2, a1, a2, a2, a2, bs, False, False, (a3, a2, a2, a3, a3, a3), None)
    bwd = (1, 1, 0, a3, a2, a2, a2, a2, bs, False, (a3, a3, a3, a3), a2, a2, (a3, a3, a3), None)
    gemm = (1, a1, 1, 1, 1, a2, False, a1, a2)
    return {"rnn_forward": fwd, "rnn_backward": bwd, "gemm": gemm}


def _ensure_compiled(dtype: np.dtype) -> None:
    if dtype.name in _compile_seconds:
        return
    import numba
    k = _kernels_or_raise()
    times = {}
    with _runtime.compiling(k.rnn_forward):
        for kname, args in _example_args(k, dtype).items():
            t0 = time.perf_counter()
            getattr(k, kname).compile(tuple(numba.typeof(a) for a in args))
            times[kname] = time.perf_counter() - t0
    _compile_seconds[dtype.name] = times


def info(warm: bool = True) -> dict:
    """What ``python -m fastrnn info`` prints for this backend. With ``warm``, compiles (or loads
    from the cache) the float32 kernels first, so that ``compile_seconds`` is filled in."""
    k = _load()
    if isinstance(k, str):
        return {"available": False, "reason": k}
    import numba
    if warm:
        _ensure_compiled(np.dtype(np.float32))
    stats = {kname: getattr(k, kname).stats for kname in ("rnn_forward", "rnn_backward", "gemm")}
    return {
        "available": True,
        "numba": numba.__version__,
        "compile_seconds": {dt: dict(v) for dt, v in _compile_seconds.items()},
        "cache": {"enabled": k.CACHE,
                  "dir": stats["rnn_forward"].cache_path if k.CACHE else None,
                  "hits": sum(sum(s.cache_hits.values()) for s in stats.values()),
                  "misses": sum(sum(s.cache_misses.values()) for s in stats.values()),
                  "rebuilt_entries": list(_runtime.rebuilt_entries)},
        "threading_layer": _runtime.threading_layer(),
        "fork_child": _runtime.forked(),
        "numba_threads": numba.get_num_threads(),
        "vector_bytes": k.VEC_BYTES,
        # numba types are NumPy's, which have no bfloat16: no kernel can hold one, let alone reach
        # AVX512_BF16's vdpbf16ps (LLVM would have to see bf16 vectors); float16 arrays compute
        # through scalar conversions, slower than float32
        "low_precision": "bfloat16 / float16 compute in float32 (cast back, fastrnn.precision): numba has "
                         "no bfloat16 type, so its kernels cannot reach the bf16 dot-product instructions",
    }


# ---------------------------------------------------------------------------------------------
# the big GEMMs of the op code (input projection, grad_x, weight gradients): numba kernels on
# numba's threads, the same as the recurrence (see rnn_kernels.gemm for why not torch's)
# ---------------------------------------------------------------------------------------------
def _gemm(a, a_rs, a_ks, M, b, trans_b, bias, N):
    """The GEMM kernel on a contiguous ``a`` read with row / k strides (a_rs, a_ks); the dtype is
    checked before any tensor becomes a numpy array (numpy has no bfloat16)."""
    k = _kernels_or_raise()
    dt = _dtype(a, k)
    out = torch.empty(M, N, dtype=a.dtype)
    with _runtime.kernel_call() as nth:
        _run(k.gemm, dt, nth, a.numpy().reshape(-1), a_rs, a_ks, M, _np(b), trans_b,
             _np(bias) if bias is not None else np.empty(0, dt), out.numpy())
    return out


def linear(x, w, b):
    """x [M, I], w [G, I], b [G] | None -> x w^T + b [M, G]"""
    x = x.detach().contiguous()
    return _gemm(x, x.shape[1], 1, x.shape[0], w, False, b, w.shape[0])


def mm(a, b):
    """a [M, K], b [K, N] -> a b"""
    a = a.detach().contiguous()
    return _gemm(a, a.shape[1], 1, a.shape[0], b, True, None, b.shape[1])


def mm_tn(a, b):
    """a [K, M], b [K, N] -> a^T b (weight gradients: K = T*B); A = a^T is read in place."""
    a = a.detach().contiguous()
    return _gemm(a, 1, a.shape[1], a.shape[1], b, True, None, b.shape[1])


# ---------------------------------------------------------------------------------------------
# the contract
# ---------------------------------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _empty(ndim: int, dtype) -> np.ndarray:
    return np.empty((0,) * ndim, dtype)


def _dtype(t: torch.Tensor, k) -> np.dtype:
    dt = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}.get(t.dtype)
    if dt is None:
        raise TypeError(f"fastrnn: backend 'numba' supports float32 and float64, not {t.dtype}")
    return dt


def _batch_sizes(batch_sizes, T: int, B: int) -> np.ndarray:
    if batch_sizes is None:
        return np.full(T, B, np.int64)
    return batch_sizes.detach().to("cpu", torch.int64).contiguous().numpy()


def _min_macs(k) -> int:
    """Multiply-adds per step below which a step runs on one thread (tests set PAR_MIN_MACS = 0
    here to exercise the parallel path at small sizes)."""
    return k.PAR_MIN_MACS if PAR_MIN_MACS is None else PAR_MIN_MACS


def _run(kernel, dtype: np.dtype, nth: int, *args, variant: bool = False) -> None:
    """``kernel(nth, *args)`` inside ``runtime.kernel_call`` (nth: its thread count; 1 in a fork
    child, where the kernels open no parallel region), compiled first if needed: the plain
    kernels once per dtype (``_ensure_compiled``), a variant's entry point on its first call,
    under the same lock and timed for ``info()`` (one signature per dtype: absent options are
    empty arrays)."""
    _ensure_compiled(dtype)
    if variant:
        times = _compile_seconds.setdefault(dtype.name + " variant", {})
        name = kernel.py_func.__name__
        if name not in times:
            import numba
            with _runtime.compiling(kernel):
                t0 = time.perf_counter()
                kernel.compile(tuple(numba.typeof(a) for a in (nth,) + args))
                times[name] = time.perf_counter() - t0
    kernel(nth, *args)


def _options(v, w_hh, H: int, dt) -> tuple:
    """The options of a variant as the kernels take them (the start of ``rnn_kernels``' VAR)."""
    opt = lambda t, ndim: _empty(ndim, dt) if t is None else _np(t)  # noqa: E731
    reset = np.empty((0, 0), np.bool_) if v.reset is None else v.reset.detach().to(torch.bool).contiguous().numpy()
    w_n = _empty(2, dt) if v.reset_after else _np(w_hh[2 * H:])   # GRU reset_after=False: W_hn apart
    return (w_n, opt(v.ln_hh_weight, 1), opt(v.ln_hh_bias, 1), opt(v.ln_c_weight, 1), opt(v.ln_c_bias, 1),
            opt(v.peephole, 2), opt(v.rec_mask, 2), opt(v.zoneout_h, 3), opt(v.zoneout_c, 3), reset)


def _saves(v, cell: str) -> tuple:
    """Which of VAR's saved arrays (hw_hat, hw_rstd, c_hat, c_rstd, new_seq) the variant keeps,
    in saved_layout's order after the plain tuple."""
    ln, lnc = v.ln_hh_weight is not None, v.ln_c_weight is not None
    return (ln, ln, lnc, lnc, v.zoneout_h is not None and cell != "gru")


_SAVES_NDIM = (3, 2, 3, 2, 3)


def rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, variant=None):
    v = check_rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, variant)
    k = _kernels_or_raise()
    xw = xw.detach().contiguous()   # overwritten with the activated gates
    T, B, G = xw.shape
    H, Hr = G // GATES[cell], h0.shape[-1]
    dt = _dtype(xw, k)
    new = lambda *shape: torch.empty(*shape, dtype=xw.dtype)  # noqa: E731  (the kernel writes every entry)
    is_lstm, is_gru, proj = cell == "lstm", cell == "gru", w_hr is not None
    nT = T if training else 1      # per-step tensors: the whole sequence only when saved
    h_seq, h_T = new(T, B, Hr), new(B, Hr)
    c_T = new(B, H) if is_lstm else None
    c_seq = new(nT, B, H) if is_lstm else None
    hu_seq = new(nT, B, H) if proj else None
    hn_seq = new(nT, B, H) if is_gru else None
    o = lambda t, ndim: _empty(ndim, dt) if t is None else t.numpy()  # noqa: E731
    out = (h_seq.numpy(), h_T.numpy(), o(c_T, 2), o(c_seq, 3), o(hu_seq, 3), o(hn_seq, 3))
    shapes = ((nT, B, G), (nT, B), (nT, B, H), (nT, B), (nT, B, H))   # hw_hat, hw_rstd, c_hat, c_rstd, new_seq
    saves = [] if v is None else [new(*shape) if on else None for shape, on in zip(shapes, _saves(v, cell))]
    var = None if v is None else _options(v, w_hh, H, dt) + tuple(map(o, saves, _SAVES_NDIM))
    with _runtime.kernel_call() as nth:
        _run(k.rnn_forward if v is None else k.rnn_forward_var, dt, nth, _min_macs(k), k.CELL_CODES[cell],
             xw.numpy(), _np(w_hh), _np(b_hh) if b_hh is not None else np.zeros(G, dt), _np(h0),
             _np(c0) if is_lstm else _empty(2, dt), _np(w_hr) if proj else _empty(2, dt),
             _batch_sizes(batch_sizes, T, B), bool(reverse), bool(training), out, var, variant=v is not None)
    if not training:
        return h_seq, h_T, c_T, ()
    saved = (h_seq,) + ((xw, c_seq) + ((hu_seq,) if proj else ()) if is_lstm else (xw, hn_seq) if is_gru else ())
    return h_seq, h_T, c_T, saved + tuple(t for t in saves if t is not None)


def rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved,
                 variant=None):
    v = check_rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved,
                           variant)
    k = _kernels_or_raise()
    h_seq = saved[0]
    T, B, Hr = h_seq.shape
    G = w_hh.shape[0]
    H = G // GATES[cell]
    dt = _dtype(h_seq, k)
    is_lstm, is_gru, proj = cell == "lstm", cell == "gru", w_hr is not None
    new = lambda *shape: torch.empty(*shape, dtype=h_seq.dtype)  # noqa: E731
    zeros = lambda *shape: torch.zeros(*shape, dtype=h_seq.dtype)  # noqa: E731
    fresh = lambda g, *shape: (zeros(*shape) if g is None  # noqa: E731
                               else g.detach().to(h_seq.dtype).contiguous().clone())
    e2, e3 = _empty(2, dt), _empty(3, dt)
    # grad_hw apart from grad_xw where they differ: GRU's n gate (reset_after=True), layer norm
    separate = (is_gru and (v is None or v.reset_after)) or (v is not None and v.ln_hh_weight is not None)
    grad_xw = new(T, B, G)
    grad_hw = new(T, B, G) if separate else grad_xw
    grad_hproj = new(T, B, Hr) if proj else None
    dh = fresh(grad_h_T, B, Hr)                          # becomes grad_h0
    dc = fresh(grad_c_T, B, H) if is_lstm else None      # becomes grad_c0
    args = (_min_macs(k), k.CELL_CODES[cell], _np(grad_h_seq) if grad_h_seq is not None else np.zeros((T, B, Hr), dt),
            _np(w_hh), _np(w_hr) if proj else e2, _np(h0), _np(c0) if is_lstm else e2,
            _batch_sizes(batch_sizes, T, B), bool(reverse),
            (_np(h_seq), _np(saved[1]) if (is_lstm or is_gru) else e3, _np(saved[2]) if is_lstm else e3,
             _np(saved[2]) if is_gru else e3),
            dh.numpy(), dc.numpy() if is_lstm else e2,
            (grad_xw.numpy(), grad_hw.numpy(), grad_hproj.numpy() if proj else e3))
    vgrads = None
    with _runtime.kernel_call() as nth:   # the per-thread accumulators are sized by the call's threads
        if v is None:
            _run(k.rnn_backward, dt, nth, *args, None)
        else:
            later = iter(saved[{"lstm": 3 + proj, "gru": 3}.get(cell, 1):])   # after the plain tuple
            saves = tuple(_np(next(later)) if on else _empty(n, dt) for on, n in zip(_saves(v, cell), _SAVES_NDIM))
            ln, lnc = v.ln_hh_weight is not None, v.ln_c_weight is not None
            acc = (zeros(nth, G) if ln else None, zeros(nth, G) if ln else None, zeros(nth, H) if lnc else None,
                   zeros(nth, H) if lnc else None, zeros(nth, 3, H) if v.peephole is not None else None)
            var = (_options(v, w_hh, H, dt) + saves + tuple(e2 if g is None else g.numpy() for g in acc[:4])
                   + (e3 if acc[4] is None else acc[4].numpy(),))
            _run(k.rnn_backward_var, dt, nth, *args, var, variant=True)
            vgrads = VariantGrads(*(None if g is None else g.sum(0) for g in acc))   # per-thread partial sums
    return grad_xw, grad_hw, dh, dc, grad_hproj, vgrads
