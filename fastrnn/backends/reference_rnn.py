r"""Reference backend ``"torch"``: plain PyTorch, readable, the specification.

Every other backend is tested directly against this file, and this file is tested in float64
against ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` / ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``
and, for the variants, against ``torch.autograd`` through its own forward
(tests/test_variants_contract.py).

Recurrence contract (one layer, one direction, the whole sequence)
------------------------------------------------------------------
``rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, variant=None)``
    cell        "lstm" | "gru" | "rnn_tanh" | "rnn_relu"
    xw          [T, B, G]  input projection ``x @ W_ih^T + b_ih`` (computed once by the op code;
                           the op code owns it, backends may overwrite it as scratch)
    w_hh        [G, Hr]    recurrent weight;  b_hh [G] or None
    h0          [B, Hr];   c0 [B, H] (LSTM) or None;  w_hr [Hr, H] (LSTM proj_size) or None
    batch_sizes [T] int64 CPU tensor, descending (PackedSequence), or None: at step t only rows
                ``[0, batch_sizes[t])`` are active, the others keep their state
    reverse     visit t = T-1 .. 0; a packed row then starts from h0 at its own last step
    training    whether ``saved`` must hold what backward needs
    variant     ``fastrnn.contract.rnn.Variant`` or None (None: exactly the plain cell below);
                see "Variants" and docs/variants.md. A backend's first line is the contract check
                (``variant = check_rnn_forward(...)``), which validates every argument and returns
                the variant normalised: None for the plain cell (also for ``Variant()``)
  returns ``(h_seq [T, B, Hr], h_T [B, Hr], c_T [B, H] | None, saved)``; ``h_seq`` is zero on
  inactive rows, ``h_T``/``c_T`` hold each row's state after its last active step, ``saved`` is
  a tuple of tensors (empty when not training).

``rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved,
variant=None)``
  returns six things, always: ``(grad_xw [T, B, G], grad_hw [T, B, G], grad_h0 [B, Hr],
  grad_c0 [B, H] | None, grad_hproj [T, B, Hr] | None, VariantGrads | None)``. ``grad_xw`` is the gradient of the gate
  pre-activations on the input side, ``grad_hw`` that of the raw recurrent product
  ``a = h_in @ W_hh^T`` (plain: ``h_prev @ W_hh^T``, the same gradient as ``+ b_hh``); they differ
  only for the GRU ``n`` gate and through the layer norm, and may be the same tensor otherwise.
  Both are zero on inactive rows. ``grad_hproj`` (with ``w_hr`` only) is the gradient reaching the
  projected output ``h_new = hu W_hr^T`` at each step. The op code turns them into ``grad_x``,
  ``dW_ih``, ``db_ih``, ``dW_hh``, ``db_hh`` and ``dW_hr = grad_hproj^T hu`` with single GEMMs.
  The sixth element is None when ``variant`` is None.

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
          dc_{t-1} = dc f;  dh_{t-1} = [di, df, dg, do] W_hh;  grad_hproj_t = dh
    GRU:  dn = dh (1-z)(1-n^2);  dz = dh (h_{t-1} - n) z(1-z);  dr = dn h_n r(1-r)
          grad_xw = [dr, dz, dn];  grad_hw = [dr, dz, dn * r];  dh_{t-1} = dh z + grad_hw W_hh
    RNN:  d = dh (1 - h_t^2) (tanh) or dh [h_t > 0] (relu);  dh_{t-1} = d W_hh

Variants (docs/variants.md; every field of ``Variant`` optional, absent = the plain equation)
--------------------------------------------------------------------------------------------
``LN(v; w, b) = w * v_hat + b``, ``v_hat = (v - mean(v)) * rstd``, ``rstd = 1/sqrt(var(v) + 1e-5)``
(last dim, biased variance). Its backward, for ``dy`` reaching ``y = LN(v)``::
    dw += sum_rows(dy * v_hat);  db += sum_rows(dy);  d_hat = dy * w
    dv = rstd * (d_hat - mean(d_hat) - v_hat * mean(d_hat * v_hat))

Forward, step t, a row active at t (inactive rows: untouched, no reset/zoneout/dropout)::
    h_prev, c_prev = (h0, c0) if reset[t] else (the state after the previous visited step)
    h_in = h_prev * rec_mask
    a    = h_in W_hh^T;   hw = LN(a; ln_hh) + b_hh  (layer norm)  else  a + b_hh
    LSTM: [x_i, x_f, x_g, x_o] = xw_t;  [hw_i, hw_f, hw_g, hw_o] = hw
          i = s(x_i + hw_i + p_i c_prev);  f = s(x_f + hw_f + p_f c_prev);  g = tanh(x_g + hw_g)
          c_new = f c_prev + i g;  o = s(x_o + hw_o + p_o c_new)                 (peephole p [3, H])
          y = LN(c_new; ln_c) (layer norm) else c_new;  hu = o tanh(y);  h_new = hu W_hr^T or hu
          c_t = zc c_prev + (1 - zc) c_new                                       (zoneout_c[t])
    GRU, reset_after=True: the plain equations with hw;  h_new = (1 - z) n + z h_prev
    GRU, reset_after=False: [hw_r, hw_z] = h_in W_h{r,z}^T + b_h{r,z};  r, z as plain
          h_n = (r * h_in) W_hn^T + b_hn;  n = tanh(x_n + h_n);  h_new = (1 - z) n + z h_prev
    RNN:  h_new = act(xw_t + hw)
    all:  h_t = zh h_prev + (1 - zh) h_new                                       (zoneout_h[t])

Backward, step t (``dh_t``, ``dc_t``: total gradient reaching the state after step t)::
    dh_new = (1 - zh) dh_t;   dh_prev = zh dh_t   (no zoneout: dh_new = dh_t, dh_prev = 0)
    LSTM: dc_new = (1 - zc) dc_t;   dc_prev = zc dc_t
          dhu = dh_new W_hr (or dh_new);  grad_hproj_t = dh_new
          dy = dhu o (1 - tanh(y)^2);  dc_new += LN_c backward of dy (or dy);  d_o = dhu tanh(y) o(1-o)
          dc_new += d_o p_o;  d_i = dc_new g i(1-i);  d_f = dc_new c_prev f(1-f);  d_g = dc_new i (1-g^2)
          dc_prev += dc_new f + d_i p_i + d_f p_f;  dp += [d_i c_prev, d_f c_prev, d_o c_new] (row sums)
          grad_xw = d_hw = [d_i, d_f, d_g, d_o]
    GRU:  d_n = dh_new (1-z)(1-n^2);  d_z = dh_new (h_prev - n) z(1-z);  dh_prev += dh_new z
          reset_after=True:  d_r = d_n h_n r(1-r);  grad_xw = [d_r, d_z, d_n];  d_hw = [d_r, d_z, d_n r]
          reset_after=False: d_rh = d_n W_hn;  d_r = d_rh h_in r(1-r);  grad_xw = d_hw = [d_r, d_z, d_n]
                             (the op code: dW_hn = d_n^T (r h_in));  dh_in gets d_rh r
    RNN:  grad_xw = d_hw = dh_new act'(h_new)
    grad_hw = LN_hh backward of d_hw (layer norm: also d ln_hh) else d_hw
    dh_in = grad_hw W_hh  (reset_after=False: grad_hw[:, :2H] W_h{r,z} + d_rh r)
    dh_prev += dh_in * rec_mask
    reset[t]: grad_h0 += dh_prev, grad_c0 += dc_prev, and the carried dh, dc get 0 (the state was replaced)
    else: they carry dh_prev, dc_prev to step t-1 (in visiting order), where grad_h_seq is added
``db_hh = sum(grad_hw)`` without layer norm; with it, ``b_hh`` sits after the norm and its
gradient is ``VariantGrads.ln_hh_bias``. ``dW_hh = grad_hw^T h_in`` (``recurrent_inputs``), except
rows 2H:3H for GRU reset_after=False: ``grad_hw[..., 2H:]^T (r h_in)``, r from the saved gates.

Accepted combinations (``check_variant``, ValueError otherwise): layer-norm weight and bias come
together; ``ln_c`` only with ``ln_hh`` (LSTM); ``peephole``, ``ln_c``, ``zoneout_c`` are LSTM-only;
an LSTM gets both ``zoneout_h`` and ``zoneout_c`` or neither; ``reset_after=False`` is GRU-only and
excludes layer norm. ``training`` only decides what is saved: dropout and zoneout masks are the
op code's choice (eval passes no ``rec_mask`` and zoneout = p).

What is saved (by name: ``contract.rnn.saved_layout``): LSTM the activated gates [T,B,4H], cell
states [T,B,H] and, with a projection, the unprojected outputs [T,B,H]; GRU the activated gates
r, z, n [T,B,3H] and h_n [T,B,H]; RNN nothing beyond ``h_seq``. With a variant: LSTM's cell states
are ``c_t`` after zoneout and GRU's ``h_n`` is the hidden-side n pre-activation as used above
(after layer norm and bias; reset_after=False: ``(r * h_in) W_hn^T + b_hn``); then, when on,
layer norm ``hw_hat [T,B,G], hw_rstd [T,B]``; LSTM cell layer norm ``c_hat [T,B,H], c_rstd [T,B]``;
zoneout LSTM ``c_new [T,B,H]`` / RNN ``h_new [T,B,H]``. Inactive rows are zero.
All backends save the same things in float32/float64 (the triton
backend keeps the LSTM cell states in float32 when running float16/bfloat16); only a backend's own
backward reads its ``saved`` tuple.
"""
from __future__ import annotations

