"""One autograd path for every attention backend (contract: ``fastrnn/backends/reference_sdpa.py``),
registered as ``torch.ops.fastrnn`` ops (see ``fastrnn/ops/library.py``).

Ops (argument list: ``SDPA_ARGS``; backend ``""`` = automatic choice):
    fastrnn::sdpa(...)      -> out [N, L, Ev]                   differentiable
    fastrnn::sdpa_fwd(...)  -> (out, lse [N, L])                what backward needs
    fastrnn::sdpa_bwd(..., grad_out, out, lse, needs) -> [grad_q, grad_k, grad_v, grad_bias]

The user function (``fastrnn.attention.scaled_dot_product_attention``) validates and flattens
torch's broadcasting into the contract's shapes; the autograd formula saves
``(q, k, v, out, lse)`` -- O(L) beyond the inputs and output -- and calls the backend's backward.
The dropout seed is a tensor argument (drawn from torch's generator, so it is part of a compiled
graph too) and travels with the op, so backward regenerates the same mask.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import backends
from .library import backend_arg, below_autograd, define
from .profiling import kernel_range

SDPA_ARGS = ("str backend, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? rows, float scale, "
             "bool causal, float dropout_p, Tensor? seed")
N_ARGS = SDPA_ARGS.count(",") + 1
GRAD_POS = (1, 2, 3, 4)  # q, k, v, bias


class SdpaMask(NamedTuple):
    """Additive mask in contract form: ``bias`` [Nm, L, S] (broadcast view allowed, stride along
    S 0 or 1), ``rows`` [N] int64: query row ``n`` uses ``bias[rows[n]]``."""
    bias: torch.Tensor
    rows: torch.Tensor


def _impl(backend, q, k, v):
    # Empty problems go to the reference backend (the kernels assume at least one row and key).
    if min(q.shape + k.shape[1:] + v.shape[2:]) == 0:
        return backends.load("torch", "sdpa")
    return backends.resolve(backend or None, q.device, "sdpa")


def _contract(q, k, v, bias, rows, scale, causal, dropout_p, seed):
    mask = SdpaMask(bias, rows) if bias is not None else None
    return (q.contiguous(), k.contiguous(), v.contiguous(), mask, scale, causal, dropout_p,
            int(seed) if seed is not None else 0)


def _forward(backend, q, k, v, bias, rows, scale, causal, dropout_p, seed):
    impl = _impl(backend, q, k, v)
    with kernel_range(f"fastrnn::sdpa_fwd[{impl.name}]", q.device):
        out, lse = impl.sdpa_forward(*_contract(q, k, v, bias, rows, scale, causal, dropout_p, seed))
    return out, lse


def _backward(backend, q, k, v, bias, rows, scale, causal, dropout_p, seed, grad_out, out, lse, needs):
    impl = _impl(backend, q, k, v)
    q, k, v, mask, *flags = _contract(q, k, v, bias, rows, scale, causal, dropout_p, seed)
    args = (grad_out.contiguous(), q, k, v, out, lse, mask, *flags)
    grads = [None] * 4
    if any(needs[:3]):
        with kernel_range(f"fastrnn::sdpa_bwd[{impl.name}]", q.device):
            grads[:3] = impl.sdpa_backward(*args)
    if needs[3]:
        # A float mask that requires grad: d(loss)/d(bias) is the full [N, L, S] score
        # gradient, O(L*S) by nature, so it is computed by the reference, blockwise.
        with kernel_range("fastrnn::sdpa_bwd_mask[torch]", q.device):
            grads[3] = backends.load("torch", "sdpa").sdpa_grad_bias(*args)
    empty = q.new_empty(0)
    return [g if need else empty for g, need in zip(grads, needs)]


def _fake_forward(backend, q, k, v, bias, rows, scale, causal, dropout_p, seed):
    N, L, _ = q.shape
    return q.new_empty(N, L, v.shape[-1]), q.new_empty(N, L, dtype=torch.float32 if q.dtype in (
        torch.float16, torch.bfloat16) else q.dtype)


def _fake_backward(*args):
    needs, empty = args[-1], args[1].new_empty(0)
    return [torch.empty_like(args[pos]) if need else empty for pos, need in zip(GRAD_POS, needs)]


class _SDPA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        with below_autograd():
            out, lse = torch.ops.fastrnn.sdpa_fwd(*args)
        ctx.flags = (args[0], args[6], args[7], args[8])  # backend, scale, causal, dropout_p
        ctx.save_for_backward(*(None if isinstance(a, (str, float, bool)) else a for a in args), out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *args, out, lse = ctx.saved_tensors
        args[0], args[6], args[7], args[8] = ctx.flags
        needs = [ctx.needs_input_grad[pos] for pos in GRAD_POS]
        grads = torch.ops.fastrnn.sdpa_bwd(*args, grad_out, out, lse, needs)
        result = [None] * N_ARGS
        for pos, need, g in zip(GRAD_POS, needs, grads):
            if need:
                result[pos] = g
        return tuple(result)


def _sdpa_autograd(*args):
    if torch.is_grad_enabled() and any(args[p] is not None and args[p].requires_grad for p in GRAD_POS):
        return _SDPA.apply(*args)
    with below_autograd():
        return torch.ops.fastrnn.sdpa(*args)


define(f"sdpa_fwd({SDPA_ARGS}) -> (Tensor, Tensor)", _forward, _fake_forward)
define(f"sdpa_bwd({SDPA_ARGS}, Tensor grad_out, Tensor out, Tensor lse, bool[] needs) -> Tensor[]",
       _backward, _fake_backward)
define(f"sdpa({SDPA_ARGS}) -> Tensor", lambda *a: _forward(*a)[0], lambda *a: _fake_forward(*a)[0],
       _sdpa_autograd)


def sdpa(backend, q, k, v, mask: SdpaMask | None, scale: float, causal: bool, dropout_p: float,
         seed: torch.Tensor | None):
    """Attention on contract shapes (q [N, L, E], k [Nk, S, E], v [Nk, S, Ev]) through the
    backend named ``backend`` (None: automatic); ``seed`` a 0-dim int64 tensor or None (no
    dropout). Returns ``out`` [N, L, Ev]."""
    bias, rows = mask if mask is not None else (None, None)
    args = (backend_arg(backend), q, k, v, bias, rows, scale, causal, dropout_p, seed)
    # as fastrnn.ops.rnn_layer._call_layer: eager enters the autograd formula directly
    if torch.compiler.is_compiling():
        return torch.ops.fastrnn.sdpa(*args)
    return _sdpa_autograd(*args)
