"""Triton kernels of the ``"triton"`` attention backend (see ``fastrnn.backends.triton_sdpa``).

Flash attention (contract and equations: ``fastrnn/backends/reference_sdpa.py``):
  ``sdpa_fwd``       one program per (query block, batch row): online softmax over key blocks,
                     writes out and lse
  ``sdpa_bwd_dkdv``  one program per (key block, key/value row): streams the query blocks of the
                     G query heads sharing it, accumulates dK and dV in registers
  ``sdpa_bwd_dq``    one program per (query block, batch row): streams the key blocks, dQ
Backward is split in two so that no gradient needs atomics (deterministic); both recompute
``P = exp(S - lse)`` through the same helper as forward. Accumulation in float32 (float64 for
float64 inputs); ``tl.dot`` operands in the input dtype.
"""
import triton
import triton.language as tl

MIX_1 = tl.constexpr(0x21F0AAAD)
MIX_2 = tl.constexpr(0x735A2D97)
MUL_N = tl.constexpr(0x61C88647)
MUL_I = tl.constexpr(0x165667B1)
MUL_J = tl.constexpr(0x27D4EB2F)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * MIX_1
    x = x ^ (x >> 15)
    x = x * MIX_2
    return x ^ (x >> 15)


@triton.jit
def _join(hi, lo, ACC: tl.constexpr):
    """A float64 host scalar arrives as two float32 (scalar kernel arguments are float32):
    hi + lo restores it to ~1e-16 in float64 kernels."""
    one = tl.full([], 1.0, ACC)  # (the interpreter passes Python floats, which have no .to)
    return one * hi + one * lo


@triton.jit
def _dropout_scale(seed, n, offs_l, offs_s, threshold, inv_keep):
    """[BL, BS]: keep(n, i, j) / (1 - p) or 0 -- the reference's hash in uint32 arithmetic."""
    key_n = _mix32(seed.to(tl.uint32) ^ (n.to(tl.uint32) * MUL_N))
    key = _mix32(key_n ^ (offs_l.to(tl.uint32) * MUL_I))
    h = _mix32(key[:, None] ^ (offs_s.to(tl.uint32) * MUL_J)[None, :])
    return (h.to(tl.int64) >= threshold).to(inv_keep.dtype) * inv_keep


