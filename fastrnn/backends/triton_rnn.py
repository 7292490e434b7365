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

Variants (``variant=``, docs/variants.md): ``_forward_var`` / ``_backward_var`` run the variant
kernels (every option a compile-time flag; layer norm in row mode, see docs/triton.md) and save
the default layout (``saved_layout`` below: LSTM's ``c_seq`` in ACC); ``VariantGrads`` are sums
over all steps formed after the loop (``_variant_param_grads``). ``variant=None`` or ``Variant()``
runs the plain loops above, unchanged.

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

from ..ops import recurrence
from ..ops.checks import check_rnn_backward, check_rnn_forward
from ..ops.recurrence import (GATES, Variant, VariantGrads, check_variant, is_plain, previous_states,
                              recurrent_inputs, time_steps)

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

# Which variant options are on (the compile-time flags of the variant kernels); None = plain.
_VarFlags = collections.namedtuple("_VarFlags", "ln ln_c peep mask zh zc reset rb")


def _var_flags(cell, variant):
    if is_plain(variant):
        return None
    v = check_variant(cell, variant)
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
                 bool(reverse), sizes, batch_sizes is not None, precision, var)


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
# variants (docs/variants.md): the same loops over the variant kernels of rnn_kernels.py
# ----------------------------------------------------------------------------------------------
_VAR_FIELDS = ("ln_hh_weight", "ln_hh_bias", "ln_c_weight", "ln_c_bias", "peephole", "rec_mask",
               "zoneout_h", "zoneout_c", "reset")  # the Variant's tensors, in launch-argument order


def _var_constexprs(p):
    v = p.var
    return dict(HAS_RESET=v.reset, HAS_MASK=v.mask, **_constexprs(p))


def _row_or_tile_grid(p, rows, cols):
    """Row mode (layer norm: a program owns whole rows) or the tile grid of the plain kernels."""
    import triton
    if p.var.ln:
        return lambda meta: (triton.cdiv(rows, meta["BLOCK_B"]), 1)
    return _grid(rows, cols)


def _step(seq, t, dummy):
    return seq[t] if seq is not None else dummy


