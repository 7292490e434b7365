r"""Backend ``"triton"``: the recurrence contract of ``reference_rnn.py`` with one fused Triton kernel
per time step (``fastrnn/_triton/rnn_kernels.py``); see ``docs/triton.md``.

Forward, per step t (visiting order of the direction), rows ``[0, batch_sizes[t])``:
    ``rnn_fwd_step``   h_{t-1} @ W_hh^T (tl.dot, one accumulator per gate) + xw_t + b_hh, gate
                       activations, c/h update; writes h_seq[t] (or the unprojected output),
                       h_T (in place), c (in place) and, in training, what backward reads
    ``rnn_proj_step``  LSTM with proj_size only: h_t = hu_t @ W_hr^T
Backward, per step in reverse visiting order:
    ``rnn_bwd_dh``     LSTM with proj_size only: dh_t = grad_h_seq[t] + grad_hw_{next} @ W_hh over Hr
    ``rnn_bwd_step``   dh_t (fused in when there is no projection), then the gate gradients;
                       writes grad_xw[t] (and grad_hw[t] for GRU), dh and dc in place
    after the loop one ``rnn_bwd_dh`` with no active rows turns the last carry into grad_h0.

Buffers (``ACC`` = float32, or float64 for float64 inputs; other tensors in the input dtype)::
    h_seq  [T, B, Hr]  output; zero on inactive rows. It doubles as the history the next step
                       reads h_{t-1} from, so no state is ever read and written by one launch.
    h_T    [B, Hr]     each row's last state, written on every active step
    c      [B, H] ACC  cell state, read and written in place (each program owns its tile)
    dh, dc [B, Hr], [B, H] ACC   gradients carried from step to step, in place
What is saved for backward (``saved``, the same tuple as the reference; only ``c_seq`` differs,
it is kept in ACC so that float16 / bfloat16 runs keep a float32 cell state)::
    LSTM  (h_seq, acts [T, B, 4H] activated i f g o, c_seq [T, B, H] ACC[, hu_seq [T, B, H]
          = o * tanh(c), with proj_size])
    GRU   (h_seq, acts [T, B, 3H] activated r z n, hn_seq [T, B, H] = h W_hn^T + b_hn)
    RNN   (h_seq,)
Nothing is recomputed in backward except tanh(c_t). Weight gradients (dW_ih, dW_hh, biases) are
GEMMs in ``fastrnn/ops/rnn_layer.py``; ``grad_w_hr`` is one GEMM here over all steps.

Devices and dtypes: CUDA (float32, float16, bfloat16, float64), and CPU through the Triton
interpreter (``TRITON_INTERPRET=1`` set before triton is imported; float32 and float64).
Float32 ``tl.dot`` runs in IEEE precision by default (exact parity with the reference); set
``FASTRNN_TRITON_TF32=1`` for TF32 tensor cores (what cuDNN's RNN does by default).
On CUDA the time loop is captured once per problem shape as a CUDA graph and replayed
(``FASTRNN_TRITON_CUDA_GRAPHS=0`` turns it off); see ``_GraphCache``.
"""
from __future__ import annotations

import collections
import importlib
import os

import torch

from .. import _triton as _triton_pkg

from ..ops.recurrence import GATES, time_steps

name = "triton"

TF32_ENV = "FASTRNN_TRITON_TF32"
GRAPHS_ENV = "FASTRNN_TRITON_CUDA_GRAPHS"
GRAPH_CACHE_ENV = "FASTRNN_TRITON_GRAPH_CACHE"

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INTERPRETER_DTYPES = (torch.float32, torch.float64)  # the interpreter has no bfloat16

_kernels_module = None


def _kernels():
    """The kernel module, imported on first use (importing triton costs about a second)."""
    global _kernels_module
    if _kernels_module is None:
        _kernels_module = importlib.import_module("fastrnn._triton.rnn_kernels")
    return _kernels_module


def availability(device_type: str) -> str | None:
    return _triton_pkg.availability(device_type, _kernels)


