"""Numba kernels of the ``"numba"`` attention backend (see ``fastrnn.backends.numba_sdpa``).

The same flash algorithm as ``csrc/sdpa.cpp`` (contract and equations:
``fastrnn/backends/reference_sdpa.py``): forward = one task per (batch row, query block) with an
online softmax over key blocks; backward = one task per key/value row (x key chunks when rows are
fewer than threads), FlashAttention-2 order. Tasks run under ``prange``; tile products are
``np.dot`` into preallocated scratch (BLAS); the row math is written as plain loops that LLVM
vectorises, with a branch-free float32 ``exp`` (numba has no vector exp without Intel SVML).

Self-contained on purpose: numba's on-disk cache keys a kernel on the timestamp of the file that
defines it, so everything these kernels inline lives in this one file.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
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


# -- scores of one tile -----------------------------------------------------------------------------

@njit(fastmath=_FM)
def _masked_scores(qb, kb, s, n, i0, j0, bl, bs, scale, bias, rows, has_bias, causal):
    """s[:bl, :bs] = scale q k^T + bias, causal entries -inf."""
    np.dot(qb, kb.T, s)
    ninf = -np.inf
    for r in range(bl):
        i = i0 + r
        row = s[r]
        if has_bias:
            brow = bias[rows[n], i]
            for j in range(bs):
                row[j] = row[j] * scale + brow[j0 + j]
        else:
            for j in range(bs):
                row[j] = row[j] * scale
        if causal:
            for j in range(max(0, i - j0 + 1), bs):
                row[j] = ninf


# -- forward ----------------------------------------------------------------------------------------
# Each parallel loop has a serial twin taken when nth == 1 (a small problem, or a fork child,
# which must open no parallel region: fastrnn/_numba/runtime.py); the loop bodies are helpers
# shared by both.

@njit(fastmath=_FM)
def _fwd_task(task, q, k, v, bias, rows, has_bias, scale, causal, threshold, inv_keep, seed, BL, BS,
              out, lse):
    """One (batch row, query block) of sdpa_forward: online softmax over the key blocks."""
    N, L, E = q.shape
    Nk, S, Ev = v.shape
    G = N // Nk
    nqb = (L + BL - 1) // BL
    dropout = threshold > 0
    dt = q.dtype
    zero = scale - scale  # 0 in q's dtype (scale is finite)
    ninf = zero - np.inf
    n = task // nqb
    i0 = (task % nqb) * BL
    kv = n // G
    bl = min(BL, L - i0)
    qb = q[n, i0:i0 + bl]
    ob = out[n, i0:i0 + bl]
    ob[:] = 0
    m = np.full(bl, ninf, dtype=dt)
    l = np.zeros(bl, dtype=dt)
    z = np.empty(BS, dtype=dt)
    s_end = min(S, i0 + bl) if causal else S
    for j0 in range(0, s_end, BS):
        bs = min(BS, s_end - j0)
        s = np.empty((bl, bs), dtype=dt)
        _masked_scores(qb, k[kv, j0:j0 + bs], s, n, i0, j0, bl, bs, scale, bias, rows,
                       has_bias, causal)
        # -- online softmax, row by row --
        for r in range(bl):
            row = s[r]
            mx = m[r]
            for j in range(bs):
                mx = row[j] if row[j] > mx else mx
            mu = zero if mx == ninf else mx  # nothing visible yet: every exp is 0
            alpha = vexp(m[r] - mu)
            total = zero
            for j in range(bs):
                e = vexp(row[j] - mu)
                row[j] = e
                total += e
            l[r] = alpha * l[r] + total
            if dropout:  # values see P * Z; l keeps the undropped sum
                _dropout_scale(z, _row_key(seed, n, i0 + r), j0, bs, threshold, inv_keep)
                for j in range(bs):
                    row[j] *= z[j]
            if alpha != 1:
                for c in range(Ev):
                    ob[r, c] *= alpha
            m[r] = mx
        # -- acc += P V --
        pv = np.empty((bl, Ev), dtype=dt)
        np.dot(s, v[kv, j0:j0 + bs], pv)
        ob += pv
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
def _bwd_delta_row(n, dout, out, D, zero):
    """D[n, i] = sum_c dout[n, i, c] out[n, i, c] (``zero``: 0 in q's dtype, the sum's type)."""
    for i in range(dout.shape[1]):
        acc = zero
        for c in range(dout.shape[2]):
            acc += dout[n, i, c] * out[n, i, c]
        D[n, i] = acc


@njit(fastmath=_FM)
def _bwd_task(task, dout, q, k, v, lse, D, bias, rows, has_bias, scale, causal, threshold, inv_keep,
              seed, BL, BS, chunks, dq, dk, dv, dq_part):
    """One (key/value row, key chunk) of sdpa_backward: its dK, dV, and its share of dQ."""
    N, L, E = q.shape
    Nk, S, Ev = v.shape
    G = N // Nk
    nqb = (L + BL - 1) // BL
    nkb = (S + BS - 1) // BS
    dropout = threshold > 0
    dt = q.dtype
    kv = task // chunks
    c = task % chunks
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
                # -- recompute P = exp(S - lse) --
                p = np.empty((bl, bs), dtype=dt)
                _masked_scores(qb, kb, p, n, i0, j0, bl, bs, scale, bias, rows, has_bias, causal)
                for r in range(bl):
                    lr = lse[n, i0 + r]
                    for j in range(bs):
                        p[r, j] = vexp(p[r, j] - lr)
                pz = p
                z = p
                if dropout:  # the same mask bits as forward, regenerated
                    z = np.empty((bl, bs), dtype=dt)
                    pz = np.empty((bl, bs), dtype=dt)
                    for r in range(bl):
                        _dropout_scale(z[r], _row_key(seed, n, i0 + r), j0, bs, threshold, inv_keep)
                        for j in range(bs):
                            pz[r, j] = p[r, j] * z[r, j]
                # -- dV += (P Z)^T dO;  dP = dO V^T --
                tv = np.empty((bs, Ev), dtype=dt)
                np.dot(pz.T, dob, tv)
                dvb += tv
                dp = np.empty((bl, bs), dtype=dt)
                np.dot(dob, vb.T, dp)
                # -- dS = P (Z dP - D) --
                for r in range(bl):
                    d = D[n, i0 + r]
                    if dropout:
                        for j in range(bs):
                            dp[r, j] = p[r, j] * (z[r, j] * dp[r, j] - d)
                    else:
                        for j in range(bs):
                            dp[r, j] = p[r, j] * (dp[r, j] - d)
                # -- dK += scale dS^T Q;  dQ += scale dS K --
                tk = np.empty((bs, E), dtype=dt)
                np.dot(dp.T, qb, tk)
                for x in range(bs):
                    for e in range(E):
                        dkb[x, e] += scale * tk[x, e]
                tq = np.empty((bl, E), dtype=dt)
                np.dot(dp, kb, tq)
                if chunks > 1:
                    dqb = dq_part[task, g * L + i0:g * L + i0 + bl]
                else:
                    dqb = dq[n, i0:i0 + bl]
                for r in range(bl):
                    for e in range(E):
                        dqb[r, e] += scale * tq[r, e]


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
    if nth == 1:
        for n in range(N):
            _bwd_delta_row(n, dout, out, D, zero)
        for task in range(Nk * chunks):
            _bwd_task(task, dout, q, k, v, lse, D, bias, rows, has_bias, scale, causal, threshold, inv_keep,
                      seed, BL, BS, chunks, dq, dk, dv, dq_part)
        if chunks > 1:
            for kv in range(Nk):
                _bwd_dq_sum(kv, chunks, dq_part, dq)
    else:
        for n in prange(N):
            _bwd_delta_row(n, dout, out, D, zero)
        for task in prange(Nk * chunks):
            _bwd_task(task, dout, q, k, v, lse, D, bias, rows, has_bias, scale, causal, threshold, inv_keep,
                      seed, BL, BS, chunks, dq, dk, dv, dq_part)
        if chunks > 1:
            for kv in prange(Nk):
                _bwd_dq_sum(kv, chunks, dq_part, dq)
