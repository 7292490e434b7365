r"""Backend ``"triton"``: the recurrence contract of ``reference_rnn.py`` with fused Triton kernels per
time step (``fastrnn/_triton/rnn_kernels.py``), for the plain cells and every variant of
docs/variants.md; see ``docs/triton.md``.

One kernel family serves both: an option is on when its tensor is passed and off when it is
None, which Triton compiles away, so the plain cell (``variant=None``) runs plain code. Launches
pass keyword arguments. Forward, per step t (visiting order of the direction), rows
``[0, batch_sizes[t])``:
    [``rnn_gemm``    layer norm: the raw product a = h_in @ W_hh^T that the row programs normalise]
    ``rnn_fwd``      h_in @ W_hh^T (tl.dot, one accumulator per gate; layer norm: LN(a)) + xw_t + b_hh,
                     gate activations, c/h update; writes h_seq[t] (or the unprojected output), h_T
                     (in place), c (in place) and, in training, what backward reads. GRU
                     reset_after=False: twice (PHASE 1: r, z, r * h_in; PHASE 2: n and h)
    [``rnn_gemm``    LSTM with proj_size: h_t = zoneout(hu_t @ W_hr^T)]
Backward, per step in reverse visiting order:
    [``rnn_bwd_dh``  layer norm or proj_size: dh_t = grad_h_seq[t] + carry over Hr; dh_new -> grad_hproj[t]]
    [``rnn_gemm``    layer norm with proj_size: dhu = dh_new @ W_hr]
    ``rnn_bwd``      dh_t (fused in: tile mode without projection) or dhu = dh_new @ W_hr (fused in:
                     tile mode with projection), then the gate gradients; writes grad_xw[t]
                     (grad_hw[t] when it differs: GRU, layer norm), dh and dc in place
    [``rnn_bwd_rb``  GRU reset_after=False: d(r h_in) = d_n @ W_hn, then d_r]
    after the loop one ``rnn_bwd_dh`` with no active rows turns the last carry into grad_h0.

Buffers (``ACC`` = float32, or float64 for float64 inputs; other tensors in the input dtype)::
    h_seq  [T, B, Hr]  output; zero on inactive rows. It doubles as the history the next step
                       reads h_{t-1} from, so no state is ever read and written by one launch.
    h_T    [B, Hr]     each row's last state, written on every active step
    c      [B, H] ACC  cell state, read and written in place (each program owns its tile)
    dh, dc [B, Hr], [B, H] ACC   gradients carried from step to step, in place
What is saved for backward is the contract's layout by name (``saved_layout`` below), LSTM's
``c_seq`` in ACC so that float16 / bfloat16 runs keep a float32 cell state. Nothing is recomputed
in backward except tanh(c_t) (and tanh(LN(c_t))). Weight gradients (dW_ih, dW_hh, dW_hr, biases)
are GEMMs in ``fastrnn/ops/rnn_layer.py``: backward returns ``grad_hproj`` (the gradient of each
step's projected output, ``dh_new``) for dW_hr. ``VariantGrads`` are sums over all steps formed
after the loop (``_variant_param_grads``).

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
from ..contract import rnn as recurrence
from ..contract.checks import check_rnn_backward, check_rnn_forward
from ..contract.rnn import GATES, Variant, VariantGrads, by_name, previous_states, time_steps

name = "triton"
# float16 / bfloat16 run natively (float32 state and accumulation); the other backends compute in
# float32 / float64 only (fastrnn.backends.plan)
dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

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
    "_Plan", "cell T B H Hr dtype device has_bias has_proj training reverse sizes packed dot_precision var",
    defaults=(None,))

# Which variant options are on; all off for the plain cell.
_VarFlags = collections.namedtuple("_VarFlags", "ln ln_c peep mask zh zc reset rb", defaults=(False,) * 8)
_N_VAR = len(Variant._fields) - 1  # the Variant's tensors (reset_after is a flag)


def _var_flags(cell, v):
    """The flags of a variant as the contract check returned it (None for the plain cell)."""
    if v is None:
        return _VarFlags()
    return _VarFlags(ln=v.ln_hh_weight is not None, ln_c=v.ln_c_weight is not None, peep=v.peephole is not None,
                     mask=v.rec_mask is not None, zh=v.zoneout_h is not None, zc=v.zoneout_c is not None,
                     reset=v.reset is not None, rb=cell == "gru" and not v.reset_after)


def _plan(cell, T, B, G, Hr, dtype, device, has_bias, has_proj, batch_sizes, reverse, training, var=None):
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
                 bool(reverse), sizes, batch_sizes is not None, precision, _VarFlags() if var is None else var)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _constexprs(p):
    import triton.language as tl
    return dict(ACC=tl.float64 if p.dtype == torch.float64 else tl.float32, DOT_PRECISION=p.dot_precision)


def _grid(rows, cols, row_mode=False):
    """Tile grid, or row mode (layer norm: a program owns whole rows)."""
    import triton
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_B"]), 1 if row_mode else triton.cdiv(cols, meta["BLOCK_H"]))


def _new(p, *shape, dtype=None):
    """Outputs are zero on inactive rows; without packing every row is written."""
    make = torch.zeros if p.packed else torch.empty
    return make(*shape, dtype=dtype or p.dtype, device=p.device)


def _at(seq, t):
    """Step t of a per-step tensor; None for an option that is off (or no step: t None)."""
    return None if seq is None or t is None else seq[t]


def _layout(p, v):
    return saved_layout(p.cell, p.T, p.B, p.H, p.Hr, p.dtype, p.has_proj, True, v)


# ----------------------------------------------------------------------------------------------
# the time loops (captured as a CUDA graph by _GraphCache on CUDA)
# ----------------------------------------------------------------------------------------------
def _forward_launches(p, xw, w_hh, b_hh, h0, c0, w_hr, *var):
    """The forward time loop; ``var``: the variant's tensors in ``Variant`` order (none: plain)."""
    k, f, v = _kernels(), p.var, Variant(*var)
    T, B, H, Hr, G = p.T, p.B, p.H, p.Hr, xw.shape[2]
    lstm, gru, train = p.cell == "lstm", p.cell == "gru", p.training
    acc = _acc_dtype(p.dtype)
    saved = lambda on, *shape, dtype=None: _new(p, T, B, *shape, dtype=dtype) if train and on else None
    scratch = lambda on, *shape: torch.empty(B, *shape, dtype=acc, device=p.device) if on else None
    h_seq = _new(p, T, B, Hr)
    h_T = h0.clone()
    c = c0.to(acc, copy=True) if lstm else None
    acts = saved(lstm or gru, G)
    c_seq, hn_seq, hu_seq = saved(lstm, H, dtype=acc), saved(gru, H), saved(p.has_proj, H)
    hat, rstd, chat, crstd = saved(f.ln, G), saved(f.ln), saved(f.ln_c, H), saved(f.ln_c)
    new_seq = saved(f.zh and not gru, H)  # zoneout: LSTM c_new / RNN h_new, before mixing
    # gates read back within a step (o for the cell-state norm, r and z across the GRU phases)
    acts_tmp = scratch(acts is None and (f.ln_c or f.rb), G)
    cnew_tmp = scratch(f.ln_c and new_seq is None, H)  # c_new of a whole row, for the cell-state norm
    hu = torch.empty(B, H, dtype=p.dtype, device=p.device) if p.has_proj and not train else None
    a_buf, rh = scratch(f.ln, G), scratch(f.rb, H)
    reset = v.reset.view(torch.uint8) if f.reset else None
    consts = _constexprs(p)
    fwd = dict(w_hh_ptr=w_hh, b_hh_ptr=b_hh, c_ptr=c, c0_ptr=c0 if f.reset else None, rmask_ptr=v.rec_mask,
               peep_ptr=v.peephole, a_ptr=a_buf, lnw_ptr=v.ln_hh_weight, lnb_ptr=v.ln_hh_bias,
               lncw_ptr=v.ln_c_weight, lncb_ptr=v.ln_c_bias, rh_ptr=rh, B=B, N=H, K=Hr,
               CELL=k.CELL_CODES[p.cell], NG=GATES[p.cell], LN=f.ln, **consts)

    t_prev = None
    for t in time_steps(T, p.reverse):
        m = p.sizes[t]
        if m > 0:
            # rows < n_seq continue from h_seq[t_prev]; the rest (reverse, packed) start from h0
            n_seq = 0 if t_prev is None else min(m, p.sizes[t_prev])
            state = dict(h_prev_ptr=h0 if t_prev is None else h_seq[t_prev], h0_ptr=h0, reset_ptr=_at(reset, t),
                         m=m, n_seq=n_seq)
            h_out = (hu_seq[t] if train else hu) if p.has_proj else h_seq[t]
            if f.ln:
                k.rnn_gemm[_grid(m, G)](a_ptr=None, w_ptr=w_hh, out_ptr=a_buf, rmask_ptr=v.rec_mask, zh_ptr=None,
                                        h_T_ptr=None, stride_wk=1, stride_wn=Hr, B=B, N=G, K=Hr, **state, **consts)
            step = dict(xw_ptr=xw[t], h_out_ptr=h_out, acts_ptr=acts_tmp if acts is None else acts[t],
                        c_seq_ptr=_at(c_seq, t), hn_ptr=_at(hn_seq, t), zc_ptr=_at(v.zoneout_c, t),
                        hat_ptr=_at(hat, t), rstd_ptr=_at(rstd, t), chat_ptr=_at(chat, t), crstd_ptr=_at(crstd, t),
                        cnew_ptr=cnew_tmp if cnew_tmp is not None else _at(new_seq if lstm else None, t),
                        hnew_ptr=None if lstm else _at(new_seq, t),
                        # with a projection rnn_gemm writes h_t, zoned out, and h_T
                        h_T_ptr=None if p.has_proj else h_T, zh_ptr=None if p.has_proj else _at(v.zoneout_h, t))
            for phase in ((1, 2) if f.rb else (0,)):
                k.rnn_fwd[_grid(m, H, f.ln)](**fwd, **state, **step, PHASE=phase)
            if p.has_proj:
                k.rnn_gemm[_grid(m, Hr)](a_ptr=h_out, w_ptr=w_hr, out_ptr=h_seq[t], rmask_ptr=None,
                                         zh_ptr=_at(v.zoneout_h, t), h_T_ptr=h_T, stride_wk=1, stride_wn=H,
                                         B=B, N=Hr, K=H, **state, **consts)
        t_prev = t

    c_T = c.to(p.dtype) if lstm else None
    if not train:
        return h_seq, h_T, c_T, ()
    named = dict(h_seq=h_seq, gates=acts, c_seq=c_seq, hu=hu_seq, h_n=hn_seq, hw_hat=hat, hw_rstd=rstd,
                 c_hat=chat, c_rstd=crstd, c_new=new_seq, h_new=new_seq)
    return h_seq, h_T, c_T, tuple(named[entry.name] for entry in _layout(p, v))


