"""Numba kernels of the ``"numba"`` attention backend (see ``fastrnn.backends.numba_sdpa``).

The same flash algorithm as ``csrc/sdpa.cpp`` (contract and equations:
``fastrnn/backends/reference_sdpa.py``): forward = one task per (batch row, query block) with an
online softmax over key blocks; backward = one task per key/value row (x key chunks when rows are
fewer than threads), FlashAttention-2 order. Tasks run under ``prange``. Tile products call BLAS
gemm directly (``_mm``: scipy's OpenBLAS, as np.dot would) with alpha = scale and beta = 1, so
they are scaled and accumulated in place, without temporaries. Tiles are held transposed (keys
down, queries across) so that every product fits OpenBLAS's unpacked small-matrix kernels (see
``_scores_t``) and the per-query softmax statistics are element-wise across key rows. The row
math is plain loops that LLVM vectorises, with a branch-free float32 ``exp`` (numba has no vector
exp without Intel SVML). Measured against the np.dot version at one thread (torch time /
numba time, forward and fwd+bwd at B=4, H=8, L=S=512, E=64): 0.55 -> 0.90 and 0.73 -> 0.99
(bench/results/numba_sdpa_cpu.md).

Self-contained on purpose: numba's on-disk cache keys a kernel on the timestamp of the file that
defines it, so everything these kernels inline lives in this one file.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# jit: numba.njit with fastrnn's on-disk cache (the same as the recurrence's: FASTRNN_NUMBA_CACHE,
# damaged entries rebuilt, read-only installs compile in memory): see fastrnn/_numba/runtime.py
from .runtime import jit

# fastmath subset: contraction and reassociation (vectorised reductions), no finite-math
# assumption, so NaN and inf keep their meaning.
_FM = {"contract", "reassoc"}

M32 = 0xFFFFFFFF
MIX_1, MIX_2 = 0x21F0AAAD, 0x735A2D97
MUL_N, MUL_I, MUL_J = 0x61C88647, 0x165667B1, 0x27D4EB2F


# -- float32 exp: Cody-Waite + degree-6 polynomial, 2^n through the exponent bits -----------------

@intrinsic
def _f32_as_i32(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def _i32_as_f32(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


_F = np.float32
_LO, _HI, _LOG2E, _MAGIC = _F(-87.0), _F(88.0), _F(1.44269504088896341), _F(12582912.0)
_LN2_HI, _LN2_LO = _F(0.693359375), _F(-2.12194440e-4)
_P0, _P1, _P2, _P3, _P4, _P5 = (_F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3),
                                _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1))
_ONE, _ZERO, _INF32 = _F(1.0), _F(0.0), _F(np.inf)


@njit
def exp_f32(x):
    """exp for float32, max error ~2 ulp; exactly 0 below -87 (masked scores add nothing),
    +inf above 88, NaN stays NaN (compares, not min/max). The algorithm and name of
    ``rnn_kernels.exp_f32``, copied rather than imported: numba's cache keys a kernel on its own
    file's timestamp, so an imported helper's edits would leave these cached kernels stale."""
    xc = _LO if x < _LO else x
    xc = _HI if xc > _HI else xc
    shifted = xc * _LOG2E + _MAGIC
    n = shifted - _MAGIC
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = _P0
    p = p * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    p = p * r * r + r + _ONE
    bits = np.int32((np.int64(_f32_as_i32(shifted)) + 127) << 23 & M32)
    y = p * _i32_as_f32(bits)
    y = _ZERO if x < _LO else y
    return _INF32 if x > _HI else y


def vexp(x):
    """exp that vectorises for float32 (math.exp for float64)."""
    return math.exp(x)


@overload(vexp)
def _vexp_overload(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    return lambda x: math.exp(x)


# -- dropout hash (int64 arithmetic masked to 32 bits, as the reference) --------------------------

@njit
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * MIX_1) & M32
    x = x ^ (x >> 15)
    x = (x * MIX_2) & M32
    return x ^ (x >> 15)


@njit
def _row_key(seed, n, i):
    return _mix32(_mix32(((n * MUL_N) & M32) ^ seed) ^ ((i * MUL_I) & M32))


@njit(fastmath=_FM)
def _dropout_scale(z, key, j0, bs, threshold, inv_keep):
    for j in range(bs):
        h = _mix32(key ^ (((j0 + j) * MUL_J) & M32))
        z[j] = inv_keep if h >= threshold else 0.0


# -- BLAS gemm with alpha and beta ------------------------------------------------------------------
# np.dot(a, b, out) computes out = a b only: every tile then needed a temporary, a separate pass
# to scale it and one to add it into its accumulator. The BLAS call behind np.dot (numba's
# ``numba_xxgemm`` helper: scipy's OpenBLAS, the same library, resolved by symbol name so cached
# kernels stay valid) takes alpha and beta, transposes and leading dimensions, so products are
# scaled and accumulated in place, into strided sub-blocks of preallocated scratch.

_LL_CHAR, _LL_VOIDP = ir.IntType(8), ir.IntType(8).as_pointer()


@intrinsic
def _xgemm(typingctx, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Column-major BLAS ``c = alpha op(a) op(b) + beta c`` on the data pointers of arrays a, b, c
    (``transa``/``transb``: the character codes ``ord('N')`` / ``ord('T')``)."""
    if not (isinstance(a, types.Array) and a.dtype in (types.float32, types.float64)
            and b.dtype == a.dtype and c.dtype == a.dtype):
        return None
    dt = a.dtype
    sig = types.int32(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, sig, args):
        ta, tb, m_, n_, k_, al, av, lda_, bv, ldb_, be, cv, ldc_ = args
        at = sig.args
        intp = context.get_value_type(types.intp)
        fnty = ir.FunctionType(ir.IntType(32), [_LL_CHAR, _LL_CHAR, _LL_CHAR, intp, intp, intp,
                                                _LL_VOIDP, _LL_VOIDP, intp, _LL_VOIDP, intp,
                                                _LL_VOIDP, _LL_VOIDP, intp])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")

        def as_intp(i):
            return context.cast(builder, args[i], at[i], types.intp)

        def as_char(i):
            return builder.trunc(as_intp(i), _LL_CHAR)

        def slot(i):  # BLAS takes alpha and beta by pointer
            val = context.cast(builder, args[i], at[i], dt)
            return builder.bitcast(cgutils.alloca_once_value(builder, val), _LL_VOIDP)

        def data(i):
            return builder.bitcast(context.make_array(at[i])(context, builder, args[i]).data, _LL_VOIDP)

        kind = ir.Constant(_LL_CHAR, ord("s" if dt == types.float32 else "d"))
        return builder.call(fn, (kind, as_char(0), as_char(1), as_intp(2), as_intp(3), as_intp(4),
                                 slot(5), data(6), as_intp(7), data(8), as_intp(9), slot(10),
                                 data(11), as_intp(12)))
    return sig, codegen


