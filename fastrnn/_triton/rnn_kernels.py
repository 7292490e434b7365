r"""Triton kernels for one time step of the LSTM / GRU / RNN recurrence (forward and backward).

Each step is one fused kernel: a tile of ``h_{t-1} @ W_hh^T`` by ``tl.dot`` (one accumulator per
gate, so a program owns the same hidden units of every gate), then the gate activations and the
state update in registers. Backward is the mirror image: a tile of ``grad_hw_{t+1} @ W_hh`` (the
gradient reaching ``h_t`` through the recurrence) followed by the pointwise gate gradients.
The time loop, the input projection and the weight-gradient GEMMs live in
``fastrnn/backends/triton_rnn.py`` and ``fastrnn/ops/rnn_layer.py``.

One kernel per direction serves every cell: ``CELL`` (LSTM / GRU / RNN_TANH / RNN_RELU), ``NG``
(gates per hidden unit), ``HAS_BIAS``, ``HAS_PROJ`` (LSTM ``proj_size``), ``TRAINING`` are
``tl.constexpr`` flags, so each combination compiles to straight-line code without dead branches.

Grid: ``(cdiv(rows, BLOCK_B), cdiv(cols, BLOCK_H))``; rows are batch rows (only the active prefix
of a packed batch is launched), cols hidden units. Tensors are contiguous, row-major; "a [B, K]
pointer" below is the base of step t's slice (``h_seq[t]``, ``acts[t]``, ...).

Numerics: products accumulate in ``ACC`` (float32, or float64 for float64 inputs); the cell
state ``c``, the carried gradients ``dh`` / ``dc`` live in ``ACC`` as well, so float16 / bfloat16
runs keep a float32 cell state. ``tl.dot`` operands are in the weight dtype;
``DOT_PRECISION`` is ``"ieee"`` for exact float32 parity (the default) or ``"tf32"``.

The reading of the previous state (``_load_prev``) implements the packed-sequence rule of the
contract: rows ``< n_seq`` continue from the previous step's saved state, the others start from
the initial state (only happens in the reverse direction, where a row's first step is its last
valid time index).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

LSTM = tl.constexpr(0)
GRU = tl.constexpr(1)
RNN_TANH = tl.constexpr(2)
RNN_RELU = tl.constexpr(3)
CELL_CODES = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # how the kernels below get decorated


# ----------------------------------------------------------------------------------------------
# autotuning
# ----------------------------------------------------------------------------------------------
# (BLOCK_B, BLOCK_H, BLOCK_K, num_warps): narrow column blocks give small batches more programs
# (one per BLOCK_H hidden units of every gate); wide row blocks reuse each W_hh tile for more rows.
_GPU_TILES = [(16, 16, 64, 4), (16, 32, 64, 4), (16, 64, 64, 4), (16, 128, 32, 4),
              (32, 32, 64, 4), (32, 64, 32, 4), (32, 64, 64, 8), (64, 32, 32, 4),
              (64, 64, 32, 8), (64, 128, 32, 8), (128, 64, 32, 8)]


def _gpu_configs():
    return [triton.Config({"BLOCK_B": bb, "BLOCK_H": bh, "BLOCK_K": bk}, num_warps=w, num_stages=3)
            for bb, bh, bk, w in _GPU_TILES]


# tl.dot needs every block dimension >= 16, also in the interpreter; one config there, since
# the interpreter would time every config on the CPU.
INTERPRETER_CONFIG = triton.Config({"BLOCK_B": 16, "BLOCK_H": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)


def configs(interpreted: bool = INTERPRETED):
    """Autotuning candidates: one small config under the interpreter, a sweep on the GPU."""
    return [INTERPRETER_CONFIG] if interpreted else _gpu_configs()


def prune_configs(configs, named_args, **kwargs):
    """Drop configs that waste the GPU for this problem: row blocks much wider than the batch,
    column blocks much wider than the hidden size, and per-gate accumulators that would crowd
    out the operand tiles from the registers (NG tiles of BLOCK_B x BLOCK_H float32 per program,
    at most 64 registers per thread; tl.dot operands and pipelining stages need the rest)."""
    B, N = named_args["B"], named_args["N"]
    ng = kwargs.get("NG", 1)
    keep = []
    for c in configs:
        bb, bh = c.kwargs["BLOCK_B"], c.kwargs["BLOCK_H"]
        if bb > max(16, triton.next_power_of_2(B)) or bh > max(16, triton.next_power_of_2(N)):
            continue
        if ng * bb * bh > 64 * 32 * c.num_warps:  # > 64 accumulator registers per thread
            continue
        keep.append(c)
    return keep or configs[:1]


def _autotune(restore, key=()):
    return triton.autotune(configs=configs(), key=["B", "N", "K", *key], restore_value=restore,
                           prune_configs_by={"early_config_prune": prune_configs})


# ----------------------------------------------------------------------------------------------
# shared helpers (forward and backward)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sigmoid(x):
    # exp of a non-positive number only: finite for any x
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1 / (1 + e), e / (1 + e))


@triton.jit
def _tanh(x):
    e = tl.exp(-2 * tl.abs(x))
    t = (1 - e) / (1 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _load(ptr, rows, cols, width, mask, DT: tl.constexpr):
    """Tile [rows, cols] of a row-major matrix with ``width`` columns, converted to DT."""
    return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=mask, other=0.0).to(DT)


@triton.jit
def _load_prev(seq_ptr, init_ptr, rows, cols, width, n_seq, mask, DT: tl.constexpr):
    """State a step starts from: the previous step's ``seq_ptr`` tile for rows < n_seq, else the
    initial state ``init_ptr`` (a packed row's first step in the reverse direction)."""
    from_seq = (rows < n_seq)[:, None]
    a = _load(seq_ptr, rows, cols, width, mask & from_seq, DT)
    b = _load(init_ptr, rows, cols, width, mask & ~from_seq, DT)
    return tl.where(from_seq, a, b)


@triton.jit
def _dot_tile(acc, a, w_ptr, ks, ns, k_ok, n_ok, stride_k, stride_n, DOT_PRECISION: tl.constexpr):
    """acc += a @ W where W[k, n] = w_ptr[k * stride_k + n * stride_n] (transposed or not)."""
    w = tl.load(w_ptr + ks[:, None] * stride_k + ns[None, :] * stride_n,
                mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    return tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION)


@triton.jit
def _dh_carry(ghw_prev_ptr, acts_prev_ptr, w_hh_ptr, dh_ptr, grad_h0_ptr, grad_h_ptr,
              rows, cols, m, m_prev, H, HR,
              NG: tl.constexpr, IS_GRU: tl.constexpr, HAS_PREV: tl.constexpr,
              ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Total gradient ``dh_t`` reaching h_t, for a [rows, cols of Hr] tile.

    Rows active at the previously processed step (``< m_prev``) receive the recurrence gradient
    ``grad_hw_prev @ W_hh`` (+ ``dh_prev * z_prev`` for GRU); rows that were not (packed rows
    starting in this backward pass) keep what ``dh_ptr`` holds, ``grad_h_T``. Rows active at
    the previous step but not at this one (``m <= row < m_prev``) are finished: their gradient
    is ``grad_h0``. ``dh_t = carry + grad_h_seq[t]`` is written back to ``dh_ptr`` in place:
    every program reads and writes only its own tile there.
    """
    G = NG * H
    col_ok = cols < HR
    prev = rows < m_prev
    cur = rows < m
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC)
    if HAS_PREV:  # a compile-time flag, so that autotuning never times the GEMM-free first step
        for k0 in range(0, G, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < G
            a = tl.load(ghw_prev_ptr + rows[:, None] * G + ks[None, :], mask=prev[:, None] & k_ok[None, :],
                        other=0.0)
            acc = _dot_tile(acc, a, w_hh_ptr, ks, cols, k_ok, col_ok, HR, 1, DOT_PRECISION)
    tile = (prev | cur)[:, None] & col_ok[None, :]
    dh_old = _load(dh_ptr, rows, cols, HR, tile, ACC)
    if IS_GRU:
        z_prev = _load(acts_prev_ptr + H, rows, cols, G, prev[:, None] & col_ok[None, :], ACC)
        acc += dh_old * z_prev
    carry = tl.where(prev[:, None], acc, dh_old)
    done = (prev & ~cur)[:, None] & col_ok[None, :]
    tl.store(grad_h0_ptr + rows[:, None] * HR + cols[None, :], carry, mask=done)
    live = cur[:, None] & col_ok[None, :]
    dh = carry + _load(grad_h_ptr, rows, cols, HR, live, ACC)
    tl.store(dh_ptr + rows[:, None] * HR + cols[None, :], dh, mask=live)
    return dh


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@_autotune(["c_ptr"])
@triton.jit(do_not_specialize=["m", "n_seq"])
def rnn_fwd_step(xw_ptr, w_hh_ptr, b_hh_ptr, h_prev_ptr, h0_ptr, c_ptr, h_out_ptr, h_T_ptr,
                 acts_ptr, c_seq_ptr, hn_ptr,
                 m, n_seq, B, N, K,
                 CELL: tl.constexpr, NG: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PROJ: tl.constexpr,
                 TRAINING: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """One forward step for rows [0, m).  N = H (hidden units), K = Hr (width of h).

    xw_ptr [B, G] (input side, incl. b_ih); w_hh_ptr [G, Hr]; b_hh_ptr [G]; h_prev_ptr [B, Hr]
    (h_seq of the previous step, rows < n_seq); h0_ptr [B, Hr]; c_ptr [B, H] cell state in ACC,
    updated in place (LSTM); h_out_ptr [B, H or Hr]: h_seq[t], or with HAS_PROJ the unprojected
    output ``o * tanh(c)`` that ``rnn_proj_step`` projects; h_T_ptr [B, Hr] final state, written
    on every active step. TRAINING also writes acts_ptr [B, G] (activated gates),
    c_seq_ptr [B, H] (LSTM, in ACC), hn_ptr [B, H] (GRU ``h W_hn^T + b_hn``).
    """
    H = N
    HR = K
    G = NG * H
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < m
    col_ok = cols < H
    mask = row_ok[:, None] & col_ok[None, :]

    # -- hw = h_{t-1} @ W_hh^T, one accumulator per gate ----------------------------------------
    acc0 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    acc1 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    acc2 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    acc3 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    for k0 in range(0, HR, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < HR
        a = _load_prev(h_prev_ptr, h0_ptr, rows, ks, HR, n_seq, row_ok[:, None] & k_ok[None, :],
                       w_hh_ptr.dtype.element_ty)
        acc0 = _dot_tile(acc0, a, w_hh_ptr, ks, cols, k_ok, col_ok, 1, HR, DOT_PRECISION)
        if NG > 1:
            acc1 = _dot_tile(acc1, a, w_hh_ptr + H * HR, ks, cols, k_ok, col_ok, 1, HR, DOT_PRECISION)
            acc2 = _dot_tile(acc2, a, w_hh_ptr + 2 * H * HR, ks, cols, k_ok, col_ok, 1, HR, DOT_PRECISION)
        if NG > 3:
            acc3 = _dot_tile(acc3, a, w_hh_ptr + 3 * H * HR, ks, cols, k_ok, col_ok, 1, HR, DOT_PRECISION)
    if HAS_BIAS:
        acc0 += tl.load(b_hh_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        if NG > 1:
            acc1 += tl.load(b_hh_ptr + H + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
            acc2 += tl.load(b_hh_ptr + 2 * H + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        if NG > 3:
            acc3 += tl.load(b_hh_ptr + 3 * H + cols, mask=col_ok, other=0.0).to(ACC)[None, :]

    # -- gates and state update -----------------------------------------------------------------
    out_offs = rows[:, None] * H + cols[None, :]
    if CELL == LSTM:
        i = _sigmoid(_load(xw_ptr, rows, cols, G, mask, ACC) + acc0)
        f = _sigmoid(_load(xw_ptr + H, rows, cols, G, mask, ACC) + acc1)
        g = _tanh(_load(xw_ptr + 2 * H, rows, cols, G, mask, ACC) + acc2)
        o = _sigmoid(_load(xw_ptr + 3 * H, rows, cols, G, mask, ACC) + acc3)
        c = f * _load(c_ptr, rows, cols, H, mask, ACC) + i * g
        h = o * _tanh(c)
        tl.store(c_ptr + out_offs, c, mask=mask)
        if TRAINING:
            tl.store(c_seq_ptr + out_offs, c, mask=mask)
    elif CELL == GRU:
        r = _sigmoid(_load(xw_ptr, rows, cols, G, mask, ACC) + acc0)
        z = _sigmoid(_load(xw_ptr + H, rows, cols, G, mask, ACC) + acc1)
        n = _tanh(_load(xw_ptr + 2 * H, rows, cols, G, mask, ACC) + r * acc2)
        h = (1 - z) * n + z * _load_prev(h_prev_ptr, h0_ptr, rows, cols, H, n_seq, mask, ACC)
        if TRAINING:
            tl.store(hn_ptr + out_offs, acc2, mask=mask)
    elif CELL == RNN_TANH:
        h = _tanh(_load(xw_ptr, rows, cols, G, mask, ACC) + acc0)
    else:
        h = tl.maximum(_load(xw_ptr, rows, cols, G, mask, ACC) + acc0, 0.0)
    tl.store(h_out_ptr + out_offs, h, mask=mask)
    if not HAS_PROJ:
        tl.store(h_T_ptr + out_offs, h, mask=mask)
    if TRAINING:
        act_offs = rows[:, None] * G + cols[None, :]
        if CELL == LSTM:
            tl.store(acts_ptr + act_offs, i, mask=mask)
            tl.store(acts_ptr + act_offs + H, f, mask=mask)
            tl.store(acts_ptr + act_offs + 2 * H, g, mask=mask)
            tl.store(acts_ptr + act_offs + 3 * H, o, mask=mask)
        elif CELL == GRU:
            tl.store(acts_ptr + act_offs, r, mask=mask)
            tl.store(acts_ptr + act_offs + H, z, mask=mask)
            tl.store(acts_ptr + act_offs + 2 * H, n, mask=mask)


@_autotune([])
@triton.jit(do_not_specialize=["m"])
def rnn_proj_step(hu_ptr, w_hr_ptr, h_out_ptr, h_T_ptr, m, B, N, K,
                  ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """LSTM projection for rows [0, m): h = hu @ W_hr^T.  N = Hr, K = H.

    hu_ptr [B, H]; w_hr_ptr [Hr, H]; writes h_out_ptr [B, Hr] (h_seq[t]) and h_T_ptr [B, Hr].
    """
    HR = N
    H = K
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < m
    col_ok = cols < HR
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(hu_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot_tile(acc, a, w_hr_ptr, ks, cols, k_ok, col_ok, 1, H, DOT_PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * HR + cols[None, :]
    tl.store(h_out_ptr + offs, acc, mask=mask)
    tl.store(h_T_ptr + offs, acc, mask=mask)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@_autotune(["dh_ptr"], key=["HAS_PREV"])
@triton.jit(do_not_specialize=["m", "m_prev"])
def rnn_bwd_dh(ghw_prev_ptr, acts_prev_ptr, w_hh_ptr, dh_ptr, grad_h0_ptr, grad_h_ptr, dh_seq_ptr,
               m, m_prev, H, B, N, K,
               NG: tl.constexpr, IS_GRU: tl.constexpr, HAS_PREV: tl.constexpr, STORE_SEQ: tl.constexpr,
               ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dh_t`` over all Hr columns (see ``_dh_carry``), for rows [0, max(m, m_prev)).  N = Hr.

    Used before the gate kernel when the LSTM has a projection (the gate kernel then needs whole
    rows of dh_t for ``dh_t @ W_hr``; STORE_SEQ also keeps dh_t in dh_seq_ptr [B, Hr] for
    ``grad_w_hr``), and once after the loop with m = 0 to flush the last rows into grad_h0.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dh = _dh_carry(ghw_prev_ptr, acts_prev_ptr, w_hh_ptr, dh_ptr, grad_h0_ptr, grad_h_ptr,
                   rows, cols, m, m_prev, H, N, NG, IS_GRU, HAS_PREV, ACC, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    if STORE_SEQ:
        tl.store(dh_seq_ptr + rows[:, None] * N + cols[None, :], dh, mask=(rows < m)[:, None] & (cols < N)[None, :])


@_autotune(["dh_ptr", "dc_ptr"], key=["HAS_PREV"])
@triton.jit(do_not_specialize=["m", "m_prev", "n_seq"])
def rnn_bwd_step(ghw_prev_ptr, acts_prev_ptr, w_hh_ptr, w_hr_ptr, dh_ptr, grad_h0_ptr, grad_h_ptr,
                 acts_ptr, state_ptr, prev_ptr, init_ptr, dc_ptr, grad_xw_ptr, grad_hw_ptr,
                 m, m_prev, n_seq, HR, B, N, K,
                 CELL: tl.constexpr, NG: tl.constexpr, HAS_PROJ: tl.constexpr, HAS_PREV: tl.constexpr,
                 ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """One backward step: gate gradients for rows [0, m) of time step t.  N = H, K = Hr.

    Without projection the program first forms dh_t itself (``_dh_carry``: the grid then spans
    rows [0, max(m, m_prev)) so that finished rows reach grad_h0). With HAS_PROJ ``rnn_bwd_dh``
    already left dh_t in dh_ptr [B, Hr], and the program computes ``dhu = dh_t @ W_hr``.
    Inputs at step t: acts_ptr [B, G]; state_ptr [B, H] = c_seq[t] (LSTM), hn_seq[t] (GRU),
    h_seq[t] (RNN); prev_ptr / init_ptr: the forward predecessor and initial state
    (c_seq / c0 for LSTM, h_seq / h0 for GRU), rows < n_seq from prev_ptr. dc_ptr [B, H]
    carries dc (LSTM, in place). Writes grad_xw_ptr [B, G] and, for GRU, grad_hw_ptr [B, G].
    """
    H = N
    G = NG * H
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < m
    col_ok = cols < H
    mask = row_ok[:, None] & col_ok[None, :]

    # -- gradient reaching the cell output --------------------------------------------------------
    if HAS_PROJ:
        dhu = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        for k0 in range(0, HR, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < HR
            a = _load(dh_ptr, rows, ks, HR, row_ok[:, None] & k_ok[None, :], ACC)
            dhu = _dot_tile(dhu, a, w_hr_ptr, ks, cols, k_ok, col_ok, H, 1, DOT_PRECISION)
    else:
        dhu = _dh_carry(ghw_prev_ptr, acts_prev_ptr, w_hh_ptr, dh_ptr, grad_h0_ptr, grad_h_ptr,
                        rows, cols, m, m_prev, H, HR, NG, CELL == GRU, HAS_PREV, ACC, DOT_PRECISION,
                        BLOCK_B, BLOCK_H, BLOCK_K)

    # -- gate gradients -------------------------------------------------------------------------
    act_offs = rows[:, None] * G + cols[None, :]
    if CELL == LSTM:
        i = _load(acts_ptr, rows, cols, G, mask, ACC)
        f = _load(acts_ptr + H, rows, cols, G, mask, ACC)
        g = _load(acts_ptr + 2 * H, rows, cols, G, mask, ACC)
        o = _load(acts_ptr + 3 * H, rows, cols, G, mask, ACC)
        tc = _tanh(_load(state_ptr, rows, cols, H, mask, ACC))
        dc = _load(dc_ptr, rows, cols, H, mask, ACC) + dhu * o * (1 - tc * tc)
        c_prev = _load_prev(prev_ptr, init_ptr, rows, cols, H, n_seq, mask, ACC)
        tl.store(grad_xw_ptr + act_offs, dc * g * i * (1 - i), mask=mask)
        tl.store(grad_xw_ptr + act_offs + H, dc * c_prev * f * (1 - f), mask=mask)
        tl.store(grad_xw_ptr + act_offs + 2 * H, dc * i * (1 - g * g), mask=mask)
        tl.store(grad_xw_ptr + act_offs + 3 * H, dhu * tc * o * (1 - o), mask=mask)
        tl.store(dc_ptr + rows[:, None] * H + cols[None, :], dc * f, mask=mask)
    elif CELL == GRU:
        r = _load(acts_ptr, rows, cols, G, mask, ACC)
        z = _load(acts_ptr + H, rows, cols, G, mask, ACC)
        n = _load(acts_ptr + 2 * H, rows, cols, G, mask, ACC)
        h_prev = _load_prev(prev_ptr, init_ptr, rows, cols, H, n_seq, mask, ACC)
        d_n = dhu * (1 - z) * (1 - n * n)
        d_z = dhu * (h_prev - n) * z * (1 - z)
        d_r = d_n * _load(state_ptr, rows, cols, H, mask, ACC) * r * (1 - r)
        tl.store(grad_xw_ptr + act_offs, d_r, mask=mask)
        tl.store(grad_xw_ptr + act_offs + H, d_z, mask=mask)
        tl.store(grad_xw_ptr + act_offs + 2 * H, d_n, mask=mask)
        tl.store(grad_hw_ptr + act_offs, d_r, mask=mask)
        tl.store(grad_hw_ptr + act_offs + H, d_z, mask=mask)
        tl.store(grad_hw_ptr + act_offs + 2 * H, d_n * r, mask=mask)
    else:
        h = _load(state_ptr, rows, cols, H, mask, ACC)
        if CELL == RNN_TANH:
            d = dhu * (1 - h * h)
        else:
            d = tl.where(h > 0, dhu, 0.0)
        tl.store(grad_xw_ptr + act_offs, d, mask=mask)