# ----------------------------------------------------------------------------------------------
# one problem: everything a launch sequence depends on (also the CUDA graph cache key)
# ----------------------------------------------------------------------------------------------
_Plan = collections.namedtuple(
    "_Plan", "cell T B H Hr dtype device has_bias has_proj training reverse sizes packed dot_precision")


def _plan(cell, T, B, G, Hr, dtype, device, has_bias, has_proj, batch_sizes, reverse, training):
    if cell not in GATES:
        raise ValueError(f"fastrnn: unknown cell {cell!r}")
    interpreted = _kernels().INTERPRETED
    allowed = INTERPRETER_DTYPES if interpreted else GPU_DTYPES
    if dtype not in allowed:
        where = "the Triton interpreter" if interpreted else "the triton backend"
        raise TypeError(f"fastrnn: {where} supports dtypes {allowed}, got {dtype}")
    sizes = tuple(int(s) for s in batch_sizes.tolist()) if batch_sizes is not None else (B,) * T
    precision = "tf32" if dtype == torch.float32 and os.environ.get(TF32_ENV) == "1" else "ieee"
    return _Plan(cell, T, B, G // GATES[cell], Hr, dtype, device, has_bias, has_proj, bool(training),
                 bool(reverse), sizes, batch_sizes is not None, precision)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _constexprs(p):
    import triton.language as tl
    return dict(ACC=tl.float64 if p.dtype == torch.float64 else tl.float32, DOT_PRECISION=p.dot_precision)


def _grid(rows, cols):
    import triton
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_B"]), triton.cdiv(cols, meta["BLOCK_H"]))


def _new(p, *shape, dtype=None):
    """Outputs are zero on inactive rows; without packing every row is written."""
    make = torch.zeros if p.packed else torch.empty
    return make(*shape, dtype=dtype or p.dtype, device=p.device)


# ----------------------------------------------------------------------------------------------
# the time loops (plain launches; captured as a CUDA graph by _GraphCache on CUDA)
# ----------------------------------------------------------------------------------------------
def _forward_launches(p, xw, w_hh, b_hh, h0, c0, w_hr):
    k = _kernels()
    T, B, H, Hr, G = p.T, p.B, p.H, p.Hr, xw.shape[2]
    lstm, gru = p.cell == "lstm", p.cell == "gru"
    acc = _acc_dtype(p.dtype)
    h_seq = _new(p, T, B, Hr)
    h_T = h0.clone()
    c = c0.to(acc, copy=True) if lstm else None
    acts = _new(p, T, B, G) if p.training and (lstm or gru) else None
    c_seq = _new(p, T, B, H, dtype=acc) if p.training and lstm else None
    hn_seq = _new(p, T, B, H) if p.training and gru else None
    hu_seq = _new(p, T, B, H) if p.training and p.has_proj else None
    hu = torch.empty(B, H, dtype=p.dtype, device=p.device) if p.has_proj and not p.training else None
    dummy = xw
    flags = dict(CELL=k.CELL_CODES[p.cell], NG=GATES[p.cell], HAS_BIAS=p.has_bias, HAS_PROJ=p.has_proj,
                 TRAINING=p.training, **_constexprs(p))

    t_prev = None
    for t in time_steps(T, p.reverse):
        m = p.sizes[t]
        if m > 0:
            # rows < n_seq continue from h_seq[t_prev]; the rest (reverse, packed) start from h0
            n_seq = 0 if t_prev is None else min(m, p.sizes[t_prev])
            h_prev = h0 if t_prev is None else h_seq[t_prev]
            h_out = (hu_seq[t] if p.training else hu) if p.has_proj else h_seq[t]
            k.rnn_fwd_step[_grid(m, H)](
                xw[t], w_hh, b_hh if p.has_bias else dummy, h_prev, h0, c if lstm else dummy, h_out, h_T,
                acts[t] if acts is not None else dummy, c_seq[t] if c_seq is not None else dummy,
                hn_seq[t] if hn_seq is not None else dummy, m, n_seq, B, H, Hr, **flags)
            if p.has_proj:
                k.rnn_proj_step[_grid(m, Hr)](h_out, w_hr, h_seq[t], h_T, m, B, Hr, H, **_constexprs(p))
        t_prev = t

    if not p.training:
        saved = ()
    elif lstm:
        saved = (h_seq, acts, c_seq) + ((hu_seq,) if p.has_proj else ())
    elif gru:
        saved = (h_seq, acts, hn_seq)
    else:
        saved = (h_seq,)
    return h_seq, h_T, (c.to(p.dtype) if lstm else None), saved