_N, _T = ord("N"), ord("T")


@njit
def _ld(x):
    """BLAS leading dimension of a row-major view: its row stride, or its width when it has one
    row (torch leaves the stride of a size-1 dimension arbitrary, even in a contiguous tensor)."""
    return x.strides[0] // x.itemsize if x.shape[0] > 1 else x.shape[1]


@njit
def _mm(a, ta, b, tb, c, alpha, beta):
    """c = alpha op(a) op(b) + beta c for row-major 2-D arrays with unit inner stride (views
    into bigger arrays included); op(x) = x.T where tx. beta = 0 ignores c's contents.
    A row-major matrix is its column-major transpose, so BLAS computes c^T = op(b)^T op(a)^T."""
    m, n = c.shape
    k = a.shape[0] if ta else a.shape[1]
    _xgemm(_T if tb else _N, _T if ta else _N, n, m, k, alpha, b, _ld(b), a, _ld(a), beta, c, _ld(c))


# -- scores of one tile, transposed ----------------------------------------------------------------
# Tiles are held transposed, keys down and queries across ([bs, bl]): then every product is a
# plain or left-transposed BLAS call on contiguous operands (Q^T and dO^T are made once), which
# OpenBLAS's small-matrix kernels take (m n k <= 1e6, no packing: 170-180 GFLOP/s here on the
# 64 x 128 x 64 tiles, against 95-105 through its packed path, which is what S = Q K^T, a
# right-transposed product, always took), and the softmax statistics of each query are
# element-wise vector operations across a key row instead of horizontal reductions.