def _backward_launches(p, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, *var_saved):
    """The backward time loop; ``var_saved``: the variant's tensors in ``Variant`` order (None
    for the plain cell), then ``saved``. Returns the contract's first five gradients and ``dyc``
    [T, B, H] (the gradient at LN(c_new)'s output; None without the cell-state norm), from which
    ``_variant_param_grads`` forms ``VariantGrads`` after the loop."""
    k, f, v = _kernels(), p.var, Variant(*var_saved[:_N_VAR])
    s = by_name(_layout(p, v), var_saved[_N_VAR:])
    T, B, H, Hr = p.T, p.B, p.H, p.Hr
    G = w_hh.shape[0]
    lstm, gru = p.cell == "lstm", p.cell == "gru"
    acc = _acc_dtype(p.dtype)
    h_seq, acts, c_seq = s["h_seq"], s.get("gates"), s.get("c_seq")
    new_seq = s.get("c_new", s.get("h_new"))  # zoneout: the state before mixing
    state_seq = s["h_n"] if gru else (new_seq if new_seq is not None else h_seq)  # GRU h_n, RNN h_new
    cnew_seq = (c_seq if new_seq is None else new_seq) if lstm else None
    prev_seq, init = (c_seq, c0) if lstm else (h_seq, h0)  # what the forward step started from

    scratch = lambda on, *shape: torch.zeros(B, *shape, dtype=acc, device=p.device) if on else None
    grad_xw = _new(p, T, B, G)
    grad_hw = _new(p, T, B, G) if gru or f.ln else grad_xw
    dh = grad_h_T.to(acc, copy=True)
    dc = grad_c_T.to(acc, copy=True) if lstm else None
    grad_h0 = grad_h_T.clone()  # rows that are never active keep grad_h_T, as in the reference
    h0acc, c0acc = scratch(f.reset, Hr), scratch(f.reset and lstm, H)  # gradients reaching h0 / c0 by resets
    grad_hproj = _new(p, T, B, Hr) if p.has_proj else None  # dh_new per step
    dh_new, dhu = scratch(f.ln and not p.has_proj, Hr), scratch(f.ln and p.has_proj, H)
    dyc = _new(p, T, B, H, dtype=acc) if f.ln_c else None
    x_rb = scratch(f.rb, H)
    reset = v.reset.view(torch.uint8) if f.reset else None
    kd = 2 * H if f.rb else G
    fuse = not (f.ln or p.has_proj)  # tile mode without projection: rnn_bwd forms dh_t itself
    consts = _constexprs(p)
    gates = dict(w_hr_ptr=w_hr if not f.ln else None, init_ptr=init, dc_ptr=dc, c0acc_ptr=c0acc,
                 peep_ptr=v.peephole, lnw_ptr=v.ln_hh_weight, lncw_ptr=v.ln_c_weight, lncb_ptr=v.ln_c_bias,
                 KD=kd, HR=Hr, B=B, N=H, K=G, CELL=k.CELL_CODES[p.cell], NG=GATES[p.cell], LN=f.ln, RB=f.rb,
                 **consts)

    def carry(sp, t):
        """``_dh_carry``'s arguments: sp the step processed before t (t None: after the loop)."""
        return dict(ghw_prev_ptr=grad_hw[sp], acts_prev_ptr=acts[sp] if gru else None, x_prev_ptr=x_rb,
                    w_hh_ptr=w_hh, dh_ptr=dh, grad_h0_ptr=grad_h0, h0acc_ptr=h0acc, grad_h_ptr=_at(grad_h_seq, t),
                    rmask_ptr=v.rec_mask, zh_prev_ptr=_at(v.zoneout_h, sp), reset_prev_ptr=_at(reset, sp),
                    zh_ptr=_at(v.zoneout_h, t))

    s_prev = None  # the step processed just before (t + 1 forward, t - 1 reverse)
    for t in time_steps(T, not p.reverse):
        m = p.sizes[t]
        m_prev = 0 if s_prev is None else p.sizes[s_prev]
        t_fwd_prev = t + 1 if p.reverse else t - 1
        has_fwd_prev = 0 <= t_fwd_prev < T
        n_seq = min(m, p.sizes[t_fwd_prev]) if has_fwd_prev else 0
        rows = max(m, m_prev)
        dh_args = carry(t if s_prev is None else s_prev, t)
        ints = dict(m=m, m_prev=m_prev, HAS_PREV=s_prev is not None)
        dnew = grad_hproj[t] if p.has_proj else dh_new  # dh_new = (1 - zoneout_h) dh_t
        if rows > 0 and not fuse:
            k.rnn_bwd_dh[_grid(rows, Hr)](**dh_args, **ints, dhnew_ptr=dnew, H=H, KD=kd, B=B, N=Hr, K=G, **consts)
        if m > 0 and f.ln and p.has_proj:  # row programs have no tl.dot: dhu = dh_new @ W_hr first
            k.rnn_gemm[_grid(m, H)](a_ptr=grad_hproj[t], w_ptr=w_hr, out_ptr=dhu, h_prev_ptr=None, h0_ptr=None,
                                    rmask_ptr=None, reset_ptr=None, zh_ptr=None, h_T_ptr=None, m=m, n_seq=0,
                                    stride_wk=H, stride_wn=1, B=B, N=H, K=Hr, **consts)
        prev_t = prev_seq[t_fwd_prev] if has_fwd_prev else init
        if (rows if fuse else m) > 0:
            k.rnn_bwd[_grid(rows if fuse else m, H, f.ln)](
                **gates, **(dh_args if fuse else dict.fromkeys(dh_args)), **ints, n_seq=n_seq,
                dnew_ptr=None if fuse else (dhu if f.ln and p.has_proj else dnew),
                acts_ptr=_at(acts, t), cnew_ptr=_at(cnew_seq, t), prev_ptr=prev_t, state_ptr=_at(state_seq, t),
                grad_xw_ptr=grad_xw[t], grad_hw_ptr=None if grad_hw is grad_xw else grad_hw[t],
                reset_ptr=_at(reset, t), zc_ptr=_at(v.zoneout_c, t), hat_ptr=_at(s.get("hw_hat"), t),
                rstd_ptr=_at(s.get("hw_rstd"), t), chat_ptr=_at(s.get("c_hat"), t),
                crstd_ptr=_at(s.get("c_rstd"), t), dyc_ptr=_at(dyc, t))
        if m > 0 and f.rb:
            k.rnn_bwd_rb[_grid(m, H)](grad_xw_ptr=grad_xw[t], grad_hw_ptr=grad_hw[t], w_hh_ptr=w_hh,
                                      acts_ptr=acts[t], h_prev_ptr=prev_t, h0_ptr=h0, rmask_ptr=v.rec_mask,
                                      reset_ptr=_at(reset, t), x_ptr=x_rb, m=m, n_seq=n_seq, B=B, N=H, K=G,
                                      **consts)
        s_prev = t

    m_last = p.sizes[s_prev]
    if m_last > 0:  # the carry out of the last step is grad_h0 for the rows active there
        k.rnn_bwd_dh[_grid(m_last, Hr)](**carry(s_prev, None), dhnew_ptr=None, m=0, m_prev=m_last, HAS_PREV=True,
                                        H=H, KD=kd, B=B, N=Hr, K=G, **consts)
    if f.reset:
        grad_h0 += h0acc.to(p.dtype)
    grad_c0 = (dc + c0acc if f.reset else dc).to(p.dtype) if lstm else None
    return grad_xw, grad_hw, grad_h0, grad_c0, grad_hproj, dyc


