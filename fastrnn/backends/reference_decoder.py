r"""Reference backend ``"torch"`` for the attention decoder: plain PyTorch, the specification.

A Luong-style decoder (Luong, Pham, Manning 2015, "global attention" with input feeding): a
stack of LSTM or GRU cells whose top state attends over an encoder's memory at every step, and
whose attentional state is fed back into the next step's input. Tested in float64 against a plain
loop over ``nn.LSTMCell`` / ``nn.GRUCell`` with the attention written as users write it
(tests/test_decoder.py); every other backend is tested against this file.

Decoder contract (what every ``*_decoder`` backend module implements)
---------------------------------------------------------------------
The op layer (``fastrnn/ops/decoder.py``) validates, projects the inputs (``xw``) and the memory
(``keys``) with big GEMMs, and forms the weight gradients from what backward returns. Shape
letters: T steps, B batch, S memory steps, M memory width, H hidden, G = 4H (LSTM) / 3H (GRU),
L layers. All of T, B, S, M, H, L >= 1.

``decoder_forward(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop, training)
        -> (out [T, B, H], attn [T, B, S], h_n [L, B, H], c_n [L, B, H] | None, saved)``
    cell    "lstm" | "gru"
    xw      [T, B, G]      layer 0's input projection ``x_t W_x^T + b_ih0`` for every step
    keys    [B, S, H]      the memory projected once: ``memory`` itself (dot), ``memory W_a^T``
                           (general), ``memory U^T`` (additive)
    memory  [B, S, M]      what the context averages
    mask    [B, S] bool | None   True = attend
    params  ``contract.decoder.DecoderParams`` (w_feed, w_in, b_in, w_hh, b_hh, w_q, b_q, v, w_c)
    h0      [L, B, H];  c0 [L, B, H] (LSTM) | None (GRU);  feed0 [B, H] (the attentional state
            before step 0; ignored without input feeding)
    drop    [T, L-1, B, H] | None   multiplicative dropout mask (already scaled by 1/(1-p)) on the
            input of layers 1..L-1 at each step
    training  whether to return ``saved`` (else ``()``)
  ``saved`` = (gates [T, L, B, 4H], cells [T, L, B, H] (GRU: [0]), hs [T, L, B, H], ctx [T, B, M])
  (``contract.decoder.saved_shapes``): LSTM gates are the activated i, f, g, o; GRU gates the
  activated r, z, n and the hidden-side pre-activation ``hn = W_hn h + b_hn``. The additive
  score's ``tanh(q + keys_s)`` [T, B, S, H] is *recomputed* in backward (it is S times bigger than
  anything else per step); everything else is saved.

``decoder_backward(cell, grad_out, grad_attn, grad_h_n, grad_c_n, xw, keys, memory, mask, params,
        h0, c0, feed0, drop, out, attn, saved) -> contract.decoder.DecoderGrads``
    the gradients of the four outputs (zeros where unused; ``grad_c_n`` None for a GRU), the
    forward's arguments and what it returned.

Equations (one step t; layer l; ``s`` = sigmoid)
------------------------------------------------
::
    in_0   = feed_{t-1}                       (input feeding; feed_{-1} = feed0)
    in_l   = h_{l-1,t} * drop[t, l-1]         (l >= 1)
    gi_l   = xw_t + W_feed in_0   (l = 0; no W_feed term without input feeding)
           = W_in[l-1] in_l + b_in[l-1]   (l >= 1)
    gh_l   = W_hh[l] h_{l,t-1} + b_hh[l]
    LSTM:  i, f, g, o = s(a_i), s(a_f), tanh(a_g), s(a_o) of a = gi_l + gh_l
           c_{l,t} = f c_{l,t-1} + i g;   h_{l,t} = o tanh(c_{l,t})
    GRU:   r = s(gi_r + gh_r);  z = s(gi_z + gh_z);  n = tanh(gi_n + r gh_n)
           h_{l,t} = (1 - z) n + z h_{l,t-1}
    h      = h_{L-1,t}                        (the top layer's state is the query)
    score  e_s = h . keys_s                   (dot, general)
           e_s = v . tanh(W_q h + b_q + keys_s)   (additive; Bahdanau's score on the current state)
    attn   a = softmax_s(e) over the unmasked s  (a row with no unmasked s: a = 0, ctx = 0)
    ctx    = sum_s a_s memory_s               [M]
    out_t  = tanh(W_c [ctx; h])               [H]  (Luong's attentional state, every score type)
    feed_t = out_t

Backward (t = T-1 .. 0; ``dfeed`` carries d out_t from step t+1's layer-0 input)::
    dout   = grad_out_t + dfeed;   dopre = dout (1 - out_t^2)          -> grad_opre[t]
    [dctx; dh] = W_c^T dopre
    grad_memory_s += a_s dctx;    da_s = dctx . memory_s + grad_attn[t, s]
    de_s   = a_s (da_s - sum_s' a_s' da_s')
    bilinear:  dh += sum_s de_s keys_s;   grad_keys_s += de_s h
    additive:  u_s = tanh(q + keys_s);  grad_v += sum_s de_s u_s;  dp_s = de_s v (1 - u_s^2)
               dq = sum_s dp_s (-> grad_q[t]);  grad_keys_s += dp_s;  dh += W_q^T dq
    then layers l = L-1 .. 0, with dh_l = dh_rec[l] + (dh if l = L-1 else din_{l+1} * drop[t, l]):
    LSTM:  dc = dc_rec[l] + dh_l o (1 - tanh(c)^2)
           da_i = dc g i (1-i);  da_f = dc c_prev f (1-f);  da_g = dc i (1-g^2);
           da_o = dh_l tanh(c) o (1-o);  grad_gi = grad_gh = da;  dc_rec[l] = dc f
    GRU:   dn = dh_l (1-z) (1-n^2);  dz = dh_l (h_prev - n) z (1-z);  dr = dn hn r (1-r)
           grad_gi = [dr, dz, dn];  grad_gh = [dr, dz, dn r];  dh_rec[l] gets dh_l z
    dh_rec[l] (+)= W_hh[l]^T grad_gh;   din_l = W_in[l-1]^T grad_gi (l >= 1)
    dfeed  = W_feed^T grad_gi (layer 0; 0 without input feeding)
    at the end: grad_h0 = dh_rec, grad_c0 = dc_rec, grad_feed0 = dfeed.

The op layer then forms ``d W_feed = sum_t grad_gi[t,0]^T feed_{t-1}``,
``d W_in[l-1] = sum_t grad_gi[t,l]^T in_l``, ``d W_hh[l] = sum_t grad_gh[t,l]^T h_{l,t-1}``,
``d W_c = sum_t grad_opre[t]^T [ctx; h]``, ``d W_q = sum_t grad_q[t]^T h``, the bias sums, and
the keys' share of the memory gradient through its projection.
"""
from __future__ import annotations

