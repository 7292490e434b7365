r"""Numba kernels of the ``"numba"`` attention decoder (see ``fastrnn.backends.numba_decoder``).

Equations, arguments and what is saved: ``fastrnn/backends/reference_decoder.py``. Shape letters
as there: T steps, B batch, S memory steps, M memory width, H hidden, G gate width, L layers.

Structure
---------
Batch rows are independent (the weights are shared and read-only), so the batch is cut into
blocks of ``block`` consecutive rows and each block is one task that runs the *whole* time loop
(forward: t = 0 .. T-1, backward: t = T-1 .. 0) for its rows: no barrier per step, one parallel
region per call (``prange`` over blocks; a serial twin when nth == 1, which opens no parallel
region: fork children, small problems). Inside a task every product with a weight matrix is one
``np.dot`` over the block's rows ([nb, H] x [H, G] etc., scipy's OpenBLAS held at one thread by
``runtime.serial_blas``); the per-row work (gates, scores, softmax, context, and in backward the
attention gradients) is plain loops that LLVM vectorises.

The blocks depend on the thread count (as big as the threads allow: BLAS is much faster on more
rows), so 1 and 2 threads agree to rounding, not bit for bit; grad_v, the one sum across rows, is
reduced per block then summed in block order, so a given thread count is deterministic. Design
choice and measurements: the module docstring of ``numba_decoder``.

Optional inputs arrive as small dummies with a boolean flag (``has_mask``, ``has_feed``,
``additive``, ``has_drop``, ``save``) and the cell as an int (``LSTM`` / ``GRU``), so each
kernel has one signature per dtype.

Numerics: float32 activations are ``rnn_kernels``' vectorisable ``sigmoid`` / ``tanh`` /
``vexp`` (about 2 ulp), float64 libm. The cached kernels name ``rnn_kernels.py`` in ``depends``
(``runtime.jit``), so an edit of those helpers rebuilds them too.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import rnn_kernels
from .rnn_kernels import sigmoid, tanh, vexp
from .runtime import jit

LSTM, GRU = 0, 1

# contraction (FMA) and reassociation (vectorised reductions); no finite-math assumption
_FM = {"contract", "reassoc"}
_OPT = dict(fastmath=_FM, error_model="numpy")


# -- forward ---------------------------------------------------------------------------------

@njit(**_OPT)
def _fwd_block(blk, block, cell, xw, keys, memory, mask, has_mask, w_feed, has_feed, w_in, b_in, w_hh, b_hh,
               w_q, b_q, v, additive, w_c, h0, c0, feed0, drop, has_drop, save,
               out, attn, h_n, c_n, gates, cells, hs, ctx):
    """Rows [blk * block, +nb) of decoder_forward, all T steps."""
    T, B, G = xw.shape
    L, _, H = h0.shape
    S, M = memory.shape[1], memory.shape[2]
    r0 = blk * block
    nb = min(block, B - r0)
    r1 = r0 + nb
    dt = xw.dtype
    lstm = cell == LSTM
    one = np.ones(1, dtype=dt)[0]
    zero = one - one
    ninf = np.full(1, -np.inf, dtype=dt)[0]
    # the block's state, copied in and out (contiguous, so np.dot takes it as it is)
    h = np.empty((L, nb, H), dtype=dt)       # h_{l, t}
    c = np.empty((L, nb, H), dtype=dt)       # c_{l, t} (LSTM)
    for layer in range(L):
        h[layer] = h0[layer, r0:r1]
        if lstm:
            c[layer] = c0[layer, r0:r1]
    feed = np.empty((nb, H), dtype=dt)       # feed_{t-1}
    feed[:] = feed0[r0:r1]
    gi = np.empty((nb, G), dtype=dt)         # input-side pre-activation
    gh = np.empty((nb, G), dtype=dt)         # hidden-side pre-activation
    below = np.empty((nb, H), dtype=dt)      # in_l = h_{l-1} * drop
    gb = np.empty((nb, 4 * H), dtype=dt)     # the saved gates of one layer
    q = np.empty((nb, H), dtype=dt)          # additive: W_q h + b_q
    cat = np.empty((nb, M + H), dtype=dt)    # [ctx; h]
    opre = np.empty((nb, H), dtype=dt)       # W_c [ctx; h]
    e = np.empty(S, dtype=dt)
    for t in range(T):
        for layer in range(L):
            hl = h[layer]
            if layer == 0:
                x = xw[t]
                if has_feed:
                    np.dot(feed, w_feed.T, gi)
                    for i in range(nb):
                        for k in range(G):
                            gi[i, k] += x[r0 + i, k]
                else:
                    for i in range(nb):
                        for k in range(G):
                            gi[i, k] = x[r0 + i, k]
            else:
                if has_drop:
                    dm = drop[t, layer - 1]
                    for i in range(nb):
                        for j in range(H):
                            below[i, j] = h[layer - 1, i, j] * dm[r0 + i, j]
                    np.dot(below, w_in[layer - 1].T, gi)
                else:
                    np.dot(h[layer - 1], w_in[layer - 1].T, gi)
                bi = b_in[layer - 1]
                for i in range(nb):
                    for k in range(G):
                        gi[i, k] += bi[k]
            np.dot(hl, w_hh[layer].T, gh)
            bh = b_hh[layer]
            for i in range(nb):
                for k in range(G):
                    gh[i, k] += bh[k]
            # -- the cell, row by row; gate loops kept separate so that each vectorises --
            for i in range(nb):
                a, p, o = gi[i], gh[i], gb[i]
                hr = hl[i]
                if lstm:
                    cr = c[layer, i]
                    for j in range(H):
                        o[j] = sigmoid(a[j] + p[j])
                    for j in range(H, 2 * H):
                        o[j] = sigmoid(a[j] + p[j])
                    for j in range(2 * H, 3 * H):
                        o[j] = tanh(a[j] + p[j])
                    for j in range(3 * H, 4 * H):
                        o[j] = sigmoid(a[j] + p[j])
                    for j in range(H):
                        cn = o[H + j] * cr[j] + o[j] * o[2 * H + j]
                        cr[j] = cn
                        hr[j] = o[3 * H + j] * tanh(cn)
                else:
                    for j in range(2 * H):
                        o[j] = sigmoid(a[j] + p[j])
                    for j in range(H):
                        hn = p[2 * H + j]
                        n = tanh(a[2 * H + j] + o[j] * hn)
                        o[2 * H + j] = n
                        o[3 * H + j] = hn
                        z = o[H + j]
                        hr[j] = (one - z) * n + z * hr[j]
            if save:
                gates[t, layer, r0:r1] = gb
                hs[t, layer, r0:r1] = hl
                if lstm:
                    cells[t, layer, r0:r1] = c[layer]
        top = h[L - 1]                       # [nb, H]: the query
        if additive:
            np.dot(top, w_q.T, q)
        for i in range(nb):
            b = r0 + i
            kb = keys[b]                     # [S, H]
            hr = top[i]
            # -- scores --
            for s in range(S):
                if has_mask and not mask[b, s]:
                    e[s] = ninf
                    continue
                acc = zero
                if additive:
                    qr = q[i]
                    for j in range(H):
                        acc += v[j] * tanh(qr[j] + b_q[j] + kb[s, j])
                else:
                    for j in range(H):
                        acc += hr[j] * kb[s, j]
                e[s] = acc
            # -- softmax over the unmasked s (none: a = 0) --
            mx = ninf
            for s in range(S):
                mx = e[s] if e[s] > mx else mx
            mu = zero if mx == ninf else mx
            total = zero
            for s in range(S):
                w = vexp(e[s] - mu)
                e[s] = w
                total += w
            inv = one / total if total > zero else one
            ar = attn[t, b]
            for s in range(S):
                ar[s] = e[s] * inv
            # -- ctx = sum_s a_s memory_s;  cat = [ctx; h] --
            for m in range(M):
                cat[i, m] = zero
            mb = memory[b]
            for s in range(S):
                w = ar[s]
                for m in range(M):
                    cat[i, m] += w * mb[s, m]
            for j in range(H):
                cat[i, M + j] = hr[j]
            if save:
                for m in range(M):
                    ctx[t, b, m] = cat[i, m]
        # -- out_t = tanh(W_c [ctx; h]) = feed_t --
        np.dot(cat, w_c.T, opre)
        ot = out[t]
        for i in range(nb):
            for j in range(H):
                y = tanh(opre[i, j])
                feed[i, j] = y
                ot[r0 + i, j] = y
    h_n[:, r0:r1] = h
    if lstm:
        c_n[:, r0:r1] = c


@jit(parallel=True, cache=True, nogil=True, depends=(rnn_kernels.__file__,), **_OPT)
def decoder_forward(cell, xw, keys, memory, mask, has_mask, w_feed, has_feed, w_in, b_in, w_hh, b_hh,
                    w_q, b_q, v, additive, w_c, h0, c0, feed0, drop, has_drop, save, block, nth,
                    out, attn, h_n, c_n, gates, cells, hs, ctx):
    """Fills out [T, B, H], attn [T, B, S], h_n, c_n [L, B, H] and, when ``save``, gates, cells,
    hs, ctx (``contract.decoder.saved_shapes``; dummies otherwise, as are the absent optional
    inputs). Rows in blocks of ``block``; nth: threads (1: no parallel region)."""
    B = xw.shape[1]
    nblk = (B + block - 1) // block
    if nth == 1:
        for blk in range(nblk):
            _fwd_block(blk, block, cell, xw, keys, memory, mask, has_mask, w_feed, has_feed, w_in, b_in, w_hh,
                       b_hh, w_q, b_q, v, additive, w_c, h0, c0, feed0, drop, has_drop, save,
                       out, attn, h_n, c_n, gates, cells, hs, ctx)
    else:
        for blk in prange(nblk):
            _fwd_block(blk, block, cell, xw, keys, memory, mask, has_mask, w_feed, has_feed, w_in, b_in, w_hh,
                       b_hh, w_q, b_q, v, additive, w_c, h0, c0, feed0, drop, has_drop, save,
                       out, attn, h_n, c_n, gates, cells, hs, ctx)


# -- backward --------------------------------------------------------------------------------

@njit(**_OPT)
def _bwd_block(blk, block, cell, grad_out, grad_attn, grad_h_n, grad_c_n, keys, memory, w_feed, has_feed,
               w_in, w_hh, w_q, b_q, v, additive, w_c, h0, c0, drop, has_drop, out, attn, gates, cells, hs,
               grad_gi, grad_gh, grad_opre, grad_q, gv_part, grad_keys, grad_memory, grad_h0, grad_c0,
               grad_feed0):
    """Rows [blk * block, +nb) of decoder_backward, all T steps in reverse."""
    T, B, H = grad_out.shape
    L = h0.shape[0]
    S, M = memory.shape[1], memory.shape[2]
    G = grad_gi.shape[3]
    r0 = blk * block
    nb = min(block, B - r0)
    r1 = r0 + nb
    dt = grad_out.dtype
    lstm = cell == LSTM
    one = np.ones(1, dtype=dt)[0]
    zero = one - one
    dh_rec = np.empty((L, nb, H), dtype=dt)   # d h_{l, t-1} through the recurrence
    dc_rec = np.empty((L, nb, H), dtype=dt)   # d c_{l, t-1} (LSTM)
    for layer in range(L):
        dh_rec[layer] = grad_h_n[layer, r0:r1]
        if lstm:
            dc_rec[layer] = grad_c_n[layer, r0:r1]
    dfeed = np.zeros((nb, H), dtype=dt)       # d out_t from step t+1's layer-0 input
    dopre = np.empty((nb, H), dtype=dt)
    dcat = np.empty((nb, M + H), dtype=dt)    # [dctx; dh]
    dh = np.empty((nb, H), dtype=dt)          # d of the top layer's h_t from the attention
    q = np.empty((nb, H), dtype=dt)           # additive: W_q h (b_q added where used)
    dq = np.empty((nb, H), dtype=dt)
    dqw = np.empty((nb, H), dtype=dt)         # dq W_q
    dhl = np.empty((nb, H), dtype=dt)         # d h_{l, t}, all paths
    din = np.empty((nb, H), dtype=dt)         # d in_l, to the layer below
    gg = np.empty((nb, G), dtype=dt)          # grad_gi rows of one layer
    ggh = np.empty((nb, G), dtype=dt)         # grad_gh rows (GRU)
    tmp = np.empty((nb, H), dtype=dt)
    da = np.empty(S, dtype=dt)
    gv = gv_part[blk]                         # this block's share of grad_v
    for t in range(T - 1, -1, -1):
        ot, got = out[t], grad_out[t]
        for i in range(nb):
            b = r0 + i
            for j in range(H):
                y = ot[b, j]
                dopre[i, j] = (got[b, j] + dfeed[i, j]) * (one - y * y)
        grad_opre[t, r0:r1] = dopre
        np.dot(dopre, w_c, dcat)
        top = hs[t, L - 1, r0:r1]             # [nb, H]
        if additive:
            np.dot(top, w_q.T, q)
        for i in range(nb):
            b = r0 + i
            ar, gar = attn[t, b], grad_attn[t, b]
            mb, gmb = memory[b], grad_memory[b]
            kb, gkb = keys[b], grad_keys[b]
            # -- through the context: grad_memory_s += a_s dctx; da_s = dctx . memory_s + grad_attn --
            for s in range(S):
                w = ar[s]
                acc = zero
                for m in range(M):
                    x = dcat[i, m]
                    gmb[s, m] += w * x
                    acc += mb[s, m] * x
                da[s] = acc + gar[s]
            # -- softmax: de_s = a_s (da_s - sum a da), stored over da --
            sad = zero
            for s in range(S):
                sad += ar[s] * da[s]
            for s in range(S):
                da[s] = ar[s] * (da[s] - sad)
            for j in range(H):
                dh[i, j] = dcat[i, M + j]
            hr = top[i]
            if additive:
                qr, dqr = q[i], dq[i]
                for j in range(H):
                    dqr[j] = zero
                for s in range(S):
                    de = da[s]
                    for j in range(H):
                        u = tanh(qr[j] + b_q[j] + kb[s, j])   # recomputed: [S, H] per row and step
                        gv[j] += de * u
                        dp = de * v[j] * (one - u * u)
                        gkb[s, j] += dp
                        dqr[j] += dp
                grad_q[t, b] = dqr
            else:
                for s in range(S):
                    de = da[s]
                    for j in range(H):
                        dh[i, j] += de * kb[s, j]
                        gkb[s, j] += de * hr[j]
        if additive:
            np.dot(dq, w_q, dqw)
            for i in range(nb):
                for j in range(H):
                    dh[i, j] += dqw[i, j]
        # -- the layers, top down; din carries d in_{l+1} (the top: dh) --
        din[:] = dh
        for layer in range(L - 1, -1, -1):
            for i in range(nb):
                for j in range(H):
                    dhl[i, j] = dh_rec[layer, i, j] + din[i, j]
            g = gates[t, layer]
            if lstm:
                cn = cells[t, layer]
                cp = cells[t - 1, layer] if t > 0 else c0[layer]
                dcr = dc_rec[layer]
                for i in range(nb):
                    b = r0 + i
                    gr, d = g[b], gg[i]
                    for j in range(H):
                        ig, fg, cg, og = gr[j], gr[H + j], gr[2 * H + j], gr[3 * H + j]
                        tc = tanh(cn[b, j])
                        dc = dcr[i, j] + dhl[i, j] * og * (one - tc * tc)
                        d[j] = dc * cg * ig * (one - ig)
                        d[H + j] = dc * cp[b, j] * fg * (one - fg)
                        d[2 * H + j] = dc * ig * (one - cg * cg)
                        d[3 * H + j] = dhl[i, j] * tc * og * (one - og)
                        dcr[i, j] = dc * fg
                np.dot(gg, w_hh[layer], dh_rec[layer])
            else:
                hp = hs[t - 1, layer] if t > 0 else h0[layer]
                for i in range(nb):
                    b = r0 + i
                    gr, d, dg = g[b], gg[i], ggh[i]
                    for j in range(H):
                        r, z, n, hn = gr[j], gr[H + j], gr[2 * H + j], gr[3 * H + j]
                        x = dhl[i, j]
                        dn = x * (one - z) * (one - n * n)
                        dz = x * (hp[b, j] - n) * z * (one - z)
                        dr = dn * hn * r * (one - r)
                        d[j] = dr
                        d[H + j] = dz
                        d[2 * H + j] = dn
                        dg[j] = dr
                        dg[H + j] = dz
                        dg[2 * H + j] = dn * r
                        tmp[i, j] = x * z
                np.dot(ggh, w_hh[layer], dh_rec[layer])
                for i in range(nb):
                    for j in range(H):
                        dh_rec[layer, i, j] += tmp[i, j]
                grad_gh[t, layer, r0:r1] = ggh
            grad_gi[t, layer, r0:r1] = gg
            if layer > 0:
                np.dot(gg, w_in[layer - 1], din)
                if has_drop:
                    dm = drop[t, layer - 1]
                    for i in range(nb):
                        for j in range(H):
                            din[i, j] *= dm[r0 + i, j]
        if has_feed:
            np.dot(gg, w_feed, dfeed)         # gg: layer 0's
    grad_h0[:, r0:r1] = dh_rec
    if lstm:
        grad_c0[:, r0:r1] = dc_rec
    grad_feed0[r0:r1] = dfeed


@jit(parallel=True, cache=True, nogil=True, depends=(rnn_kernels.__file__,), **_OPT)
def decoder_backward(cell, grad_out, grad_attn, grad_h_n, grad_c_n, keys, memory, w_feed, has_feed,
                     w_in, w_hh, w_q, b_q, v, additive, w_c, h0, c0, drop, has_drop, out, attn, gates,
                     cells, hs, block, nth, grad_gi, grad_gh, grad_opre, grad_q, grad_v, grad_keys,
                     grad_memory, grad_h0, grad_c0, grad_feed0, gv_part):
    """Fills the DecoderGrads arrays (grad_keys, grad_memory zeroed by the caller; for an LSTM
    grad_gh is grad_gi itself, and grad_q, grad_v are dummies unless ``additive``). Rows in
    blocks of ``block``; nth: threads (1: no parallel region). gv_part [nblk, H] (zeros, from the
    caller): grad_v per block, summed in block order, so no race and a fixed order. Allocated by
    the caller because an array expression here (np.zeros) would itself become a parallel region
    under parallel=True, which a fork child must not open even on its serial path."""
    B, H = grad_out.shape[1], grad_out.shape[2]
    nblk = (B + block - 1) // block
    if nth == 1:
        for blk in range(nblk):
            _bwd_block(blk, block, cell, grad_out, grad_attn, grad_h_n, grad_c_n, keys, memory, w_feed, has_feed,
                       w_in, w_hh, w_q, b_q, v, additive, w_c, h0, c0, drop, has_drop, out, attn, gates, cells,
                       hs, grad_gi, grad_gh, grad_opre, grad_q, gv_part, grad_keys, grad_memory, grad_h0,
                       grad_c0, grad_feed0)
    else:
        for blk in prange(nblk):
            _bwd_block(blk, block, cell, grad_out, grad_attn, grad_h_n, grad_c_n, keys, memory, w_feed, has_feed,
                       w_in, w_hh, w_q, b_q, v, additive, w_c, h0, c0, drop, has_drop, out, attn, gates, cells,
                       hs, grad_gi, grad_gh, grad_opre, grad_q, gv_part, grad_keys, grad_memory, grad_h0,
                       grad_c0, grad_feed0)
    if additive:
        for j in range(H):
            acc = gv_part[0, j]
            for blk in range(1, nblk):
                acc += gv_part[blk, j]
            grad_v[j] = acc