def _forward_var(p, xw, w_hh, b_hh, h0, c0, w_hr, lnw, lnb, lncw, lncb, peep, rmask, zh, zc, reset):
    """The forward time loop of a variant. Per step: [``rnn_var_gemm`` (layer norm)],
    ``rnn_fwd_var`` (GRU reset_after=False: twice, PHASE 1 then 2), [``rnn_proj_var``]."""
    k = _kernels()
    v = p.var
    T, B, H, Hr, G = p.T, p.B, p.H, p.Hr, xw.shape[2]
    lstm, gru = p.cell == "lstm", p.cell == "gru"
    train = p.training
    acc = _acc_dtype(p.dtype)
    h_seq = _new(p, T, B, Hr)
    h_T = h0.clone()
    c = c0.to(acc, copy=True) if lstm else None
    acts = _new(p, T, B, G) if train and (lstm or gru) else None
    # gates read back within a step (o for the cell-state norm, r and z across the GRU phases)
    acts_tmp = (torch.empty(B, G, dtype=acc, device=p.device)
                if acts is None and (v.ln_c or v.rb) else None)
    c_seq = _new(p, T, B, H, dtype=acc) if train and lstm else None
    hn_seq = _new(p, T, B, H) if train and gru else None
    hu_seq = _new(p, T, B, H) if train and p.has_proj else None
    hu = torch.empty(B, H, dtype=p.dtype, device=p.device) if p.has_proj and not train else None
    hat = _new(p, T, B, G) if train and v.ln else None
    rstd = _new(p, T, B) if train and v.ln else None
    chat = _new(p, T, B, H) if train and v.ln_c else None
    crstd = _new(p, T, B) if train and v.ln_c else None
    new_seq = _new(p, T, B, H) if train and v.zh and not gru else None  # LSTM c_new / RNN h_new
    cnew_tmp = (torch.empty(B, H, dtype=acc, device=p.device)
                if v.ln_c and (new_seq is None or not lstm) else None)
    a_buf = torch.empty(B, G, dtype=acc, device=p.device) if v.ln else None
    rh = torch.empty(B, H, dtype=acc, device=p.device) if v.rb else None
    reset = reset.view(torch.uint8) if reset is not None else None
    dummy = xw
    d = lambda x: x if x is not None else dummy  # noqa: E731
    flags = dict(CELL=k.CELL_CODES[p.cell], NG=GATES[p.cell], HAS_BIAS=p.has_bias, HAS_PROJ=p.has_proj,
                 TRAINING=train, PEEP=v.peep, ZONE_H=v.zh, ZONE_C=v.zc, LN=v.ln, LN_C=v.ln_c,
                 **_var_constexprs(p))

    t_prev = None
    for t in time_steps(T, p.reverse):
        m = p.sizes[t]
        if m > 0:
            n_seq = 0 if t_prev is None else min(m, p.sizes[t_prev])
            h_prev = h0 if t_prev is None else h_seq[t_prev]
            h_out = (hu_seq[t] if train else hu) if p.has_proj else h_seq[t]
            reset_t, zh_t = _step(reset, t, dummy), _step(zh, t, dummy)
            if v.ln:
                k.rnn_var_gemm[_grid(m, G)](h_prev, h0, d(rmask), reset_t, w_hh, a_buf, m, n_seq, B, G, Hr,
                                            LN=False, **_var_constexprs(p))
            cnew_t = cnew_tmp if cnew_tmp is not None else _step(new_seq if lstm else None, t, dummy)
            args = (xw[t], w_hh, d(b_hh), h_prev, h0, d(c), d(c0), h_out, h_T,
                    acts[t] if acts is not None else d(acts_tmp), _step(c_seq, t, dummy), _step(hn_seq, t, dummy),
                    reset_t, d(rmask), zh_t, _step(zc, t, dummy), d(peep),
                    d(a_buf), d(lnw), d(lnb), _step(hat, t, dummy), _step(rstd, t, dummy), d(lncw), d(lncb),
                    _step(chat, t, dummy), _step(crstd, t, dummy), cnew_t,
                    _step(new_seq if not lstm else None, t, dummy), d(rh), m, n_seq, B, H, Hr)
            grid = _row_or_tile_grid(p, m, H)
            for phase in ((1, 2) if v.rb else (0,)):
                k.rnn_fwd_var[grid](*args, PHASE=phase, **flags)
            if p.has_proj:
                k.rnn_proj_var[_grid(m, Hr)](h_out, w_hr, h_seq[t], h_T, h_prev, h0, zh_t, reset_t, m, n_seq,
                                             B, Hr, H, BWD=False, HAS_RESET=v.reset, ZONE_H=v.zh, LN=False,
                                             **_constexprs(p))
        t_prev = t

    if not train:
        return h_seq, h_T, (c.to(p.dtype) if lstm else None), ()
    if lstm:
        saved = (h_seq, acts, c_seq) + ((hu_seq,) if p.has_proj else ())
    elif gru:
        saved = (h_seq, acts, hn_seq)
    else:
        saved = (h_seq,)
    saved += (hat, rstd) if v.ln else ()
    saved += (chat, crstd) if v.ln_c else ()
    saved += (new_seq,) if new_seq is not None else ()
    return h_seq, h_T, (c.to(p.dtype) if lstm else None), saved