def _variant_param_grads(p, grad_xw, dyc, c0, v, saved):
    """``VariantGrads``: sums over all steps and rows of per-step products the loop left in
    memory (inactive rows are zero in every gradient, so they add nothing). Runs after the time
    loop, outside its CUDA graph: ``previous_states`` copies ``batch_sizes`` to the device."""
    s = by_name(_layout(p, v), saved)
    H, dims, out = p.H, (0, 1), {}
    if v.ln_hh_weight is not None:  # the gradient after the norm: d_xw, except GRU's n entries (times r)
        post = grad_xw
        if p.cell == "gru":
            post = torch.cat([grad_xw[..., :2 * H], grad_xw[..., 2 * H:] * s["gates"][..., :H]], -1)
        out.update(ln_hh_weight=(post * s["hw_hat"]).sum(dims), ln_hh_bias=post.sum(dims))
    if v.ln_c_weight is not None:
        out.update(ln_c_weight=(dyc * s["c_hat"]).sum(dims).to(p.dtype), ln_c_bias=dyc.sum(dims).to(p.dtype))
    if v.peephole is not None:
        c_seq = s["c_seq"]
        c0 = c0.to(c_seq.dtype)
        c_prev = previous_states(c_seq, c0, _batch_sizes(p), p.reverse)
        if v.reset is not None:
            c_prev = torch.where(v.reset.unsqueeze(-1), c0.unsqueeze(0), c_prev)
        out.update(peephole=torch.stack([(grad_xw[..., :H] * c_prev).sum(dims),
                                         (grad_xw[..., H:2 * H] * c_prev).sum(dims),
                                         (grad_xw[..., 3 * H:] * s.get("c_new", c_seq)).sum(dims)]).to(p.dtype))
    return VariantGrads(**out)


