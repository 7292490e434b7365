r"""Triton kernels for one time step of the LSTM / GRU / RNN recurrence (forward and backward), for
the plain cells and every variant of docs/variants.md (layer norm, peephole, recurrent dropout,
zoneout, resets, GRU reset_after=False).

One kernel family: an option is on when its tensor argument is given and off when it is None.
Triton specialises a None argument as a compile-time constant, so ``if peep_ptr is not None:``
compiles away and the plain cell (every option None) compiles to plain code. What is not a
tensor is a ``tl.constexpr`` flag: ``CELL`` (LSTM / GRU / RNN_TANH / RNN_RELU), ``NG`` (gates
per hidden unit), ``LN`` (row mode, below), ``PHASE`` / ``RB`` (GRU reset_after=False),
``HAS_PREV``, ``ACC``, ``DOT_PRECISION``. Launches pass keyword arguments.

    rnn_fwd     forward step: h_in @ W_hh^T by tl.dot (one accumulator per gate), gates, state update
    rnn_gemm    a tile GEMM with the recurrence's operands: layer norm's raw product h_in @ W_hh^T,
                the LSTM projection h_t = zoneout(hu @ W_hr^T), and (row mode) dhu = dh_new @ W_hr
    rnn_bwd_dh  dh_t over all Hr columns when the gate kernel cannot form it; after the loop, grad_h0
    rnn_bwd     backward step: dh_t (fused in tile mode), the gate gradients, the dc carry
    rnn_bwd_rb  GRU reset_after=False: d(r * h_in) = d_n @ W_hn, then d_r
The time loops, the input projection and the weight-gradient GEMMs live in
``fastrnn/backends/triton_rnn.py`` and ``fastrnn/ops/rnn_layer.py``; docs/triton.md has the design.

Two program shapes (``LN``). Tile mode: grid ``(cdiv(rows, BLOCK_B), cdiv(cols, BLOCK_H))``, a
program owns BLOCK_H hidden units of every gate for BLOCK_B rows and forms their products with
tl.dot. Row mode (hidden-product layer norm): grid ``(cdiv(rows, BLOCK_B), 1)``; the norm needs
the statistics of all G entries of a row before any gate, so ``rnn_gemm`` first writes the raw
product a [B, G], then a program owns whole rows and walks their hidden units in BLOCK_H chunks
through the same gate code (no tl.dot, so BLOCK_B < 16 is legal). Rows are batch rows: only the
active prefix of a packed batch is launched. Tensors are contiguous, row-major; "a [B, K]
pointer" below is the base of step t's slice (``h_seq[t]``, ``acts[t]``, ...).

Numerics: products accumulate in ``ACC`` (float32, or float64 for float64 inputs); the cell state
``c``, the carried gradients ``dh`` / ``dc`` live in ``ACC`` as well, so float16 / bfloat16 runs
keep a float32 cell state. ``tl.dot`` operands are in the weight dtype; ``DOT_PRECISION`` is
``"ieee"`` for exact float32 parity (the default) or ``"tf32"``.

The state a step starts from (``_state_in``) follows the packed-sequence rule of the contract:
rows ``< n_seq`` continue from the previous step's saved state, the others start from the
initial state (in the reverse direction a row's first step is its last valid time index), and so
do rows with ``reset``.
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
LN_EPS = tl.constexpr(1e-5)  # fastrnn.contract.rnn.LN_EPS

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # how the kernels below get decorated
# Triton before 3.9 cannot lower a float64 tl.dot with the operand layouts below (an MMAv2
# "largeK" assertion; seen with 3.6 on sm_90): ``_dot_tile`` then multiplies and sums instead
FP64_DOT = tl.constexpr(tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9))


# ----------------------------------------------------------------------------------------------
# autotuning
# ----------------------------------------------------------------------------------------------
# Tile mode (BLOCK_B, BLOCK_H, BLOCK_K, num_warps): narrow column blocks give small batches more
# programs (one per BLOCK_H hidden units of every gate); wide row blocks reuse each W_hh tile for
# more rows.
_GPU_TILES = [(16, 16, 64, 4), (16, 32, 64, 4), (16, 64, 64, 4), (16, 128, 32, 4),
              (32, 32, 64, 4), (32, 64, 32, 4), (32, 64, 64, 8), (64, 32, 32, 4),
              (64, 64, 32, 8), (64, 128, 32, 8), (128, 64, 32, 8)]
# Row mode (no tl.dot there: rows per program may be < 16, BLOCK_K is unused). Few rows per program
# give a batch of 32 its 8 to 32 programs for a pass that is pure bandwidth.
_ROW_TILES = [(1, 128, 16, 4), (2, 128, 16, 4), (4, 64, 16, 4), (1, 256, 16, 8), (4, 256, 16, 8)]


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


# tl.dot needs every block dimension >= 16, also in the interpreter; one config there (valid for
# both program shapes), since the interpreter would time every config on the CPU.
INTERPRETER_CONFIG = triton.Config({"BLOCK_B": 16, "BLOCK_H": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)


def configs(interpreted: bool = INTERPRETED, row_mode: bool = False):
    """Autotuning candidates of one program shape: one small config under the interpreter, a
    sweep on the GPU (row mode: no software pipelining, there is no tl.dot to feed)."""
    if interpreted:
        return [INTERPRETER_CONFIG]
    return [triton.Config({"BLOCK_B": bb, "BLOCK_H": bh, "BLOCK_K": bk}, num_warps=w, num_stages=1 if row_mode else 3)
            for bb, bh, bk, w in env_tiles(row_mode, _ROW_TILES if row_mode else _GPU_TILES)]


def kernel_configs(interpreted: bool = INTERPRETED):
    """What every kernel is autotuned over: the tile-mode and the row-mode candidates."""
    return [INTERPRETER_CONFIG] if interpreted else configs(False) + configs(False, row_mode=True)


def prune_configs(configs, named_args, **kwargs):
    """Row-mode configs (BLOCK_B < 16) for row-mode launches (``LN``). Otherwise the tile configs
    minus those that waste the GPU for this problem: row blocks much wider than the batch, column
    blocks much wider than the output, and per-gate accumulators that would crowd out the operand
    tiles from the registers (NG tiles of BLOCK_B x BLOCK_H float32 per program, at most 64
    registers per thread; tl.dot operands and pipelining stages need the rest). Keyword launches
    bring the problem sizes in ``kwargs``."""
    args = {**named_args, **kwargs}
    rows = [c for c in configs if c.kwargs["BLOCK_B"] < 16]
    tiles = [c for c in configs if c.kwargs["BLOCK_B"] >= 16]
    if args.get("LN", False):
        return rows or configs[:1]
    B, N, ng = args["B"], args["N"], args.get("NG", 1)
    keep = [c for c in tiles if c.kwargs["BLOCK_B"] <= max(16, triton.next_power_of_2(B))
            and c.kwargs["BLOCK_H"] <= max(16, triton.next_power_of_2(N))
            and ng * c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_H"] <= 64 * 32 * c.num_warps]  # <= 64 acc. registers
    return keep or tiles[:1] or configs[:1]


def _restore_hooks(names):
    """Autotuner hooks that save the in-place outputs ``names`` before each timed launch and put
    them back after it. Triton's own ``restore_value`` clones every named argument, and before
    Triton 3.9 it fails on one passed as ``None`` (an optional input such as ``c0acc_ptr``), so
    the kernels name theirs here and ``None`` is skipped."""
    saved = {}

    def pre_hook(kwargs, reset_only=False):
        if not reset_only:
            saved.clear()
            saved.update({n: kwargs[n].clone() for n in names if kwargs[n] is not None})

    def post_hook(kwargs, exception=None):
        for n, value in saved.items():
            kwargs[n].copy_(value)
        saved.clear()

    return dict(pre_hook=pre_hook, post_hook=post_hook) if names else {}


def _autotune(restore, key=()):
    # LN is in the key of the kernels that have a row mode: a row config is never reused for a tile launch
    return triton.autotune(configs=kernel_configs(), key=["B", "N", "K", *key], **_restore_hooks(restore),
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
def d_sigmoid(s):
    """sigmoid'(x) from s = sigmoid(x)."""
    return s * (1 - s)


