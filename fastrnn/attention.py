"""Fused scaled-dot-product attention: a drop-in for ``F.scaled_dot_product_attention``, and a
Luong-style ``Attention`` module for RNN sequence-to-sequence decoders.

The user function validates like torch, then flattens torch's broadcasting into the backend
contract (``fastrnn/backends/reference_sdpa.py``):

- leading dims of q, k, v broadcast to one batch shape and are flattened to ``N`` (query) and
  ``Nk`` (key/value) rows. With ``enable_gqa`` and key/value heads dividing the query heads the
  grouping stays implicit (``N = G * Nk``, no copy of k, v); other broadcasts are materialised
  with ``expand().reshape()`` (autograd sums their gradients back).
- a bool mask becomes an additive one (True -> 0, False -> -inf) in the compute dtype; its own
  batch dims are flattened to ``Nm`` rows and ``rows[n]`` says which one each query row uses, so
  a key-padding mask ``[B, 1, 1, S]`` or a shared ``[L, S]`` mask is never copied per head.
- dtypes the backend does not compute in (float16 / bfloat16 on CPU) run in float32 and are cast
  back.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import backends, precision
from .contract.sdpa import SdpaMask
from .ops.attention import sdpa


def _check_inputs(query, key, value, attn_mask, dropout_p, is_causal):
    """The checks torch 2.13 makes, with the same exception types."""
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(
            "Expected query, key, and value to have the same dtype, but got query.dtype: "
            f"{query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead.")
    if not (query.device == key.device == value.device):
        raise RuntimeError(
            "Expected query, key, and value to have the same device type, but got query.device: "
            f"{query.device} key.device: {key.device} and value.device: {value.device} instead.")
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise RuntimeError(
            "Expected query, key, and value to all be at least 2 dimensional, but got query.dim: "
            f"{query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead.")
    if not query.is_floating_point():
        raise RuntimeError(f"expected scalar type Float but found {query.dtype}")
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise RuntimeError(
                "Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                f"attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype} instead.")
        if attn_mask.device != query.device:
            # torch 2.13's CPU kernels read a mask on another device (a meta mask gives uninitialised
            # memory back); its CUDA path refuses. Refuse everywhere.
            raise RuntimeError(f"Expected attn_mask to be on the device of query ({query.device}), but got "
                               f"attn_mask.device: {attn_mask.device}")
        if is_causal:
            # torch 2.13 raises this on its math path (bool and float masks alike); its CPU flash path
            # (4-D, E == Ev) instead applies both. One rule here: torch's documented one.
            raise RuntimeError(
                "_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    if dropout_p > 1:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if key.shape[-1] != query.shape[-1]:
        raise RuntimeError(f"fastrnn sdpa: query has E={query.shape[-1]} but key has E={key.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise RuntimeError(f"fastrnn sdpa: key has S={key.shape[-2]} but value has S={value.shape[-2]}")


def _flatten_kv(query, key, value, enable_gqa):
    """Broadcast batch shape, and k, v as [Nk, S, *] with the implicit GQA group G = N // Nk."""
    qb, kb, vb = query.shape[:-2], key.shape[:-2], value.shape[:-2]
    if enable_gqa:
        Hq, Hk, Hv = query.size(-3), key.size(-3), value.size(-3)  # IndexError below 3-D, as torch
        if Hq % Hk or Hq % Hv:
            raise RuntimeError("Number of heads in key and value must divide the number of heads in query")
        kb, vb = kb[:-1] + (Hq,), vb[:-1] + (Hq,)
    batch = torch.broadcast_shapes(qb, kb, vb)
    S = key.shape[-2]
    if enable_gqa and Hk == Hv and Hk < Hq and all(
            t.shape[:-3] == batch[:-1] for t in (key, value)):
        # grouped heads stay implicit: query head h uses key head h // G (torch's repeat_interleave)
        Nk = math.prod(batch[:-1]) * Hk
        return batch, key.reshape(Nk, S, key.shape[-1]), value.reshape(Nk, S, value.shape[-1])
    if enable_gqa:
        key = key.repeat_interleave(Hq // Hk, -3)
        value = value.repeat_interleave(Hq // Hv, -3)
    N = math.prod(batch)
    key = key.expand(batch + key.shape[-2:]).reshape(N, S, key.shape[-1])
    value = value.expand(batch + value.shape[-2:]).reshape(N, S, value.shape[-1])
    return batch, key, value


def _flatten_mask(attn_mask, batch, L, S, dtype):
    """attn_mask broadcastable to batch + [L, S] -> SdpaMask(bias [Nm, L, S], rows [N])."""
    target = batch + (L, S)
    try:
        fits = attn_mask.dim() <= len(target) and torch.broadcast_shapes(attn_mask.shape, target) == target
    except RuntimeError:  # torch's own message names neither the mask nor the attention shape
        fits = False
    if not fits:
        raise RuntimeError(f"fastrnn sdpa: attn_mask of shape {tuple(attn_mask.shape)} does not "
                           f"broadcast to the attention shape {target}")
    m = attn_mask.reshape((1,) * (len(target) - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.dtype == torch.bool:
        # out of place: works under vmap
        m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
    else:
        m = m.to(dtype)
    mb = m.shape[:-2]
    bias = m.reshape(math.prod(mb), *m.shape[-2:]).contiguous().expand(-1, L, S)
    rows = torch.arange(bias.shape[0], device=m.device).view(mb).expand(batch).reshape(-1)
    return SdpaMask(bias, rows)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, backend=None):
    """``F.scaled_dot_product_attention`` with a fused flash kernel (torch 2.13 semantics).

    query [..., L, E], key [..., S, E], value [..., S, Ev] (leading dims broadcast; with
    ``enable_gqa`` dim -3 is heads and key/value heads may divide query heads); attn_mask
    broadcastable to [..., L, S], bool (True = take part) or float (added to the scores);
    ``is_causal`` top-left aligned; ``scale`` defaults to 1/sqrt(E); ``dropout_p`` is applied
    whenever > 0 (as torch: pass 0.0 in eval), seeded from torch's default generator.
    Returns [..., L, Ev]. ``backend`` as everywhere in fastrnn (None: automatic).
    """
    _check_inputs(query, key, value, attn_mask, dropout_p, is_causal)
    # torch's autocast runs SDPA in the autocast dtype (fastrnn.precision); a dtype the backend
    # does not compute in runs in float32 and is cast back. plan() is a constant to torch.compile.
    want = precision.autocast_dtype("sdpa", query.device.type)
    result = want if want is not None and query.dtype != torch.float64 else query.dtype
    name, dtype = backends.plan(backend, query.device, "sdpa", result)
    if want is not None:  # autocast casts every floating input (a float mask too)
        query, key, value, attn_mask = precision.cast((query, key, value, attn_mask), want)
    L, E = query.shape[-2:]
    S, Ev = key.shape[-2], value.shape[-1]
    batch, k3, v3 = _flatten_kv(query, key, value, enable_gqa)
    q3 = query.expand(batch + (L, E)).reshape(math.prod(batch), L, E)
    mask = _flatten_mask(attn_mask, batch, L, S, dtype) if attn_mask is not None else None
    # E = 0: every score is an empty sum, 0 at any finite scale (torch returns the mean of v), not 1/0
    scale = (1.0 / math.sqrt(E) if E > 0 else 1.0) if scale is None else float(scale)
    p = float(dropout_p) if dropout_p > 0 else 0.0
    # a tensor, not a Python int: drawing it is then part of a compiled graph, not a graph break
    seed = torch.randint(0, 2 ** 32, ()) if 0 < p < 1 else None
    with precision.no_autocast(query.device.type):
        out = sdpa(name, q3.to(dtype), k3.to(dtype), v3.to(dtype), mask, scale, bool(is_causal),
                   p if p < 1 else 0.0, seed)
        if p >= 1:
            out = out * 0.0  # every weight dropped (torch returns zeros; NaN still propagates)
    return out.to(result).view(batch + (L, Ev))


class Attention(nn.Module):
    r"""Luong attention for RNN encoder-decoders, on the fused kernel.

    ``context, weights = attn(decoder_states, encoder_states, encoder_mask=None, need_weights=False)``

    decoder_states [..., L, H] (queries, e.g. a decoder GRU's outputs), encoder_states [..., S, H]
    (keys and values); leading dims broadcast. Scores (Luong et al. 2015, section 3.1)::
        dot         score(h_t, h_s) = h_t . h_s
        general     score(h_t, h_s) = h_t . (W_a h_s)       W_a = ``self.weight`` [H, H]
        scaled_dot  score(h_t, h_s) = h_t . h_s / sqrt(H)
    ``a_t = softmax(score)`` over the encoder positions, ``context_t = sum_s a_ts h_s``.
    encoder_mask: bool [..., S] (True = a real encoder position, False = padding), or anything
    ``attn_mask`` of ``scaled_dot_product_attention`` accepts for [..., L, S]. A decoder step that
    sees no encoder position gets a zero context (as torch's SDPA).
    Returns ``context`` [..., L, H] and, when ``need_weights``, ``weights`` [..., L, S]: computed
    separately with plain torch ops, O(L*S) memory -- the context itself never materialises them.
    The attentional state of Luong's eq. 5, ``tanh(W_c [context; h_t])``, is left to the caller.
    """

    SCORES = ("dot", "general", "scaled_dot")

    def __init__(self, hidden_size: int, score: str = "dot", backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        if score not in self.SCORES:
            raise ValueError(f"fastrnn.Attention: score must be one of {self.SCORES}, got {score!r}")
        self.hidden_size, self.score = hidden_size, score
        self.backend = backends.check_name(backend)
        if score == "general":
            self.weight = nn.Parameter(torch.empty(hidden_size, hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:  # as nn.Linear(hidden_size, hidden_size, bias=False)
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, score={self.score!r}"

    def forward(self, decoder_states, encoder_states, encoder_mask=None, need_weights: bool = False):
        for name, t in (("decoder_states", decoder_states), ("encoder_states", encoder_states)):
            if t.dim() < 2 or t.shape[-1] != self.hidden_size:
                raise ValueError(f"fastrnn.Attention: {name} must be [..., {self.hidden_size}] with at "
                                 f"least 2 dims, got {tuple(t.shape)}")
        keys = encoder_states @ self.weight.t() if self.weight is not None else encoder_states
        scale = 1.0 / math.sqrt(self.hidden_size) if self.score == "scaled_dot" else 1.0
        mask = encoder_mask
        if mask is not None and mask.dim() == encoder_states.dim() - 1:
            mask = mask.unsqueeze(-2)  # [..., S] -> [..., 1, S]: the same for every decoder step
        context = scaled_dot_product_attention(decoder_states, keys, encoder_states, attn_mask=mask,
                                               scale=scale, backend=self.backend)
        weights = None
        if need_weights:
            scores = (decoder_states @ keys.transpose(-1, -2)) * scale
            if mask is not None:
                scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                          else scores + mask)
            hidden = scores.amax(-1, keepdim=True) == float("-inf")  # no visible position
            weights = torch.softmax(scores, -1).masked_fill(hidden, 0.0)  # 0, as the context
        return context, weights
