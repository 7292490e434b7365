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

The variants of docs/variants.md (layer norm, peephole, recurrent dropout, zoneout, resets, GRU
reset_after=False) have their own kernels at the end of this file (``rnn_var_gemm``,
``rnn_fwd_var``, ``rnn_proj_var``, ``rnn_bwd_dh_var``, ``rnn_bwd_var``, ``rnn_bwd_gru_rb``), so
that the plain kernels above stay exactly what they were; see the comment there and
docs/triton.md for their tile / row-mode design.
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


# FASTRNN_TRITON_TILES="32x32x32x4,2x32x16x4" replaces the candidate lists: each entry is
# BLOCK_B x BLOCK_H x BLOCK_K x num_warps; entries with BLOCK_B < 16 replace the row-mode tiles
# (_ROW_TILES), the others the tile-mode ones (_GPU_TILES); a list without either kind keeps that
# kind's default. Every candidate is compiled for every flag combination and benchmarked once per
# autotuning key, so a short list is what makes a time-limited GPU run (bench/gpu_check.py)
# spend its minutes measuring. Read when the kernels are decorated (at import).
TILES_ENV = "FASTRNN_TRITON_TILES"


def _parse_tile(text):
    try:
        tile = tuple(int(v) for v in text.strip().lower().split("x"))
    except ValueError:
        tile = ()
    if len(tile) != 4 or any(v < 1 or v & (v - 1) for v in tile):
        raise ValueError(f"{TILES_ENV}: {text!r} is not BLOCK_B x BLOCK_H x BLOCK_K x num_warps "
                         "in powers of two, e.g. 32x64x32x4")
    if tile[0] >= 16 and min(tile[1:3]) < 16:  # tile mode runs tl.dot: every block dimension >= 16
        raise ValueError(f"{TILES_ENV}: {text!r}: a tile-mode entry (BLOCK_B >= 16) needs BLOCK_H and "
                         "BLOCK_K >= 16 (tl.dot)")
    return tile


def env_tiles(row_mode: bool, default):
    """The tiles of one kind from $FASTRNN_TRITON_TILES, or ``default`` (unset or none of that kind)."""
    spec = os.environ.get(TILES_ENV, "")
    tiles = [_parse_tile(t) for t in spec.split(",") if t.strip()]
    return [t for t in tiles if (t[0] < 16) == row_mode] or default


def _gpu_configs():
    return [triton.Config({"BLOCK_B": bb, "BLOCK_H": bh, "BLOCK_K": bk}, num_warps=w, num_stages=3)
            for bb, bh, bk, w in env_tiles(False, _GPU_TILES)]


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


# ----------------------------------------------------------------------------------------------
# variants beyond cuDNN (docs/variants.md): layer norm, peephole, recurrent dropout, zoneout,
# state resets, GRU reset_after=False. Separate kernels, so that the plain kernels above stay
# exactly what they were; every option is a tl.constexpr flag and compiles away when off.
#
# Two program shapes share one kernel body (flag ``LN``):
#   tile mode (LN=False): grid (rows / BLOCK_B, H / BLOCK_H) as the plain kernels; the program
#       forms its gates' hidden products itself with tl.dot and does the gate math in registers.
#   row mode  (LN=True):  grid (rows / BLOCK_B, 1); a program owns whole rows. The layer norm of
#       the hidden product needs statistics over all G entries of a row before any gate can be
#       evaluated, so ``rnn_var_gemm`` first writes the raw product a = h_in W_hh^T [B, G] (a tile
#       GEMM with the full grid), then the row program takes the row statistics (two passes over
#       a, from L2) and walks the row's hidden units in BLOCK_H chunks with the same gate code.
#       The cell-state norm (LSTM) needs statistics of c_new over H before h: a second and third
#       walk over the chunks. Backward mirrors it: row sums for the two norms' gradients.
# ----------------------------------------------------------------------------------------------
LN_EPS = tl.constexpr(1e-5)  # fastrnn.ops.recurrence.LN_EPS

# Row-mode candidates (no tl.dot there: rows per program may be < 16, BLOCK_K is unused). Few
# rows per program give a batch of 32 its 8 to 32 programs for a pass that is pure bandwidth.
_ROW_TILES = [(1, 128, 16, 4), (2, 128, 16, 4), (4, 64, 16, 4), (1, 256, 16, 8), (4, 256, 16, 8)]


def var_configs(interpreted: bool = INTERPRETED):
    """Tile-mode candidates (those of the plain kernels) plus row-mode ones; one config under the
    interpreter (16 x 16 x 16, valid for both modes)."""
    if interpreted:
        return [INTERPRETER_CONFIG]
    rows = [triton.Config({"BLOCK_B": bb, "BLOCK_H": bh, "BLOCK_K": bk}, num_warps=w, num_stages=1)
            for bb, bh, bk, w in env_tiles(True, _ROW_TILES)]
    return _gpu_configs() + rows


def prune_var_configs(configs, named_args, **kwargs):
    """Row-mode configs (BLOCK_B < 16) for LN launches, tile-mode configs (pruned as the plain
    kernels') otherwise. The interpreter's single config serves both."""
    row_mode = [c for c in configs if c.kwargs["BLOCK_B"] < 16]
    tile_mode = [c for c in configs if c.kwargs["BLOCK_B"] >= 16]
    if kwargs.get("LN", False):
        return row_mode or configs[:1]
    return prune_configs(tile_mode, named_args, **kwargs) if tile_mode else configs[:1]


def _autotune_var(restore, key=()):
    # LN in the key: a row-mode config (BLOCK_B < 16) must never be reused for a tile-mode launch
    return triton.autotune(configs=var_configs(), key=["B", "N", "K", "LN", *key], restore_value=restore,
                           prune_configs_by={"early_config_prune": prune_var_configs})


@triton.jit
def _row_flag(ptr, rows, ok, HAS: tl.constexpr):
    """[BLOCK_B] bool from a uint8 [B] vector (``reset[t]``); all False when the option is off."""
    if HAS:
        flag = tl.load(ptr + rows, mask=ok, other=0) != 0
    else:
        flag = rows < 0
    return flag


