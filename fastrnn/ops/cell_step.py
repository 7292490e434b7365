"""Small calls: one plain cell step (``LSTMCell`` / ``GRUCell`` / ``RNNCell``, T = 1 layers) in one
kernel call each way, in eager mode.

Why a path of its own: a streaming decoder or an RL policy calls a cell thousands of times at
batch 1-8, where the arithmetic takes a few microseconds. Through the general path (the
functional checks, the precision plan, the layer op at T = 1 with its autograd formula, the
backend wrapper's checks, three kernel calls) a 64-wide LSTM cell step took ~90 us without
gradients and ~460 us with its backward, against torch's ~22 and ~140
(bench/results/small_calls_cpu.md). Here the backend's ``cell_forward`` checks the arguments
and runs the input projection, the recurrent product and the gate math in one call, and a
classic ``autograd.Function`` calls ``cell_backward`` for every gradient in one more.

The path takes a call only when it can run it exactly as the general path would: eager mode
(not under ``torch.compile``, which sees the registered op, nor torch.func transforms, which need
the op's vmap rules), autocast off, a backend that has ``cell_forward`` (cpp), and arguments that
``cell_forward`` accepts (it returns ``[]`` for anything but one dtype among float32 / float64,
CPU, contiguous, well-formed sizes). Every other call, and every call with a variant option,
takes the general path, which validates it and raises torch's errors. The kernels are the
layer's (csrc/rnn.cpp at T = 1), so the numbers are the same bit for bit.

Double backward (``create_graph=True``): the gradients are recomputed from the reference
backend's equations under autograd (``rnn_layer._reference_layer``), as the layer op's
``rnn_layer_bwd`` does, so they can be differentiated again.
"""
from __future__ import annotations

import torch

from .. import backends
from ..contract.rnn import Variant
from .profiling import kernel_range
from .rnn_layer import _reference_layer


def step(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend):
    """``(h' [B, H], c' [B, H] | None)`` of one plain step, or None when this path does not take
    the call (the caller then runs the general path). Shapes: input [B, I], hx [B, H], cx [B, H]
    (LSTM) or None, w_ih [G, I], w_hh [G, H], b_ih / b_hh [G] or None."""
    if (torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling()
            or torch.is_autocast_enabled("cpu")):
        return None
    try:
        impl = backends.resolve(backend, input.device, "rnn")
    except RuntimeError:
        return None  # the general path raises it, after its argument checks
    if not hasattr(impl, "cell_forward"):
        return None
    args = (input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    # weights first: in training they require grad, and the test ends there
    grad = torch.is_grad_enabled() and (w_ih.requires_grad or w_hh.requires_grad or any(
        t is not None and t.requires_grad for t in args))
    with kernel_range(f"fastrnn::{cell}_cell_fwd[{impl.name}]", input.device):
        out = impl.cell_forward(cell, *args, grad)
    if not out:
        return None
    if grad:
        return _Step.apply(cell, impl, out, *args)
    return out[0], out[1]


class _Step(torch.autograd.Function):
    """Autograd of one step whose forward already ran (``out``: what ``cell_forward`` returned,
    so that a call this path turns down costs nothing more): saves the inputs and the kernel's
    saved tensors, and hands every gradient to ``cell_backward`` in one call."""

    @staticmethod
    def forward(ctx, cell, impl, out, x, hx, cx, w_ih, w_hh, b_ih, b_hh):
        ctx.cell, ctx.impl = cell, impl
        ctx.save_for_backward(x, hx, cx, w_ih, w_hh, b_ih, b_hh, *out[2:])
        return out[0], out[1]

    @staticmethod
    def backward(ctx, grad_h, grad_c):
        x, hx, cx, w_ih, w_hh, b_ih, b_hh, *saved = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[3:])
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            grads = _differentiable_grads(ctx.cell, (x, hx, cx, w_ih, w_hh, b_ih, b_hh), needs, grad_h, grad_c)
        else:
            with kernel_range(f"fastrnn::{ctx.cell}_cell_bwd[{ctx.impl.name}]", x.device):
                grads = ctx.impl.cell_backward(ctx.cell, grad_h, grad_c, x, hx, cx, w_ih, w_hh, saved, needs)
        return (None, None, None, *grads)


def _differentiable_grads(cell, args, needs, grad_h, grad_c):
    """The step's gradients through the reference equations, built under autograd."""
    x, hx, cx, w_ih, w_hh, b_ih, b_hh = args
    with torch.enable_grad():
        _, h, c = _reference_layer("", cell, x.unsqueeze(0), w_ih, w_hh, b_ih, b_hh, hx, cx, None, None, False,
                                   None, None, *Variant())
    outs = [(o, g) for o, g in ((h, grad_h), (c, grad_c)) if o is not None and g is not None]
    wanted = [t for t, need in zip(args, needs) if need]
    got = iter(torch.autograd.grad([o for o, _ in outs], wanted, [g for _, g in outs], create_graph=True,
                                   allow_unused=True))
    grads = []
    for t, need in zip(args, needs):
        g = next(got) if need else None
        grads.append(torch.zeros_like(t) if need and g is None else g)
    return grads