def _backward_launches(p, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, *saved):
    k = _kernels()
    T, B, H, Hr = p.T, p.B, p.H, p.Hr
    G = w_hh.shape[0]
    lstm, gru = p.cell == "lstm", p.cell == "gru"
    acc = _acc_dtype(p.dtype)
    h_seq = saved[0]
    acts = saved[1] if lstm or gru else None
    state_seq = saved[2] if lstm or gru else h_seq  # c_seq (LSTM), hn_seq (GRU), h_seq (RNN)
    hu_seq = saved[3] if p.has_proj else None
    prev_seq, init = (state_seq, c0) if lstm else (h_seq, h0)  # what the forward step started from

    grad_xw = _new(p, T, B, G)
    grad_hw = _new(p, T, B, G) if gru else grad_xw
    dh = grad_h_T.to(acc, copy=True)
    dc = grad_c_T.to(acc, copy=True) if lstm else None
    grad_h0 = grad_h_T.clone()  # rows that are never active keep grad_h_T, as in the reference
    dh_seq = _new(p, T, B, Hr) if p.has_proj else None
    dummy = grad_xw
    flags = dict(NG=GATES[p.cell], **_constexprs(p))

    s_prev = None  # the step processed just before (t + 1 forward, t - 1 reverse)
    for t in time_steps(T, not p.reverse):
        m = p.sizes[t]
        m_prev = 0 if s_prev is None else p.sizes[s_prev]
        t_fwd_prev = t + 1 if p.reverse else t - 1
        has_fwd_prev = 0 <= t_fwd_prev < T
        n_seq = min(m, p.sizes[t_fwd_prev]) if has_fwd_prev else 0
        ghw_prev = grad_hw[s_prev if s_prev is not None else t]
        acts_prev = acts[s_prev] if gru and s_prev is not None else dummy
        rows = max(m, m_prev)
        if p.has_proj and rows > 0:
            k.rnn_bwd_dh[_grid(rows, Hr)](
                ghw_prev, acts_prev, w_hh, dh, grad_h0, grad_h_seq[t], dh_seq[t], m, m_prev, H, B, Hr, G,
                IS_GRU=False, HAS_PREV=s_prev is not None, STORE_SEQ=True, **flags)
            rows = m
        if rows > 0:
            k.rnn_bwd_step[_grid(rows, H)](
                ghw_prev, acts_prev, w_hh, w_hr if p.has_proj else dummy, dh, grad_h0, grad_h_seq[t],
                acts[t] if acts is not None else dummy, state_seq[t],
                prev_seq[t_fwd_prev] if has_fwd_prev else init, init if init is not None else dummy,
                dc if lstm else dummy, grad_xw[t], grad_hw[t], m, m_prev, n_seq, Hr, B, H, Hr,
                CELL=k.CELL_CODES[p.cell], HAS_PROJ=p.has_proj, HAS_PREV=s_prev is not None, **flags)
        s_prev = t

    m_last = p.sizes[s_prev]
    if m_last > 0:  # the carry out of the last step is grad_h0 for the rows active there
        k.rnn_bwd_dh[_grid(m_last, Hr)](
            grad_hw[s_prev], acts[s_prev] if gru else dummy, w_hh, dh, grad_h0, dummy, dummy,
            0, m_last, H, B, Hr, G, IS_GRU=gru, HAS_PREV=True, STORE_SEQ=False, **flags)

    grad_w_hr = None
    if p.has_proj:
        grad_w_hr = dh_seq.reshape(T * B, Hr).t() @ hu_seq.reshape(T * B, H)
    return grad_xw, grad_hw, grad_h0, (dc.to(p.dtype) if lstm else None), grad_w_hr