@triton.jit
def d_tanh(t):
    """tanh'(x) from t = tanh(x)."""
    return 1 - t * t


@triton.jit
def _load(ptr, rows, cols, width, mask, DT: tl.constexpr):
    """Tile [rows, cols] of a row-major matrix with ``width`` columns, converted to DT."""
    return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=mask, other=0.0).to(DT)


@triton.jit
def _vec(ptr, cols, col_ok, ACC: tl.constexpr):
    """A [1, BLOCK_H] row of a per-unit parameter vector."""
    return tl.load(ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]


@triton.jit
def _dot_tile(acc, a, w_ptr, ks, ns, k_ok, n_ok, stride_k, stride_n, DOT_PRECISION: tl.constexpr):
    """acc += a @ W where W[k, n] = w_ptr[k * stride_k + n * stride_n] (transposed or not)."""
    w = tl.load(w_ptr + ks[:, None] * stride_k + ns[None, :] * stride_n,
                mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    a = a.to(w.dtype)
    if w.dtype == tl.float64 and not FP64_DOT:
        # float64 (the exactness tests' dtype) as a broadcast product and sum
        acc = acc + tl.sum(a[:, :, None] * w[None, :, :], axis=1)
    else:  # out_dtype: before Triton 3.9 it is float32 unless given, which a float64 acc refuses
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _row_flag(ptr, rows, ok):
    """[BLOCK_B] bool from a uint8 [B] vector (``reset[t]``); None when the option is off."""
    flag = None
    if ptr is not None:
        flag = tl.load(ptr + rows, mask=ok, other=0) != 0
    return flag


@triton.jit
def _state_in(seq_ptr, init_ptr, rows, cols, width, n_seq, mask, reset, DT: tl.constexpr):
    """State a step starts from: the previous step's ``seq_ptr`` tile for rows < n_seq, else the
    initial state ``init_ptr``; rows with ``reset`` ([BLOCK_B] bool, or None) start from it too."""
    from_seq = rows < n_seq
    if reset is not None:
        from_seq = from_seq & ~reset
    a = _load(seq_ptr, rows, cols, width, mask & from_seq[:, None], DT)
    b = _load(init_ptr, rows, cols, width, mask & ~from_seq[:, None], DT)
    return tl.where(from_seq[:, None], a, b)


@triton.jit
def _h_in(h_prev_ptr, h0_ptr, rmask_ptr, rows, cols, width, n_seq, mask, reset, DT: tl.constexpr):
    """Left operand of the recurrent product: the state entering the step, times ``rec_mask``."""
    h = _state_in(h_prev_ptr, h0_ptr, rows, cols, width, n_seq, mask, reset, DT)
    if rmask_ptr is not None:
        h = h * _load(rmask_ptr, rows, cols, width, mask, DT)
    return h


@triton.jit
def _blend(z_ptr, rows, cols, width, mask, old, new, ACC: tl.constexpr):
    """Zoneout ``z * old + (1 - z) * new`` (z [B, width] of this step); ``new`` when z_ptr is None."""
    out = new
    if z_ptr is not None:
        z = _load(z_ptr, rows, cols, width, mask, ACC)
        out = z * old + (1 - z) * new
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
             ACC: tl.constexpr):
    """Hidden-side pre-activation of one gate from the raw product: ``w * hat + b_ln (+ b_hh)``,
    hat = (a - mean) * rstd over the row, saved to hat_ptr (training). ``off`` = gate * H."""
    offs = rows[:, None] * width + off + cols[None, :]
    hat = (tl.load(a_ptr + offs, mask=mask, other=0.0).to(ACC) - mean[:, None]) * rstd[:, None]
    if hat_ptr is not None:
        tl.store(hat_ptr + offs, hat, mask=mask)
    hw = hat * _vec(lnw_ptr + off, cols, col_ok, ACC) + _vec(lnb_ptr + off, cols, col_ok, ACC)
    if b_ptr is not None:
        hw += _vec(b_ptr + off, cols, col_ok, ACC)
    return hw


