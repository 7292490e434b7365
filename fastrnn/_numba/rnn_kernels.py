r"""Numba kernels of the recurrence: one layer, one direction, the whole sequence per call.

The time loop runs here, in compiled code. Each step is one BLAS gemm for ``h_{t-1} W_hh^T``
(scipy's BLAS, called through a function pointer that the caller passes in, so that the
compiled code holds no process-specific address and can be cached on disk) followed by one
fused pass over the gates of each active row. Shape letters as in ``fastrnn.ops.recurrence``.

Kernel arguments are numpy arrays (zero-copy views of torch tensors), all C-contiguous, all of
one float dtype (float32 or float64: one compiled signature each). Absent optional inputs are
passed as empty arrays of the right rank, so that every call of a kernel has the same types.

Numerics
--------
- float32: sigmoid and tanh are computed by ``_exp_f32`` (range reduction to
  ``[-ln2/2, ln2/2]``, degree-7 polynomial, scale by ``2^k`` built from the exponent bits): about
  2 ulp, and, unlike libm's ``expf``, a loop of it vectorises (Numba has no vector math library
  without Intel SVML). NaN propagates: every clamp is written so that a NaN fails the comparison
  and passes through unchanged, and no fast-math flag other than ``contract`` (fused
  multiply-add) is used, so the compiler may not assume finite values.
- float64: libm's ``exp`` and ``tanh`` (``gradcheck`` and the 1e-10 tolerance need them).
- sigmoid uses ``1 / (1 + exp(-x))`` with ``exp`` clamped to the finite range (no overflow,
  no cancellation); tanh uses ``(1 - e) / (1 + e)``, ``e = exp(-2|x|)``, and an odd polynomial
  below ``|x| < 0.25`` where that form would cancel.
"""
from __future__ import annotations

import ctypes
import math
import os

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import get_cython_function_address, intrinsic, overload

# On-disk cache of compiled kernels (see the module docstring of fastrnn.backends.numba_rnn).
CACHE = os.environ.get("FASTRNN_NUMBA_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")

# fastmath "contract" only: fused multiply-add, nothing that assumes values are finite.
_JIT = dict(cache=CACHE, nogil=True, fastmath={"contract"}, error_model="numpy")

LSTM, GRU, RNN_TANH, RNN_RELU = 0, 1, 2, 3
CELL_CODES = {"lstm": LSTM, "gru": GRU, "rnn_tanh": RNN_TANH, "rnn_relu": RNN_RELU}

# ---------------------------------------------------------------------------------------------
# BLAS: scipy's cython_blas {s,d}gemm (Fortran conventions: column-major, every argument by
# pointer). The caller passes the function object as a kernel argument.
# ---------------------------------------------------------------------------------------------
_GEMM_TYPE = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 13))
GEMM = {np.dtype(np.float32): _GEMM_TYPE(get_cython_function_address("scipy.linalg.cython_blas", "sgemm")),
        np.dtype(np.float64): _GEMM_TYPE(get_cython_function_address("scipy.linalg.cython_blas", "dgemm"))}

_CHAR_N, _CHAR_T = 78, 84  # 'N', 'T' as the first byte of a little-endian int32


@njit(**_JIT)
def _gemm_call(gemm, ws_i, ws_f, beta, a, b, c):
    """Call gemm with the integer arguments already in ``ws_i`` = [transa, transb, M, N, K, lda,
    ldb, ldc] (int32) and ``ws_f`` = [alpha, beta]; ``a``, ``b``, ``c`` are the column-major
    A, B, C operands."""
    ws_f[0] = 1
    ws_f[1] = beta
    p = ws_i.ctypes.data
    f = ws_f.ctypes.data
    gemm(p, p + 4, p + 8, p + 12, p + 16, f, a.ctypes.data, p + 20, b.ctypes.data, p + 24,
         f + ws_f.itemsize, c.ctypes.data, p + 28)


@njit(**_JIT)
def mm_abt(gemm, ws_i, ws_f, m, a, b, out, beta):
    """``out[:m] = a[:m] @ b^T + beta * out[:m]``; a [*, K], b [N, K], out [*, N], row-major.

    Row-major ``out [m, N]`` is column-major ``out^T [N, m] = b [N, K] @ a^T [K, m]``."""
    if m == 0:
        return
    N, K = b.shape
    ws_i[0], ws_i[1], ws_i[2], ws_i[3], ws_i[4] = _CHAR_T, _CHAR_N, N, m, K
    ws_i[5], ws_i[6], ws_i[7] = K, K, N
    _gemm_call(gemm, ws_i, ws_f, beta, b, a, out)