import torch

from ..contract.checks import check_rnn_backward, check_rnn_forward
from ..contract.rnn import (
    GATES,
    LN_EPS,
    Variant,
    VariantGrads,
    active_rows,
    by_name,
    previous_states,
    saved_layout,
    time_steps,
)

name = "torch"


def availability(device_type: str) -> str | None:
    return None  # plain torch runs wherever torch does


def _activation(cell):
    return torch.relu if cell == "rnn_relu" else torch.tanh


def d_sigmoid(s):
    """d sigmoid(x) / dx from s = sigmoid(x)."""
    return s * (1 - s)


def d_tanh(t):
    """d tanh(x) / dx from t = tanh(x)."""
    return 1 - t * t


def _layer_norm(v, weight, bias):
    """LN over the last dim. v [m, K] -> (y [m, K], v_hat [m, K], rstd [m])."""
    vc = v - v.mean(-1, keepdim=True)
    rstd = torch.rsqrt((vc * vc).mean(-1, keepdim=True) + LN_EPS)
    v_hat = vc * rstd
    return v_hat * weight + bias, v_hat, rstd.squeeze(-1)


def _layer_norm_backward(dy, weight, v_hat, rstd):
    """For y = weight * v_hat + bias: (dv [m, K], dweight [K], dbias [K])."""
    d_hat = dy * weight
    dv = rstd.unsqueeze(-1) * (d_hat - d_hat.mean(-1, keepdim=True)
                               - v_hat * (d_hat * v_hat).mean(-1, keepdim=True))
    return dv, (dy * v_hat).sum(0), dy.sum(0)