import torch

from ..contract.decoder import DecoderGrads, check_decoder_backward, check_decoder_forward

name = "torch"


def availability(device_type: str) -> str | None:
    return None


def _cell(cell, gi, gh, h_prev, c_prev):
    """One cell step: -> (h [B, H], c [B, H] | None, saved gates [B, 4H])."""
    H = h_prev.shape[1]
    if cell == "lstm":
        a = gi + gh
        i, f, o = (torch.sigmoid(a[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
        g = torch.tanh(a[:, 2 * H:3 * H])
        c = f * c_prev + i * g
        return o * torch.tanh(c), c, torch.cat([i, f, g, o], 1)
    r = torch.sigmoid(gi[:, :H] + gh[:, :H])
    z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
    hn = gh[:, 2 * H:]
    n = torch.tanh(gi[:, 2 * H:] + r * hn)
    return (1 - z) * n + z * h_prev, None, torch.cat([r, z, n, hn], 1)


def _scores(h, keys, mask, p):
    """e [B, S] (-inf where masked) and, for the additive score, u = tanh(q + keys) [B, S, H]."""
    if p.v is None:
        e, u = torch.einsum("bsh,bh->bs", keys, h), None
    else:
        u = torch.tanh((h @ p.w_q.T + p.b_q).unsqueeze(1) + keys)
        e = u @ p.v
    if mask is not None:
        e = e.masked_fill(~mask, float("-inf"))
    return e, u


def _softmax(e):
    """softmax over the last dim; a row that is all -inf gives zeros (not NaN)."""
    m = e.amax(-1, keepdim=True)
    w = torch.exp(e - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


def decoder_forward(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop, training):
    check_decoder_forward(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop, training)
    p = params
    T, L = xw.shape[0], h0.shape[0]
    h, c = list(h0.unbind(0)), (list(c0.unbind(0)) if c0 is not None else [None] * L)
    feed = feed0
    outs, attns, gates, cells, hs, ctxs = [], [], [], [], [], []
    for t in range(T):
        for layer in range(L):
            if layer == 0:
                gi = xw[t] + (feed @ p.w_feed.T if p.w_feed is not None else 0)
            else:
                below = h[layer - 1] * drop[t, layer - 1] if drop is not None else h[layer - 1]
                gi = below @ p.w_in[layer - 1].T + p.b_in[layer - 1]
            gh = h[layer] @ p.w_hh[layer].T + p.b_hh[layer]
            h[layer], c[layer], g = _cell(cell, gi, gh, h[layer], c[layer])
            gates.append(g)
            cells.append(c[layer])
            hs.append(h[layer])
        e, _ = _scores(h[-1], keys, mask, p)
        a = _softmax(e)
        ctx = torch.einsum("bs,bsm->bm", a, memory)
        feed = torch.tanh(torch.cat([ctx, h[-1]], 1) @ p.w_c.T)
        outs.append(feed)
        attns.append(a)
        ctxs.append(ctx)
    out, attn = torch.stack(outs), torch.stack(attns)
    h_n = torch.stack(h)
    c_n = torch.stack(c) if cell == "lstm" else None
    if not training:
        return out, attn, h_n, c_n, ()
    B, H = h0.shape[1:]
    saved = (torch.stack(gates).view(T, L, B, 4 * H),
             torch.stack(cells).view(T, L, B, H) if cell == "lstm" else xw.new_empty(0),
             torch.stack(hs).view(T, L, B, H), torch.stack(ctxs))
    return out, attn, h_n, c_n, saved


def decoder_backward(cell, grad_out, grad_attn, grad_h_n, grad_c_n, xw, keys, memory, mask, params,
                     h0, c0, feed0, drop, out, attn, saved):
    check_decoder_backward(cell, grad_out, grad_attn, grad_h_n, grad_c_n, xw, keys, memory, mask, params,
                           h0, c0, feed0, drop, out, attn, saved)
    p = params
    gates, cells, hs, ctx = saved
    T, L, B, H = hs.shape
    M = memory.shape[2]
    G = xw.shape[2]
    grad_gi = xw.new_zeros(T, L, B, G)
    grad_gh = grad_gi if cell == "lstm" else xw.new_zeros(T, L, B, G)
    grad_opre = xw.new_zeros(T, B, H)
    grad_q = xw.new_zeros(T, B, H) if p.v is not None else None
    grad_v = xw.new_zeros(H) if p.v is not None else None
    grad_keys, grad_memory = torch.zeros_like(keys), torch.zeros_like(memory)
    dh_rec = list(grad_h_n.unbind(0))
    dc_rec = list(grad_c_n.unbind(0)) if cell == "lstm" else None
    dfeed = torch.zeros_like(feed0)
    for t in range(T - 1, -1, -1):
        top = hs[t, L - 1]
        # attentional output and attention
        dout = grad_out[t] + dfeed
        dopre = dout * (1 - out[t] ** 2)
        grad_opre[t] = dopre
        dcat = dopre @ p.w_c
        dctx, dh = dcat[:, :M], dcat[:, M:]
        a = attn[t]
        grad_memory += a.unsqueeze(2) * dctx.unsqueeze(1)
        da = torch.einsum("bsm,bm->bs", memory, dctx) + grad_attn[t]
        de = a * (da - (a * da).sum(1, keepdim=True))
        if p.v is None:
            dh = dh + torch.einsum("bs,bsh->bh", de, keys)
            grad_keys += de.unsqueeze(2) * top.unsqueeze(1)
        else:
            _, u = _scores(top, keys, None, p)
            grad_v += torch.einsum("bs,bsh->h", de, u)
            dp = de.unsqueeze(2) * p.v * (1 - u ** 2)
            grad_keys += dp
            dq = dp.sum(1)
            grad_q[t] = dq
            dh = dh + dq @ p.w_q
        # the layers, top down
        din = dh
        for layer in range(L - 1, -1, -1):
            dh_l = dh_rec[layer] + din
            h_prev = hs[t - 1, layer] if t > 0 else h0[layer]
            g = gates[t, layer]
            if cell == "lstm":
                i, f, gg, o = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:]
                c_prev = cells[t - 1, layer] if t > 0 else c0[layer]
                tc = torch.tanh(cells[t, layer])
                dc = dc_rec[layer] + dh_l * o * (1 - tc ** 2)
                d = torch.cat([dc * gg * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - gg ** 2),
                               dh_l * tc * o * (1 - o)], 1)
                grad_gi[t, layer] = d
                dc_rec[layer] = dc * f
                dh_rec[layer] = d @ p.w_hh[layer]
            else:
                r, z, n, hn = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:]
                dn = dh_l * (1 - z) * (1 - n ** 2)
                dz = dh_l * (h_prev - n) * z * (1 - z)
                dr = dn * hn * r * (1 - r)
                grad_gi[t, layer] = torch.cat([dr, dz, dn], 1)
                grad_gh[t, layer] = torch.cat([dr, dz, dn * r], 1)
                dh_rec[layer] = dh_l * z + grad_gh[t, layer] @ p.w_hh[layer]
            if layer > 0:
                din = grad_gi[t, layer] @ p.w_in[layer - 1]
                if drop is not None:
                    din = din * drop[t, layer - 1]
        dfeed = grad_gi[t, 0] @ p.w_feed if p.w_feed is not None else torch.zeros_like(feed0)
    return DecoderGrads(grad_gi, grad_gh, grad_opre, grad_q, grad_v, grad_keys, grad_memory,
                        torch.stack(dh_rec), torch.stack(dc_rec) if cell == "lstm" else None, dfeed)
