"""The attention-decoder contract's data and checks: what the op layer (``fastrnn/ops/decoder.py``)
and every ``*_decoder`` backend agree on. Equations and every argument:
``fastrnn/backends/reference_decoder.py``. Imports only torch.

Shape letters: T decoder steps, B batch, S memory (encoder) steps, M memory width, H hidden,
G gate width (4H LSTM, 3H GRU), L layers.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .checks import _fmt, _raise_mixed, _raise_not_tensor, _raise_shape, _uniform

CELLS = ("lstm", "gru")
GATES = {"lstm": 4, "gru": 3}
ATTENTIONS = ("additive", "dot", "general")


class DecoderParams(NamedTuple):
    """The weights a decoder kernel reads (the op layer builds them from the module's parameters).

    ``w_feed`` is None without input feeding; ``w_q``, ``b_q``, ``v`` are None unless the score is
    additive (``dot`` and ``general`` are one bilinear score ``h . keys_s`` to a kernel)."""
    w_feed: torch.Tensor | None  # [G, H]      layer 0's weights on the fed-back attentional state
    w_in: torch.Tensor           # [L-1, G, H] input weights of layers 1..L-1
    b_in: torch.Tensor           # [L-1, G]
    w_hh: torch.Tensor           # [L, G, H]
    b_hh: torch.Tensor           # [L, G]
    w_q: torch.Tensor | None     # [H, H]      additive: query projection
    b_q: torch.Tensor | None     # [H]
    v: torch.Tensor | None       # [H]         additive: score vector
    w_c: torch.Tensor            # [H, M + H]  attentional output tanh(w_c [ctx; h])


class DecoderGrads(NamedTuple):
    """What a backend's ``decoder_backward`` returns; the op layer forms the weight gradients
    from these with big GEMMs (``fastrnn/ops/decoder.py``)."""
    grad_gi: torch.Tensor          # [T, L, B, G]  input-side pre-activation gradient (layer 0: d xw)
    grad_gh: torch.Tensor          # [T, L, B, G]  hidden-side (LSTM: the same tensor as grad_gi)
    grad_opre: torch.Tensor        # [T, B, H]     d (w_c [ctx; h])
    grad_q: torch.Tensor | None    # [T, B, H]     additive: d (w_q h + b_q)
    grad_v: torch.Tensor | None    # [H]           additive
    grad_keys: torch.Tensor        # [B, S, H]
    grad_memory: torch.Tensor      # [B, S, M]     through the context only (keys' share is the op's)
    grad_h0: torch.Tensor          # [L, B, H]
    grad_c0: torch.Tensor | None   # [L, B, H]     LSTM
    grad_feed0: torch.Tensor       # [B, H]        zeros without input feeding


def saved_shapes(cell: str, T: int, L: int, B: int, H: int, M: int) -> tuple:
    """The saved tensors' shapes, in order: gates [T, L, B, 4H] (LSTM: activated i, f, g, o; GRU:
    activated r, z, n and the hidden-side n pre-activation ``W_hn h + b_hn``), cells [T, L, B, H]
    (LSTM; GRU: [0]), hs [T, L, B, H] (every layer's h after every step), ctx [T, B, M]."""
    return ((T, L, B, 4 * H), (T, L, B, H) if cell == "lstm" else (0,), (T, L, B, H), (T, B, M))


def check_cell(cell) -> None:
    if cell not in GATES:
        raise ValueError(f"fastrnn: unknown decoder cell {cell!r}; expected one of {CELLS}")


def _want(name, t, shape, letters):
    if tuple(t.shape) != shape:
        _raise_shape(name, t, shape, letters)


def _check(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop):
    """Shapes, dtypes and devices of the forward arguments; returns (T, B, S, M, H, L)."""
    check_cell(cell)
    if not isinstance(params, DecoderParams):
        raise TypeError(f"fastrnn: params must be a DecoderParams, got {type(params).__name__}")
    _raise_not_tensor([("xw", xw, False), ("keys", keys, False), ("memory", memory, False),
                       ("mask", mask, True), ("h0", h0, False), ("c0", c0, True), ("feed0", feed0, False),
                       ("drop", drop, True)] + [(n, p, True) for n, p in zip(DecoderParams._fields, params)])
    if xw.dim() != 3:
        raise RuntimeError(f"fastrnn: xw must be 3-D [T, B, G], got shape {_fmt(xw.shape)}")
    T, B, G = xw.shape
    if h0.dim() != 3:
        raise RuntimeError(f"fastrnn: h0 must be 3-D [L, B, H], got shape {_fmt(h0.shape)}")
    L, H = h0.shape[0], h0.shape[2]
    if G != GATES[cell] * H:
        raise RuntimeError(f"fastrnn: xw has {G} columns, expected {GATES[cell]} * H = {GATES[cell] * H} "
                           f"for a {cell} decoder with hidden size {H}")
    if memory.dim() != 3:
        raise RuntimeError(f"fastrnn: memory must be 3-D [B, S, M], got shape {_fmt(memory.shape)}")
    S, M = memory.shape[1], memory.shape[2]
    if min(T, B, S, M, H, L) < 1:
        raise RuntimeError(f"fastrnn: the decoder kernels need T, B, S, M, H, L >= 1, got "
                           f"{dict(T=T, B=B, S=S, M=M, H=H, L=L)}")
    _want("h0", h0, (L, B, H), "[L, B, H]")
    _want("memory", memory, (B, S, M), "[B, S, M]")
    _want("keys", keys, (B, S, H), "[B, S, H]")
    _want("feed0", feed0, (B, H), "[B, H]")
    if (c0 is not None) != (cell == "lstm"):
        raise RuntimeError(f"fastrnn: c0 must be {'given' if cell == 'lstm' else 'None'} for a {cell} decoder")
    if c0 is not None:
        _want("c0", c0, (L, B, H), "[L, B, H]")
    if drop is not None:
        _want("drop", drop, (T, L - 1, B, H), "[T, L-1, B, H]")
    if mask is not None:
        _want("mask", mask, (B, S), "[B, S]")
        if mask.dtype != torch.bool or mask.device != xw.device:
            raise RuntimeError(f"fastrnn: mask must be a bool tensor on {xw.device}, got {mask.dtype} on {mask.device}")
    p = params
    if p.w_feed is not None:
        _want("w_feed", p.w_feed, (G, H), "[G, H]")
    _want("w_in", p.w_in, (L - 1, G, H), "[L-1, G, H]")
    _want("b_in", p.b_in, (L - 1, G), "[L-1, G]")
    _want("w_hh", p.w_hh, (L, G, H), "[L, G, H]")
    _want("b_hh", p.b_hh, (L, G), "[L, G]")
    additive = [t is not None for t in (p.w_q, p.b_q, p.v)]
    if any(additive) and not all(additive):
        raise RuntimeError("fastrnn: w_q, b_q and v are given together (additive score) or not at all")
    if p.v is not None:
        _want("w_q", p.w_q, (H, H), "[H, H]")
        _want("b_q", p.b_q, (H,), "[H]")
        _want("v", p.v, (H,), "[H]")
    _want("w_c", p.w_c, (H, M + H), "[H, M + H]")
    tensors = [keys, memory, h0, c0, feed0, drop, *p]
    if xw.dtype not in (torch.float32, torch.float64) or not _uniform(tensors, xw.dtype, xw.device):
        if xw.dtype not in (torch.float32, torch.float64):
            raise RuntimeError(f"fastrnn: the decoder kernels compute in float32 or float64, got {xw.dtype}")
        _raise_mixed(list(zip(("keys", "memory", "h0", "c0", "feed0", "drop", *DecoderParams._fields), tensors)),
                     "xw", xw)
    return T, B, S, M, H, L


def check_decoder_forward(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop, training):
    """Every backend's first line in ``decoder_forward``: the arguments as the reference documents
    them (any strides; backends make what they need contiguous)."""
    _check(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop)


def check_decoder_backward(cell, grad_out, grad_attn, grad_h_n, grad_c_n, xw, keys, memory, mask, params,
                           h0, c0, feed0, drop, out, attn, saved):
    """Every backend's first line in ``decoder_backward``: the forward's arguments, what it
    returned and the gradients of its outputs (all materialised, none None except grad_c_n of a
    GRU)."""
    T, B, S, M, H, L = _check(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop)
    _raise_not_tensor([("grad_out", grad_out, False), ("grad_attn", grad_attn, False),
                       ("grad_h_n", grad_h_n, False), ("grad_c_n", grad_c_n, True),
                       ("out", out, False), ("attn", attn, False)])
    for name, t, shape, letters in (("grad_out", grad_out, (T, B, H), "[T, B, H]"),
                                    ("grad_attn", grad_attn, (T, B, S), "[T, B, S]"),
                                    ("grad_h_n", grad_h_n, (L, B, H), "[L, B, H]"),
                                    ("out", out, (T, B, H), "[T, B, H]"),
                                    ("attn", attn, (T, B, S), "[T, B, S]")):
        _want(name, t, shape, letters)
    if (grad_c_n is not None) != (cell == "lstm"):
        raise RuntimeError(f"fastrnn: grad_c_n must be {'given' if cell == 'lstm' else 'None'} for a {cell} decoder")
    if grad_c_n is not None:
        _want("grad_c_n", grad_c_n, (L, B, H), "[L, B, H]")
    if not isinstance(saved, (tuple, list)) or len(saved) != 4:
        raise RuntimeError("fastrnn: saved must be the 4 tensors decoder_forward returned with training=True")
    for name, t, shape in zip(("gates", "cells", "hs", "ctx"), saved, saved_shapes(cell, T, L, B, H, M)):
        _raise_not_tensor([(f"saved {name}", t, False)])
        _want(f"saved {name}", t, shape, _fmt(shape))
    tensors = [grad_out, grad_attn, grad_h_n, grad_c_n, out, attn, *saved]
    if not _uniform(tensors, xw.dtype, xw.device):
        _raise_mixed(list(zip(("grad_out", "grad_attn", "grad_h_n", "grad_c_n", "out", "attn", "gates", "cells",
                               "hs", "ctx"), tensors)), "xw", xw)