def _with_rows(state, m, new):
    """``state`` with its first m rows replaced by ``new``, out of place (see ``_Steps``)."""
    return new if m == state.shape[0] else torch.cat([new, state[m:]], 0)


def _pad_rows(v, B):
    """Rows ``[0, m)`` of a step -> all B rows, zero on the inactive ones."""
    m = v.shape[0]
    return v if m == B else torch.cat([v, v.new_zeros((B - m,) + tuple(v.shape[1:]))], 0)


class _Steps:
    """Per-step tensors of the active rows, stacked to ``[T, B, ...]`` (zero on inactive rows) at
    the end. Both directions of this file are written out of place -- no writes into preallocated
    buffers, no in-place accumulation -- so that torch.autograd can differentiate them (twice:
    the op code's double backward recomputes ``rnn_forward`` under autograd; the tests check the
    hand-written backward against it and differentiate ``rnn_backward`` itself) and vmap can
    batch them."""

    def __init__(self, T, B, keep=None):
        self.T, self.B, self.steps, self.keep = T, B, {}, keep

    def put(self, name, t, value):
        """Record ``value`` as step t of ``name`` (dropped unless ``name`` is in ``keep``, when given)."""
        if self.keep is None or name in self.keep:
            self.steps.setdefault(name, [None] * self.T)[t] = value

    def stack(self, name):
        return torch.stack([_pad_rows(v, self.B) for v in self.steps[name]])


def rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, variant=None):
    variant = check_rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, variant)
    T, B, G = xw.shape
    H = G // GATES[cell]
    v = variant or Variant()
    ln, ln_c = v.ln_hh_weight is not None, v.ln_c_weight is not None
    zoneout = v.zoneout_h is not None
    gru_reset_before = cell == "gru" and not v.reset_after
    h = h0
    c = c0 if cell == "lstm" else None
    # per step: h_seq, and in training what the saved layout names (nothing else is kept)
    layout = saved_layout(cell, T, B, H, h0.shape[1], xw.dtype, w_hr is not None, training, variant)
    out = _Steps(T, B, keep={"h_seq"} | {entry.name for entry in layout})

    for t in time_steps(T, reverse):
        m = active_rows(batch_sizes, t, B)
        h_prev = h[:m]
        c_prev = c[:m] if cell == "lstm" else None
        if v.reset is not None:
            reset_t = v.reset[t, :m].unsqueeze(1)
            h_prev = torch.where(reset_t, h0[:m], h_prev)
            if cell == "lstm":
                c_prev = torch.where(reset_t, c0[:m], c_prev)
        h_in = h_prev * v.rec_mask[:m] if v.rec_mask is not None else h_prev
        # GRU reset_after=False: only the r, z rows multiply h_in; the n rows multiply r * h_in below
        w_prod = w_hh[:2 * H] if gru_reset_before else w_hh
        hw = h_in @ w_prod.t()
        if ln:
            hw, hw_hat, hw_rstd = _layer_norm(hw, v.ln_hh_weight, v.ln_hh_bias)
            if training:
                out.put("hw_hat", t, hw_hat)
                out.put("hw_rstd", t, hw_rstd)
        if b_hh is not None:
            hw = hw + (b_hh[:2 * H] if gru_reset_before else b_hh)
        x_t = xw[t, :m]
        if cell == "lstm":
            i, f, g, o = (x_t + hw).chunk(4, 1)
            if v.peephole is not None:
                i, f = i + v.peephole[0] * c_prev, f + v.peephole[1] * c_prev
            i, f, g = i.sigmoid(), f.sigmoid(), g.tanh()
            c_new = f * c_prev + i * g
            if v.peephole is not None:
                o = o + v.peephole[2] * c_new
            o = o.sigmoid()
            if ln_c:
                y, c_hat, c_rstd = _layer_norm(c_new, v.ln_c_weight, v.ln_c_bias)
                if training:
                    out.put("c_hat", t, c_hat)
                    out.put("c_rstd", t, c_rstd)
            else:
                y = c_new
            hu = o * y.tanh()
            h_new = hu @ w_hr.t() if w_hr is not None else hu
            if zoneout:
                zc = v.zoneout_c[t, :m]
                c_t = zc * c_prev + (1 - zc) * c_new
            else:
                c_t = c_new
            c = _with_rows(c, m, c_t)
            if training:
                out.put("gates", t, torch.cat([i, f, g, o], 1))
                out.put("c_seq", t, c_t)
                out.put("hu", t, hu)
                out.put("c_new", t, c_new)
        elif cell == "gru":
            x_r, x_z, x_n = x_t.chunk(3, 1)
            if gru_reset_before:
                h_r, h_z = hw.chunk(2, 1)
                r = (x_r + h_r).sigmoid()
                z = (x_z + h_z).sigmoid()
                h_n = (r * h_in) @ w_hh[2 * H:].t()
                if b_hh is not None:
                    h_n = h_n + b_hh[2 * H:]
                n = (x_n + h_n).tanh()
            else:
                h_r, h_z, h_n = hw.chunk(3, 1)
                r = (x_r + h_r).sigmoid()
                z = (x_z + h_z).sigmoid()
                n = (x_n + r * h_n).tanh()
            h_new = (1 - z) * n + z * h_prev
            if training:
                out.put("gates", t, torch.cat([r, z, n], 1))
                out.put("h_n", t, h_n)
        else:
            h_new = _activation(cell)(x_t + hw)
            if training:
                out.put("h_new", t, h_new)
        if zoneout:
            zh = v.zoneout_h[t, :m]
            h_t = zh * h_prev + (1 - zh) * h_new
        else:
            h_t = h_new
        h = _with_rows(h, m, h_t)
        out.put("h_seq", t, h_t)

    h_seq = out.stack("h_seq")  # h and c are fresh tensors: every step (T >= 1) replaces them
    return h_seq, h, c, tuple(out.stack(entry.name) for entry in layout)


def rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved,
                 variant=None):
    variant = check_rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse,
                                 saved, variant)
    h_seq = saved[0]
    T, B, Hr = h_seq.shape
    G = w_hh.shape[0]
    H = G // GATES[cell]
    v = variant or Variant()
    ln, ln_c = v.ln_hh_weight is not None, v.ln_c_weight is not None
    zoneout = v.zoneout_h is not None
    gru_reset_before = cell == "gru" and not v.reset_after
    # per step: "xw" (grad_xw), "hw" (grad_hw), "hproj" (the gradient reaching h_t W_hr^T)
    out = _Steps(T, B)
    # grad_hw differs from grad_xw for the GRU n gate (reset_after=True) and through the layer norm
    separate_hw = ln or (cell == "gru" and not gru_reset_before)
    dh = grad_h_T.clone()
    dc = grad_c_T.clone() if cell == "lstm" else None
    s = by_name(saved_layout(cell, T, B, H, Hr, h_seq.dtype, w_hr is not None, True, variant), saved)
    new_seq = s.get("c_new", s.get("h_new"))

    # GRU: h_prev, the state entering each step (after reset; the zoneout and update-gate operand)
    h_prev_seq = None
    if cell == "gru":
        h_prev_seq = previous_states(h_seq, h0, batch_sizes, reverse)
        if v.reset is not None:
            h_prev_seq = torch.where(v.reset.unsqueeze(-1), h0.unsqueeze(0), h_prev_seq)
    if cell == "lstm":
        c_prev_seq = previous_states(s["c_seq"], c0, batch_sizes, reverse)
        if v.reset is not None:
            c_prev_seq = torch.where(v.reset.unsqueeze(-1), c0.unsqueeze(0), c_prev_seq)

    # variant parameter gradients, summed over steps and rows
    g_ln_w = g_ln_b = g_lnc_w = g_lnc_b = g_peep = None
    if ln:
        g_ln_w, g_ln_b = h_seq.new_zeros(G), h_seq.new_zeros(G)
    if ln_c:
        g_lnc_w, g_lnc_b = h_seq.new_zeros(H), h_seq.new_zeros(H)
    if v.peephole is not None:
        g_peep = h_seq.new_zeros(3, H)
    # what reaches h0 / c0 through reset steps (the carried state gets nothing there)
    grad_h0_reset = torch.zeros_like(h0) if v.reset is not None else None
    grad_c0_reset = torch.zeros_like(c0) if v.reset is not None and cell == "lstm" else None

    for t in time_steps(T, not reverse):
        m = active_rows(batch_sizes, t, B)
        dh_t = dh[:m] + grad_h_seq[t, :m]
        if zoneout:
            zh = v.zoneout_h[t, :m]
            dh_new, dh_prev_z = (1 - zh) * dh_t, zh * dh_t
        else:
            dh_new, dh_prev_z = dh_t, None
        if cell == "lstm":
            if zoneout:
                zc = v.zoneout_c[t, :m]
                dc_new, dc_prev = (1 - zc) * dc[:m], zc * dc[:m]
            else:
                dc_new, dc_prev = dc[:m], None
            if w_hr is not None:
                out.put("hproj", t, dh_new)
                dhu = dh_new @ w_hr
            else:
                dhu = dh_new
            i, f, g, o = s["gates"][t, :m].chunk(4, 1)
            c_new = new_seq[t, :m] if zoneout else s["c_seq"][t, :m]
            c_prev = c_prev_seq[t, :m]
            if ln_c:
                c_hat = s["c_hat"][t, :m]
                tc = (c_hat * v.ln_c_weight + v.ln_c_bias).tanh()
                d_y = dhu * o * d_tanh(tc)
                d_cn, d_w, d_b = _layer_norm_backward(d_y, v.ln_c_weight, c_hat, s["c_rstd"][t, :m])
                g_lnc_w, g_lnc_b = g_lnc_w + d_w, g_lnc_b + d_b
                dc_new = dc_new + d_cn
            else:
                tc = c_new.tanh()
                dc_new = dc_new + dhu * o * d_tanh(tc)
            d_o = dhu * tc * d_sigmoid(o)
            if v.peephole is not None:
                dc_new = dc_new + d_o * v.peephole[2]
            d_i = dc_new * g * d_sigmoid(i)
            d_f = dc_new * c_prev * d_sigmoid(f)
            d_g = dc_new * i * d_tanh(g)
            d_xw = torch.cat([d_i, d_f, d_g, d_o], 1)
            dc_prev = dc_new * f if dc_prev is None else dc_prev + dc_new * f
            if v.peephole is not None:
                dc_prev = dc_prev + d_i * v.peephole[0] + d_f * v.peephole[1]
                g_peep = g_peep + torch.stack([(d_i * c_prev).sum(0), (d_f * c_prev).sum(0),
                                               (d_o * c_new).sum(0)])
            d_hw = d_xw
        elif cell == "gru":
            r, z, n = s["gates"][t, :m].chunk(3, 1)
            h_prev = h_prev_seq[t, :m]
            d_n = dh_new * (1 - z) * d_tanh(n)
            d_z = dh_new * (h_prev - n) * d_sigmoid(z)
            if gru_reset_before:
                h_in = h_prev * v.rec_mask[:m] if v.rec_mask is not None else h_prev
                d_rh = d_n @ w_hh[2 * H:]                      # gradient of r * h_in
                d_r = d_rh * h_in * d_sigmoid(r)
            else:
                d_r = d_n * s["h_n"][t, :m] * d_sigmoid(r)
            d_xw = torch.cat([d_r, d_z, d_n], 1)
            d_hw = d_xw if gru_reset_before else torch.cat([d_r, d_z, d_n * r], 1)
        else:
            h_new = new_seq[t, :m] if zoneout else h_seq[t, :m]
            # relu: where(), not a 0/1 product, so a NaN gradient stays out of inactive units (as torch)
            d_xw = dh_new * d_tanh(h_new) if cell == "rnn_tanh" else torch.where(h_new > 0, dh_new, 0.0)
            d_hw = d_xw
        out.put("xw", t, d_xw)

        # hidden side: through the layer norm to the raw product a = h_in W_hh^T, then to h_in
        if ln:
            d_hw, d_w, d_b = _layer_norm_backward(d_hw, v.ln_hh_weight, s["hw_hat"][t, :m], s["hw_rstd"][t, :m])
            g_ln_w, g_ln_b = g_ln_w + d_w, g_ln_b + d_b
        out.put("hw", t, d_hw)
        if gru_reset_before:
            dh_in = d_hw[:, :2 * H] @ w_hh[:2 * H] + d_rh * r
        else:
            dh_in = d_hw @ w_hh
        dh_prev = dh_in * v.rec_mask[:m] if v.rec_mask is not None else dh_in
        if cell == "gru":
            dh_prev = dh_new * z + dh_prev
        if dh_prev_z is not None:
            dh_prev = dh_prev + dh_prev_z
        if v.reset is not None:  # the state entering step t was h0 / c0: the gradient goes there
            reset_t = v.reset[t, :m].unsqueeze(1)
            grad_h0_reset = grad_h0_reset + _pad_rows(torch.where(reset_t, dh_prev, 0.0), B)
            dh_prev = torch.where(reset_t, 0.0, dh_prev)
            if cell == "lstm":
                grad_c0_reset = grad_c0_reset + _pad_rows(torch.where(reset_t, dc_prev, 0.0), B)
                dc_prev = torch.where(reset_t, 0.0, dc_prev)
        dh = _with_rows(dh, m, dh_prev)
        if cell == "lstm":
            dc = _with_rows(dc, m, dc_prev)

    grad_xw = out.stack("xw")
    grad_hw = out.stack("hw") if separate_hw else grad_xw
    grad_hproj = out.stack("hproj") if w_hr is not None else None
    if grad_h0_reset is not None:
        dh = dh + grad_h0_reset
        if cell == "lstm":
            dc = dc + grad_c0_reset
    vgrads = None if variant is None else VariantGrads(g_ln_w, g_ln_b, g_lnc_w, g_lnc_b, g_peep)
    return grad_xw, grad_hw, dh, dc, grad_hproj, vgrads