def _batch_sizes(p):
    return torch.tensor(p.sizes, dtype=torch.int64) if p.packed else None


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
def _variant_tensors(variant):
    return list(variant or Variant())[:_N_VAR]


def rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, variant=None):
    variant = check_rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, variant)
    T, B, G = xw.shape
    p = _plan(cell, T, B, G, h0.shape[-1], xw.dtype, xw.device, b_hh is not None, w_hr is not None,
              batch_sizes, reverse, training, _var_flags(cell, variant))
    return _launch(p, _forward_launches, [xw, w_hh, b_hh, h0, c0, w_hr, *_variant_tensors(variant)], "fwd")


def rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved,
                 variant=None):
    """The contract's backward: ``(grad_xw, grad_hw, grad_h0, grad_c0, grad_hproj, VariantGrads | None)``."""
    variant = check_rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse,
                                 saved, variant, layout=saved_layout)
    T, B, Hr = saved[0].shape  # saved[0] is h_seq; the bias plays no part in backward
    p = _plan(cell, T, B, w_hh.shape[0], Hr, saved[0].dtype, saved[0].device, False, w_hr is not None,
              batch_sizes, reverse, True, _var_flags(cell, variant))
    *grads, dyc = _launch(p, _backward_launches, [grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0,
                                                  *_variant_tensors(variant), *saved], "bwd")
    return (*grads, None if variant is None else _variant_param_grads(p, grads[0], dyc, c0, variant, saved))


def saved_layout(cell, T, B, H, Hr, dtype, has_proj, training, variant=None, state_dtype=None):
    """The default layout (``fastrnn.contract.rnn.saved_layout``) with LSTM's ``c_seq`` in the
    accumulation dtype: float32 for float16 / bfloat16 runs (the cell state stays float32)."""
    if state_dtype is None and cell == "lstm":
        state_dtype = _acc_dtype(dtype)
    return recurrence.saved_layout(cell, T, B, H, Hr, dtype, has_proj, training, variant, state_dtype)