@njit(fastmath=_FM)
def _transpose(src, dst):
    """dst = src.T, in 64 x 64 blocks (both stay in L1 whichever side is strided)."""
    R, C = src.shape
    for r0 in range(0, R, 64):
        for c0 in range(0, C, 64):
            for c in range(c0, min(C, c0 + 64)):
                for r in range(r0, min(R, r0 + 64)):
                    dst[c, r] = src[r, c]


@njit(fastmath=_FM)
def _scores_t(kb, qt, st, n, i0, j0, scale, bias, rows, has_bias, causal):
    """st = (scale q k^T + bias)^T, [bs, bl]; entries past the causal diagonal -inf."""
    bs, bl = st.shape
    _mm(kb, False, qt, False, st, scale, scale - scale)
    if has_bias:
        bm = bias[rows[n]]
        for jj in range(bs):
            for ii in range(bl):
                st[jj, ii] += bm[i0 + ii, j0 + jj]
    if causal and j0 + bs - 1 > i0:  # only tiles that reach past the diagonal
        ninf = -np.inf
        for jj in range(bs):
            for ii in range(min(bl, j0 + jj - i0)):  # query i0 + ii < key j0 + jj
                st[jj, ii] = ninf


# -- forward ----------------------------------------------------------------------------------------
# Each parallel loop has a serial twin taken when nth == 1 (a small problem, or a fork child,
# which must open no parallel region: fastrnn/_numba/runtime.py); the loop bodies are helpers
# shared by both.

@njit(fastmath=_FM)
def _fwd_task(task, q, k, v, bias, rows, has_bias, scale, causal, threshold, inv_keep, seed, BL, BS,
              out, lse):
    """One (batch row, query block) of sdpa_forward: online softmax over the key blocks, the
    output block accumulated in place (out's rows; BLAS beta = 0 on the first key block)."""
    N, L, E = q.shape
    Nk, S, Ev = v.shape
    G = N // Nk
    nqb = (L + BL - 1) // BL
    dropout = threshold > 0
    dt = q.dtype
    zero = scale - scale  # 0 and 1 in q's dtype (scale is finite)
    one = zero + 1
    ninf = zero - np.inf
    n = task // nqb
    i0 = (task % nqb) * BL
    kv = n // G
    bl = min(BL, L - i0)
    ob = out[n, i0:i0 + bl]
    qt = np.empty((E, bl), dtype=dt)
    _transpose(q[n, i0:i0 + bl], qt)
    m = np.full(bl, ninf, dtype=dt)   # running max of each query's scores
    l = np.zeros(bl, dtype=dt)        # running sum of exp(s - m)
    mu = np.empty(bl, dtype=dt)
    alpha = np.empty(bl, dtype=dt)
    z = np.empty(BS, dtype=dt)
    scratch = np.empty((BS, bl), dtype=dt)
    s_end = min(S, i0 + bl) if causal else S
    for j0 in range(0, s_end, BS):
        bs = min(BS, s_end - j0)
        st = scratch[:bs]
        _scores_t(k[kv, j0:j0 + bs], qt, st, n, i0, j0, scale, bias, rows, has_bias, causal)
        # -- online softmax: per query (column), vectorised across each key row --
        for i in range(bl):
            mu[i] = m[i]
        for jj in range(bs):  # element-wise across queries: vectorises, NaN scores skipped
            row = st[jj]      # (they reach the output through exp below), as a scalar max would
            for i in range(bl):
                mu[i] = row[i] if row[i] > mu[i] else mu[i]
        for i in range(bl):
            mx = mu[i]
            mu[i] = zero if mx == ninf else mx  # nothing visible yet: every exp is 0
            alpha[i] = vexp(m[i] - mu[i])
            l[i] *= alpha[i]
            m[i] = mx
        for jj in range(bs):
            row = st[jj]
            for i in range(bl):
                e = vexp(row[i] - mu[i])
                row[i] = e
                l[i] += e
        if dropout:  # values see P * Z; l keeps the undropped sum
            for i in range(bl):
                _dropout_scale(z, _row_key(seed, n, i0 + i), j0, bs, threshold, inv_keep)
                for jj in range(bs):
                    st[jj, i] *= z[jj]
        # -- acc = alpha acc + P V --
        if j0 > 0:
            for i in range(bl):
                a = alpha[i]
                if a != 1:
                    for c in range(Ev):
                        ob[i, c] *= a
        _mm(st, True, v[kv, j0:j0 + bs], False, ob, one, zero if j0 == 0 else one)
    for r in range(bl):
        if l[r] == 0:  # no visible key: zeros, as torch
            ob[r] = 0
            lse[n, i0 + r] = np.inf
        else:
            inv = 1 / l[r]
            for c in range(Ev):
                ob[r, c] *= inv
            lse[n, i0 + r] = m[r] + math.log(l[r])