@triton.jit
def _state_in(seq_ptr, init_ptr, rows, cols, width, n_seq, mask, reset, DT: tl.constexpr):
    """``_load_prev`` with resets: rows with ``reset`` start from the initial state."""
    from_seq = ((rows < n_seq) & ~reset)[:, None]
    a = _load(seq_ptr, rows, cols, width, mask & from_seq, DT)
    b = _load(init_ptr, rows, cols, width, mask & ~from_seq, DT)
    return tl.where(from_seq, a, b)


@triton.jit
def _h_in(h_prev_ptr, h0_ptr, rmask_ptr, rows, cols, width, n_seq, mask, reset,
          HAS_MASK: tl.constexpr, DT: tl.constexpr):
    """Left operand of the recurrent product: the state entering the step times ``rec_mask``."""
    h = _state_in(h_prev_ptr, h0_ptr, rows, cols, width, n_seq, mask, reset, DT)
    if HAS_MASK:
        h = h * _load(rmask_ptr, rows, cols, width, mask, DT)
    return h


@triton.jit
def _blend(z_ptr, rows, cols, width, mask, old, new, HAS: tl.constexpr, ACC: tl.constexpr):
    """Zoneout ``z * old + (1 - z) * new`` (z [B, width] of this step); ``new`` when off."""
    if HAS:
        z = _load(z_ptr, rows, cols, width, mask, ACC)
        out = z * old + (1 - z) * new
    else:
        out = new
    return out


