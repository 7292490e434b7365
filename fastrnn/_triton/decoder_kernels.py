r"""Triton kernels of the ``"triton"`` attention decoder (``fastrnn/backends/triton_decoder.py``).

Contract and equations: ``fastrnn/backends/reference_decoder.py``.

Persistent design. Batch rows are independent (the weights are shared and read-only, memory /
keys / mask are per row), so one program owns ``BLOCK_B`` batch rows and runs the *whole* time
loop for them: grid ``(cdiv(B, BLOCK_B),)``, one launch for forward, one for backward, no
grid-wide synchronisation. Within a step a program works in phases (one layer's gates, the
scores, the softmax, the context, the attentional output); each phase writes full rows of a
small global buffer that the next phase reads across columns, so phases are separated by
``tl.debug_barrier()`` (``__syncthreads``: the writes of one phase are visible to every thread of
the program in the next; a no-op in the interpreter, which runs one program at a time).

    decoder_fwd   forward: per step, per layer a tiled gate GEMM (``tl.dot`` over BLOCK_K x BLOCK_N
                  tiles of the weights, read from global / L2 every step) fused with the gate
                  math; then the scores (a [BLOCK_B, BLOCK_S, BLOCK_D] broadcast-reduce over the
                  keys), an online masked softmax, the context and out = tanh(W_c [ctx; h])
    decoder_bwd   backward: the same structure in reverse; the additive score's tanh(q + keys_s)
                  is recomputed per step; grad_v is a per-program partial [n_programs, H] that the
                  host sums afterwards (deterministic, no atomics)

Numerics: everything in ``ACC`` = the input dtype (float32 or float64: the contract allows no
other); ``tl.dot`` runs with ``PRECISION`` ("ieee" unless TF32 is asked for). Every block size
that feeds ``tl.dot`` is >= 16 (a GPU requirement); sizes are runtime values and every load and
store is masked. Tensors are contiguous and row-major (the launcher checks); offsets fit in int32
(the launcher checks numel < 2**31).

Options follow the project's convention: a tensor argument that is None switches its option off
at compile time (``if v_ptr is not None``: the additive score; ``mask_ptr``, ``drop_ptr``,
``w_feed_ptr``, ``gates_ptr`` (not saved in inference)); ``LSTM`` is a constexpr flag.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# the recurrence's activations and their derivatives through the outputs (one copy in Triton)
from .rnn_kernels import _dot_tile, _sigmoid, _tanh, d_sigmoid, d_tanh

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # how the kernels below get decorated


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tile(ptr, rows, cols, width, mask):
    """[BLOCK_B, BLOCK_N] tile of a row-major [*, width] matrix (0 outside ``mask``)."""
    return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _vec(ptr, cols, col_ok):
    """A [1, BLOCK_N] row of a vector (a bias, v)."""
    return tl.load(ptr + cols, mask=col_ok, other=0.0)[None, :]


@triton.jit
def _mm(acc, a_ptr, rows, row_ok, K, w_ptr, cols, col_ok, stride_k, stride_n,
        PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [BB, BN] += A[rows, :K] @ W[:K, cols], W[k, n] = w_ptr[k * stride_k + n * stride_n]; A
    row-major [B, K]. A Linear's weight W' [*, width] enters as W = W'^T (strides 1, width: the
    forward products) or as W' itself (width, 1: d input = d output @ W')."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = _tile(a_ptr, rows, ks, K, row_ok[:, None] & k_ok[None, :])
        acc = _dot_tile(acc, a, w_ptr, ks, cols, k_ok, col_ok, stride_k, stride_n, PRECISION)
    return acc


@triton.jit
def _tile3(ptr, rows, ss, ds, S, D, mask3):
    """[BLOCK_B, BLOCK_S, BLOCK_D] tile of a row-major [B, S, D] tensor (keys, memory)."""
    return tl.load(ptr + rows[:, None, None] * (S * D) + ss[None, :, None] * D + ds[None, None, :],
                   mask=mask3, other=0.0)


@triton.jit
def _mask3(row_ok, s_ok, d_ok):
    return row_ok[:, None, None] & s_ok[None, :, None] & d_ok[None, None, :]


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _layer_fwd(xw_ptr, in_ptr, drop_ptr, w_in_ptr, b_in_ptr, h_prev_ptr, w_hh_ptr, b_hh_ptr,
               c_prev_ptr, c_ptr, h_ptr, gates_ptr, rows, row_ok, H,
               LSTM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One layer of one step for this program's rows; every pointer is that step's [B, ...] slice.

    Input side (into a0..a2, a3 for LSTM): xw_ptr [B, G] (layer 0, includes b_ih) and/or
    in_ptr [B, H] (layer 0: feed_{t-1}; layer l: h_{l-1,t}) times drop_ptr [B, H] through
    w_in_ptr [G, H] (W_feed / W_in[l-1]) plus b_in_ptr [G]. Hidden side: h_prev_ptr [B, H]
    through w_hh_ptr [G, H] plus b_hh_ptr [G]; GRU keeps its n part apart in a3 (r multiplies it).
    Writes h_ptr [B, H], LSTM c_ptr [B, H] (from c_prev_ptr), and gates_ptr [B, 4H] when saved.
    """
    G = (4 if LSTM else 3) * H
    for n0 in range(0, H, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        mask = row_ok[:, None] & col_ok[None, :]
        a0 = tl.zeros([BLOCK_B, BLOCK_N], ACC)
        a1 = tl.zeros([BLOCK_B, BLOCK_N], ACC)
        a2 = tl.zeros([BLOCK_B, BLOCK_N], ACC)
        a3 = tl.zeros([BLOCK_B, BLOCK_N], ACC)
        # -- input side --------------------------------------------------------------------------
        if xw_ptr is not None:
            a0 += _tile(xw_ptr, rows, cols, G, mask)
            a1 += _tile(xw_ptr + H, rows, cols, G, mask)
            a2 += _tile(xw_ptr + 2 * H, rows, cols, G, mask)
            if LSTM:
                a3 += _tile(xw_ptr + 3 * H, rows, cols, G, mask)
        if b_in_ptr is not None:
            a0 += _vec(b_in_ptr, cols, col_ok)
            a1 += _vec(b_in_ptr + H, cols, col_ok)
            a2 += _vec(b_in_ptr + 2 * H, cols, col_ok)
            if LSTM:
                a3 += _vec(b_in_ptr + 3 * H, cols, col_ok)
        if in_ptr is not None:
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                amask = row_ok[:, None] & k_ok[None, :]
                x = _tile(in_ptr, rows, ks, H, amask)
                if drop_ptr is not None:
                    x = x * _tile(drop_ptr, rows, ks, H, amask)
                a0 = _dot_tile(a0, x, w_in_ptr, ks, cols, k_ok, col_ok, 1, H, PRECISION)
                a1 = _dot_tile(a1, x, w_in_ptr + H * H, ks, cols, k_ok, col_ok, 1, H, PRECISION)
                a2 = _dot_tile(a2, x, w_in_ptr + 2 * H * H, ks, cols, k_ok, col_ok, 1, H, PRECISION)
                if LSTM:
                    a3 = _dot_tile(a3, x, w_in_ptr + 3 * H * H, ks, cols, k_ok, col_ok, 1, H, PRECISION)
        # -- hidden side: gates 0, 1 (and LSTM 2, 3) add up with the input side ---------------------
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            x = _tile(h_prev_ptr, rows, ks, H, row_ok[:, None] & k_ok[None, :])
            a0 = _dot_tile(a0, x, w_hh_ptr, ks, cols, k_ok, col_ok, 1, H, PRECISION)
            a1 = _dot_tile(a1, x, w_hh_ptr + H * H, ks, cols, k_ok, col_ok, 1, H, PRECISION)
            if LSTM:
                a2 = _dot_tile(a2, x, w_hh_ptr + 2 * H * H, ks, cols, k_ok, col_ok, 1, H, PRECISION)
                a3 = _dot_tile(a3, x, w_hh_ptr + 3 * H * H, ks, cols, k_ok, col_ok, 1, H, PRECISION)
            else:
                a3 = _dot_tile(a3, x, w_hh_ptr + 2 * H * H, ks, cols, k_ok, col_ok, 1, H, PRECISION)
        a0 += _vec(b_hh_ptr, cols, col_ok)
        a1 += _vec(b_hh_ptr + H, cols, col_ok)
        if LSTM:
            a2 += _vec(b_hh_ptr + 2 * H, cols, col_ok)
            a3 += _vec(b_hh_ptr + 3 * H, cols, col_ok)
        else:
            a3 += _vec(b_hh_ptr + 2 * H, cols, col_ok)
        # -- gate math -------------------------------------------------------------------------
        if LSTM:
            g0 = _sigmoid(a0)  # i
            g1 = _sigmoid(a1)  # f
            g2 = _tanh(a2)     # g
            g3 = _sigmoid(a3)  # o
            c = g1 * _tile(c_prev_ptr, rows, cols, H, mask) + g0 * g2
            h = g3 * _tanh(c)
            tl.store(c_ptr + rows[:, None] * H + cols[None, :], c, mask=mask)
        else:
            g0 = _sigmoid(a0)                # r
            g1 = _sigmoid(a1)                # z
            g2 = _tanh(a2 + g0 * a3)         # n
            g3 = a3                          # hn = W_hn h + b_hn
            h = (1 - g1) * g2 + g1 * _tile(h_prev_ptr, rows, cols, H, mask)
        tl.store(h_ptr + rows[:, None] * H + cols[None, :], h, mask=mask)
        if gates_ptr is not None:
            offs = gates_ptr + rows[:, None] * (4 * H) + cols[None, :]
            tl.store(offs, g0, mask=mask)
            tl.store(offs + H, g1, mask=mask)
            tl.store(offs + 2 * H, g2, mask=mask)
            tl.store(offs + 3 * H, g3, mask=mask)


@triton.jit
def _query_proj(q_ptr, w_q_ptr, b_q_ptr, qp_ptr, rows, row_ok, H,
                ACC: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Additive score: qp [B, H] = q [B, H] @ W_q^T + b_q."""
    for n0 in range(0, H, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        acc = _mm(tl.zeros([BLOCK_B, BLOCK_N], ACC), q_ptr, rows, row_ok, H, w_q_ptr, cols, col_ok, 1, H,
                  PRECISION, BLOCK_K)
        acc += _vec(b_q_ptr, cols, col_ok)
        tl.store(qp_ptr + rows[:, None] * H + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _score_block(q_ptr, qp_ptr, v_ptr, keys_ptr, rows, row_ok, ss, s_ok, S, H,
                 ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Raw scores e [BLOCK_B, BLOCK_S] of the memory steps ``ss``: h . keys_s (bilinear; q_ptr
    [B, H] = h) or v . tanh(qp + keys_s) (additive, v_ptr given; qp_ptr [B, H])."""
    e = tl.zeros([BLOCK_B, BLOCK_S], ACC)
    for d0 in range(0, H, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < H
        k = _tile3(keys_ptr, rows, ss, ds, S, H, _mask3(row_ok, s_ok, d_ok))     # [BB, BS, BD]
        if v_ptr is not None:
            qv = _tile(qp_ptr, rows, ds, H, row_ok[:, None] & d_ok[None, :])      # [BB, BD]
            vv = tl.load(v_ptr + ds, mask=d_ok, other=0.0)                         # [BD]
            u = _tanh(qv[:, None, :] + k)
            e += tl.sum(u * vv[None, None, :], axis=2)
        else:
            qv = _tile(q_ptr, rows, ds, H, row_ok[:, None] & d_ok[None, :])
            e += tl.sum(qv[:, None, :] * k, axis=2)
    return e


@triton.jit
def _attend(e, rows, row_ok, ss, s_ok, S, mask_ptr):
    """Which scores take part: valid rows and memory steps, unmasked (mask_ptr [B, S] uint8)."""
    valid = row_ok[:, None] & s_ok[None, :]
    if mask_ptr is not None:
        valid = valid & (tl.load(mask_ptr + rows[:, None] * S + ss[None, :], mask=valid, other=0) != 0)
    return tl.where(valid, e, float("-inf"))


@triton.jit
def decoder_fwd(xw_ptr, keys_ptr, mem_ptr, mask_ptr,
                w_feed_ptr, w_in_ptr, b_in_ptr, w_hh_ptr, b_hh_ptr, w_q_ptr, b_q_ptr, v_ptr, w_c_ptr, drop_ptr,
                hs_ptr, cs_ptr, out_ptr, attn_ptr, gates_ptr, ctx_ptr, qp_ptr,
                T, B, S, M, H, L, ctx_step,
                LSTM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """The whole forward for batch rows [pid * BLOCK_B, (pid + 1) * BLOCK_B).

    Inputs: xw [T, B, G], keys [B, S, H], memory [B, S, M], mask [B, S] uint8 | None, the
    DecoderParams (w_feed [G, H] | None, w_in [L-1, G, H], b_in [L-1, G], w_hh [L, G, H],
    b_hh [L, G], w_q [H, H], b_q [H], v [H] | None, w_c [H, M + H]), drop [T, L-1, B, H] | None.
    State / outputs: hs [T+1, L, B, H] (hs[0] = h0 on entry; hs[t+1] = the states after step t),
    cs [T+1, L, B, H] (LSTM, cs[0] = c0), out [T+1, B, H] (out[0] = feed0 on entry), attn
    [T, B, S], gates [T, L, B, 4H] (None: inference), ctx [T, B, M] (ctx_step = B * M) or one
    [B, M] scratch (ctx_step = 0, inference), qp [B, H] scratch (additive).
    """
    G = (4 if LSTM else 3) * H
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    for t in range(0, T):
        # ---- layers ------------------------------------------------------------------------------
        hs_prev = hs_ptr + t * (L * B * H)        # [L, B, H] states entering step t
        hs_t = hs_prev + L * B * H                # [L, B, H] states after step t
        cs_prev = None
        cs_t = None
        if cs_ptr is not None:
            cs_prev = cs_ptr + t * (L * B * H)
            cs_t = cs_prev + L * B * H
        gates_t = None
        if gates_ptr is not None:
            gates_t = gates_ptr + t * (L * B * 4 * H)
        feed = None                               # in_0 = feed_{t-1} = out[t] (out[0] = feed0)
        if w_feed_ptr is not None:
            feed = out_ptr + t * (B * H)
        _layer_fwd(xw_ptr + t * (B * G), feed, None, w_feed_ptr, None, hs_prev, w_hh_ptr, b_hh_ptr,
                   cs_prev, cs_t, hs_t, gates_t, rows, row_ok, H,
                   LSTM, ACC, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
        tl.debug_barrier()  # h_{0,t} complete before layer 1 (or the attention) reads whole rows
        for layer in range(1, L):
            lo = layer * (B * H)
            drop_t = None
            if drop_ptr is not None:
                drop_t = drop_ptr + (t * (L - 1) + layer - 1) * (B * H)
            c_prev_l = None
            c_l = None
            if cs_ptr is not None:
                c_prev_l = cs_prev + lo
                c_l = cs_t + lo
            gates_l = None
            if gates_ptr is not None:
                gates_l = gates_t + layer * (B * 4 * H)
            _layer_fwd(None, hs_t + lo - B * H, drop_t, w_in_ptr + (layer - 1) * (G * H),
                       b_in_ptr + (layer - 1) * G, hs_prev + lo, w_hh_ptr + layer * (G * H), b_hh_ptr + layer * G,
                       c_prev_l, c_l, hs_t + lo, gates_l, rows, row_ok, H,
                       LSTM, ACC, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
            tl.debug_barrier()
        q_ptr = hs_t + (L - 1) * (B * H)          # [B, H] the top state is the query
        # ---- scores and an online masked softmax (raw scores parked in attn[t]) ----------------
        if v_ptr is not None:
            _query_proj(q_ptr, w_q_ptr, b_q_ptr, qp_ptr, rows, row_ok, H, ACC, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
            tl.debug_barrier()
        attn_t = attn_ptr + t * (B * S)
        m_run = tl.full([BLOCK_B], float("-inf"), ACC)
        l_run = tl.zeros([BLOCK_B], ACC)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            s_ok = ss < S
            e = _score_block(q_ptr, qp_ptr, v_ptr, keys_ptr, rows, row_ok, ss, s_ok, S, H,
                             ACC, BLOCK_B, BLOCK_S, BLOCK_D)
            e = _attend(e, rows, row_ok, ss, s_ok, S, mask_ptr)
            tl.store(attn_t + rows[:, None] * S + ss[None, :], e, mask=row_ok[:, None] & s_ok[None, :])
            m_new = tl.maximum(m_run, tl.max(e, axis=1))
            mu = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing unmasked yet: every exp is 0
            l_run = l_run * tl.exp(m_run - mu) + tl.sum(tl.exp(e - mu[:, None]), axis=1)
            m_run = m_new
        mu = tl.where(m_run == float("-inf"), 0.0, m_run)
        inv = tl.where(l_run > 0, 1.0 / tl.where(l_run > 0, l_run, 1.0), 0.0)  # all masked: a = 0
        tl.debug_barrier()
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            smask = row_ok[:, None] & (ss < S)[None, :]
            offs = attn_t + rows[:, None] * S + ss[None, :]
            e = tl.load(offs, mask=smask, other=float("-inf"))
            tl.store(offs, tl.exp(e - mu[:, None]) * inv[:, None], mask=smask)
        tl.debug_barrier()
        # ---- context: ctx [B, M] = sum_s a_s memory_s ----------------------------------------------
        ctx_t = ctx_ptr + t * ctx_step
        for d0 in range(0, M, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < M
            acc = tl.zeros([BLOCK_B, BLOCK_D], ACC)
            for s0 in range(0, S, BLOCK_S):
                ss = s0 + tl.arange(0, BLOCK_S)
                s_ok = ss < S
                a = _tile(attn_t, rows, ss, S, row_ok[:, None] & s_ok[None, :])
                mem = _tile3(mem_ptr, rows, ss, ds, S, M, _mask3(row_ok, s_ok, d_ok))
                acc += tl.sum(a[:, :, None] * mem, axis=1)
            tl.store(ctx_t + rows[:, None] * M + ds[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        tl.debug_barrier()
        # ---- out_t = tanh(W_c [ctx; h]) -> out[t + 1], the next step's feed ------------------------
        out_t = out_ptr + (t + 1) * (B * H)
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            acc = _mm(tl.zeros([BLOCK_B, BLOCK_N], ACC), ctx_t, rows, row_ok, M, w_c_ptr, cols, col_ok, 1, M + H,
                      PRECISION, BLOCK_K)
            acc = _mm(acc, q_ptr, rows, row_ok, H, w_c_ptr + M, cols, col_ok, 1, M + H, PRECISION, BLOCK_K)
            tl.store(out_t + rows[:, None] * H + cols[None, :], _tanh(acc), mask=row_ok[:, None] & col_ok[None, :])
        tl.debug_barrier()  # out[t + 1] and hs[t + 1] complete before step t + 1 reads them


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _de(attn_t, da_ptr, ad, rows, row_ok, ss, s_ok, S):
    """de [BB, BS] = a (da - sum_s' a da) of the memory steps ``ss`` (0 where a is 0)."""
    smask = row_ok[:, None] & s_ok[None, :]
    a = _tile(attn_t, rows, ss, S, smask)
    return a * (_tile(da_ptr, rows, ss, S, smask) - ad[:, None])


@triton.jit
def decoder_bwd(grad_out_ptr, grad_attn_ptr, keys_ptr, mem_ptr,
                w_feed_ptr, w_in_ptr, w_hh_ptr, w_q_ptr, b_q_ptr, v_ptr, w_c_ptr, drop_ptr,
                hs_ptr, cs_ptr, out_ptr, attn_ptr, gates_ptr,
                grad_gi_ptr, grad_gh_ptr, grad_opre_ptr, grad_q_ptr, grad_v_ptr, grad_keys_ptr, grad_mem_ptr,
                dh_ptr, dc_ptr, dfeed_ptr, dnext_ptr, dctx_ptr, da_ptr, qp_ptr,
                T, B, S, M, H, L,
                LSTM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """The whole backward for batch rows [pid * BLOCK_B, (pid + 1) * BLOCK_B), t = T-1 .. 0.

    Reads grad_out [T, B, H], grad_attn [T, B, S], keys, memory, the weights (as forward; mask
    plays no part: masked a are 0), drop, hs [T+1, L, B, H] and cs [T+1, L, B, H] (the saved
    states with h0 / c0 in front), out [T, B, H], attn [T, B, S], gates [T, L, B, 4H].
    Writes grad_gi / grad_gh [T, L, B, G] (LSTM: one tensor), grad_opre [T, B, H], grad_q
    [T, B, H] (additive), grad_v [n_programs, H] (this program's partial, additive), and
    accumulates into zero-initialised grad_keys [B, S, H] and grad_memory [B, S, M].
    Carried in place: dh [L, B, H] (= grad_h_n on entry, grad_h0 on exit), dc [L, B, H] (LSTM,
    likewise), dfeed [B, H] (zeros on entry, grad_feed0 on exit). Scratch: dnext [B, H] (the
    gradient reaching the current layer's output from above), dctx [B, M], da [B, S], qp [B, H].
    """
    G = (4 if LSTM else 3) * H
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    for tt in range(0, T):
        t = T - 1 - tt
        hs_t = hs_ptr + (t + 1) * (L * B * H)     # [L, B, H] states after step t
        q_ptr = hs_t + (L - 1) * (B * H)          # [B, H] the query h
        attn_t = attn_ptr + t * (B * S)
        # ---- dopre = (grad_out + dfeed) (1 - out^2); additive: recompute qp --------------------
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < H)[None, :]
            o = _tile(out_ptr + t * (B * H), rows, cols, H, mask)
            dout = _tile(grad_out_ptr + t * (B * H), rows, cols, H, mask) + _tile(dfeed_ptr, rows, cols, H, mask)
            tl.store(grad_opre_ptr + t * (B * H) + rows[:, None] * H + cols[None, :], dout * d_tanh(o), mask=mask)
        if v_ptr is not None:
            _query_proj(q_ptr, w_q_ptr, b_q_ptr, qp_ptr, rows, row_ok, H, ACC, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
        tl.debug_barrier()
        # ---- [dctx; dh] = dopre @ W_c ------------------------------------------------------------
        dopre_ptr = grad_opre_ptr + t * (B * H)
        for n0 in range(0, M, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < M
            acc = _mm(tl.zeros([BLOCK_B, BLOCK_N], ACC), dopre_ptr, rows, row_ok, H, w_c_ptr, cols, col_ok, M + H, 1,
                      PRECISION, BLOCK_K)
            tl.store(dctx_ptr + rows[:, None] * M + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            acc = _mm(tl.zeros([BLOCK_B, BLOCK_N], ACC), dopre_ptr, rows, row_ok, H, w_c_ptr + M, cols, col_ok,
                      M + H, 1, PRECISION, BLOCK_K)
            tl.store(dnext_ptr + rows[:, None] * H + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
        tl.debug_barrier()
        # ---- da = dctx . memory_s + grad_attn; grad_memory += a dctx; ad = sum_s a da -------------
        ad = tl.zeros([BLOCK_B], ACC)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            s_ok = ss < S
            smask = row_ok[:, None] & s_ok[None, :]
            a = _tile(attn_t, rows, ss, S, smask)
            da = _tile(grad_attn_ptr + t * (B * S), rows, ss, S, smask)
            for d0 in range(0, M, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < M
                m3 = _mask3(row_ok, s_ok, d_ok)
                dctx = _tile(dctx_ptr, rows, ds, M, row_ok[:, None] & d_ok[None, :])
                da += tl.sum(_tile3(mem_ptr, rows, ss, ds, S, M, m3) * dctx[:, None, :], axis=2)
                gm_offs = grad_mem_ptr + rows[:, None, None] * (S * M) + ss[None, :, None] * M + ds[None, None, :]
                tl.store(gm_offs, tl.load(gm_offs, mask=m3, other=0.0) + a[:, :, None] * dctx[:, None, :], mask=m3)
            tl.store(da_ptr + rows[:, None] * S + ss[None, :], da, mask=smask)
            ad += tl.sum(a * da, axis=1)
        tl.debug_barrier()
        # ---- the score's backward: dnext += d h, grad_keys, (additive) grad_q, grad_v -----------------
        for d0 in range(0, H, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < H
            hmask = row_ok[:, None] & d_ok[None, :]
            if v_ptr is not None:
                qv = _tile(qp_ptr, rows, ds, H, hmask)                   # [BB, BD]
                vv = tl.load(v_ptr + ds, mask=d_ok, other=0.0)            # [BD]
                dq = tl.zeros([BLOCK_B, BLOCK_D], ACC)
                gv = tl.zeros([BLOCK_D], ACC)
            else:
                h = _tile(q_ptr, rows, ds, H, hmask)
                dh = _tile(dnext_ptr, rows, ds, H, hmask)
            for s0 in range(0, S, BLOCK_S):
                ss = s0 + tl.arange(0, BLOCK_S)
                s_ok = ss < S
                m3 = _mask3(row_ok, s_ok, d_ok)
                de = _de(attn_t, da_ptr, ad, rows, row_ok, ss, s_ok, S)[:, :, None]   # [BB, BS, 1]
                k = _tile3(keys_ptr, rows, ss, ds, S, H, m3)
                gk_offs = grad_keys_ptr + rows[:, None, None] * (S * H) + ss[None, :, None] * H + ds[None, None, :]
                if v_ptr is not None:
                    u = _tanh(qv[:, None, :] + k)
                    gv += tl.sum(tl.sum(de * u, axis=1), axis=0)
                    dp = de * vv[None, None, :] * d_tanh(u)
                    dq += tl.sum(dp, axis=1)
                    gk = dp
                else:
                    dh += tl.sum(de * k, axis=1)
                    gk = de * h[:, None, :]
                tl.store(gk_offs, tl.load(gk_offs, mask=m3, other=0.0) + gk, mask=m3)
            if v_ptr is not None:
                tl.store(grad_q_ptr + t * (B * H) + rows[:, None] * H + ds[None, :], dq, mask=hmask)
                gv_offs = grad_v_ptr + pid * H + ds
                tl.store(gv_offs, tl.load(gv_offs, mask=d_ok, other=0.0) + gv, mask=d_ok)
            else:
                tl.store(dnext_ptr + rows[:, None] * H + ds[None, :], dh, mask=hmask)
        tl.debug_barrier()
        if v_ptr is not None:  # dh += dq @ W_q
            for n0 in range(0, H, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_ok = cols < H
                mask = row_ok[:, None] & col_ok[None, :]
                acc = _mm(_tile(dnext_ptr, rows, cols, H, mask), grad_q_ptr + t * (B * H), rows, row_ok, H,
                          w_q_ptr, cols, col_ok, H, 1, PRECISION, BLOCK_K)
                tl.store(dnext_ptr + rows[:, None] * H + cols[None, :], acc, mask=mask)
            tl.debug_barrier()
        # ---- the layers, top down ----------------------------------------------------------------
        for ll in range(0, L):
            layer = L - 1 - ll
            lo = layer * (B * H)
            gi_t = grad_gi_ptr + (t * L + layer) * (B * G)   # [B, G]
            gh_t = grad_gh_ptr + (t * L + layer) * (B * G)
            g_t = gates_ptr + (t * L + layer) * (B * 4 * H)  # [B, 4H]
            for n0 in range(0, H, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_ok = cols < H
                mask = row_ok[:, None] & col_ok[None, :]
                offs = rows[:, None] * H + cols[None, :]
                din = _tile(dnext_ptr, rows, cols, H, mask)
                if drop_ptr is not None:  # below the top layer the gradient passed the dropout mask
                    below = (rows * 0 + layer) < L - 1  # [BB] (a tensor: the interpreter masks with tensors only)
                    dmask = mask & below[:, None]
                    din = din * tl.load(drop_ptr + (t * (L - 1) + layer) * (B * H) + offs, mask=dmask, other=1.0)
                dh_l = _tile(dh_ptr + lo, rows, cols, H, mask) + din
                g0 = _tile(g_t, rows, cols, 4 * H, mask)
                g1 = _tile(g_t + H, rows, cols, 4 * H, mask)
                g2 = _tile(g_t + 2 * H, rows, cols, 4 * H, mask)
                g3 = _tile(g_t + 3 * H, rows, cols, 4 * H, mask)
                goffs = rows[:, None] * G + cols[None, :]
                if LSTM:  # g0..g3 = i, f, g, o
                    c = _tile(cs_ptr + (t + 1) * (L * B * H) + lo, rows, cols, H, mask)
                    c_prev = _tile(cs_ptr + t * (L * B * H) + lo, rows, cols, H, mask)
                    tc = _tanh(c)
                    dc = _tile(dc_ptr + lo, rows, cols, H, mask) + dh_l * g3 * d_tanh(tc)
                    tl.store(gi_t + goffs, dc * g2 * d_sigmoid(g0), mask=mask)
                    tl.store(gi_t + goffs + H, dc * c_prev * d_sigmoid(g1), mask=mask)
                    tl.store(gi_t + goffs + 2 * H, dc * g0 * d_tanh(g2), mask=mask)
                    tl.store(gi_t + goffs + 3 * H, dh_l * tc * d_sigmoid(g3), mask=mask)
                    tl.store(dc_ptr + lo + offs, dc * g1, mask=mask)
                else:  # g0..g3 = r, z, n, hn
                    h_prev = _tile(hs_ptr + t * (L * B * H) + lo, rows, cols, H, mask)
                    dn = dh_l * (1 - g1) * d_tanh(g2)
                    dz = dh_l * (h_prev - g2) * d_sigmoid(g1)
                    dr = dn * g3 * d_sigmoid(g0)
                    tl.store(gi_t + goffs, dr, mask=mask)
                    tl.store(gi_t + goffs + H, dz, mask=mask)
                    tl.store(gi_t + goffs + 2 * H, dn, mask=mask)
                    tl.store(gh_t + goffs, dr, mask=mask)
                    tl.store(gh_t + goffs + H, dz, mask=mask)
                    tl.store(gh_t + goffs + 2 * H, dn * g0, mask=mask)
                    tl.store(dh_ptr + lo + offs, dh_l * g1, mask=mask)  # the direct path h_prev -> h
            tl.debug_barrier()
            # dh_rec[l] (+)= grad_gh @ W_hh[l];  dnext = grad_gi @ W_in[l-1] (l >= 1) or
            # dfeed = grad_gi @ W_feed (l = 0)
            for n0 in range(0, H, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_ok = cols < H
                mask = row_ok[:, None] & col_ok[None, :]
                offs = rows[:, None] * H + cols[None, :]
                if LSTM:
                    acc = tl.zeros([BLOCK_B, BLOCK_N], ACC)
                else:
                    acc = _tile(dh_ptr + lo, rows, cols, H, mask)
                acc = _mm(acc, gh_t, rows, row_ok, G, w_hh_ptr + layer * (G * H), cols, col_ok, H, 1,
                          PRECISION, BLOCK_K)
                tl.store(dh_ptr + lo + offs, acc, mask=mask)
                if layer > 0:
                    acc = _mm(tl.zeros([BLOCK_B, BLOCK_N], ACC), gi_t, rows, row_ok, G,
                              w_in_ptr + (layer - 1) * (G * H), cols, col_ok, H, 1, PRECISION, BLOCK_K)
                    tl.store(dnext_ptr + offs, acc, mask=mask)
                else:
                    if w_feed_ptr is not None:
                        acc = _mm(tl.zeros([BLOCK_B, BLOCK_N], ACC), gi_t, rows, row_ok, G,
                                  w_feed_ptr, cols, col_ok, H, 1, PRECISION, BLOCK_K)
                        tl.store(dfeed_ptr + offs, acc, mask=mask)
            tl.debug_barrier()