@njit(**_JIT)
def mm_ab(gemm, ws_i, ws_f, m, a, b, out, beta):
    """``out[:m] = a[:m] @ b + beta * out[:m]``; a [*, K], b [K, N], out [*, N], row-major.

    Row-major ``out [m, N]`` is column-major ``out^T [N, m] = b^T [N, K] @ a^T [K, m]``."""
    if m == 0:
        return
    K, N = b.shape
    ws_i[0], ws_i[1], ws_i[2], ws_i[3], ws_i[4] = _CHAR_N, _CHAR_N, N, m, K
    ws_i[5], ws_i[6], ws_i[7] = N, K, N
    _gemm_call(gemm, ws_i, ws_f, beta, b, a, out)


# ---------------------------------------------------------------------------------------------
# Activations. float32: vectorisable polynomial exp; float64: libm.
# ---------------------------------------------------------------------------------------------
@intrinsic
def _f32_bits(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, i):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


_F = np.float32
_ONE32, _TWO32 = _F(1.0), _F(2.0)
_EXP_LO, _EXP_HI = _F(-87.0), _F(88.0)          # 2^k stays a normal float32
_ROUND = _F(12582912.0)                           # 1.5 * 2^23: adding it rounds to an integer
_ROUND_BITS = np.int32(np.array([12582912.0], np.float32).view(np.int32)[0])
_LOG2E = _F(1.4426950408889634)
_LN2_HI, _LN2_LO = _F(0.693359375), _F(-2.12194440e-4)  # ln 2 split so that k * _LN2_HI is exact
_P = tuple(_F(1.0 / math.factorial(n)) for n in range(8))  # Taylor; |r| <= ln2/2: error < 2e-9
_T3, _T5, _T7, _T9 = _F(-1 / 3), _F(2 / 15), _F(-17 / 315), _F(62 / 2835)
_TANH_SMALL = _F(0.25)


@njit(**_JIT)
def _exp_f32(y):
    # Clamps written as "if y < lo" so that NaN passes through (it fails both comparisons).
    if y < _EXP_LO:
        y = _EXP_LO
    if y > _EXP_HI:
        y = _EXP_HI
    t = y * _LOG2E + _ROUND          # k = round(y / ln 2) sits in the low mantissa bits of t
    k = t - _ROUND
    r = y - k * _LN2_HI
    r = r - k * _LN2_LO              # |r| <= ln2 / 2
    p = ((((((_P[7] * r + _P[6]) * r + _P[5]) * r + _P[4]) * r + _P[3]) * r + _P[2]) * r + _P[1]) * r + _P[0]
    scale = _bits_f32((_f32_bits(t) - _ROUND_BITS + np.int32(127)) << np.int32(23))
    return p * scale


@njit(**_JIT)
def _sigmoid_f32(x):
    return _ONE32 / (_ONE32 + _exp_f32(-x))


@njit(**_JIT)
def _tanh_f32(x):
    a = abs(x)
    e = _exp_f32(-_TWO32 * a)
    big = (_ONE32 - e) / (_ONE32 + e)
    if x < 0:
        big = -big
    x2 = x * x
    small = x + x * x2 * (_T3 + x2 * (_T5 + x2 * (_T7 + x2 * _T9)))
    return small if a < _TANH_SMALL else big


@njit(**_JIT)
def _sigmoid_f64(x):
    e = math.exp(-abs(x))            # never overflows
    return 1.0 / (1.0 + e) if x >= 0 else e / (1.0 + e)


def sigmoid(x):
    """Logistic function of a float32 or float64 scalar (compiled by the overload below)."""
    raise NotImplementedError("only callable from numba-compiled code")


