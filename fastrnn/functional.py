"""Functional API: validate inputs, run layers and directions, call the recurrence op.

Shape letters: T time, B batch, I input, H hidden, Hr projected hidden, L layers, D directions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops.recurrence import packed_mask
from .ops.rnn_layer import rnn_layer


def _check_same(tensors, what, ref):
    for name, t in tensors:
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise RuntimeError(f"fastrnn: {name} has dtype {t.dtype} but {what} has dtype {ref.dtype}; "
                               "all inputs, states and weights must share one dtype")
        if t.device != ref.device:
            raise RuntimeError(f"fastrnn: {name} is on {t.device} but {what} is on {ref.device}; "
                               "all inputs, states and weights must be on one device")


def rnn(cell, x, h0, c0, weights, *, num_layers, bidirectional, dropout=0.0, training=False,
        batch_sizes=None, backend=None):
    """Multi-layer, optionally bidirectional recurrence in time-major layout.

    x        [T, B, I], or PackedSequence data [N, I] when ``batch_sizes`` [T] is given
    h0       [L*D, B, Hr];  c0 [L*D, B, H] (LSTM) or None
    weights  one tuple ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` per layer and direction, in torch's
             order (layer-major, forward then reverse); biases / w_hr may be None
    returns  ``(out [T, B, D*Hr] or [N, D*Hr], h_n [L*D, B, Hr], c_n [L*D, B, H] | None)``

    Dropout with probability ``dropout`` is applied to the output of every layer but the last,
    in training only (as torch).
    """
    D = 2 if bidirectional else 1
    if len(weights) != num_layers * D:
        raise ValueError(f"fastrnn: expected {num_layers * D} weight groups, got {len(weights)}")
    _check_same([("hx" if c0 is not None else "h0", h0), ("cx", c0)], "input", x)
    _check_same([(f"weight group {k}", w) for k, group in enumerate(weights) for w in group], "input", x)

    mask = None
    if batch_sizes is not None:
        batch_sizes = batch_sizes.cpu()
        B = int(batch_sizes[0])
        mask = packed_mask(batch_sizes, B, x.device)
        padded = x.new_zeros(len(batch_sizes), B, x.shape[-1])
        x = padded.masked_scatter(mask.unsqueeze(-1), x)
    if x.shape[0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            h_seq, h_T, c_T = rnn_layer(cell, x, w_ih, w_hh, b_ih, b_hh, h0[k],
                                        c0[k] if c0 is not None else None, w_hr,
                                        batch_sizes, reverse=d == 1, backend=backend)
            outs.append(h_seq)
            h_n.append(h_T)
            c_n.append(c_T)
        x = outs[0] if D == 1 else torch.cat(outs, -1)
        if dropout > 0 and training and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)

    out = x if mask is None else x[mask]
    return out, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)


def _cell(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend):
    """One step of a cell. input [B, I]; hx [B, H]; cx [B, H] (LSTM) or None."""
    if input.shape[1] != w_ih.shape[1]:
        raise RuntimeError(f"input has inconsistent input_size: got {input.shape[1]} expected {w_ih.shape[1]}")
    for k, state in enumerate((hx, cx)):
        if state is None:
            continue
        if state.dim() != 2 or state.shape[1] != w_hh.shape[1]:
            got = state.shape[-1] if state.dim() else 0
            raise RuntimeError(f"hidden{k} has inconsistent hidden_size: got {got}, expected {w_hh.shape[1]}")
        if state.shape[0] != input.shape[0]:
            raise RuntimeError(f"Input batch size {input.shape[0]} doesn't match hidden{k} batch size {state.shape[0]}")
    _check_same([("hx", hx), ("cx", cx)], "input", input)
    _check_same([("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh)], "input", input)
    _, h, c = rnn_layer(cell, input.unsqueeze(0), w_ih, w_hh, b_ih, b_hh, hx, cx, backend=backend)
    return h, c


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, backend=None):
    """LSTM cell step: input [B, I], hx = (h [B, H], c [B, H]) -> (h' [B, H], c' [B, H])."""
    return _cell("lstm", input, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh, backend)


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, backend=None):
    """GRU cell step: input [B, I], hx [B, H] -> h' [B, H]."""
    return _cell("gru", input, hx, None, w_ih, w_hh, b_ih, b_hh, backend)[0]


def rnn_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh", backend=None):
    """Elman cell step: input [B, I], hx [B, H] -> h' [B, H]."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    return _cell(f"rnn_{nonlinearity}", input, hx, None, w_ih, w_hh, b_ih, b_hh, backend)[0]