def _backward_var(p, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0,
                  lnw, lnb, lncw, lncb, peep, rmask, zh, zc, reset, *saved):
    """The backward time loop of a variant. Per step (reverse visiting order): [``rnn_bwd_dh_var``
    (dh_t over Hr; layer norm or proj_size only)], [``rnn_proj_var`` BWD], ``rnn_bwd_var`` (which
    otherwise forms dh_t itself), [``rnn_bwd_gru_rb``]. Returns the
    contract's five gradients and ``dyc`` [T, B, H] (LSTM cell-state norm, else None), from which
    ``_variant_param_grads`` forms ``VariantGrads`` after the loop."""
    k = _kernels()
    v = p.var
    T, B, H, Hr = p.T, p.B, p.H, p.Hr
    G = w_hh.shape[0]
    lstm, gru = p.cell == "lstm", p.cell == "gru"
    acc = _acc_dtype(p.dtype)
    h_seq = saved[0]
    acts = saved[1] if lstm or gru else None
    c_seq = saved[2] if lstm else None
    hn_seq = saved[2] if gru else None
    hu_seq = saved[3] if p.has_proj else None
    j = {"lstm": 3 + p.has_proj, "gru": 3}.get(p.cell, 1)
    hat, rstd = (saved[j], saved[j + 1]) if v.ln else (None, None)
    j += 2 * v.ln
    chat, crstd = (saved[j], saved[j + 1]) if v.ln_c else (None, None)
    j += 2 * v.ln_c
    new_seq = saved[j] if v.zh and not gru else None

    grad_xw = _new(p, T, B, G)
    grad_hw = _new(p, T, B, G) if gru or v.ln else grad_xw
    dh = grad_h_T.to(acc, copy=True)
    dc = grad_c_T.to(acc, copy=True) if lstm else None
    grad_h0 = grad_h_T.clone()
    h0acc = torch.zeros(B, Hr, dtype=acc, device=p.device) if v.reset else None
    c0acc = torch.zeros(B, H, dtype=acc, device=p.device) if v.reset and lstm else None
    dh_seq = _new(p, T, B, Hr) if p.has_proj else None  # d h_new (after zoneout's share), for grad_w_hr
    dh_new = torch.empty(B, Hr, dtype=acc, device=p.device) if v.ln and not p.has_proj else None
    dhu = torch.empty(B, H, dtype=acc, device=p.device) if p.has_proj else None
    dyc = _new(p, T, B, H, dtype=acc) if v.ln_c else None
    x_rb = torch.zeros(B, H, dtype=acc, device=p.device) if v.rb else None
    reset = reset.view(torch.uint8) if reset is not None else None
    dummy = grad_xw
    d = lambda x: x if x is not None else dummy  # noqa: E731
    kd = 2 * H if v.rb else G
    state_seq = hn_seq if gru else (new_seq if new_seq is not None else h_seq)  # GRU h_n, RNN h_new
    cnew_seq = (new_seq if new_seq is not None else c_seq) if lstm else None
    prev_seq, init = (c_seq, c0) if lstm else (h_seq, h0)
    # tile mode without projection: the gate kernel forms dh_t itself (one launch per step, as plain)
    fuse = not (v.ln or p.has_proj)
    dflags = dict(IS_GRU=gru, RB=v.rb, ZONE_H=v.zh, LN=False, **_var_constexprs(p))
    flags = dict(CELL=k.CELL_CODES[p.cell], NG=GATES[p.cell], PEEP=v.peep, ZONE_C=v.zc, LN=v.ln, LN_C=v.ln_c,
                 RB=v.rb, FUSE_DH=fuse, ZONE_H=v.zh, **_var_constexprs(p))

    s_prev = None
    for t in time_steps(T, not p.reverse):
        m = p.sizes[t]
        m_prev = 0 if s_prev is None else p.sizes[s_prev]
        t_fwd_prev = t + 1 if p.reverse else t - 1
        has_fwd_prev = 0 <= t_fwd_prev < T
        n_seq = min(m, p.sizes[t_fwd_prev]) if has_fwd_prev else 0
        s = s_prev if s_prev is not None else t
        rows = max(m, m_prev)
        # dh_t's arguments (rnn_bwd_dh_var's, and rnn_bwd_var's when it forms dh_t itself)
        dh_args = (grad_hw[s], acts[s] if gru else dummy, d(x_rb), w_hh, dh, grad_h0, d(h0acc), grad_h_seq[t])
        dh_vars = (d(rmask), _step(zh, s, dummy), _step(zh, t, dummy), _step(reset, s, dummy))
        if rows > 0 and not fuse:
            k.rnn_bwd_dh_var[_grid(rows, Hr)](
                *dh_args, dh_seq[t] if p.has_proj else dh_new, *dh_vars, m, m_prev, H, kd, B, Hr, G,
                HAS_PREV=s_prev is not None, STORE_NEW=True, **dflags)
        if m > 0 and p.has_proj:
            k.rnn_proj_var[_grid(m, H)](dh_seq[t], w_hr, dhu, dummy, dummy, dummy, dummy, dummy, m, 0,
                                        B, H, Hr, BWD=True, HAS_RESET=False, ZONE_H=False, LN=False,
                                        **_constexprs(p))
        prev_t = prev_seq[t_fwd_prev] if has_fwd_prev else init
        if (rows if fuse else m) > 0:
            k.rnn_bwd_var[_row_or_tile_grid(p, rows if fuse else m, H)](
                d(dhu if p.has_proj else dh_new), d(acts[t] if acts is not None else None),
                _step(cnew_seq, t, dummy), prev_t, init, d(dc), d(c0acc), grad_xw[t], grad_hw[t],
                _step(reset, t, dummy), _step(zc, t, dummy), d(peep), _step(state_seq, t, dummy),
                _step(hat, t, dummy), _step(rstd, t, dummy), d(lnw), _step(chat, t, dummy), _step(crstd, t, dummy),
                d(lncw), d(lncb), _step(dyc, t, dummy),
                *(dh_args + dh_vars if fuse else (dummy,) * 12), m, n_seq, m_prev, kd, B, H, G,
                HAS_PREV=s_prev is not None, **flags)
        if m > 0 and v.rb:
            k.rnn_bwd_gru_rb[_grid(m, H)](grad_xw[t], grad_hw[t], w_hh, acts[t], prev_t, h0, d(rmask),
                                          _step(reset, t, dummy), x_rb, m, n_seq, B, H, G, LN=False,
                                          **_var_constexprs(p))
        s_prev = t

    m_last = p.sizes[s_prev]
    if m_last > 0:  # the carry out of the last step is grad_h0 for the rows active there
        k.rnn_bwd_dh_var[_grid(m_last, Hr)](
            grad_hw[s_prev], acts[s_prev] if gru else dummy, d(x_rb), w_hh, dh, grad_h0, d(h0acc), dummy, dummy,
            d(rmask), _step(zh, s_prev, dummy), dummy, _step(reset, s_prev, dummy), 0, m_last, H, kd, B, Hr, G,
            HAS_PREV=True, STORE_NEW=False, **dflags)
    if v.reset:
        grad_h0 += h0acc.to(p.dtype)
    grad_c0 = None
    if lstm:
        grad_c0 = (dc + c0acc if v.reset else dc).to(p.dtype)
    grad_w_hr = None
    if p.has_proj:
        grad_w_hr = dh_seq.reshape(T * B, Hr).t() @ hu_seq.reshape(T * B, H)
    # dyc (LSTM cell-state norm: the gradient at its output) goes out for _variant_param_grads
    return grad_xw, grad_hw, grad_h0, grad_c0, grad_w_hr, dyc


