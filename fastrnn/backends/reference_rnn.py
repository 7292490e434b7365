r"""Reference backend ``"torch"``: plain PyTorch, readable, the specification.

Every other backend is tested directly against this file, and this file is tested in float64
against ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` / ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``.

Recurrence contract (one layer, one direction, the whole sequence)
------------------------------------------------------------------
``rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training)``
    cell        "lstm" | "gru" | "rnn_tanh" | "rnn_relu"
    xw          [T, B, G]  input projection ``x @ W_ih^T + b_ih`` (computed once by the op code;
                           the op code owns it, backends may overwrite it as scratch)
    w_hh        [G, Hr]    recurrent weight;  b_hh [G] or None
    h0          [B, Hr];   c0 [B, H] (LSTM) or None;  w_hr [Hr, H] (LSTM proj_size) or None
    batch_sizes [T] int64 CPU tensor, descending (PackedSequence), or None: at step t only rows
                ``[0, batch_sizes[t])`` are active, the others keep their state
    reverse     visit t = T-1 .. 0; a packed row then starts from h0 at its own last step
    training    whether ``saved`` must hold what backward needs
  returns ``(h_seq [T, B, Hr], h_T [B, Hr], c_T [B, H] | None, saved)``; ``h_seq`` is zero on
  inactive rows, ``h_T``/``c_T`` hold each row's state after its last active step, ``saved`` is
  a tuple of tensors (empty when not training).

``rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved)``
  returns ``(grad_xw [T, B, G], grad_hw [T, B, G], grad_h0 [B, Hr], grad_c0 [B, H] | None,
  grad_w_hr [Hr, H] | None)``. ``grad_xw`` is the gradient of the gate pre-activations on the
  input side, ``grad_hw`` on the hidden side (``h_prev @ W_hh^T + b_hh``); they differ only for
  the GRU ``n`` gate and may be the same tensor otherwise. Both are zero on inactive rows.
  The op code turns them into ``grad_x``, ``dW_ih``, ``db_ih``, ``dW_hh``, ``db_hh`` with single GEMMs.

Cell equations (``s`` = sigmoid, ``*`` elementwise; gate order as torch)
------------------------------------------------------------------------
LSTM (i, f, g, o)::
    [i, f, g, o] = xw_t + h_{t-1} W_hh^T + b_hh;  i, f, o = s(.);  g = tanh(.)
    c_t = f * c_{t-1} + i * g;   h_t = (o * tanh(c_t)) W_hr^T   (no W_hr: h_t = o * tanh(c_t))
GRU (r, z, n)::
    [x_r, x_z, x_n] = xw_t;  [h_r, h_z, h_n] = h_{t-1} W_hh^T + b_hh
    r = s(x_r + h_r);  z = s(x_z + h_z);  n = tanh(x_n + r * h_n);  h_t = (1 - z) * n + z * h_{t-1}
RNN::
    h_t = act(xw_t + h_{t-1} W_hh^T + b_hh),  act = tanh | relu

Backward (``dh`` = total gradient reaching h_t: from the output and from step t+1)::
    LSTM: dhu = dh W_hr (or dh);  dc = dc_next + dhu * o * (1 - tanh(c_t)^2)
          di = dc g i(1-i);  df = dc c_{t-1} f(1-f);  dg = dc i (1-g^2);  do = dhu tanh(c_t) o(1-o)
          dc_{t-1} = dc f;  dh_{t-1} = [di, df, dg, do] W_hh;  dW_hr += dh^T (o tanh(c_t))
    GRU:  dn = dh (1-z)(1-n^2);  dz = dh (h_{t-1} - n) z(1-z);  dr = dn h_n r(1-r)
          grad_xw = [dr, dz, dn];  grad_hw = [dr, dz, dn * r];  dh_{t-1} = dh z + grad_hw W_hh
    RNN:  d = dh (1 - h_t^2) (tanh) or dh [h_t > 0] (relu);  dh_{t-1} = d W_hh

What is saved: LSTM the activated gates [T,B,4H], cell states [T,B,H] and, with a projection,
the unprojected outputs [T,B,H]; GRU the activated gates r, z, n [T,B,3H] and h_n [T,B,H];
RNN nothing beyond ``h_seq``. All backends save the same things in float32/float64 (the triton
backend keeps the LSTM cell states in float32 when running float16/bfloat16); only a backend's own
backward reads its ``saved`` tuple.
"""
from __future__ import annotations

import torch

from ..ops.recurrence import GATES, active_rows, previous_states, time_steps

name = "torch"


def availability(device_type: str) -> str | None:
    return None  # plain torch runs wherever torch does


def _activation(cell):
    return torch.relu if cell == "rnn_relu" else torch.tanh


def rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training):
    T, B, G = xw.shape
    H = G // GATES[cell]
    h = h0.clone()
    c = c0.clone() if cell == "lstm" else None
    h_seq = xw.new_zeros(T, B, h0.shape[-1])
    acts = xw.new_zeros(T, B, G) if training and cell in ("lstm", "gru") else None
    c_seq = xw.new_zeros(T, B, H) if training and cell == "lstm" else None
    hn_seq = xw.new_zeros(T, B, H) if training and cell == "gru" else None
    hu_seq = xw.new_zeros(T, B, H) if training and w_hr is not None else None

    for t in time_steps(T, reverse):
        m = active_rows(batch_sizes, t, B)
        hw = h[:m] @ w_hh.t()
        if b_hh is not None:
            hw = hw + b_hh
        x_t = xw[t, :m]
        if cell == "lstm":
            i, f, g, o = (x_t + hw).chunk(4, 1)
            i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
            c_new = f * c[:m] + i * g
            hu = o * c_new.tanh()
            h_new = hu @ w_hr.t() if w_hr is not None else hu
            c[:m] = c_new
            if training:
                acts[t, :m] = torch.cat([i, f, g, o], 1)
                c_seq[t, :m] = c_new
                if hu_seq is not None:
                    hu_seq[t, :m] = hu
        elif cell == "gru":
            x_r, x_z, x_n = x_t.chunk(3, 1)
            h_r, h_z, h_n = hw.chunk(3, 1)
            r = (x_r + h_r).sigmoid()
            z = (x_z + h_z).sigmoid()
            n = (x_n + r * h_n).tanh()
            h_new = (1 - z) * n + z * h[:m]
            if training:
                acts[t, :m] = torch.cat([r, z, n], 1)
                hn_seq[t, :m] = h_n
        else:
            h_new = _activation(cell)(x_t + hw)
        h[:m] = h_new
        h_seq[t, :m] = h_new

    if not training:
        saved = ()
    elif cell == "lstm":
        saved = (h_seq, acts, c_seq) + ((hu_seq,) if hu_seq is not None else ())
    elif cell == "gru":
        saved = (h_seq, acts, hn_seq)
    else:
        saved = (h_seq,)
    return h_seq, h, c, saved


def rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved):
    h_seq = saved[0]
    T, B, _ = h_seq.shape
    G = w_hh.shape[0]
    grad_xw = h_seq.new_zeros(T, B, G)
    grad_hw = h_seq.new_zeros(T, B, G) if cell == "gru" else grad_xw
    dh = grad_h_T.clone()
    dc = grad_c_T.clone() if cell == "lstm" else None
    grad_w_hr = None

    if cell == "lstm":
        acts, c_seq = saved[1], saved[2]
        hu_seq = saved[3] if w_hr is not None else None
        c_prev_seq = previous_states(c_seq, c0, batch_sizes, reverse)
        grad_hproj = h_seq.new_zeros(T, B, w_hr.shape[0]) if w_hr is not None else None
    elif cell == "gru":
        acts, hn_seq = saved[1], saved[2]
        h_prev_seq = previous_states(h_seq, h0, batch_sizes, reverse)

    for t in time_steps(T, not reverse):
        m = active_rows(batch_sizes, t, B)
        dh_t = dh[:m] + grad_h_seq[t, :m]
        if cell == "lstm":
            if w_hr is not None:
                grad_hproj[t, :m] = dh_t
                dhu = dh_t @ w_hr
            else:
                dhu = dh_t
            i, f, g, o = acts[t, :m].chunk(4, 1)
            tc = c_seq[t, :m].tanh()
            dc_t = dc[:m] + dhu * o * (1 - tc * tc)
            d_i = dc_t * g * i * (1 - i)
            d_f = dc_t * c_prev_seq[t, :m] * f * (1 - f)
            d_g = dc_t * i * (1 - g * g)
            d_o = dhu * tc * o * (1 - o)
            grad_xw[t, :m] = torch.cat([d_i, d_f, d_g, d_o], 1)
            dc[:m] = dc_t * f
            dh[:m] = grad_xw[t, :m] @ w_hh
        elif cell == "gru":
            r, z, n = acts[t, :m].chunk(3, 1)
            h_prev = h_prev_seq[t, :m]
            d_n = dh_t * (1 - z) * (1 - n * n)
            d_z = dh_t * (h_prev - n) * z * (1 - z)
            d_r = d_n * hn_seq[t, :m] * r * (1 - r)
            grad_xw[t, :m] = torch.cat([d_r, d_z, d_n], 1)
            grad_hw[t, :m] = torch.cat([d_r, d_z, d_n * r], 1)
            dh[:m] = dh_t * z + grad_hw[t, :m] @ w_hh
        else:
            h_t = h_seq[t, :m]
            # relu: where(), not a 0/1 product, so a NaN gradient stays out of inactive units (as torch)
            d = dh_t * (1 - h_t * h_t) if cell == "rnn_tanh" else torch.where(h_t > 0, dh_t, 0.0)
            grad_xw[t, :m] = d
            dh[:m] = d @ w_hh

    if cell == "lstm" and w_hr is not None:
        grad_w_hr = grad_hproj.reshape(T * B, w_hr.shape[0]).t() @ hu_seq.reshape(T * B, w_hr.shape[1])
    return grad_xw, grad_hw, dh, dc, grad_w_hr