@triton.jit
def _row_stats(x_ptr, rows, row_ok, width, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Mean and 1 / sqrt(biased var + eps) of each row of x [B, width]: two passes (the variance
    from centred values, no E[x^2] - E[x]^2 cancellation)."""
    s = tl.zeros([BLOCK_B], dtype=ACC)
    for k0 in range(0, width, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        s += tl.sum(_load(x_ptr, rows, ks, width, row_ok[:, None] & (ks < width)[None, :], ACC), axis=1)
    mean = s / width
    v = tl.zeros([BLOCK_B], dtype=ACC)
    for k0 in range(0, width, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        mk = row_ok[:, None] & (ks < width)[None, :]
        d = tl.where(mk, _load(x_ptr, rows, ks, width, mk, ACC) - mean[:, None], 0.0)
        v += tl.sum(d * d, axis=1)
    return mean, 1.0 / tl.sqrt(v / width + LN_EPS)


@triton.jit
def _ln_gate(a_ptr, hat_ptr, lnw_ptr, lnb_ptr, b_ptr, off, rows, cols, width, mask, col_ok, mean, rstd,
             HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr, ACC: tl.constexpr):
    """Hidden-side pre-activation of one gate from the raw product: ``w * hat + b_ln (+ b_hh)``,
    hat = (a - mean) * rstd over the row; TRAINING saves hat. ``off`` = gate * H."""
    offs = rows[:, None] * width + off + cols[None, :]
    hat = (tl.load(a_ptr + offs, mask=mask, other=0.0).to(ACC) - mean[:, None]) * rstd[:, None]
    if TRAINING:
        tl.store(hat_ptr + offs, hat, mask=mask)
    w = tl.load(lnw_ptr + off + cols, mask=col_ok, other=0.0).to(ACC)
    hw = hat * w[None, :] + tl.load(lnb_ptr + off + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        hw += tl.load(b_ptr + off + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return hw


@triton.jit
def _vec(ptr, cols, col_ok, ACC: tl.constexpr):
    """A [1, BLOCK_H] row of a per-unit parameter vector."""
    return tl.load(ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]


@_autotune_var([])
@triton.jit(do_not_specialize=["m", "n_seq"])
def rnn_var_gemm(h_prev_ptr, h0_ptr, rmask_ptr, reset_ptr, w_hh_ptr, a_ptr, m, n_seq, B, N, K,
                 HAS_RESET: tl.constexpr, HAS_MASK: tl.constexpr, LN: tl.constexpr,
                 ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Raw hidden product of the layer-norm path, rows [0, m): a = h_in @ W_hh^T.  N = G, K = Hr.

    h_in = (h_prev, or h0 on reset / for rows >= n_seq) * rec_mask; writes a_ptr [B, G] in ACC.
    (``LN`` is always False here: it only selects the tile-mode configs.)
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < m
    col_ok = cols < N
    reset = _row_flag(reset_ptr, rows, row_ok, HAS_RESET)
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = _h_in(h_prev_ptr, h0_ptr, rmask_ptr, rows, ks, K, n_seq, row_ok[:, None] & k_ok[None, :], reset,
                  HAS_MASK, ACC)
        acc = _dot_tile(acc, a, w_hh_ptr, ks, cols, k_ok, col_ok, 1, K, DOT_PRECISION)
    tl.store(a_ptr + rows[:, None] * N + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@_autotune_var(["c_ptr"])
@triton.jit(do_not_specialize=["m", "n_seq"])
def rnn_fwd_var(xw_ptr, w_hh_ptr, b_hh_ptr, h_prev_ptr, h0_ptr, c_ptr, c0_ptr, h_out_ptr, h_T_ptr,
                acts_ptr, c_seq_ptr, hn_ptr, reset_ptr, rmask_ptr, zh_ptr, zc_ptr, peep_ptr,
                a_ptr, lnw_ptr, lnb_ptr, hat_ptr, rstd_ptr, lncw_ptr, lncb_ptr, chat_ptr, crstd_ptr,
                cnew_ptr, hnew_ptr, rh_ptr,
                m, n_seq, B, N, K,
                CELL: tl.constexpr, NG: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PROJ: tl.constexpr,
                TRAINING: tl.constexpr, HAS_RESET: tl.constexpr, HAS_MASK: tl.constexpr,
                PEEP: tl.constexpr, ZONE_H: tl.constexpr, ZONE_C: tl.constexpr, LN: tl.constexpr,
                LN_C: tl.constexpr, PHASE: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """One forward step of a variant for rows [0, m).  N = H, K = Hr.

    As ``rnn_fwd_step`` (same pointers), plus, per step t: reset_ptr [B] uint8, rmask_ptr [B, Hr],
    zh_ptr [B, Hr], zc_ptr [B, H], peep_ptr [3, H]; layer norm (LN, row mode): a_ptr [B, G] raw
    product from ``rnn_var_gemm``, lnw/lnb [G], TRAINING saves hat_ptr [B, G], rstd_ptr [B];
    LN_C (LSTM): lncw/lncb [H], saves chat_ptr [B, H], crstd_ptr [B]; cnew_ptr [B, H] c_new
    before zoneout (saved with ZONE_C, scratch for LN_C); hnew_ptr [B, H] RNN h_new (saved with
    ZONE_H). acts_ptr is always a real [B, G] buffer when LN_C or PHASE > 0 (o, r, z are read back).
    PHASE (GRU reset_after=False): 1 = r, z and rh = r * h_in -> rh_ptr [B, H];
    2 = n from rh @ W_hn^T, and h; 0 = every other case.
    """
    H = N
    HR = K
    G = NG * H
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < m
    reset = _row_flag(reset_ptr, rows, row_ok, HAS_RESET)
    if LN:
        mean, rstd = _row_stats(a_ptr, rows, row_ok, G, ACC, BLOCK_B, BLOCK_H)
        if TRAINING:
            tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        n_tiles = tl.cdiv(H, BLOCK_H)
        tile0 = 0
    else:
        mean = tl.zeros([BLOCK_B], dtype=ACC)
        rstd = mean
        n_tiles = 1
        tile0 = tl.program_id(1)
    csum = tl.zeros([BLOCK_B], dtype=ACC)
    for tb in range(0, n_tiles):
        cols = (tile0 + tb) * BLOCK_H + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * H + cols[None, :]
        act_offs = rows[:, None] * G + cols[None, :]

        # -- hidden-side pre-activations hw0..hw3 of this tile ------------------------------------
        if LN:
            hw0 = _ln_gate(a_ptr, hat_ptr, lnw_ptr, lnb_ptr, b_hh_ptr, 0, rows, cols, G, mask, col_ok,
                           mean, rstd, HAS_BIAS, TRAINING, ACC)
            if NG > 1:
                hw1 = _ln_gate(a_ptr, hat_ptr, lnw_ptr, lnb_ptr, b_hh_ptr, H, rows, cols, G, mask, col_ok,
                               mean, rstd, HAS_BIAS, TRAINING, ACC)
                hw2 = _ln_gate(a_ptr, hat_ptr, lnw_ptr, lnb_ptr, b_hh_ptr, 2 * H, rows, cols, G, mask, col_ok,
                               mean, rstd, HAS_BIAS, TRAINING, ACC)
            if NG > 3:
                hw3 = _ln_gate(a_ptr, hat_ptr, lnw_ptr, lnb_ptr, b_hh_ptr, 3 * H, rows, cols, G, mask, col_ok,
                               mean, rstd, HAS_BIAS, TRAINING, ACC)
        else:
            hw0 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
            hw1 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
            hw2 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
            hw3 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
            for k0 in range(0, HR, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < HR
                amask = row_ok[:, None] & k_ok[None, :]
                if PHASE == 2:  # (r * h_in) @ W_hn^T
                    a = _load(rh_ptr, rows, ks, HR, amask, ACC)
                    hw2 = _dot_tile(hw2, a, w_hh_ptr + 2 * H * HR, ks, cols, k_ok, col_ok, 1, HR, DOT_PRECISION)
                else:
                    a = _h_in(h_prev_ptr, h0_ptr, rmask_ptr, rows, ks, HR, n_seq, amask, reset, HAS_MASK, ACC)
                    hw0 = _dot_tile(hw0, a, w_hh_ptr, ks, cols, k_ok, col_ok, 1, HR, DOT_PRECISION)
                    if NG > 1:
                        hw1 = _dot_tile(hw1, a, w_hh_ptr + H * HR, ks, cols, k_ok, col_ok, 1, HR, DOT_PRECISION)
                    if NG > 1 and PHASE == 0:
                        hw2 = _dot_tile(hw2, a, w_hh_ptr + 2 * H * HR, ks, cols, k_ok, col_ok, 1, HR,
                                        DOT_PRECISION)
                    if NG > 3:
                        hw3 = _dot_tile(hw3, a, w_hh_ptr + 3 * H * HR, ks, cols, k_ok, col_ok, 1, HR,
                                        DOT_PRECISION)
            if HAS_BIAS:
                hw0 += _vec(b_hh_ptr, cols, col_ok, ACC)
                if NG > 1:
                    hw1 += _vec(b_hh_ptr + H, cols, col_ok, ACC)
                    hw2 += _vec(b_hh_ptr + 2 * H, cols, col_ok, ACC)
                if NG > 3:
                    hw3 += _vec(b_hh_ptr + 3 * H, cols, col_ok, ACC)

        # -- gates and state update -----------------------------------------------------------------
        if CELL == LSTM:
            c_prev = _state_in(c_ptr, c0_ptr, rows, cols, H, m, mask, reset, ACC)
            pre_i = _load(xw_ptr, rows, cols, G, mask, ACC) + hw0
            pre_f = _load(xw_ptr + H, rows, cols, G, mask, ACC) + hw1
            if PEEP:
                pre_i += _vec(peep_ptr, cols, col_ok, ACC) * c_prev
                pre_f += _vec(peep_ptr + H, cols, col_ok, ACC) * c_prev
            i = _sigmoid(pre_i)
            f = _sigmoid(pre_f)
            g = _tanh(_load(xw_ptr + 2 * H, rows, cols, G, mask, ACC) + hw2)
            c_new = f * c_prev + i * g
            pre_o = _load(xw_ptr + 3 * H, rows, cols, G, mask, ACC) + hw3
            if PEEP:
                pre_o += _vec(peep_ptr + 2 * H, cols, col_ok, ACC) * c_new
            o = _sigmoid(pre_o)
            c_t = _blend(zc_ptr, rows, cols, H, mask, c_prev, c_new, ZONE_C, ACC)
            tl.store(c_ptr + offs, c_t, mask=mask)
            if TRAINING:
                tl.store(c_seq_ptr + offs, c_t, mask=mask)
            if TRAINING or LN_C:
                tl.store(acts_ptr + act_offs, i, mask=mask)
                tl.store(acts_ptr + act_offs + H, f, mask=mask)
                tl.store(acts_ptr + act_offs + 2 * H, g, mask=mask)
                tl.store(acts_ptr + act_offs + 3 * H, o, mask=mask)
            if LN_C or (ZONE_C and TRAINING):
                tl.store(cnew_ptr + offs, c_new, mask=mask)
            if LN_C:  # h needs the statistics of the whole row of c_new: after this loop
                csum += tl.sum(tl.where(mask, c_new, 0.0), axis=1)
            else:
                _store_h(o * _tanh(c_new), h_prev_ptr, h0_ptr, zh_ptr, h_out_ptr, h_T_ptr, hnew_ptr, rows, cols,
                         H, n_seq, mask, reset, False, HAS_PROJ, ZONE_H, TRAINING, ACC)
        elif CELL == GRU:
            if PHASE == 1:
                r = _sigmoid(_load(xw_ptr, rows, cols, G, mask, ACC) + hw0)
                z = _sigmoid(_load(xw_ptr + H, rows, cols, G, mask, ACC) + hw1)
                tl.store(acts_ptr + act_offs, r, mask=mask)
                tl.store(acts_ptr + act_offs + H, z, mask=mask)
                h_in = _h_in(h_prev_ptr, h0_ptr, rmask_ptr, rows, cols, H, n_seq, mask, reset, HAS_MASK, ACC)
                tl.store(rh_ptr + offs, r * h_in, mask=mask)
            else:
                if PHASE == 2:
                    z = _load(acts_ptr + H, rows, cols, G, mask, ACC)
                    n = _tanh(_load(xw_ptr + 2 * H, rows, cols, G, mask, ACC) + hw2)
                else:
                    r = _sigmoid(_load(xw_ptr, rows, cols, G, mask, ACC) + hw0)
                    z = _sigmoid(_load(xw_ptr + H, rows, cols, G, mask, ACC) + hw1)
                    n = _tanh(_load(xw_ptr + 2 * H, rows, cols, G, mask, ACC) + r * hw2)
                    if TRAINING:
                        tl.store(acts_ptr + act_offs, r, mask=mask)
                        tl.store(acts_ptr + act_offs + H, z, mask=mask)
                h_prev = _state_in(h_prev_ptr, h0_ptr, rows, cols, H, n_seq, mask, reset, ACC)
                if TRAINING:
                    tl.store(acts_ptr + act_offs + 2 * H, n, mask=mask)
                    tl.store(hn_ptr + offs, hw2, mask=mask)
                _store_h((1 - z) * n + z * h_prev, h_prev_ptr, h0_ptr, zh_ptr, h_out_ptr, h_T_ptr, hnew_ptr,
                         rows, cols, H, n_seq, mask, reset, False, False, ZONE_H, TRAINING, ACC)
        else:
            pre = _load(xw_ptr, rows, cols, G, mask, ACC) + hw0
            h_new = _tanh(pre) if CELL == RNN_TANH else tl.maximum(pre, 0.0)
            _store_h(h_new, h_prev_ptr, h0_ptr, zh_ptr, h_out_ptr, h_T_ptr, hnew_ptr, rows, cols, H, n_seq,
                     mask, reset, True, False, ZONE_H, TRAINING, ACC)

    if LN_C:  # LSTM: h = o * tanh(LN(c_new)); c_new of the whole row is in cnew_ptr now
        tl.debug_barrier()  # other threads of this program wrote parts of the row
        mean_c = csum / H
        v = tl.zeros([BLOCK_B], dtype=ACC)
        for tb in range(0, n_tiles):
            cols = tb * BLOCK_H + tl.arange(0, BLOCK_H)
            mask = row_ok[:, None] & (cols < H)[None, :]
            d = tl.where(mask, _load(cnew_ptr, rows, cols, H, mask, ACC) - mean_c[:, None], 0.0)
            v += tl.sum(d * d, axis=1)
        rstd_c = 1.0 / tl.sqrt(v / H + LN_EPS)
        if TRAINING:
            tl.store(crstd_ptr + rows, rstd_c, mask=row_ok)
        for tb in range(0, n_tiles):
            cols = tb * BLOCK_H + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            chat = (_load(cnew_ptr, rows, cols, H, mask, ACC) - mean_c[:, None]) * rstd_c[:, None]
            if TRAINING:
                tl.store(chat_ptr + rows[:, None] * H + cols[None, :], chat, mask=mask)
            y = chat * _vec(lncw_ptr, cols, col_ok, ACC) + _vec(lncb_ptr, cols, col_ok, ACC)
            o = _load(acts_ptr + 3 * H, rows, cols, G, mask, ACC)
            _store_h(o * _tanh(y), h_prev_ptr, h0_ptr, zh_ptr, h_out_ptr, h_T_ptr, hnew_ptr, rows, cols, H,
                     n_seq, mask, reset, False, HAS_PROJ, ZONE_H, TRAINING, ACC)


@triton.jit
def _store_h(h_new, h_prev_ptr, h0_ptr, zh_ptr, h_out_ptr, h_T_ptr, hnew_ptr, rows, cols, H, n_seq, mask, reset,
             SAVE_NEW: tl.constexpr, HAS_PROJ: tl.constexpr, ZONE_H: tl.constexpr, TRAINING: tl.constexpr,
             ACC: tl.constexpr):
    """Write a step's output tile: with a projection the unprojected ``hu`` (zoneout happens after
    the projection, in ``rnn_proj_var``); else ``h_t`` = zoneout(h_new) to h_seq[t] and h_T.
    SAVE_NEW (RNN): h_new before zoneout, which backward needs, to hnew_ptr."""
    offs = rows[:, None] * H + cols[None, :]
    if HAS_PROJ:
        tl.store(h_out_ptr + offs, h_new, mask=mask)
    else:
        if ZONE_H:
            h_prev = _state_in(h_prev_ptr, h0_ptr, rows, cols, H, n_seq, mask, reset, ACC)
            h = _blend(zh_ptr, rows, cols, H, mask, h_prev, h_new, True, ACC)
            if SAVE_NEW and TRAINING:
                tl.store(hnew_ptr + offs, h_new, mask=mask)
        else:
            h = h_new
        tl.store(h_out_ptr + offs, h, mask=mask)
        tl.store(h_T_ptr + offs, h, mask=mask)


@_autotune_var([])
@triton.jit(do_not_specialize=["m", "n_seq"])
def rnn_proj_var(a_ptr, w_hr_ptr, out_ptr, h_T_ptr, h_prev_ptr, h0_ptr, zh_ptr, reset_ptr, m, n_seq, B, N, K,
                 BWD: tl.constexpr, HAS_RESET: tl.constexpr, ZONE_H: tl.constexpr, LN: tl.constexpr,
                 ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """LSTM projection of a variant, rows [0, m); w_hr_ptr [Hr, H].

    Forward (BWD=False, N = Hr, K = H): h_t = zoneout(hu @ W_hr^T) from a_ptr = hu [B, H] to
    out_ptr = h_seq[t] and h_T_ptr [B, Hr]; the zoneout's h_prev as in ``_state_in``.
    Backward (BWD=True, N = H, K = Hr): out_ptr [B, H] = a_ptr [B, Hr] (dh_new) @ W_hr.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < m
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = _load(a_ptr, rows, ks, K, row_ok[:, None] & k_ok[None, :], ACC)
        if BWD:
            acc = _dot_tile(acc, a, w_hr_ptr, ks, cols, k_ok, col_ok, N, 1, DOT_PRECISION)
        else:
            acc = _dot_tile(acc, a, w_hr_ptr, ks, cols, k_ok, col_ok, 1, K, DOT_PRECISION)
    offs = rows[:, None] * N + cols[None, :]
    if BWD:
        tl.store(out_ptr + offs, acc, mask=mask)
    else:
        reset = _row_flag(reset_ptr, rows, row_ok, HAS_RESET)
        if ZONE_H:
            h_prev = _state_in(h_prev_ptr, h0_ptr, rows, cols, N, n_seq, mask, reset, ACC)
            h = _blend(zh_ptr, rows, cols, N, mask, h_prev, acc, True, ACC)
        else:
            h = acc
        tl.store(out_ptr + offs, h, mask=mask)
        tl.store(h_T_ptr + offs, h, mask=mask)