def _variant_param_grads(p, grad_xw, grad_hw, dyc, h0, c0, variant, saved):
    """``VariantGrads``: sums over all steps and rows of per-step products the loop left in
    memory (inactive rows are zero in every gradient, so they add nothing). Runs after the time
    loop, outside its CUDA graph: ``previous_states`` copies ``batch_sizes`` to the device."""
    v, H = p.var, p.H
    dims = (0, 1)
    h_seq = saved[0]
    acts = saved[1] if p.cell in ("lstm", "gru") else None
    c_seq = saved[2] if p.cell == "lstm" else None
    j = {"lstm": 3 + p.has_proj, "gru": 3}.get(p.cell, 1)
    hat = saved[j] if v.ln else None
    chat = saved[j + 2] if v.ln_c else None
    cnew_seq = (saved[-1] if v.zh else c_seq) if p.cell == "lstm" else None
    rmask, reset = variant.rec_mask, variant.reset
    out = {}
    if v.ln:  # d ln_hh: the gradient after the norm, d_xw except GRU's n entries (times r)
        post = grad_xw
        if p.cell == "gru":
            post = torch.cat([grad_xw[..., :2 * H], grad_xw[..., 2 * H:] * acts[..., :H]], -1)
        out.update(ln_hh_weight=(post * hat).sum(dims), ln_hh_bias=post.sum(dims))
    if v.ln_c:
        out.update(ln_c_weight=(dyc * chat).sum(dims).to(p.dtype), ln_c_bias=dyc.sum(dims).to(p.dtype))
    if v.peep:
        c_prev = previous_states(c_seq, c0.to(c_seq.dtype), _batch_sizes(p), p.reverse)
        if reset is not None:
            c_prev = torch.where(reset.unsqueeze(-1), c0.to(c_seq.dtype).unsqueeze(0), c_prev)
        out.update(peephole=torch.stack([(grad_xw[..., :H] * c_prev).sum(dims),
                                         (grad_xw[..., H:2 * H] * c_prev).sum(dims),
                                         (grad_xw[..., 3 * H:] * cnew_seq).sum(dims)]).to(p.dtype))
    if v.rb:  # rows 2H:3H of dW_hh: d(hw_n)^T (r * h_in)
        h_in = recurrent_inputs(h_seq, h0, _batch_sizes(p), p.reverse, Variant(rec_mask=rmask, reset=reset))
        rh = (acts[..., :H] * h_in).reshape(-1, H)
        out.update(w_hn=grad_hw[..., 2 * H:].reshape(-1, H).t() @ rh)
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
    return [getattr(variant, f) for f in _VAR_FIELDS]


def rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, variant=None):
    check_rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, variant)
    T, B, G = xw.shape
    var = _var_flags(cell, variant)
    p = _plan(cell, T, B, G, h0.shape[-1], xw.dtype, xw.device, b_hh is not None, w_hr is not None,
              batch_sizes, reverse, training, var)
    if var is None:
        return _launch(p, _forward_launches, [xw, w_hh, b_hh, h0, c0, w_hr], "fwd")
    return _launch(p, _forward_var, [xw, w_hh, b_hh, h0, c0, w_hr, *_variant_tensors(variant)], "fwd")


def rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved,
                 variant=None):
    """The contract's backward: ``(grad_xw, grad_hw, grad_h0, grad_c0, grad_w_hr, VariantGrads | None)``."""
    check_rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved, variant,
                       layout=saved_layout)
    T, B, Hr = saved[0].shape  # saved[0] is h_seq; the bias plays no part in backward
    var = _var_flags(cell, variant)
    p = _plan(cell, T, B, w_hh.shape[0], Hr, saved[0].dtype, saved[0].device, False, w_hr is not None,
              batch_sizes, reverse, True, var)
    if var is None:
        return _launch(p, _backward_launches, [grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, *saved],
                       "bwd") + (None,)
    *grads, dyc = _launch(p, _backward_var, [grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0,
                                             *_variant_tensors(variant), *saved], "bwd")
    return (*grads, _variant_param_grads(p, grads[0], grads[1], dyc, h0, c0, variant, saved))


def saved_layout(cell, T, B, H, Hr, dtype, has_proj, training, variant=None, state_dtype=None):
    """The default layout (``fastrnn.ops.recurrence.saved_layout``) with LSTM's ``c_seq`` in the
    accumulation dtype: float32 for float16 / bfloat16 runs (the cell state stays float32)."""
    if state_dtype is None and cell == "lstm":
        state_dtype = _acc_dtype(dtype)
    return recurrence.saved_layout(cell, T, B, H, Hr, dtype, has_proj, training, variant, state_dtype)