# ----------------------------------------------------------------------------------------------
# CUDA graphs: capture a whole time loop once per problem, replay it afterwards
# ----------------------------------------------------------------------------------------------
def _capture_cuda_graph(fn, static_args):
    """Capture ``fn(*static_args)`` as a CUDA graph; returns ``(replay, static_outputs)``."""
    # one eager run on the static tensors first, on a side stream as torch's recipe has it:
    # their pointer alignment may differ from the first call's and select another kernel
    # specialization, and nothing may be compiled during capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static_args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_args)
    return graph.replay, static_out


class _GraphCache:
    """Replays a captured time loop instead of launching T (or 2T) kernels from Python.

    The first call with a given plan runs eagerly: that compiles and autotunes every kernel the
    loop uses (neither may happen during capture), and a plan seen only once (a one-off batch
    shape) never pays for a capture. The second call captures the loop on static copies of its
    inputs; every later call copies its inputs into those, replays, and returns clones of the
    outputs (the next replay overwrites the static ones). At most ``FASTRNN_TRITON_GRAPH_CACHE``
    (default 8) graphs are kept, least recently used dropped first: each holds its own copy of
    the inputs and outputs in the graph's memory pool.
    """

    def __init__(self, capture=_capture_cuda_graph):
        self.capture = capture
        self.seen = collections.OrderedDict()
        self.graphs = collections.OrderedDict()

    @staticmethod
    def enabled(device: torch.device) -> bool:
        return (device.type == "cuda" and os.environ.get(GRAPHS_ENV, "1") != "0"
                and not _kernels().INTERPRETED and not torch.cuda.is_current_stream_capturing())

    def run(self, key, fn, args):
        limit = int(os.environ.get(GRAPH_CACHE_ENV, "8"))
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen:
                self.seen[key] = True
                while len(self.seen) > 4 * limit:
                    self.seen.popitem(last=False)
                return fn(*args)
            static_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            replay, static_out = self.capture(fn, static_args)
            entry = self.graphs[key] = (replay, static_args, static_out)
            while len(self.graphs) > limit:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        replay, static_args, static_out = entry
        for dst, src in zip(static_args, args):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        replay()
        return _clone_outputs(static_out, {})


def _clone_outputs(obj, memo):
    """Clone every tensor in a nest of tuples once (h_seq is both an output and saved)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.clone()
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_clone_outputs(o, memo) for o in obj)
    return obj


_graphs = _GraphCache()


def _launch(p, fn, args, direction):
    args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
    if p.device.type != "cuda":
        return fn(p, *args)
    with torch.cuda.device(p.device), torch.no_grad():
        if _GraphCache.enabled(p.device):
            return _graphs.run((direction, p), lambda *a: fn(p, *a), args)
        return fn(p, *args)


# ----------------------------------------------------------------------------------------------
# the contract
# ----------------------------------------------------------------------------------------------
def rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training):
    T, B, G = xw.shape
    p = _plan(cell, T, B, G, h0.shape[-1], xw.dtype, xw.device, b_hh is not None, w_hr is not None,
              batch_sizes, reverse, training)
    return _launch(p, _forward_launches, [xw, w_hh, b_hh, h0, c0, w_hr], "fwd")


def rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved):
    T, B, Hr = saved[0].shape  # saved[0] is h_seq; the bias plays no part in backward
    p = _plan(cell, T, B, w_hh.shape[0], Hr, saved[0].dtype, saved[0].device, False, w_hr is not None,
              batch_sizes, reverse, True)
    return _launch(p, _backward_launches, [grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, *saved], "bwd")
