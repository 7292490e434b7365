"""``fastrnn.AttentionDecoder``: a sequence-to-sequence decoder with attention and input feeding
(Luong et al. 2015; Bahdanau et al. 2015's additive score), the whole teacher-forced loop as one
fused op (``torch.ops.fastrnn.decoder``; equations in ``fastrnn/backends/reference_decoder.py``).

Why a fused op: with input feeding every step's input depends on the previous step's attention,
so the decoder cannot be one ``nn.LSTM`` call followed by attention; users write a Python loop
over ``nn.LSTMCell`` + attention, several kernel launches and ~100 us of Python per step. Here the
loop runs inside the kernel, the memory's projection is computed once per sequence, and the
weight gradients are one GEMM each over all steps.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import nn

from . import backends, precision
from .contract.decoder import ATTENTIONS, CELLS, GATES, DecoderParams
from .ops.decoder import decoder as decoder_op


class DecoderMemory(NamedTuple):
    """The encoder side prepared once (``AttentionDecoder.prepare_memory``), for ``step`` loops:
    memory [B, S, M], its projection ``keys`` [B, S, H] and the mask [B, S] bool | None."""
    memory: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor | None


class AttentionDecoder(nn.Module):
    r"""A stack of ``num_layers`` LSTM or GRU cells whose top state attends over an encoder's
    memory at every step (Luong's global attention); with ``input_feeding`` the attentional state
    of step t-1 is concatenated to the input of step t.

    Per step t (``h`` the top layer's new state; layer 0 reads ``[x_t; feed_{t-1}]``)::

        score  e_s = h . m_s                              attention="dot"      (memory_size == hidden_size)
               e_s = h . (W_a m_s)                        attention="general"  (W_a = memory_weight)
               e_s = v . tanh(W_q h + b_q + U m_s)        attention="additive" (U = memory_weight,
                                                          W_q, b_q = query_weight, query_bias, v = score_weight)
        a      = softmax_s(e) over the unmasked s (a row with nothing to attend to gets a = 0)
        ctx    = sum_s a_s m_s
        out_t  = tanh(W_c [ctx; h])                       (W_c = output_weight; feed_t = out_t)

    Args: ``cell`` ("lstm" | "gru"), ``input_size`` I, ``hidden_size`` H, ``memory_size`` M,
    ``attention``, ``input_feeding``, ``num_layers`` L, ``dropout`` (on the input of layers 1..L-1,
    in training, as ``nn.LSTM``), ``backend`` (None: automatic), ``device``, ``dtype``.

    Parameters, named as ``nn.LSTM``'s where they are the same thing: ``weight_ih_l{k}``
    [G, I + H] for layer 0 with input feeding (the x columns first), [G, I] without, [G, H] above;
    ``weight_hh_l{k}`` [G, H]; ``bias_ih_l{k}``, ``bias_hh_l{k}`` [G]; G = 4H (LSTM, gates i f g o)
    or 3H (GRU, r z n). Then ``memory_weight`` [H, M] (general, additive), ``query_weight`` [H, H],
    ``query_bias`` [H], ``score_weight`` [H] (additive), ``output_weight`` [H, M + H]. All start
    U(-1/sqrt(H), 1/sqrt(H)), in that order.

    ``forward(inputs, memory, memory_mask=None, state=None, batch_first=False)``:
        inputs [T, B, I] (batch_first: [B, T, I]; unbatched [T, I]), memory [S, B, M] (batch_first:
        [B, S, M]; unbatched [S, M]) or a ``DecoderMemory``, memory_mask [B, S] bool (True = attend)
    -> ``(outputs [T, B, H], attention [T, B, S], state)`` (batch_first: [B, T, ...]).
    ``state``: LSTM ``(h [L, B, H], c [L, B, H], feed [B, H])``, GRU ``(h, feed)``; without input
    feeding LSTM ``(h, c)`` and GRU ``h``, as ``nn.LSTM`` / ``nn.GRU``. None: zeros (also for
    ``feed`` alone: ``(h, c, None)``).

    ``step(input [B, I], memory, memory_mask=None, state=None) -> (output [B, H], attention [B, S],
    state)``: one step, for greedy or beam decoding; pass ``prepare_memory(memory, mask)`` to
    compute the memory's projection once.

    Dtypes: float32 and float64; other floating dtypes (and autocast) compute in float32, outputs
    cast back to the input's dtype.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, memory_size: int,
                 attention: str = "additive", input_feeding: bool = True, num_layers: int = 1,
                 dropout: float = 0.0, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"fastrnn: AttentionDecoder cell must be one of {CELLS}, got {cell!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"fastrnn: attention must be one of {ATTENTIONS}, got {attention!r}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("memory_size", memory_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"fastrnn: {name} must be a positive int, got {value!r}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             "element being zeroed")
        if attention == "dot" and memory_size != hidden_size:
            raise ValueError(f"fastrnn: attention='dot' needs memory_size == hidden_size, got {memory_size} and "
                             f"{hidden_size} (use 'general' to project the memory)")
        self.cell, self.attention = cell, attention
        self.input_size, self.hidden_size, self.memory_size = input_size, hidden_size, memory_size
        self.input_feeding, self.num_layers, self.dropout = bool(input_feeding), num_layers, float(dropout)
        self.backend = backends.check_name(backend)
        H, G = hidden_size, GATES[cell] * hidden_size
        kw = dict(device=device, dtype=dtype)
        for k in range(num_layers):
            width = (input_size + (H if input_feeding else 0)) if k == 0 else H
            setattr(self, f"weight_ih_l{k}", nn.Parameter(torch.empty(G, width, **kw)))
            setattr(self, f"weight_hh_l{k}", nn.Parameter(torch.empty(G, H, **kw)))
            setattr(self, f"bias_ih_l{k}", nn.Parameter(torch.empty(G, **kw)))
            setattr(self, f"bias_hh_l{k}", nn.Parameter(torch.empty(G, **kw)))
        if attention != "dot":
            self.memory_weight = nn.Parameter(torch.empty(H, memory_size, **kw))
        if attention == "additive":
            self.query_weight = nn.Parameter(torch.empty(H, H, **kw))
            self.query_bias = nn.Parameter(torch.empty(H, **kw))
            self.score_weight = nn.Parameter(torch.empty(H, **kw))
        self.output_weight = nn.Parameter(torch.empty(H, memory_size + H, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        s = (f"{self.cell!r}, {self.input_size}, {self.hidden_size}, {self.memory_size}, "
             f"attention={self.attention!r}, input_feeding={self.input_feeding}, num_layers={self.num_layers}")
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s + (f", backend={self.backend!r}" if self.backend else "")

    # ---- memory ------------------------------------------------------------------------------

    def prepare_memory(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
                       batch_first: bool = False) -> DecoderMemory:
        """The memory [S, B, M] (batch_first / the kernels' layout: [B, S, M]; unbatched [S, M])
        with its projection, computed once for a sequence of ``step`` calls or ``forward``s. The
        projection uses the weights of the moment: prepare again after an optimizer step."""
        if not isinstance(memory, torch.Tensor):
            raise TypeError(f"fastrnn: memory must be a tensor, got {type(memory).__name__}")
        if memory.dim() == 2:
            memory = memory.unsqueeze(0 if batch_first else 1)
            if memory_mask is not None and memory_mask.dim() == 1:
                memory_mask = memory_mask.unsqueeze(0)
        if memory.dim() != 3:
            raise ValueError(f"fastrnn: memory must be 3-D [S, B, M] (or 2-D unbatched), got shape "
                             f"{list(memory.shape)}")
        if memory.shape[2] != self.memory_size:
            raise RuntimeError(f"fastrnn: memory has width {memory.shape[2]}, expected memory_size="
                               f"{self.memory_size}")
        ref = self.output_weight
        if memory.device != ref.device:
            raise RuntimeError(f"fastrnn: memory is on {memory.device}, the decoder's parameters on {ref.device}")
        if not memory.is_floating_point():
            raise RuntimeError(f"fastrnn: memory must be floating point, got {memory.dtype}")
        mem = memory if batch_first else memory.transpose(0, 1)  # [B, S, M]
        B, S = mem.shape[0], mem.shape[1]
        if memory_mask is not None:
            if not isinstance(memory_mask, torch.Tensor) or memory_mask.dtype != torch.bool:
                raise RuntimeError("fastrnn: memory_mask must be a bool tensor [B, S] (True = attend), got "
                                   f"{getattr(memory_mask, 'dtype', type(memory_mask).__name__)}")
            if tuple(memory_mask.shape) != (B, S):
                raise RuntimeError(f"fastrnn: memory_mask has shape {list(memory_mask.shape)}, expected [B, S] = "
                                   f"{[B, S]}")
            if memory_mask.device != mem.device:
                raise RuntimeError(f"fastrnn: memory_mask is on {memory_mask.device}, memory on {mem.device}")
        dtype = self._compute_dtype(mem.dtype)
        with precision.no_autocast(mem.device.type):
            mem = mem.to(dtype).contiguous()  # the kernels' layout, made once for every step that reuses it
            keys = mem if self.attention == "dot" else mem @ self.memory_weight.to(dtype).T
        return DecoderMemory(mem, keys, memory_mask)

    @staticmethod
    def _compute_dtype(dtype):
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, inputs: torch.Tensor, memory, memory_mask: torch.Tensor | None = None, state=None,
                batch_first: bool = False):
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"fastrnn: inputs must be a tensor, got {type(inputs).__name__}")
        unbatched = inputs.dim() == 2
        if unbatched:
            inputs = inputs.unsqueeze(0 if batch_first else 1)
            state = None if state is None else _map(state, lambda s: s.unsqueeze(-2))
        if inputs.dim() != 3:
            raise ValueError(f"fastrnn: AttentionDecoder: expected inputs to be 2-D or 3-D, got {inputs.dim()}-D")
        if isinstance(memory, DecoderMemory):
            mem = memory
            if memory_mask is not None:
                raise ValueError("fastrnn: memory is a DecoderMemory, so memory_mask must be None (the mask goes to "
                                 "prepare_memory); pass the state by keyword: step(input, prepared, state=state)")
        else:
            if unbatched and isinstance(memory, torch.Tensor) and memory.dim() != 2:
                raise ValueError("fastrnn: unbatched inputs [T, I] need an unbatched memory [S, M]")
            mem = self.prepare_memory(memory, memory_mask, batch_first)
        x = inputs.transpose(0, 1) if batch_first else inputs  # [T, B, I]
        out, attn, state = self._run(x, mem, state)
        if batch_first:
            out, attn = out.transpose(0, 1), attn.transpose(0, 1)
        if unbatched:
            out, attn = out.squeeze(1 - int(batch_first)), attn.squeeze(1 - int(batch_first))
            state = _map(state, lambda s: s.squeeze(-2))
        return out, attn, state

    def step(self, input: torch.Tensor, memory, memory_mask: torch.Tensor | None = None, state=None):
        """One decoder step: input [B, I] (unbatched [I]) -> (output [B, H], attention [B, S], state)."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"fastrnn: input must be a tensor, got {type(input).__name__}")
        out, attn, state = self.forward(input.unsqueeze(0), memory, memory_mask, state)
        return out[0], attn[0], state

    def _run(self, x, mem: DecoderMemory, state):
        T, B, I = x.shape
        if I != self.input_size:
            raise RuntimeError(f"fastrnn: input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {I}")
        if mem.memory.shape[0] != B:
            raise RuntimeError(f"fastrnn: inputs have batch {B} but memory has batch {mem.memory.shape[0]}")
        if not x.is_floating_point():
            raise RuntimeError(f"fastrnn: inputs must be floating point, got {x.dtype}")
        if x.device != mem.memory.device:
            raise RuntimeError(f"fastrnn: inputs are on {x.device}, memory on {mem.memory.device}")
        if T == 0:
            raise RuntimeError("fastrnn: AttentionDecoder needs at least one step (T >= 1)")
        if mem.memory.shape[1] == 0:
            raise RuntimeError("fastrnn: AttentionDecoder needs a memory of at least one step (S >= 1)")
        dtype = self._compute_dtype(x.dtype)
        if mem.memory.dtype != dtype:
            raise RuntimeError(f"fastrnn: inputs compute in {dtype} but the memory was prepared in "
                               f"{mem.memory.dtype}")
        h0, c0, feed0 = self._initial_state(state, B, x)
        autocast = torch.is_autocast_enabled(x.device.type) if x.device.type in ("cpu", "cuda") else False
        with precision.no_autocast(x.device.type) if autocast else contextlib.nullcontext():
            out, attn, h_n, c_n = self._fused(x.to(dtype), mem, h0, c0, feed0, dtype)
        if x.dtype != dtype:
            out, attn, h_n, c_n = (t.to(x.dtype) if t is not None else None for t in (out, attn, h_n, c_n))
        feed_n = out[-1]
        if self.cell == "lstm":
            return out, attn, ((h_n, c_n, feed_n) if self.input_feeding else (h_n, c_n))
        return out, attn, ((h_n, feed_n) if self.input_feeding else h_n)

    def _fused(self, x, mem: DecoderMemory, h0, c0, feed0, dtype):
        """The op on the module's weights: layer 0's input projection for all T steps as one GEMM
        (``xw``), the other weights stacked per layer, dropout masks drawn here."""
        T, B, I = x.shape
        H, L = self.hidden_size, self.num_layers
        w = lambda name: _as(getattr(self, name), dtype)  # noqa: E731
        w_ih0, b_ih0 = w("weight_ih_l0"), w("bias_ih_l0")
        h0, c0, feed0 = (None if t is None else _as(t, dtype) for t in (h0, c0, feed0))
        w_feed = None
        if T == 1 and self.input_feeding:
            # one step (decoding): the fed-back state is known before the call, so layer 0's whole
            # input projection is one GEMM over the contiguous weight_ih_l0 (a GEMV over a column
            # slice costs twice as much) and the kernel gets no W_feed product
            xw = torch.addmm(b_ih0, torch.cat([x[0], feed0], 1), w_ih0.T).unsqueeze(0)
        else:
            xw = torch.addmm(b_ih0, x.reshape(T * B, I), w_ih0[:, :I].T).view(T, B, -1)
            if self.input_feeding:
                w_feed = w_ih0[:, I:]  # a column slice: the kernels take its row stride
        G = xw.shape[2]
        if L > 1:
            w_in = torch.stack([w(f"weight_ih_l{k}") for k in range(1, L)])
            b_in = torch.stack([w(f"bias_ih_l{k}") for k in range(1, L)])
        else:
            w_in, b_in = xw.new_empty(0, G, H), xw.new_empty(0, G)
        params = DecoderParams(
            w_feed, w_in, b_in, _stack([w(f"weight_hh_l{k}") for k in range(L)]),
            _stack([w(f"bias_hh_l{k}") for k in range(L)]),
            *((w("query_weight"), w("query_bias"), w("score_weight")) if self.attention == "additive"
              else (None, None, None)),
            w("output_weight"))
        drop = None
        if self.training and self.dropout > 0 and L > 1:
            keep = 1.0 - self.dropout
            drop = (torch.empty(T, L - 1, B, H, dtype=dtype, device=x.device).bernoulli_(keep) / keep
                    if keep > 0 else xw.new_zeros(T, L - 1, B, H))
        backend, _ = backends.plan(self.backend, x.device, "decoder", dtype)
        return decoder_op(backend, self.cell, xw, mem.keys, mem.memory, mem.mask, params, h0, c0, feed0, drop)

    def _initial_state(self, state, B, x):
        """(h0 [L, B, H], c0 [L, B, H] | None, feed0 [B, H]) from the user's state (None: zeros)."""
        L, H = self.num_layers, self.hidden_size
        lstm, feeding = self.cell == "lstm", self.input_feeding
        zeros = lambda *s: x.new_zeros(*s, dtype=self._compute_dtype(x.dtype))  # noqa: E731
        if state is None:
            return zeros(L, B, H), zeros(L, B, H) if lstm else None, zeros(B, H)
        parts = list(state) if isinstance(state, (tuple, list)) else [state]
        names = ["h"] + (["c"] if lstm else []) + (["feed"] if feeding else [])
        if len(parts) != len(names) or (len(names) == 1 and not isinstance(state, torch.Tensor)):
            want = "a tensor h" if len(names) == 1 else "a tuple (" + ", ".join(names) + ")"
            raise ValueError(f"fastrnn: the state of this decoder is {want}")
        got = dict(zip(names, parts))
        if feeding and got["feed"] is None:  # a bridge from the encoder gives h (and c) only
            got["feed"] = zeros(B, H).to(x.dtype)
        for name, t in got.items():
            shape = (B, H) if name == "feed" else (L, B, H)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"fastrnn: state {name} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise RuntimeError(f"fastrnn: expected state {name} of size {list(shape)}, got {list(t.shape)}")
            if t.device != x.device:
                raise RuntimeError(f"fastrnn: state {name} is on {t.device}, inputs on {x.device}")
            if t.dtype != x.dtype:
                raise RuntimeError(f"fastrnn: state {name} has dtype {t.dtype}, expected {x.dtype} (the inputs')")
        return got["h"], got.get("c"), got["feed"] if feeding else zeros(B, H)


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def _stack(tensors):
    """torch.stack, without its copy for one tensor (a one-layer decoder's step calls would
    otherwise copy every recurrent weight at each step)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _map(state, fn):
    if isinstance(state, torch.Tensor):
        return fn(state)
    return type(state)(fn(s) for s in state)