@triton.jit
def _dh_carry_var(ghw_prev_ptr, acts_prev_ptr, x_prev_ptr, w_hh_ptr, dh_ptr, grad_h0_ptr, h0acc_ptr, grad_h_ptr,
                  rmask_ptr, zh_prev_ptr, reset_prev_ptr, rows, cols, m, m_prev, H, KD, N, K,
                  IS_GRU: tl.constexpr, RB: tl.constexpr, HAS_PREV: tl.constexpr, HAS_RESET: tl.constexpr,
                  HAS_MASK: tl.constexpr, ZONE_H: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dh_t`` of a variant for a [rows, cols of Hr] tile (N = Hr, K = G); ``_dh_carry`` with the
    variant's terms. The gradient reaching h_s (s = the step processed before, the forward
    successor) through step s's use of its entering state h_prev(s):
        ((grad_hw[s][:, :KD] @ W_hh[:KD]) (+ RB: x_prev = d(r * h_in) * r) ) * rec_mask
        + dh_s * (zoneout_h[s] + (1 - zoneout_h[s]) * z_s (GRU))
    KD = G, or 2H for GRU reset_after=False (its n rows act on r * h_in, folded into x_prev).
    Rows reset at s send that gradient to h0acc_ptr [B, Hr] (ACC, accumulated) instead. Then as
    ``_dh_carry``: finished rows -> grad_h0, rows starting here keep grad_h_T, and
    dh_t = carry + grad_h_seq[t] -> dh_ptr (in place; returned).
    """
    col_ok = cols < N
    prev = rows < m_prev
    cur = rows < m
    pmask = prev[:, None] & col_ok[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    if HAS_PREV:
        for k0 in range(0, KD, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < KD
            a = tl.load(ghw_prev_ptr + rows[:, None] * K + ks[None, :], mask=prev[:, None] & k_ok[None, :],
                        other=0.0)
            acc = _dot_tile(acc, a, w_hh_ptr, ks, cols, k_ok, col_ok, N, 1, DOT_PRECISION)
        if RB:
            acc += _load(x_prev_ptr, rows, cols, N, pmask, ACC)
        if HAS_MASK:
            acc *= _load(rmask_ptr, rows, cols, N, pmask, ACC)
    tile = (prev | cur)[:, None] & col_ok[None, :]
    dh_old = _load(dh_ptr, rows, cols, N, tile, ACC)
    if IS_GRU and ZONE_H:
        zp = _load(zh_prev_ptr, rows, cols, N, pmask, ACC)
        acc += dh_old * (zp + (1 - zp) * _load(acts_prev_ptr + H, rows, cols, K, pmask, ACC))
    elif IS_GRU:
        acc += dh_old * _load(acts_prev_ptr + H, rows, cols, K, pmask, ACC)
    elif ZONE_H:
        acc += dh_old * _load(zh_prev_ptr, rows, cols, N, pmask, ACC)
    if HAS_RESET:
        was_reset = (_row_flag(reset_prev_ptr, rows, prev, HAS_RESET) & prev)[:, None] & col_ok[None, :]
        offs0 = rows[:, None] * N + cols[None, :]
        tl.store(h0acc_ptr + offs0, tl.load(h0acc_ptr + offs0, mask=was_reset, other=0.0) + acc, mask=was_reset)
        acc = tl.where(was_reset, 0.0, acc)
    carry = tl.where(prev[:, None], acc, dh_old)
    done = (prev & ~cur)[:, None] & col_ok[None, :]
    tl.store(grad_h0_ptr + rows[:, None] * N + cols[None, :], carry, mask=done)
    live = cur[:, None] & col_ok[None, :]
    dh = carry + _load(grad_h_ptr, rows, cols, N, live, ACC)
    tl.store(dh_ptr + rows[:, None] * N + cols[None, :], dh, mask=live)
    return dh


@_autotune_var(["dh_ptr", "h0acc_ptr"], key=["HAS_PREV"])
@triton.jit(do_not_specialize=["m", "m_prev"])
def rnn_bwd_dh_var(ghw_prev_ptr, acts_prev_ptr, x_prev_ptr, w_hh_ptr, dh_ptr, grad_h0_ptr, h0acc_ptr, grad_h_ptr,
                   dhnew_ptr, rmask_ptr, zh_prev_ptr, zh_ptr, reset_prev_ptr,
                   m, m_prev, H, KD, B, N, K,
                   IS_GRU: tl.constexpr, RB: tl.constexpr, HAS_PREV: tl.constexpr, HAS_RESET: tl.constexpr,
                   HAS_MASK: tl.constexpr, ZONE_H: tl.constexpr, STORE_NEW: tl.constexpr, LN: tl.constexpr,
                   ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dh_t`` of a variant over all Hr columns (``_dh_carry_var``), rows [0, max(m, m_prev)).
    N = Hr, K = G. Used when the gate kernel cannot form dh_t itself (layer norm: row programs;
    LSTM proj_size: whole rows of dh_t feed ``dh_new @ W_hr``), and once after the loop with m = 0
    to flush the last rows into grad_h0. STORE_NEW also writes dh_new = (1 - zoneout_h[t]) * dh_t
    (the gradient of the un-zoned output) to dhnew_ptr [B, Hr].
    (``LN`` is always False: it selects the tile-mode configs.)
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dh = _dh_carry_var(ghw_prev_ptr, acts_prev_ptr, x_prev_ptr, w_hh_ptr, dh_ptr, grad_h0_ptr, h0acc_ptr,
                       grad_h_ptr, rmask_ptr, zh_prev_ptr, reset_prev_ptr, rows, cols, m, m_prev, H, KD, N, K,
                       IS_GRU, RB, HAS_PREV, HAS_RESET, HAS_MASK, ZONE_H, ACC, DOT_PRECISION, BLOCK_B, BLOCK_H,
                       BLOCK_K)
    if STORE_NEW:
        live = (rows < m)[:, None] & (cols < N)[None, :]
        tl.store(dhnew_ptr + rows[:, None] * N + cols[None, :],
                 _blend(zh_ptr, rows, cols, N, live, 0.0, dh, ZONE_H, ACC), mask=live)


@_autotune_var(["dc_ptr", "c0acc_ptr", "grad_hw_ptr", "dh_ptr", "h0acc_ptr"], key=["HAS_PREV"])
@triton.jit(do_not_specialize=["m", "n_seq", "m_prev"])
def rnn_bwd_var(dhu_ptr, acts_ptr, cnew_ptr, prev_ptr, init_ptr, dc_ptr, c0acc_ptr, grad_xw_ptr, grad_hw_ptr,
                reset_ptr, zc_ptr, peep_ptr, state_ptr, hat_ptr, rstd_ptr, lnw_ptr,
                chat_ptr, crstd_ptr, lncw_ptr, lncb_ptr, dyc_ptr,
                ghw_prev_ptr, acts_prev_ptr, x_prev_ptr, w_hh_ptr, dh_ptr, grad_h0_ptr, h0acc_ptr, grad_h_ptr,
                rmask_ptr, zh_prev_ptr, zh_ptr, reset_prev_ptr,
                m, n_seq, m_prev, KD, B, N, K,
                CELL: tl.constexpr, NG: tl.constexpr, HAS_RESET: tl.constexpr, PEEP: tl.constexpr,
                ZONE_C: tl.constexpr, LN: tl.constexpr, LN_C: tl.constexpr, RB: tl.constexpr,
                FUSE_DH: tl.constexpr, HAS_PREV: tl.constexpr, HAS_MASK: tl.constexpr, ZONE_H: tl.constexpr,
                ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Gate gradients of a variant at step t, rows [0, m).  N = H, K = G.  Tile or row mode (LN).

    dhu_ptr [B, H]: gradient of the cell output before zoneout (and, LSTM with proj_size, after
    ``rnn_proj_var``'s backward). acts_ptr [B, G] the saved gates; LSTM: cnew_ptr [B, H] c_new,
    prev_ptr / init_ptr c_seq[prev] / c0 (``_state_in`` with n_seq and reset), dc_ptr [B, H] dc_t
    in, the carry into c_{t-1} out (ACC, in place); rows reset at t add it to c0acc_ptr instead.
    GRU: prev_ptr / init_ptr h_seq[prev] / h0, state_ptr = hn [B, H]. RNN: state_ptr = h_new.
    Writes grad_xw_ptr [B, G] and grad_hw_ptr [B, G], the gradient of the raw product
    (GRU RB: without the r entries, which ``rnn_bwd_gru_rb`` adds). Layer norm (row mode):
    hat_ptr [B, G], rstd_ptr [B], lnw [G]; LN_C: chat_ptr [B, H], crstd_ptr [B], lncw / lncb [H],
    and dyc_ptr [B, H] receives the gradient at LN(c_new)'s output (for the norm's weights).
    FUSE_DH (tile mode, no projection): the program forms its tile of dh_t itself
    (``_dh_carry_var``, the arguments of ``rnn_bwd_dh_var``) instead of reading dhu_ptr, as the
    plain ``rnn_bwd_step`` does: one launch per step; the grid then spans rows
    [0, max(m, m_prev)) so that finished rows reach grad_h0.
    """
    H = N
    G = K
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < m
    reset = _row_flag(reset_ptr, rows, row_ok, HAS_RESET)
    if LN:
        n_tiles = tl.cdiv(H, BLOCK_H)
        tile0 = 0
    else:
        n_tiles = 1
        tile0 = tl.program_id(1)
    # -- LSTM cell-state norm: row sums of its output gradient ------------------------------------
    s1 = tl.zeros([BLOCK_B], dtype=ACC)
    s2 = tl.zeros([BLOCK_B], dtype=ACC)
    if LN_C:
        rstd_c = tl.load(crstd_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        for tb in range(0, n_tiles):
            cols = tb * BLOCK_H + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            chat = _load(chat_ptr, rows, cols, H, mask, ACC)
            wc = _vec(lncw_ptr, cols, col_ok, ACC)
            ty = _tanh(chat * wc + _vec(lncb_ptr, cols, col_ok, ACC))
            dy = _load(dhu_ptr, rows, cols, H, mask, ACC) * _load(acts_ptr + 3 * H, rows, cols, G, mask, ACC) \
                * (1 - ty * ty)
            tl.store(dyc_ptr + rows[:, None] * H + cols[None, :], dy, mask=mask)
            s1 += tl.sum(dy * wc, axis=1)
            s2 += tl.sum(dy * wc * chat, axis=1)
        s1 = s1 / H
        s2 = s2 / H
    # -- gate gradients; with LN, the row sums of the hidden norm's gradient ----------------------
    t1 = tl.zeros([BLOCK_B], dtype=ACC)
    t2 = tl.zeros([BLOCK_B], dtype=ACC)
    for tb in range(0, n_tiles):
        cols = (tile0 + tb) * BLOCK_H + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * H + cols[None, :]
        act_offs = rows[:, None] * G + cols[None, :]
        if FUSE_DH:
            dh = _dh_carry_var(ghw_prev_ptr, acts_prev_ptr, x_prev_ptr, w_hh_ptr, dh_ptr, grad_h0_ptr, h0acc_ptr,
                               grad_h_ptr, rmask_ptr, zh_prev_ptr, reset_prev_ptr, rows, cols, m, m_prev, H,
                               KD, H, G, CELL == GRU, RB, HAS_PREV, HAS_RESET, HAS_MASK, ZONE_H, ACC,
                               DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
            dhu = _blend(zh_ptr, rows, cols, H, mask, 0.0, dh, ZONE_H, ACC)
        else:
            dhu = _load(dhu_ptr, rows, cols, H, mask, ACC)
        if CELL == LSTM:
            i = _load(acts_ptr, rows, cols, G, mask, ACC)
            f = _load(acts_ptr + H, rows, cols, G, mask, ACC)
            g = _load(acts_ptr + 2 * H, rows, cols, G, mask, ACC)
            o = _load(acts_ptr + 3 * H, rows, cols, G, mask, ACC)
            if LN_C:
                chat = _load(chat_ptr, rows, cols, H, mask, ACC)
                wc = _vec(lncw_ptr, cols, col_ok, ACC)
                tc = _tanh(chat * wc + _vec(lncb_ptr, cols, col_ok, ACC))
                dy = _load(dyc_ptr, rows, cols, H, mask, ACC)
                dcn = rstd_c[:, None] * (dy * wc - s1[:, None] - chat * s2[:, None])
            else:
                tc = _tanh(_load(cnew_ptr, rows, cols, H, mask, ACC))
                dcn = dhu * o * (1 - tc * tc)
            d_o = dhu * tc * o * (1 - o)
            dc_t = _load(dc_ptr, rows, cols, H, mask, ACC)
            if ZONE_C:
                zc = _load(zc_ptr, rows, cols, H, mask, ACC)
                dcn += (1 - zc) * dc_t
                dcp = zc * dc_t
            else:
                dcn += dc_t
                dcp = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
            if PEEP:
                dcn += d_o * _vec(peep_ptr + 2 * H, cols, col_ok, ACC)
            c_prev = _state_in(prev_ptr, init_ptr, rows, cols, H, n_seq, mask, reset, ACC)
            d_i = dcn * g * i * (1 - i)
            d_f = dcn * c_prev * f * (1 - f)
            d_g = dcn * i * (1 - g * g)
            dcp += dcn * f
            if PEEP:
                dcp += d_i * _vec(peep_ptr, cols, col_ok, ACC) + d_f * _vec(peep_ptr + H, cols, col_ok, ACC)
            if HAS_RESET:  # the state entering this step was c0
                sel = reset[:, None] & mask
                tl.store(c0acc_ptr + offs, tl.load(c0acc_ptr + offs, mask=sel, other=0.0) + dcp, mask=sel)
                dcp = tl.where(sel, 0.0, dcp)
            tl.store(dc_ptr + offs, dcp, mask=mask)
            dq0, dq1, dq2, dq3 = d_i, d_f, d_g, d_o
            tl.store(grad_xw_ptr + act_offs, d_i, mask=mask)
            tl.store(grad_xw_ptr + act_offs + H, d_f, mask=mask)
            tl.store(grad_xw_ptr + act_offs + 2 * H, d_g, mask=mask)
            tl.store(grad_xw_ptr + act_offs + 3 * H, d_o, mask=mask)
            if not LN:
                tl.store(grad_hw_ptr + act_offs, d_i, mask=mask)
                tl.store(grad_hw_ptr + act_offs + H, d_f, mask=mask)
                tl.store(grad_hw_ptr + act_offs + 2 * H, d_g, mask=mask)
                tl.store(grad_hw_ptr + act_offs + 3 * H, d_o, mask=mask)
        elif CELL == GRU:
            z = _load(acts_ptr + H, rows, cols, G, mask, ACC)
            n = _load(acts_ptr + 2 * H, rows, cols, G, mask, ACC)
            h_prev = _state_in(prev_ptr, init_ptr, rows, cols, H, n_seq, mask, reset, ACC)
            d_n = dhu * (1 - z) * (1 - n * n)
            d_z = dhu * (h_prev - n) * z * (1 - z)
            tl.store(grad_xw_ptr + act_offs + H, d_z, mask=mask)
            tl.store(grad_xw_ptr + act_offs + 2 * H, d_n, mask=mask)
            tl.store(grad_hw_ptr + act_offs + H, d_z, mask=mask)
            if RB:  # hw_n = (r * h_in) W_hn^T + b_hn: its gradient is d_n; d_r needs a GEMM first
                tl.store(grad_hw_ptr + act_offs + 2 * H, d_n, mask=mask)
                dq0, dq1, dq2 = d_z, d_z, d_n  # unused (no layer norm with RB)
            else:
                r = _load(acts_ptr, rows, cols, G, mask, ACC)
                d_r = d_n * _load(state_ptr, rows, cols, H, mask, ACC) * r * (1 - r)
                tl.store(grad_xw_ptr + act_offs, d_r, mask=mask)
                tl.store(grad_hw_ptr + act_offs, d_r, mask=mask)
                tl.store(grad_hw_ptr + act_offs + 2 * H, d_n * r, mask=mask)
                dq0, dq1, dq2 = d_r, d_z, d_n * r
        else:
            h = _load(state_ptr, rows, cols, H, mask, ACC)
            if CELL == RNN_TANH:
                d = dhu * (1 - h * h)
            else:
                d = tl.where(h > 0, dhu, 0.0)
            tl.store(grad_xw_ptr + act_offs, d, mask=mask)
            if not LN:
                tl.store(grad_hw_ptr + act_offs, d, mask=mask)
            dq0 = d
        if LN:
            t1, t2 = _ln_sums(t1, t2, dq0, hat_ptr, lnw_ptr, 0, rows, cols, G, mask, col_ok, ACC)
            if NG > 1:
                t1, t2 = _ln_sums(t1, t2, dq1, hat_ptr, lnw_ptr, H, rows, cols, G, mask, col_ok, ACC)
                t1, t2 = _ln_sums(t1, t2, dq2, hat_ptr, lnw_ptr, 2 * H, rows, cols, G, mask, col_ok, ACC)
            if NG > 3:
                t1, t2 = _ln_sums(t1, t2, dq3, hat_ptr, lnw_ptr, 3 * H, rows, cols, G, mask, col_ok, ACC)
    if LN:  # gradient of the raw product: rstd * (w*d - mean(w*d) - hat * mean(w*d*hat)) over G
        tl.debug_barrier()  # the post-norm gradients were written by other threads of this program
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        t1 = t1 / G
        t2 = t2 / G
        src_ptr = grad_hw_ptr if CELL == GRU else grad_xw_ptr  # post-norm gradient (GRU: n times r)
        for k0 in range(0, G, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < G
            mk = row_ok[:, None] & k_ok[None, :]
            wd = _load(src_ptr, rows, ks, G, mk, ACC) * _vec(lnw_ptr, ks, k_ok, ACC)
            da = rstd[:, None] * (wd - t1[:, None] - _load(hat_ptr, rows, ks, G, mk, ACC) * t2[:, None])
            tl.store(grad_hw_ptr + rows[:, None] * G + ks[None, :], da, mask=mk)


@triton.jit
def _ln_sums(t1, t2, d, hat_ptr, lnw_ptr, off, rows, cols, G, mask, col_ok, ACC: tl.constexpr):
    """Row sums of w*d and w*d*hat for one gate's tile (hidden layer norm backward)."""
    wd = tl.where(mask, d * _vec(lnw_ptr + off, cols, col_ok, ACC), 0.0)
    hat = _load(hat_ptr + off, rows, cols, G, mask, ACC)
    return t1 + tl.sum(wd, axis=1), t2 + tl.sum(wd * hat, axis=1)


@_autotune_var([])
@triton.jit(do_not_specialize=["m", "n_seq"])
def rnn_bwd_gru_rb(grad_xw_ptr, grad_hw_ptr, w_hh_ptr, acts_ptr, h_prev_ptr, h0_ptr, rmask_ptr, reset_ptr, x_ptr,
                   m, n_seq, B, N, K,
                   HAS_RESET: tl.constexpr, HAS_MASK: tl.constexpr, LN: tl.constexpr,
                   ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """GRU reset_after=False, step t, rows [0, m): d(r * h_in) = d_n @ W_hn, then
    d_r = d(r * h_in) * h_in * r (1 - r) into both gradients' r entries, and
    x_ptr [B, H] = d(r * h_in) * r (its share of the gradient of h_in, for ``rnn_bwd_dh_var``).
    N = H, K = G; d_n is grad_hw[t][:, 2H:3H].
    """
    H = N
    G = K
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < m
    col_ok = cols < H
    mask = row_ok[:, None] & col_ok[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(grad_hw_ptr + 2 * H + rows[:, None] * G + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = _dot_tile(acc, a, w_hh_ptr + 2 * H * H, ks, cols, k_ok, col_ok, H, 1, DOT_PRECISION)
    reset = _row_flag(reset_ptr, rows, row_ok, HAS_RESET)
    h_in = _h_in(h_prev_ptr, h0_ptr, rmask_ptr, rows, cols, H, n_seq, mask, reset, HAS_MASK, ACC)
    r = _load(acts_ptr, rows, cols, G, mask, ACC)
    d_r = acc * h_in * r * (1 - r)
    act_offs = rows[:, None] * G + cols[None, :]
    tl.store(grad_xw_ptr + act_offs, d_r, mask=mask)
    tl.store(grad_hw_ptr + act_offs, d_r, mask=mask)
    tl.store(x_ptr + rows[:, None] * H + cols[None, :], acc * r, mask=mask)