@triton.jit
def _scores(q, k, n, offs_l, offs_s, L, S, scale, Bias, Rows, stride_bn, stride_bl, stride_bs,
            HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, ACC: tl.constexpr,
            PRECISION: tl.constexpr):
    """scale q k^T + bias for a [BL, BS] tile; -inf where causal hides a key or past S."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * scale
    valid = (offs_s < S)[None, :]
    if HAS_BIAS:
        row = tl.load(Rows + n)
        b = tl.load(Bias + row * stride_bn + offs_l[:, None] * stride_bl + offs_s[None, :] * stride_bs,
                    mask=(offs_l < L)[:, None] & valid, other=0.0)
        s += b.to(ACC)
    if CAUSAL:  # top-left aligned: key j is visible to query i iff j <= i
        valid = valid & (offs_s[None, :] <= offs_l[:, None])
    return tl.where(valid, s, float("-inf"))


@triton.jit
def sdpa_fwd(Q, K, V, Bias, Rows, Out, Lse, L, S, G, scale_hi, scale_lo, seed, threshold,
             keep_hi, keep_lo,
             stride_bn, stride_bl, stride_bs,
             E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
             BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, HAS_BIAS: tl.constexpr,
             CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
             PRECISION: tl.constexpr):
    scale = _join(scale_hi, scale_lo, ACC)
    inv_keep = _join(keep_hi, keep_lo, ACC)
    i0 = tl.program_id(0) * BLOCK_L
    n = tl.program_id(1).to(tl.int64)
    kv = n // G
    offs_l = i0 + tl.arange(0, BLOCK_L)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    q = tl.load(Q + (n * L + offs_l[:, None]) * E + offs_e[None, :],
                mask=(offs_l < L)[:, None] & (offs_e < E)[None, :], other=0.0)
    m = tl.full([BLOCK_L], float("-inf"), ACC)
    l = tl.zeros([BLOCK_L], ACC)
    acc = tl.zeros([BLOCK_L, BLOCK_EV], ACC)
    s_end = tl.minimum(S, i0 + BLOCK_L) if CAUSAL else S  # later keys are hidden from every row
    for j0 in range(0, s_end, BLOCK_S):
        offs_s = j0 + tl.arange(0, BLOCK_S)
        k = tl.load(K + (kv * S + offs_s[:, None]) * E + offs_e[None, :],
                    mask=(offs_s < S)[:, None] & (offs_e < E)[None, :], other=0.0)
        v = tl.load(V + (kv * S + offs_s[:, None]) * EV + offs_ev[None, :],
                    mask=(offs_s < S)[:, None] & (offs_ev < EV)[None, :], other=0.0)
        # -- scores and online softmax --
        s = _scores(q, k, n, offs_l, offs_s, L, S, scale, Bias, Rows, stride_bn, stride_bl,
                    stride_bs, HAS_BIAS, CAUSAL, ACC, PRECISION)
        m_new = tl.maximum(m, tl.max(s, 1))
        mu = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: every exp is 0
        alpha = tl.exp(m - mu)
        p = tl.exp(s - mu[:, None])
        l = l * alpha + tl.sum(p, 1)
        if DROPOUT:  # values see P * Z; l keeps the undropped sum
            p = p * _dropout_scale(seed, n, offs_l, offs_s, threshold, inv_keep)
        # -- acc = alpha acc + P V --
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
        m = m_new
    empty = l == 0.0  # no visible key: zeros, as torch
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l)[:, None])
    lse = tl.where(empty, float("inf"), m + tl.log(tl.where(empty, 1.0, l)))
    tl.store(Out + (n * L + offs_l[:, None]) * EV + offs_ev[None, :], out.to(Out.dtype.element_ty),
             mask=(offs_l < L)[:, None] & (offs_ev < EV)[None, :])
    tl.store(Lse + n * L + offs_l, lse, mask=offs_l < L)


@triton.jit
def _probs_and_grad_scores(q, k, v, do, lse, delta, n, offs_l, offs_s, L, S, scale, seed,
                           threshold, inv_keep, Bias, Rows, stride_bn, stride_bl, stride_bs,
                           HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                           ACC: tl.constexpr, PRECISION: tl.constexpr):
    """P * Z (what dV needs) and dS = P (Z dP - D) for one [BL, BS] tile."""
    s = _scores(q, k, n, offs_l, offs_s, L, S, scale, Bias, Rows, stride_bn, stride_bl, stride_bs,
                HAS_BIAS, CAUSAL, ACC, PRECISION)
    p = tl.exp(s - lse[:, None])  # lse = +inf (row sees no key, or padding) -> 0
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
    if DROPOUT:  # the same mask bits as forward, regenerated
        z = _dropout_scale(seed, n, offs_l, offs_s, threshold, inv_keep)
        pz = p * z
        dp = dp * z
    else:
        pz = p
    ds = p * (dp - delta[:, None])
    return pz, ds


@triton.jit
def sdpa_bwd_dkdv(Q, K, V, DO, Lse, Delta, Bias, Rows, DK, DV, L, S, G, scale_hi, scale_lo, seed,
                  threshold, keep_hi, keep_lo, stride_bn, stride_bl, stride_bs,
                  E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
                  BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, HAS_BIAS: tl.constexpr,
                  CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
                  PRECISION: tl.constexpr):
    scale = _join(scale_hi, scale_lo, ACC)
    inv_keep = _join(keep_hi, keep_lo, ACC)
    j0 = tl.program_id(0) * BLOCK_S
    kv = tl.program_id(1).to(tl.int64)
    offs_s = j0 + tl.arange(0, BLOCK_S)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    k = tl.load(K + (kv * S + offs_s[:, None]) * E + offs_e[None, :],
                mask=(offs_s < S)[:, None] & (offs_e < E)[None, :], other=0.0)
    v = tl.load(V + (kv * S + offs_s[:, None]) * EV + offs_ev[None, :],
                mask=(offs_s < S)[:, None] & (offs_ev < EV)[None, :], other=0.0)
    dk = tl.zeros([BLOCK_S, BLOCK_E], ACC)
    dv = tl.zeros([BLOCK_S, BLOCK_EV], ACC)
    i_start = (j0 // BLOCK_L) * BLOCK_L if CAUSAL else 0  # earlier queries see none of these keys
    for g in range(0, G):
        n = kv * G + g
        for i0 in range(i_start, L, BLOCK_L):
            offs_l = i0 + tl.arange(0, BLOCK_L)
            q = tl.load(Q + (n * L + offs_l[:, None]) * E + offs_e[None, :],
                        mask=(offs_l < L)[:, None] & (offs_e < E)[None, :], other=0.0)
            do = tl.load(DO + (n * L + offs_l[:, None]) * EV + offs_ev[None, :],
                         mask=(offs_l < L)[:, None] & (offs_ev < EV)[None, :], other=0.0)
            lse = tl.load(Lse + n * L + offs_l, mask=offs_l < L, other=float("inf"))
            delta = tl.load(Delta + n * L + offs_l, mask=offs_l < L, other=0.0)
            pz, ds = _probs_and_grad_scores(q, k, v, do, lse, delta, n, offs_l, offs_s, L, S, scale,
                                            seed, threshold, inv_keep, Bias, Rows, stride_bn,
                                            stride_bl, stride_bs, HAS_BIAS, CAUSAL, DROPOUT, ACC,
                                            PRECISION)
            dv += tl.dot(tl.trans(pz).to(do.dtype), do, input_precision=PRECISION, out_dtype=ACC)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION, out_dtype=ACC)
    tl.store(DK + (kv * S + offs_s[:, None]) * E + offs_e[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=(offs_s < S)[:, None] & (offs_e < E)[None, :])
    tl.store(DV + (kv * S + offs_s[:, None]) * EV + offs_ev[None, :], dv.to(DV.dtype.element_ty),
             mask=(offs_s < S)[:, None] & (offs_ev < EV)[None, :])


@triton.jit
def sdpa_bwd_dq(Q, K, V, DO, Lse, Delta, Bias, Rows, DQ, L, S, G, scale_hi, scale_lo, seed,
                threshold, keep_hi, keep_lo, stride_bn, stride_bl, stride_bs,
                E: tl.constexpr, EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
                BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, HAS_BIAS: tl.constexpr,
                CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
                PRECISION: tl.constexpr):
    scale = _join(scale_hi, scale_lo, ACC)
    inv_keep = _join(keep_hi, keep_lo, ACC)
    i0 = tl.program_id(0) * BLOCK_L
    n = tl.program_id(1).to(tl.int64)
    kv = n // G
    offs_l = i0 + tl.arange(0, BLOCK_L)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    q = tl.load(Q + (n * L + offs_l[:, None]) * E + offs_e[None, :],
                mask=(offs_l < L)[:, None] & (offs_e < E)[None, :], other=0.0)
    do = tl.load(DO + (n * L + offs_l[:, None]) * EV + offs_ev[None, :],
                 mask=(offs_l < L)[:, None] & (offs_ev < EV)[None, :], other=0.0)
    lse = tl.load(Lse + n * L + offs_l, mask=offs_l < L, other=float("inf"))
    delta = tl.load(Delta + n * L + offs_l, mask=offs_l < L, other=0.0)
    dq = tl.zeros([BLOCK_L, BLOCK_E], ACC)
    s_end = tl.minimum(S, i0 + BLOCK_L) if CAUSAL else S
    for j0 in range(0, s_end, BLOCK_S):
        offs_s = j0 + tl.arange(0, BLOCK_S)
        k = tl.load(K + (kv * S + offs_s[:, None]) * E + offs_e[None, :],
                    mask=(offs_s < S)[:, None] & (offs_e < E)[None, :], other=0.0)
        v = tl.load(V + (kv * S + offs_s[:, None]) * EV + offs_ev[None, :],
                    mask=(offs_s < S)[:, None] & (offs_ev < EV)[None, :], other=0.0)
        _, ds = _probs_and_grad_scores(q, k, v, do, lse, delta, n, offs_l, offs_s, L, S, scale, seed,
                                       threshold, inv_keep, Bias, Rows, stride_bn, stride_bl,
                                       stride_bs, HAS_BIAS, CAUSAL, DROPOUT, ACC, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
    tl.store(DQ + (n * L + offs_l[:, None]) * E + offs_e[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=(offs_l < L)[:, None] & (offs_e < E)[None, :])
