"""One autograd path for every attention backend (contract: ``fastrnn/backends/reference_sdpa.py``).

The user function (``fastrnn.attention.scaled_dot_product_attention``) validates and flattens
torch's broadcasting into the contract's shapes; this module runs the chosen backend's forward,
saves ``(q, k, v, out, lse)`` -- O(L) beyond the inputs and output -- and calls its backward.
The dropout seed travels with the op, so backward regenerates the same mask.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import backends
from .profiling import kernel_range


class SdpaMask(NamedTuple):
    """Additive mask in contract form: ``bias`` [Nm, L, S] (broadcast view allowed, stride along
    S 0 or 1), ``rows`` [N] int64: query row ``n`` uses ``bias[rows[n]]``."""
    bias: torch.Tensor
    rows: torch.Tensor


class _SDPA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, q, k, v, bias, rows, scale, causal, dropout_p, seed):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        mask = SdpaMask(bias, rows) if bias is not None else None
        with kernel_range(f"fastrnn::sdpa_fwd[{impl.name}]", q.device):
            out, lse = impl.sdpa_forward(q, k, v, mask, scale, causal, dropout_p, seed)
        ctx.impl, ctx.scale, ctx.causal, ctx.dropout_p, ctx.seed = impl, scale, causal, dropout_p, seed
        ctx.save_for_backward(q, k, v, out, lse, bias, rows)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, bias, rows = ctx.saved_tensors
        mask = SdpaMask(bias, rows) if bias is not None else None
        args = (grad_out.contiguous(), q, k, v, out, lse, mask, ctx.scale, ctx.causal,
                ctx.dropout_p, ctx.seed)
        need = ctx.needs_input_grad
        grad_q = grad_k = grad_v = grad_bias = None
        if any(need[1:4]):
            with kernel_range(f"fastrnn::sdpa_bwd[{ctx.impl.name}]", q.device):
                grad_q, grad_k, grad_v = ctx.impl.sdpa_backward(*args)
        if need[4]:
            # A float mask that requires grad: d(loss)/d(bias) is the full [N, L, S] score
            # gradient, O(L*S) by nature, so it is computed by the reference, blockwise.
            with kernel_range("fastrnn::sdpa_bwd_mask[torch]", q.device):
                grad_bias = backends.load("torch", "sdpa").sdpa_grad_bias(*args)
        return (None, grad_q if need[1] else None, grad_k if need[2] else None,
                grad_v if need[3] else None, grad_bias, None, None, None, None, None)


def sdpa(impl, q, k, v, mask: SdpaMask | None, scale: float, causal: bool, dropout_p: float,
         seed: int):
    """Attention on contract shapes (q [N, L, E], k [Nk, S, E], v [Nk, S, Ev]) through backend
    module ``impl``; returns ``out`` [N, L, Ev]. Empty problems go to the reference backend."""
    if min(q.shape + k.shape[1:] + v.shape[2:]) == 0:
        impl = backends.load("torch", "sdpa")
    bias, rows = mask if mask is not None else (None, None)
    out, _ = _SDPA.apply(impl, q, k, v, bias, rows, scale, causal, dropout_p, seed)
    return out
