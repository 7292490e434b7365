"""Small calls: one plain cell step (``LSTMCell`` / ``GRUCell`` / ``RNNCell``, T = 1 layers) in one
kernel call each way, in eager mode.

Why a path of its own: a streaming decoder or an RL policy calls a cell thousands of times at
batch 1-8, where the arithmetic takes a few microseconds. Through the general path (the
functional checks, the precision plan, the layer op at T = 1 with its autograd formula, the
backend wrapper's checks, three kernel calls) a 64-wide LSTM cell step took ~90 us without
gradients and ~460 us with its backward, against torch's ~22 and ~140
(bench/results/small_calls_cpu.md). Here the backend's ``cell_step`` checks the arguments and
runs the input projection, the recurrent product and the gate math in one call, and, when a
gradient is needed, attaches its own autograd node (C++ for cpp), whose backward computes every
gradient in one more call: no Python between the user's code and the kernels either way.

The path takes a call only when it can run it exactly as the general path would: eager mode (not
under ``torch.compile``, which sees the registered op, nor torch.func transforms, which need the
op's vmap rules, nor a dispatch or function mode or the TorchScript tracer, which must see every
op), autocast off, plain tensors (no subclass), a backend that has ``cell_step`` (cpp), and
arguments that ``cell_step`` accepts (it returns ``[]`` for anything but one dtype among float32 /
float64 / bfloat16 (where the cpp bf16 GEMMs run), dense CPU memory holding the values as they
are, contiguous, well-formed sizes). Every other call, and every call with a variant option, takes
the general path, which validates it and raises torch's errors. The kernels are the layer's
(csrc/rnn.cpp at T = 1), so the numbers are the same bit for bit.

Double backward (``create_graph=True``): the node calls ``create_graph_backward`` below, which
recomputes the step with the reference backend's equations under autograd, as the layer op's
``rnn_layer_bwd`` does, so the gradients can be differentiated again.
"""
from __future__ import annotations

import torch

from .. import backends
from .profiling import kernel_range

_wired: set = set()  # backends whose create_graph backward is registered
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _interposed() -> bool:
    """Whether something must see every op the call runs: a TorchDispatchMode or TorchFunctionMode
    (FakeTensorMode, FlopCounterMode, a user's logging mode) or the TorchScript tracer."""
    return bool(torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
                or torch._C._get_tracing_state())


def step(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend):
    """``(h' [B, H], c' [B, H] | None)`` of one plain step, or None when this path does not take
    the call (the caller then runs the general path). Shapes: input [B, I], hx [B, H], cx [B, H]
    (LSTM) or None, w_ih [G, I], w_hh [G, H], b_ih / b_hh [G] or None."""
    if (torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling()
            or torch.is_autocast_enabled("cpu") or _interposed()):
        return None
    # plain tensors only: a subclass (FakeTensor, DTensor, a user's __torch_function__ type) must
    # see the registered op, which this path does not call
    if not (type(input) in _PLAIN and type(hx) in _PLAIN and type(w_ih) in _PLAIN and type(w_hh) in _PLAIN
            and (cx is None or type(cx) in _PLAIN) and (b_ih is None or type(b_ih) in _PLAIN)
            and (b_hh is None or type(b_hh) in _PLAIN)):
        return None
    try:
        impl = backends.resolve(backend, input.device, "rnn")
    except RuntimeError:
        return None  # the general path raises it, after its argument checks
    if not hasattr(impl, "cell_step"):
        return None
    if impl not in _wired:
        impl.set_create_graph_backward(create_graph_backward)
        _wired.add(impl)
    with kernel_range(f"fastrnn::{cell}_cell_fwd[{impl.name}]", input.device):
        out = impl.cell_step(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    return (out[0], out[1]) if out else None


def create_graph_backward(cell, x, hx, cx, w_ih, w_hh, b_ih, b_hh, needs, grad_h, grad_c):
    """The step's gradients (those ``needs`` asks for; 7 flags in the argument order) through
    the reference equations, built under autograd so they can be differentiated again: what the
    backend's autograd node calls when the backward runs with ``create_graph=True``."""
    args = (x, hx, cx, w_ih, w_hh, b_ih, b_hh)
    with torch.enable_grad():
        _, h, c, _ = backends.load("torch", "rnn").rnn_forward(
            cell, _input_projection(x, w_ih, b_ih), w_hh, b_hh, hx, cx, None, None, False, False)
    outs = [(o, g) for o, g in ((h, grad_h), (c, grad_c)) if o is not None and g is not None]
    wanted = [t for t, need in zip(args, needs) if need]
    got = iter(torch.autograd.grad([o for o, _ in outs], wanted, [g for _, g in outs], create_graph=True,
                                   allow_unused=True) if outs else [None] * len(wanted))
    grads = []
    for t, need in zip(args, needs):
        g = next(got) if need else None
        grads.append(torch.zeros_like(t) if need and g is None else g)
    return grads


def _input_projection(x, w_ih, b_ih):
    """xw [1, B, G] = x W_ih^T + b_ih, differentiable (the reference backend takes it given)."""
    xw = x @ w_ih.t()
    return (xw if b_ih is None else xw + b_ih).unsqueeze(0)