def tanh(x):
    """Hyperbolic tangent of a float32 or float64 scalar (compiled by the overload below)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(sigmoid, jit_options=_JIT)
def _sigmoid_overload(x):
    if x == types.float32:
        return lambda x: _sigmoid_f32(x)
    return lambda x: _sigmoid_f64(x)


@overload(tanh, jit_options=_JIT)
def _tanh_overload(x):
    if x == types.float32:
        return lambda x: _tanh_f32(x)
    return lambda x: math.tanh(x)


# ---------------------------------------------------------------------------------------------
# Fused cell steps on one row (one batch element). Arguments are disjoint 1-D slices of H
# elements. Forward: pre-activations in, activated gates out (in place), new state out.
# Backward: saved activations in, pre-activation gradients out. The derivative of each
# activation is written in terms of its output: sigmoid' = s (1 - s), tanh' = 1 - t^2.
# ---------------------------------------------------------------------------------------------
@njit(**_JIT)
def lstm_fwd_row(gi, gf, gg, go, bi, bf, bg, bo, c, c_out, hu):
    """gi, gf, gg, go [H]: pre-activations (x W_ih^T + b_ih + h W_hh^T) in, activated gates out;
    bi..bo [H]: b_hh; c [H]: c_{t-1} in, c_t out (also to c_out); hu [H] <- o * tanh(c_t)."""
    for j in range(c.shape[0]):
        i = sigmoid(gi[j] + bi[j])
        f = sigmoid(gf[j] + bf[j])
        g = tanh(gg[j] + bg[j])
        o = sigmoid(go[j] + bo[j])
        c_new = f * c[j] + i * g
        gi[j], gf[j], gg[j], go[j] = i, f, g, o
        c[j] = c_new
        c_out[j] = c_new
        hu[j] = o * tanh(c_new)


@njit(**_JIT)
def lstm_bwd_row(i_, f_, g_, o_, c, c_prev, dhu, dc, di, df, dg, do):
    """i_..o_ [H]: saved gates; c, c_prev [H]: c_t, c_{t-1}; dhu [H]: gradient reaching
    o * tanh(c_t); dc [H]: gradient reaching c_t from step t+1 in, reaching c_{t-1} out;
    di..do [H] <- pre-activation gradients."""
    one = c.dtype.type(1)
    for j in range(c.shape[0]):
        i, f, g, o = i_[j], f_[j], g_[j], o_[j]
        tc = tanh(c[j])
        dc_t = dc[j] + dhu[j] * o * (one - tc * tc)
        di[j] = dc_t * g * i * (one - i)
        df[j] = dc_t * c_prev[j] * f * (one - f)
        dg[j] = dc_t * i * (one - g * g)
        do[j] = dhu[j] * tc * o * (one - o)
        dc[j] = dc_t * f


@njit(**_JIT)
def gru_fwd_row(xr, xz, xn, hr, hz, hn, br, bz, bn, h, hn_out, h_out):
    """xr, xz, xn [H]: input-side pre-activations in, activated r, z, n out; hr, hz, hn [H]:
    h_{t-1} W_hh^T; br, bz, bn [H]: b_hh; h [H]: h_{t-1} in, h_t out (also to h_out);
    hn_out [H] <- W_hn h_{t-1} + b_hn (saved for backward)."""
    one = h.dtype.type(1)
    for j in range(h.shape[0]):
        h_n = hn[j] + bn[j]
        r = sigmoid(xr[j] + hr[j] + br[j])
        z = sigmoid(xz[j] + hz[j] + bz[j])
        n = tanh(xn[j] + r * h_n)
        h_new = (one - z) * n + z * h[j]
        xr[j], xz[j], xn[j] = r, z, n
        hn_out[j] = h_n
        h[j] = h_new
        h_out[j] = h_new


@njit(**_JIT)
def gru_bwd_row(r_, z_, n_, hn, h_prev, dh, dxr, dxz, dxn, dhn):
    """r_, z_, n_ [H]: saved gates; hn [H]: saved W_hn h_{t-1} + b_hn; h_prev [H]: h_{t-1};
    dh [H]: gradient reaching h_t in, its direct part ``dh * z`` reaching h_{t-1} out;
    dxr, dxz, dxn [H] <- input-side pre-activation gradients; dhn [H] <- ``dn * r`` (the
    hidden-side n gradient; r and z gradients are the same on both sides)."""
    one = dh.dtype.type(1)
    for j in range(dh.shape[0]):
        r, z, n, d = r_[j], z_[j], n_[j], dh[j]
        d_n = d * (one - z) * (one - n * n)
        dxz[j] = d * (h_prev[j] - n) * z * (one - z)
        dxr[j] = d_n * hn[j] * r * (one - r)
        dxn[j] = d_n
        dhn[j] = d_n * r
        dh[j] = d * z


@njit(**_JIT)
def rnn_fwd_row(relu, x, b, h, h_out):
    """x [H]: pre-activation without b_hh; b [H]: b_hh; h [H] <- h_t (and h_out)."""
    zero = h.dtype.type(0)
    for j in range(h.shape[0]):
        v = x[j] + b[j]
        if relu:
            v = zero if v < zero else v      # NaN stays NaN
        else:
            v = tanh(v)
        h[j] = v
        h_out[j] = v


@njit(**_JIT)
def rnn_bwd_row(relu, h, dh, d):
    """h [H]: h_t; dh [H]: gradient reaching h_t; d [H] <- pre-activation gradient.
    relu selects rather than multiplies by 0/1, so a NaN gradient stays out of units that
    relu switched off (as torch's threshold_backward)."""
    one, zero = h.dtype.type(1), h.dtype.type(0)
    for j in range(h.shape[0]):
        if relu:
            d[j] = dh[j] if h[j] > zero else zero
        else:
            d[j] = dh[j] * (one - h[j] * h[j])


# ---------------------------------------------------------------------------------------------
# Whole-sequence kernels
# ---------------------------------------------------------------------------------------------
@njit(**_JIT)
def _zero_rows(a, m):
    """a[m:] = 0 for a [B, K]."""
    for b in range(m, a.shape[0]):
        for k in range(a.shape[1]):
            a[b, k] = 0


@njit(**_JIT)
def rnn_forward(cell, gemm, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training,
                h_seq, h_state, c_state, c_seq, hu_seq, hn_seq, hw):
    """Forward recurrence over all T steps.

    cell        LSTM | GRU | RNN_TANH | RNN_RELU
    xw          [T, B, G]  in: x W_ih^T + b_ih;  out: activated gates (LSTM i,f,g,o; GRU r,z,n),
                           zero on inactive rows (RNN: h_t, not read later)
    w_hh [G, Hr]; b_hh [G] (zeros when absent); h0 [B, Hr]; c0 [B, H] (LSTM, else empty)
    w_hr        [Hr, H] (LSTM with projection) or empty [0, 0]
    batch_sizes [T] int64 (all B when not packed)
    h_seq       [T, B, Hr] out (zero on inactive rows)
    h_state     [B, Hr] out: h_T;  c_state [B, H] out: c_T (LSTM, else empty)
    c_seq       [T, B, H] out when training (LSTM: c_t), else [1, B, H] scratch
    hu_seq      [T, B, H] out when training (LSTM with projection: o * tanh(c_t)), else [1, B, H]
                scratch; empty when there is no projection
    hn_seq      [T, B, H] out when training (GRU: W_hn h_{t-1} + b_hn), else [1, B, H] scratch
    hw          [B, G] scratch for h_{t-1} W_hh^T (GRU only; LSTM and RNN accumulate into xw)
    """
    T, B, G = xw.shape
    proj = w_hr.shape[0] > 0
    H = G // 4 if cell == LSTM else (G // 3 if cell == GRU else G)
    ws_i = np.empty(8, np.int32)
    ws_f = np.empty(2, xw.dtype)
    h_state[:, :] = h0
    if cell == LSTM:
        c_state[:, :] = c0
    for s in range(T):
        t = T - 1 - s if reverse else s
        m = batch_sizes[t]
        ts = t if training else 0
        x_t = xw[t]
        if cell == GRU:
            mm_abt(gemm, ws_i, ws_f, m, h_state, w_hh, hw, 0)
        else:
            mm_abt(gemm, ws_i, ws_f, m, h_state, w_hh, x_t, 1)
        if cell == LSTM:
            hu_t = hu_seq[ts] if proj else h_seq[t]
            for b in range(m):
                g = x_t[b]
                lstm_fwd_row(g[:H], g[H:2 * H], g[2 * H:3 * H], g[3 * H:],
                             b_hh[:H], b_hh[H:2 * H], b_hh[2 * H:3 * H], b_hh[3 * H:],
                             c_state[b], c_seq[ts, b], hu_t[b])
            if proj:
                mm_abt(gemm, ws_i, ws_f, m, hu_t, w_hr, h_seq[t], 0)
            h_state[:m] = h_seq[t, :m]
            if training and m < B:
                _zero_rows(c_seq[t], m)
                if proj:
                    _zero_rows(hu_seq[t], m)
        elif cell == GRU:
            for b in range(m):
                g, q = x_t[b], hw[b]
                gru_fwd_row(g[:H], g[H:2 * H], g[2 * H:], q[:H], q[H:2 * H], q[2 * H:],
                            b_hh[:H], b_hh[H:2 * H], b_hh[2 * H:], h_state[b], hn_seq[ts, b], h_seq[t, b])
            if training and m < B:
                _zero_rows(hn_seq[t], m)
        else:
            for b in range(m):
                rnn_fwd_row(cell == RNN_RELU, x_t[b], b_hh, h_state[b], h_seq[t, b])
        if m < B:
            _zero_rows(h_seq[t], m)
            _zero_rows(x_t, m)


@njit(**_JIT)
def rnn_backward(cell, gemm, grad_h_seq, w_hh, w_hr, h0, c0, batch_sizes, reverse,
                 h_seq, acts, c_seq, hn_seq, dh, dc, grad_xw, grad_hw, grad_hproj, dhu):
    """Backward recurrence over all T steps (the forward's steps in the opposite order).

    grad_h_seq  [T, B, Hr];  w_hh [G, Hr];  w_hr [Hr, H] or empty;  h0 [B, Hr];  c0 [B, H] or empty
    h_seq, acts, c_seq, hn_seq: what the forward saved (acts/c_seq/hn_seq empty where unused)
    dh          [B, Hr]  in: grad_h_T;  out: grad_h0
    dc          [B, H]   in: grad_c_T;  out: grad_c0 (LSTM, else empty)
    grad_xw     [T, B, G] out;  grad_hw [T, B, G] out (GRU; the same array as grad_xw otherwise)
    grad_hproj  [T, B, Hr] out: gradient reaching each projected h_t (LSTM with projection)
    dhu         [B, H] scratch: gradient reaching o * tanh(c_t) (LSTM with projection)
    """
    T, B, G = grad_xw.shape
    proj = w_hr.shape[0] > 0
    H = G // 4 if cell == LSTM else (G // 3 if cell == GRU else G)
    ws_i = np.empty(8, np.int32)
    ws_f = np.empty(2, grad_xw.dtype)
    for s in range(T):
        t = s if reverse else T - 1 - s
        m = batch_sizes[t]
        # rows that started step t from the initial state rather than from step t -/+ 1
        if reverse:
            m_prev = batch_sizes[t + 1] if t + 1 < T else 0
        else:
            m_prev = m if t > 0 else 0
        t_prev = t + 1 if reverse else t - 1
        for b in range(m):
            for k in range(dh.shape[1]):
                dh[b, k] += grad_h_seq[t, b, k]
        gx = grad_xw[t]
        if cell == LSTM:
            if proj:
                grad_hproj[t, :m] = dh[:m]
                if m < B:
                    _zero_rows(grad_hproj[t], m)
                mm_ab(gemm, ws_i, ws_f, m, dh, w_hr, dhu, 0)
            d_u = dhu if proj else dh
            a = acts[t]
            for b in range(m):
                g, q = a[b], gx[b]
                c_prev = c_seq[t_prev, b] if b < m_prev else c0[b]
                lstm_bwd_row(g[:H], g[H:2 * H], g[2 * H:3 * H], g[3 * H:], c_seq[t, b], c_prev,
                             d_u[b], dc[b], q[:H], q[H:2 * H], q[2 * H:3 * H], q[3 * H:])
            if m < B:
                _zero_rows(gx, m)
            mm_ab(gemm, ws_i, ws_f, m, gx, w_hh, dh, 0)
        elif cell == GRU:
            a, gh = acts[t], grad_hw[t]
            for b in range(m):
                g, q, p = a[b], gx[b], gh[b]
                h_prev = h_seq[t_prev, b] if b < m_prev else h0[b]
                gru_bwd_row(g[:H], g[H:2 * H], g[2 * H:], hn_seq[t, b], h_prev, dh[b],
                            q[:H], q[H:2 * H], q[2 * H:], p[2 * H:])
                p[:2 * H] = q[:2 * H]
            if m < B:
                _zero_rows(gx, m)
                _zero_rows(gh, m)
            mm_ab(gemm, ws_i, ws_f, m, gh, w_hh, dh, 1)
        else:
            for b in range(m):
                rnn_bwd_row(cell == RNN_RELU, h_seq[t, b], dh[b], gx[b])
            if m < B:
                _zero_rows(gx, m)
            mm_ab(gemm, ws_i, ws_f, m, gx, w_hh, dh, 0)