@jit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def sdpa_forward(q, k, v, bias, rows, has_bias, scale, causal, threshold, inv_keep, seed, BL, BS,
                 nth, out, lse):
    """q [N, L, E], k [Nk, S, E], v [Nk, S, Ev] -> out [N, L, Ev], lse [N, L] (filled in place).
    ``scale`` and ``inv_keep`` come as scalars of q's dtype; ``bias`` [Nm, L, S] may be a
    broadcast view (used only when ``has_bias``); nth: threads (1: no parallel region)."""
    N, L, E = q.shape
    tasks = N * ((L + BL - 1) // BL)
    if nth == 1:
        for task in range(tasks):
            _fwd_task(task, q, k, v, bias, rows, has_bias, scale, causal, threshold, inv_keep, seed, BL, BS,
                      out, lse)
    else:
        for task in prange(tasks):
            _fwd_task(task, q, k, v, bias, rows, has_bias, scale, causal, threshold, inv_keep, seed, BL, BS,
                      out, lse)


# -- backward ---------------------------------------------------------------------------------------

@njit(fastmath=_FM)
def _bwd_prep_row(n, dout, out, q, D, qt, dot, zero):
    """D[n, i] = sum_c dout[n, i, c] out[n, i, c] (``zero``: 0 in q's dtype, the sum's type);
    qt[n] = q[n]^T, dot[n] = dout[n]^T."""
    for i in range(dout.shape[1]):
        acc = zero
        for c in range(dout.shape[2]):
            acc += dout[n, i, c] * out[n, i, c]
        D[n, i] = acc
    _transpose(q[n], qt[n])
    _transpose(dout[n], dot[n])


@njit(fastmath=_FM)
def _bwd_task(task, dout, q, k, v, lse, D, qt_all, dot_all, bias, rows, has_bias, scale, causal,
              threshold, inv_keep, seed, BL, BS, chunks, dq, dk, dv, dq_part):
    """One (key/value row, key chunk) of sdpa_backward: its dK, dV, and its share of dQ, each
    accumulated in place by BLAS (beta = 1 into the zeroed gradients, alpha = scale). Tiles are
    transposed as in the forward: P^T, dP^T, dS^T [bs, bl]."""
    N, L, E = q.shape
    Nk, S, Ev = v.shape
    G = N // Nk
    nqb = (L + BL - 1) // BL
    nkb = (S + BS - 1) // BS
    dropout = threshold > 0
    dt = q.dtype
    zero = scale - scale
    one = zero + 1
    kv = task // chunks
    c = task % chunks
    pt_all = np.empty((BS, BL), dtype=dt)
    dpt_all = np.empty((BS, BL), dtype=dt)
    z = np.empty(BS, dtype=dt)
    zt_all = np.empty((BS, BL) if dropout else (1, 1), dtype=dt)
    pzt_all = np.empty((BS, BL) if dropout else (1, 1), dtype=dt)
    for jb in range(c, nkb, chunks):
        j0 = jb * BS
        bs = min(BS, S - j0)
        kb = k[kv, j0:j0 + bs]
        vb = v[kv, j0:j0 + bs]
        dkb = dk[kv, j0:j0 + bs]
        dvb = dv[kv, j0:j0 + bs]
        for g in range(G):
            n = kv * G + g
            ib0 = j0 // BL if causal else 0  # earlier query blocks see none of these keys
            for ib in range(ib0, nqb):
                i0 = ib * BL
                bl = min(BL, L - i0)
                qb = q[n, i0:i0 + bl]
                dob = dout[n, i0:i0 + bl]
                lse_b = lse[n, i0:i0 + bl]
                D_b = D[n, i0:i0 + bl]
                # -- recompute P^T = exp(S - lse)^T --
                pt = pt_all[:bs, :bl]
                _scores_t(kb, qt_all[n, :, i0:i0 + bl], pt, n, i0, j0, scale, bias, rows, has_bias,
                          causal)
                for jj in range(bs):
                    row = pt[jj]
                    for i in range(bl):
                        row[i] = vexp(row[i] - lse_b[i])
                pzt = pt
                zt = pt
                if dropout:  # the same mask bits as forward, regenerated
                    zt = zt_all[:bs, :bl]
                    pzt = pzt_all[:bs, :bl]
                    for i in range(bl):
                        _dropout_scale(z, _row_key(seed, n, i0 + i), j0, bs, threshold, inv_keep)
                        for jj in range(bs):
                            zt[jj, i] = z[jj]
                            pzt[jj, i] = pt[jj, i] * z[jj]
                # -- dV += (P Z)^T dO;  dP^T = V dO^T --
                _mm(pzt, False, dob, False, dvb, one, one)
                dpt = dpt_all[:bs, :bl]
                _mm(vb, False, dot_all[n, :, i0:i0 + bl], False, dpt, one, zero)
                # -- dS = P (Z dP - D) --
                for jj in range(bs):
                    prow = pt[jj]
                    dprow = dpt[jj]
                    if dropout:
                        zrow = zt[jj]
                        for i in range(bl):
                            dprow[i] = prow[i] * (zrow[i] * dprow[i] - D_b[i])
                    else:
                        for i in range(bl):
                            dprow[i] = prow[i] * (dprow[i] - D_b[i])
                # -- dK += scale dS^T Q;  dQ += scale dS K --
                _mm(dpt, False, qb, False, dkb, scale, one)
                if chunks > 1:
                    dqb = dq_part[task, g * L + i0:g * L + i0 + bl]
                else:
                    dqb = dq[n, i0:i0 + bl]
                _mm(dpt, True, kb, False, dqb, scale, one)


@njit(fastmath=_FM)
def _bwd_dq_sum(kv, chunks, dq_part, dq):
    """dq rows of key/value row kv += the per-chunk partial dQ of its chunks, in chunk order."""
    N, L, E = dq.shape
    G = N // (dq_part.shape[0] // chunks)
    for c in range(chunks):
        part = dq_part[kv * chunks + c]
        for g in range(G):
            n = kv * G + g
            for i in range(L):
                for e in range(E):
                    dq[n, i, e] += part[g * L + i, e]


@jit(parallel=True, fastmath=_FM, cache=True, nogil=True)
def sdpa_backward(dout, q, k, v, out, lse, bias, rows, has_bias, scale, causal, threshold, inv_keep,
                  seed, BL, BS, chunks, nth, dq, dk, dv, dq_part):
    """Fills dq [N, L, E], dk [Nk, S, E], dv [Nk, S, Ev] (zeroed by the caller). With chunks > 1,
    dq_part [Nk * chunks, G * L, E] (zeroed) holds per-chunk dQ, summed into dq at the end.
    nth: threads (1: no parallel region)."""
    N, L, E = q.shape
    Nk = v.shape[0]
    zero = scale - scale
    D = np.empty((N, L), dtype=q.dtype)
    qt = np.empty((N, E, L), dtype=q.dtype)
    dot = np.empty((N, dout.shape[2], L), dtype=q.dtype)
    if nth == 1:
        for n in range(N):
            _bwd_prep_row(n, dout, out, q, D, qt, dot, zero)
        for task in range(Nk * chunks):
            _bwd_task(task, dout, q, k, v, lse, D, qt, dot, bias, rows, has_bias, scale, causal, threshold, inv_keep,
                      seed, BL, BS, chunks, dq, dk, dv, dq_part)
        if chunks > 1:
            for kv in range(Nk):
                _bwd_dq_sum(kv, chunks, dq_part, dq)
    else:
        for n in prange(N):
            _bwd_prep_row(n, dout, out, q, D, qt, dot, zero)
        for task in prange(Nk * chunks):
            _bwd_task(task, dout, q, k, v, lse, D, qt, dot, bias, rows, has_bias, scale, causal, threshold, inv_keep,
                      seed, BL, BS, chunks, dq, dk, dv, dq_part)
        if chunks > 1:
            for kv in prange(Nk):
                _bwd_dq_sum(kv, chunks, dq_part, dq)