@triton.jit
def _ln_sums(t1, t2, d, hat_ptr, lnw_ptr, off, rows, cols, G, mask, col_ok, ACC: tl.constexpr):
    """Row sums of w*d and w*d*hat for one gate's tile (hidden layer norm backward)."""
    wd = tl.where(mask, d * _vec(lnw_ptr + off, cols, col_ok, ACC), 0.0)
    hat = _load(hat_ptr + off, rows, cols, G, mask, ACC)
    return t1 + tl.sum(wd, axis=1), t2 + tl.sum(wd * hat, axis=1)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@_autotune([])
@triton.jit(do_not_specialize=["m", "n_seq"])
def rnn_gemm(a_ptr, w_ptr, out_ptr, h_prev_ptr, h0_ptr, rmask_ptr, reset_ptr, zh_ptr, h_T_ptr,
             m, n_seq, stride_wk, stride_wn, B, N, K,
             ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
             BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [B, N] = A @ W for rows [0, m), W[k, n] = w_ptr[k * stride_wk + n * stride_wn]. Three uses:

    * layer norm's raw product (a_ptr None): A = h_in, the state entering the step (h_prev_ptr
      [B, Hr] for rows < n_seq, else h0_ptr; reset_ptr [B] uint8) times rmask_ptr [B, Hr];
      W = W_hh^T; out = a [B, G] in ACC.
    * the LSTM projection: A = a_ptr = hu [B, H], W = W_hr^T, out = h_seq[t] and h_T_ptr [B, Hr]
      = zoneout(hu @ W_hr^T) with zh_ptr [B, Hr], against the state entering the step as above.
    * its backward in row mode (a program of the gate kernel has no tl.dot there): A = a_ptr =
      dh_new [B, Hr], W = W_hr, out = dhu [B, H] in ACC.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < m
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    reset = _row_flag(reset_ptr, rows, row_ok)
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        amask = row_ok[:, None] & k_ok[None, :]
        if a_ptr is None:
            a = _h_in(h_prev_ptr, h0_ptr, rmask_ptr, rows, ks, K, n_seq, amask, reset, w_ptr.dtype.element_ty)
        else:
            a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=amask, other=0.0)
        acc = _dot_tile(acc, a, w_ptr, ks, cols, k_ok, col_ok, stride_wk, stride_wn, DOT_PRECISION)
    out = acc
    if zh_ptr is not None:
        h_prev = _state_in(h_prev_ptr, h0_ptr, rows, cols, N, n_seq, mask, reset, ACC)
        out = _blend(zh_ptr, rows, cols, N, mask, h_prev, acc, ACC)
    offs = rows[:, None] * N + cols[None, :]
    tl.store(out_ptr + offs, out, mask=mask)
    if h_T_ptr is not None:
        tl.store(h_T_ptr + offs, out, mask=mask)


@triton.jit
def _store_h(h_new, h_prev_ptr, h0_ptr, zh_ptr, h_out_ptr, h_T_ptr, hnew_ptr, rows, cols, H, n_seq, mask, reset,
             ACC: tl.constexpr):
    """Write a step's output tile: h_t = zoneout(h_new) to h_out_ptr (h_seq[t]) and h_T_ptr, and
    h_new itself to hnew_ptr (RNN zoneout, training: backward needs it). With a projection the
    host passes h_T_ptr and zh_ptr None: h_out_ptr gets the unprojected ``hu`` (``rnn_gemm``
    projects it, then applies zoneout)."""
    offs = rows[:, None] * H + cols[None, :]
    h = h_new
    if zh_ptr is not None:
        h = _blend(zh_ptr, rows, cols, H, mask, _state_in(h_prev_ptr, h0_ptr, rows, cols, H, n_seq, mask, reset, ACC),
                   h_new, ACC)
    if hnew_ptr is not None:
        tl.store(hnew_ptr + offs, h_new, mask=mask)
    tl.store(h_out_ptr + offs, h, mask=mask)
    if h_T_ptr is not None:
        tl.store(h_T_ptr + offs, h, mask=mask)


@_autotune(["c_ptr"], key=["LN"])
@triton.jit(do_not_specialize=["m", "n_seq"])
def rnn_fwd(xw_ptr, w_hh_ptr, b_hh_ptr, h_prev_ptr, h0_ptr, c_ptr, c0_ptr, h_out_ptr, h_T_ptr,
            acts_ptr, c_seq_ptr, hn_ptr, reset_ptr, rmask_ptr, zh_ptr, zc_ptr, peep_ptr,
            a_ptr, lnw_ptr, lnb_ptr, hat_ptr, rstd_ptr, lncw_ptr, lncb_ptr, chat_ptr, crstd_ptr,
            cnew_ptr, hnew_ptr, rh_ptr,
            m, n_seq, B, N, K,
            CELL: tl.constexpr, NG: tl.constexpr, LN: tl.constexpr, PHASE: tl.constexpr,
            ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
            BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """One forward step for rows [0, m).  N = H (hidden units), K = Hr (width of h).

    xw_ptr [B, G] (input side, incl. b_ih); w_hh_ptr [G, Hr]; h_prev_ptr [B, Hr] (h_seq of the
    previous step, rows < n_seq) and h0_ptr [B, Hr]; c_ptr [B, H] the LSTM cell state in ACC,
    updated in place; h_out_ptr [B, Hr] = h_seq[t], h_T_ptr [B, Hr] the final state, written on
    every active step (``_store_h``: None with a projection). Optional, None = off / not saved:
    b_hh_ptr [G]; in training acts_ptr [B, G] (activated gates; also scratch for o with the
    cell-state norm and for r, z across GRU's phases), c_seq_ptr [B, H] (ACC), hn_ptr [B, H]
    (GRU hidden-side n pre-activation), cnew_ptr [B, H] (LSTM c_new before zoneout, also scratch
    for the cell-state norm), hnew_ptr [B, H] (RNN h_new before zoneout); reset_ptr [B] uint8
    with c0_ptr [B, H]; rmask_ptr [B, Hr]; zh_ptr [B, Hr], zc_ptr [B, H] zoneout; peep_ptr [3, H].
    Layer norm (LN, row mode): a_ptr [B, G] raw product from ``rnn_gemm``, lnw/lnb [G], saved
    hat_ptr [B, G] and rstd_ptr [B]; lncw/lncb [H] (LSTM cell-state norm), saved chat_ptr [B, H]
    and crstd_ptr [B]. PHASE (GRU reset_after=False): 1 = r, z and rh = r * h_in -> rh_ptr
    [B, H]; 2 = n from rh @ W_hn^T, and h; 0 = every other case.
    """
    H = N
    HR = K
    G = NG * H
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < m
    reset = _row_flag(reset_ptr, rows, row_ok)
    if LN:
        mean, rstd = _row_stats(a_ptr, rows, row_ok, G, ACC, BLOCK_B, BLOCK_H)
        if rstd_ptr is not None:
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
            hw0 = _ln_gate(a_ptr, hat_ptr, lnw_ptr, lnb_ptr, b_hh_ptr, 0, rows, cols, G, mask, col_ok, mean, rstd, ACC)
            if NG > 1:
                hw1 = _ln_gate(a_ptr, hat_ptr, lnw_ptr, lnb_ptr, b_hh_ptr, H, rows, cols, G, mask, col_ok, mean, rstd,
                               ACC)
                hw2 = _ln_gate(a_ptr, hat_ptr, lnw_ptr, lnb_ptr, b_hh_ptr, 2 * H, rows, cols, G, mask, col_ok, mean,
                               rstd, ACC)
            if NG > 3:
                hw3 = _ln_gate(a_ptr, hat_ptr, lnw_ptr, lnb_ptr, b_hh_ptr, 3 * H, rows, cols, G, mask, col_ok, mean,
                               rstd, ACC)
        else:  # one accumulator per gate: the program owns the same hidden units of every gate
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
                    a = _h_in(h_prev_ptr, h0_ptr, rmask_ptr, rows, ks, HR, n_seq, amask, reset,
                              w_hh_ptr.dtype.element_ty)
                    hw0 = _dot_tile(hw0, a, w_hh_ptr, ks, cols, k_ok, col_ok, 1, HR, DOT_PRECISION)
                    if NG > 1:
                        hw1 = _dot_tile(hw1, a, w_hh_ptr + H * HR, ks, cols, k_ok, col_ok, 1, HR, DOT_PRECISION)
                    if NG > 1 and PHASE == 0:
                        hw2 = _dot_tile(hw2, a, w_hh_ptr + 2 * H * HR, ks, cols, k_ok, col_ok, 1, HR, DOT_PRECISION)
                    if NG > 3:
                        hw3 = _dot_tile(hw3, a, w_hh_ptr + 3 * H * HR, ks, cols, k_ok, col_ok, 1, HR, DOT_PRECISION)
            if b_hh_ptr is not None:
                hw0 += _vec(b_hh_ptr, cols, col_ok, ACC)
                if NG > 1:
                    hw1 += _vec(b_hh_ptr + H, cols, col_ok, ACC)
                    hw2 += _vec(b_hh_ptr + 2 * H, cols, col_ok, ACC)
                if NG > 3:
                    hw3 += _vec(b_hh_ptr + 3 * H, cols, col_ok, ACC)

        # -- gates and state update -----------------------------------------------------------------
        if CELL == LSTM:
            c_prev = _load(c_ptr, rows, cols, H, mask, ACC)  # c holds every active row's state
            if reset is not None:
                c_prev = tl.where(reset[:, None], _load(c0_ptr, rows, cols, H, mask & reset[:, None], ACC), c_prev)
            pre_i = _load(xw_ptr, rows, cols, G, mask, ACC) + hw0
            pre_f = _load(xw_ptr + H, rows, cols, G, mask, ACC) + hw1
            if peep_ptr is not None:
                pre_i += _vec(peep_ptr, cols, col_ok, ACC) * c_prev
                pre_f += _vec(peep_ptr + H, cols, col_ok, ACC) * c_prev
            i = _sigmoid(pre_i)
            f = _sigmoid(pre_f)
            g = _tanh(_load(xw_ptr + 2 * H, rows, cols, G, mask, ACC) + hw2)
            c_new = f * c_prev + i * g
            pre_o = _load(xw_ptr + 3 * H, rows, cols, G, mask, ACC) + hw3
            if peep_ptr is not None:
                pre_o += _vec(peep_ptr + 2 * H, cols, col_ok, ACC) * c_new
            o = _sigmoid(pre_o)
            c_t = _blend(zc_ptr, rows, cols, H, mask, c_prev, c_new, ACC)
            tl.store(c_ptr + offs, c_t, mask=mask)
            if c_seq_ptr is not None:
                tl.store(c_seq_ptr + offs, c_t, mask=mask)
            if acts_ptr is not None:
                tl.store(acts_ptr + act_offs, i, mask=mask)
                tl.store(acts_ptr + act_offs + H, f, mask=mask)
                tl.store(acts_ptr + act_offs + 2 * H, g, mask=mask)
                tl.store(acts_ptr + act_offs + 3 * H, o, mask=mask)
            if cnew_ptr is not None:
                tl.store(cnew_ptr + offs, c_new, mask=mask)
            if lncw_ptr is not None:  # h needs the statistics of the whole row of c_new: after this loop
                csum += tl.sum(tl.where(mask, c_new, 0.0), axis=1)
            else:
                _store_h(o * _tanh(c_new), h_prev_ptr, h0_ptr, zh_ptr, h_out_ptr, h_T_ptr, hnew_ptr, rows, cols, H,
                         n_seq, mask, reset, ACC)
        elif CELL == GRU:
            if PHASE == 1:
                r = _sigmoid(_load(xw_ptr, rows, cols, G, mask, ACC) + hw0)
                z = _sigmoid(_load(xw_ptr + H, rows, cols, G, mask, ACC) + hw1)
                tl.store(acts_ptr + act_offs, r, mask=mask)
                tl.store(acts_ptr + act_offs + H, z, mask=mask)
                h_in = _h_in(h_prev_ptr, h0_ptr, rmask_ptr, rows, cols, H, n_seq, mask, reset, ACC)
                tl.store(rh_ptr + offs, r * h_in, mask=mask)
            else:
                if PHASE == 2:
                    z = _load(acts_ptr + H, rows, cols, G, mask, ACC)
                    n = _tanh(_load(xw_ptr + 2 * H, rows, cols, G, mask, ACC) + hw2)
                else:
                    r = _sigmoid(_load(xw_ptr, rows, cols, G, mask, ACC) + hw0)
                    z = _sigmoid(_load(xw_ptr + H, rows, cols, G, mask, ACC) + hw1)
                    n = _tanh(_load(xw_ptr + 2 * H, rows, cols, G, mask, ACC) + r * hw2)
                    if acts_ptr is not None:
                        tl.store(acts_ptr + act_offs, r, mask=mask)
                        tl.store(acts_ptr + act_offs + H, z, mask=mask)
                h_prev = _state_in(h_prev_ptr, h0_ptr, rows, cols, H, n_seq, mask, reset, ACC)
                if hn_ptr is not None:  # training
                    tl.store(acts_ptr + act_offs + 2 * H, n, mask=mask)
                    tl.store(hn_ptr + offs, hw2, mask=mask)
                _store_h((1 - z) * n + z * h_prev, h_prev_ptr, h0_ptr, zh_ptr, h_out_ptr, h_T_ptr, hnew_ptr,
                         rows, cols, H, n_seq, mask, reset, ACC)
        else:
            pre = _load(xw_ptr, rows, cols, G, mask, ACC) + hw0
            h_new = _tanh(pre) if CELL == RNN_TANH else tl.maximum(pre, 0.0)
            _store_h(h_new, h_prev_ptr, h0_ptr, zh_ptr, h_out_ptr, h_T_ptr, hnew_ptr, rows, cols, H, n_seq, mask,
                     reset, ACC)

    if lncw_ptr is not None:  # LSTM: h = o * tanh(LN(c_new)); c_new of the whole row is in cnew_ptr now
        tl.debug_barrier()  # other threads of this program wrote parts of the row
        mean_c = csum / H
        v = tl.zeros([BLOCK_B], dtype=ACC)
        for tb in range(0, n_tiles):
            cols = tb * BLOCK_H + tl.arange(0, BLOCK_H)
            mask = row_ok[:, None] & (cols < H)[None, :]
            d = tl.where(mask, _load(cnew_ptr, rows, cols, H, mask, ACC) - mean_c[:, None], 0.0)
            v += tl.sum(d * d, axis=1)
        rstd_c = 1.0 / tl.sqrt(v / H + LN_EPS)
        if crstd_ptr is not None:
            tl.store(crstd_ptr + rows, rstd_c, mask=row_ok)
        for tb in range(0, n_tiles):
            cols = tb * BLOCK_H + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            chat = (_load(cnew_ptr, rows, cols, H, mask, ACC) - mean_c[:, None]) * rstd_c[:, None]
            if chat_ptr is not None:
                tl.store(chat_ptr + rows[:, None] * H + cols[None, :], chat, mask=mask)
            y = chat * _vec(lncw_ptr, cols, col_ok, ACC) + _vec(lncb_ptr, cols, col_ok, ACC)
            o = _load(acts_ptr + 3 * H, rows, cols, G, mask, ACC)
            _store_h(o * _tanh(y), h_prev_ptr, h0_ptr, zh_ptr, h_out_ptr, h_T_ptr, hnew_ptr, rows, cols, H,
                     n_seq, mask, reset, ACC)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dh_carry(ghw_prev_ptr, acts_prev_ptr, x_prev_ptr, w_hh_ptr, dh_ptr, grad_h0_ptr, h0acc_ptr, grad_h_ptr,
              rmask_ptr, zh_prev_ptr, reset_prev_ptr, rows, cols, m, m_prev, H, KD, N, K,
              HAS_PREV: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Total gradient ``dh_t`` reaching h_t, for a [rows, cols of Hr] tile (N = Hr, K = G).

    Rows active at s, the step processed before (the forward successor; rows < m_prev), receive
    the gradient that reached h_t through step s's use of it as its entering state:
        ((grad_hw[s][:, :KD] @ W_hh[:KD]) (+ x_prev_ptr = d(r * h_in) r, GRU reset_after=False)) * rec_mask
        + dh_s * (zoneout_h[s] + (1 - zoneout_h[s]) * z_s (GRU: acts_prev_ptr, the gates of s))
    KD = G, or 2H with reset_after=False (its n rows act on r * h_in, folded into x_prev). Rows reset
    at s send that gradient to h0acc_ptr [B, Hr] (ACC, accumulated) instead: they started from h0.
    Rows not active at s (packed rows starting in this backward pass) keep what dh_ptr holds,
    grad_h_T; rows active at s but not at t (``m <= row < m_prev``) are finished: their carry is
    grad_h0. dh_t = carry + grad_h_seq[t] is written back to dh_ptr in place (every program reads
    and writes only its own tile) and returned; grad_h_ptr None after the loop (no row is live).
    """
    col_ok = cols < N
    prev = rows < m_prev
    cur = rows < m
    pmask = prev[:, None] & col_ok[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    if HAS_PREV:  # a compile-time flag, so that autotuning never times the GEMM-free first step
        for k0 in range(0, KD, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < KD
            a = tl.load(ghw_prev_ptr + rows[:, None] * K + ks[None, :], mask=prev[:, None] & k_ok[None, :], other=0.0)
            acc = _dot_tile(acc, a, w_hh_ptr, ks, cols, k_ok, col_ok, N, 1, DOT_PRECISION)
        if x_prev_ptr is not None:
            acc += _load(x_prev_ptr, rows, cols, N, pmask, ACC)
        if rmask_ptr is not None:
            acc *= _load(rmask_ptr, rows, cols, N, pmask, ACC)
    dh_old = _load(dh_ptr, rows, cols, N, (prev | cur)[:, None] & col_ok[None, :], ACC)
    if acts_prev_ptr is not None:  # GRU: h_s = (1 - z) n + z h_prev
        keep = _load(acts_prev_ptr + H, rows, cols, K, pmask, ACC)
        if zh_prev_ptr is not None:
            zp = _load(zh_prev_ptr, rows, cols, N, pmask, ACC)
            keep = zp + (1 - zp) * keep
        acc += dh_old * keep
    elif zh_prev_ptr is not None:
        acc += dh_old * _load(zh_prev_ptr, rows, cols, N, pmask, ACC)
    offs = rows[:, None] * N + cols[None, :]
    if reset_prev_ptr is not None:
        was_reset = _row_flag(reset_prev_ptr, rows, prev)[:, None] & pmask
        tl.store(h0acc_ptr + offs, tl.load(h0acc_ptr + offs, mask=was_reset, other=0.0) + acc, mask=was_reset)
        acc = tl.where(was_reset, 0.0, acc)
    carry = tl.where(prev[:, None], acc, dh_old)
    tl.store(grad_h0_ptr + offs, carry, mask=(prev & ~cur)[:, None] & col_ok[None, :])
    dh = carry
    if grad_h_ptr is not None:
        live = cur[:, None] & col_ok[None, :]
        dh = carry + _load(grad_h_ptr, rows, cols, N, live, ACC)
        tl.store(dh_ptr + offs, dh, mask=live)
    return dh


@_autotune(["dh_ptr", "h0acc_ptr"], key=["HAS_PREV"])
@triton.jit(do_not_specialize=["m", "m_prev"])
def rnn_bwd_dh(ghw_prev_ptr, acts_prev_ptr, x_prev_ptr, w_hh_ptr, dh_ptr, grad_h0_ptr, h0acc_ptr, grad_h_ptr,
               rmask_ptr, zh_prev_ptr, reset_prev_ptr, zh_ptr, dhnew_ptr,
               m, m_prev, H, KD, B, N, K,
               HAS_PREV: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dh_t`` over all Hr columns (``_dh_carry``), rows [0, max(m, m_prev)).  N = Hr, K = G.

    Used when the gate kernel cannot form dh_t itself (layer norm: row programs; LSTM proj_size:
    whole rows of dh_t feed ``dh_new @ W_hr``), and once after the loop with m = 0 and grad_h_ptr
    None to flush the last rows into grad_h0. dhnew_ptr [B, Hr] (optional) receives dh_new =
    (1 - zoneout_h[t]) dh_t (zh_ptr [B, Hr]), the gradient of the step's new output.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dh = _dh_carry(ghw_prev_ptr, acts_prev_ptr, x_prev_ptr, w_hh_ptr, dh_ptr, grad_h0_ptr, h0acc_ptr, grad_h_ptr,
                   rmask_ptr, zh_prev_ptr, reset_prev_ptr, rows, cols, m, m_prev, H, KD, N, K,
                   HAS_PREV, ACC, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    if dhnew_ptr is not None:
        live = (rows < m)[:, None] & (cols < N)[None, :]
        tl.store(dhnew_ptr + rows[:, None] * N + cols[None, :], _blend(zh_ptr, rows, cols, N, live, 0.0, dh, ACC),
                 mask=live)


@_autotune(["dc_ptr", "c0acc_ptr", "grad_hw_ptr", "dh_ptr", "h0acc_ptr"], key=["LN", "HAS_PREV"])
@triton.jit(do_not_specialize=["m", "n_seq", "m_prev"])
def rnn_bwd(dnew_ptr, w_hr_ptr, acts_ptr, cnew_ptr, prev_ptr, init_ptr, state_ptr, dc_ptr, c0acc_ptr,
            grad_xw_ptr, grad_hw_ptr, reset_ptr, zc_ptr, peep_ptr, hat_ptr, rstd_ptr, lnw_ptr,
            chat_ptr, crstd_ptr, lncw_ptr, lncb_ptr, dyc_ptr,
            ghw_prev_ptr, acts_prev_ptr, x_prev_ptr, w_hh_ptr, dh_ptr, grad_h0_ptr, h0acc_ptr, grad_h_ptr,
            rmask_ptr, zh_prev_ptr, reset_prev_ptr, zh_ptr,
            m, n_seq, m_prev, KD, HR, B, N, K,
            CELL: tl.constexpr, NG: tl.constexpr, LN: tl.constexpr, RB: tl.constexpr, HAS_PREV: tl.constexpr,
            ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
            BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Gate gradients at step t, rows [0, m).  N = H, K = G.  Tile or row mode (LN).

    The gradient dhu of the cell output (before the projection and zoneout) comes from one of:
    dh_ptr given (tile mode, no projection): the program forms its tile of dh_t itself
    (``_dh_carry``, with the arguments of ``rnn_bwd_dh``) and dhu = (1 - zoneout_h[t]) dh_t,
    the grid then spans rows [0, max(m, m_prev)) so that finished rows reach grad_h0; w_hr_ptr
    [Hr, H] given (tile mode, LSTM proj_size): dhu = dnew_ptr [B, Hr] (dh_new) @ W_hr;
    otherwise dnew_ptr [B, H] is dhu.
    acts_ptr [B, G] the saved gates. LSTM: cnew_ptr [B, H] c_new, prev_ptr / init_ptr
    c_seq[prev] / c0 (``_state_in`` with n_seq and reset_ptr [B] uint8), dc_ptr [B, H] dc_t in,
    the carry into c_{t-1} out (ACC, in place); with resets, rows reset at t add it to c0acc_ptr
    instead. GRU: prev_ptr / init_ptr h_seq[prev] / h0, state_ptr = h_n [B, H]. RNN: state_ptr =
    h_new. Writes grad_xw_ptr [B, G] and grad_hw_ptr [B, G], the gradient of the raw product (None
    when it is grad_xw; GRU RB: without the r entries, which ``rnn_bwd_rb`` adds). Optional:
    zc_ptr [B, H], peep_ptr [3, H]; layer norm (row mode): hat_ptr [B, G], rstd_ptr [B], lnw [G];
    lncw / lncb [H] with chat_ptr [B, H], crstd_ptr [B], and dyc_ptr [B, H] receives the gradient
    at LN(c_new)'s output (for the norm's weights).
    """
    H = N
    G = K
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < m
    reset = _row_flag(reset_ptr, rows, row_ok)
    if LN:
        n_tiles = tl.cdiv(H, BLOCK_H)
        tile0 = 0
    else:
        n_tiles = 1
        tile0 = tl.program_id(1)
    # -- LSTM cell-state norm: row sums of its output gradient ------------------------------------
    s1 = tl.zeros([BLOCK_B], dtype=ACC)
    s2 = tl.zeros([BLOCK_B], dtype=ACC)
    if lncw_ptr is not None:
        rstd_c = tl.load(crstd_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        for tb in range(0, n_tiles):
            cols = tb * BLOCK_H + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            chat = _load(chat_ptr, rows, cols, H, mask, ACC)
            wc = _vec(lncw_ptr, cols, col_ok, ACC)
            ty = _tanh(chat * wc + _vec(lncb_ptr, cols, col_ok, ACC))
            o = _load(acts_ptr + 3 * H, rows, cols, G, mask, ACC)
            dy = _load(dnew_ptr, rows, cols, H, mask, ACC) * o * d_tanh(ty)  # dy = dhu o (1 - tanh(y)^2)
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
        if dh_ptr is not None:
            dh = _dh_carry(ghw_prev_ptr, acts_prev_ptr, x_prev_ptr, w_hh_ptr, dh_ptr, grad_h0_ptr, h0acc_ptr,
                           grad_h_ptr, rmask_ptr, zh_prev_ptr, reset_prev_ptr, rows, cols, m, m_prev, H, KD, H, G,
                           HAS_PREV, ACC, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
            dhu = _blend(zh_ptr, rows, cols, H, mask, 0.0, dh, ACC)
        elif w_hr_ptr is not None:
            dhu = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
            for k0 in range(0, HR, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < HR
                a = tl.load(dnew_ptr + rows[:, None] * HR + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                            other=0.0)
                dhu = _dot_tile(dhu, a, w_hr_ptr, ks, cols, k_ok, col_ok, H, 1, DOT_PRECISION)
        else:
            dhu = _load(dnew_ptr, rows, cols, H, mask, ACC)
        if CELL == LSTM:
            i = _load(acts_ptr, rows, cols, G, mask, ACC)
            f = _load(acts_ptr + H, rows, cols, G, mask, ACC)
            g = _load(acts_ptr + 2 * H, rows, cols, G, mask, ACC)
            o = _load(acts_ptr + 3 * H, rows, cols, G, mask, ACC)
            if lncw_ptr is not None:  # dc_new = LN_c backward of dy
                chat = _load(chat_ptr, rows, cols, H, mask, ACC)
                wc = _vec(lncw_ptr, cols, col_ok, ACC)
                tc = _tanh(chat * wc + _vec(lncb_ptr, cols, col_ok, ACC))
                dy = _load(dyc_ptr, rows, cols, H, mask, ACC)
                dcn = rstd_c[:, None] * (dy * wc - s1[:, None] - chat * s2[:, None])
            else:
                tc = _tanh(_load(cnew_ptr, rows, cols, H, mask, ACC))
                dcn = dhu * o * d_tanh(tc)
            d_o = dhu * tc * d_sigmoid(o)
            dc_t = _load(dc_ptr, rows, cols, H, mask, ACC)
            if zc_ptr is not None:
                zc = _load(zc_ptr, rows, cols, H, mask, ACC)
                dcn += (1 - zc) * dc_t
                dcp = zc * dc_t
            else:
                dcn += dc_t
                dcp = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
            if peep_ptr is not None:
                dcn += d_o * _vec(peep_ptr + 2 * H, cols, col_ok, ACC)
            c_prev = _state_in(prev_ptr, init_ptr, rows, cols, H, n_seq, mask, reset, ACC)
            d_i = dcn * g * d_sigmoid(i)
            d_f = dcn * c_prev * d_sigmoid(f)
            d_g = dcn * i * d_tanh(g)
            dcp += dcn * f
            if peep_ptr is not None:
                dcp += d_i * _vec(peep_ptr, cols, col_ok, ACC) + d_f * _vec(peep_ptr + H, cols, col_ok, ACC)
            if reset is not None:  # the state entering this step was c0
                sel = reset[:, None] & mask
                tl.store(c0acc_ptr + offs, tl.load(c0acc_ptr + offs, mask=sel, other=0.0) + dcp, mask=sel)
                dcp = tl.where(sel, 0.0, dcp)
            tl.store(dc_ptr + offs, dcp, mask=mask)
            dq0, dq1, dq2, dq3 = d_i, d_f, d_g, d_o
            tl.store(grad_xw_ptr + act_offs, d_i, mask=mask)
            tl.store(grad_xw_ptr + act_offs + H, d_f, mask=mask)
            tl.store(grad_xw_ptr + act_offs + 2 * H, d_g, mask=mask)
            tl.store(grad_xw_ptr + act_offs + 3 * H, d_o, mask=mask)
        elif CELL == GRU:
            z = _load(acts_ptr + H, rows, cols, G, mask, ACC)
            n = _load(acts_ptr + 2 * H, rows, cols, G, mask, ACC)
            h_prev = _state_in(prev_ptr, init_ptr, rows, cols, H, n_seq, mask, reset, ACC)
            d_n = dhu * (1 - z) * d_tanh(n)
            d_z = dhu * (h_prev - n) * d_sigmoid(z)
            tl.store(grad_xw_ptr + act_offs + H, d_z, mask=mask)
            tl.store(grad_xw_ptr + act_offs + 2 * H, d_n, mask=mask)
            tl.store(grad_hw_ptr + act_offs + H, d_z, mask=mask)
            if RB:  # hw_n = (r * h_in) W_hn^T + b_hn: its gradient is d_n; d_r needs a GEMM first
                tl.store(grad_hw_ptr + act_offs + 2 * H, d_n, mask=mask)
                dq0, dq1, dq2 = d_z, d_z, d_n  # unused (no layer norm with RB)
            else:
                r = _load(acts_ptr, rows, cols, G, mask, ACC)
                d_r = d_n * _load(state_ptr, rows, cols, H, mask, ACC) * d_sigmoid(r)
                tl.store(grad_xw_ptr + act_offs, d_r, mask=mask)
                tl.store(grad_hw_ptr + act_offs, d_r, mask=mask)
                tl.store(grad_hw_ptr + act_offs + 2 * H, d_n * r, mask=mask)
                dq0, dq1, dq2 = d_r, d_z, d_n * r
        else:
            h = _load(state_ptr, rows, cols, H, mask, ACC)
            d = dhu * d_tanh(h) if CELL == RNN_TANH else tl.where(h > 0, dhu, 0.0)
            tl.store(grad_xw_ptr + act_offs, d, mask=mask)
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


@_autotune([])
@triton.jit(do_not_specialize=["m", "n_seq"])
def rnn_bwd_rb(grad_xw_ptr, grad_hw_ptr, w_hh_ptr, acts_ptr, h_prev_ptr, h0_ptr, rmask_ptr, reset_ptr, x_ptr,
               m, n_seq, B, N, K,
               ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """GRU reset_after=False, step t, rows [0, m): d(r * h_in) = d_n @ W_hn, then
    d_r = d(r * h_in) * h_in * r (1 - r) into both gradients' r entries, and
    x_ptr [B, H] = d(r * h_in) * r (its share of the gradient of h_in, for ``_dh_carry``).
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
    reset = _row_flag(reset_ptr, rows, row_ok)
    h_in = _h_in(h_prev_ptr, h0_ptr, rmask_ptr, rows, cols, H, n_seq, mask, reset, ACC)
    r = _load(acts_ptr, rows, cols, G, mask, ACC)
    d_r = acc * h_in * d_sigmoid(r)
    act_offs = rows[:, None] * G + cols[None, :]
    tl.store(grad_xw_ptr + act_offs, d_r, mask=mask)
    tl.store(grad_hw_ptr + act_offs, d_r, mask=mask)
    tl.store(x_ptr + rows[:, None] * H + cols[None, :], acc * r, mask=mask)
