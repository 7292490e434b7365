"""One autograd path for every recurrence backend: one layer, one direction, whole sequence.

The input projection ``xw = x W_ih^T + b_ih`` for all T steps and the weight gradients
``dW_ih = grad_xw^T x``, ``dW_hh = grad_hw^T h_prev`` are single large GEMMs here; the backend
runs only the sequential part (the time loop with its small GEMM and fused cell step).

A backend may also provide the big GEMMs themselves (``linear(x, w, b)``, ``mm(a, b)``,
``mm_tn(a, b) = a^T b``) when it has a faster GEMM than torch's on its device: the cpp backend
does (oneDNN's brgemm runs ~1.8x faster than MKL's sgemm on AMD CPUs). Otherwise torch does them.
"""
from __future__ import annotations

import torch

from .. import backends
from .profiling import kernel_range
from .recurrence import previous_states


def _linear(impl, x, w, b):
    if hasattr(impl, "linear"):
        return impl.linear(x, w, b)
    return torch.addmm(b, x, w.t()) if b is not None else x @ w.t()


def _mm(impl, a, b):
    return impl.mm(a, b) if hasattr(impl, "mm") else a @ b


def _mm_tn(impl, a, b):
    """a [K, M], b [K, N] -> a^T b (weight gradients: K = T*B)."""
    return impl.mm_tn(a, b) if hasattr(impl, "mm_tn") else a.t() @ b


def _input_projection(impl, x, w_ih, b_ih):
    """x [T, B, I] -> xw [T, B, G] as one GEMM over all T*B rows (a fresh tensor the backend owns)."""
    T, B, I = x.shape
    return _linear(impl, x.reshape(T * B, I), w_ih, b_ih).view(T, B, w_ih.shape[0])


class _RNNLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes, reverse):
        xw = _input_projection(impl, x, w_ih, b_ih)
        with kernel_range(f"fastrnn::{cell}_layer_fwd[{impl.name}]", x.device):
            h_seq, h_T, c_T, saved = impl.rnn_forward(
                cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, True)
        ctx.impl, ctx.cell, ctx.reverse, ctx.batch_sizes = impl, cell, reverse, batch_sizes
        ctx.has_b_ih, ctx.has_b_hh = b_ih is not None, b_hh is not None
        ctx.n_saved = len(saved)
        ctx.save_for_backward(x, w_ih, w_hh, w_hr, h0, c0, h_seq, *saved)
        if cell == "lstm":
            return h_seq, h_T, c_T
        return h_seq, h_T

    @staticmethod
    def backward(ctx, grad_h_seq, grad_h_T, grad_c_T=None):
        x, w_ih, w_hh, w_hr, h0, c0, h_seq, *saved = ctx.saved_tensors
        impl, cell = ctx.impl, ctx.cell
        T, B, I = x.shape
        with kernel_range(f"fastrnn::{cell}_layer_bwd[{impl.name}]", x.device):
            grad_xw, grad_hw, grad_h0, grad_c0, grad_w_hr = impl.rnn_backward(
                cell, grad_h_seq.contiguous(), grad_h_T.contiguous(),
                grad_c_T.contiguous() if grad_c_T is not None else None,
                w_hh, w_hr, h0, c0, ctx.batch_sizes, ctx.reverse, tuple(saved))
        need = ctx.needs_input_grad
        G, Hr = w_hh.shape
        gx = grad_xw.reshape(T * B, G)
        gh = grad_hw.reshape(T * B, G)
        grad_x = _mm(impl, gx, w_ih).view(T, B, I) if need[2] else None
        grad_w_ih = _mm_tn(impl, gx, x.reshape(T * B, I)) if need[3] else None
        grad_w_hh = None
        if need[4]:
            h_prev = previous_states(h_seq, h0, ctx.batch_sizes, ctx.reverse)
            grad_w_hh = _mm_tn(impl, gh, h_prev.reshape(T * B, Hr))
        grad_b_ih = gx.sum(0) if ctx.has_b_ih and need[5] else None
        grad_b_hh = gh.sum(0) if ctx.has_b_hh and need[6] else None
        return (None, None, grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh,
                grad_h0 if need[7] else None, grad_c0 if need[8] else None,
                grad_w_hr if need[9] else None, None, None)


def rnn_layer(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, w_hr=None, batch_sizes=None,
              reverse=False, backend=None):
    """One layer and direction of an RNN over a whole (padded) sequence.

    x [T, B, I]; w_ih [G, I]; w_hh [G, Hr]; b_ih, b_hh [G] or None; h0 [B, Hr];
    c0 [B, H] (LSTM) or None; w_hr [Hr, H] or None; batch_sizes [T] (int64, CPU, descending)
    or None. Returns ``(h_seq [T, B, Hr], h_T [B, Hr], c_T [B, H] | None)``.
    """
    impl = backends.resolve(backend, x.device, "rnn")
    tensors = (x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out = _RNNLayer.apply(impl, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes, reverse)
        return out if cell == "lstm" else (out[0], out[1], None)
    xw = _input_projection(impl, x, w_ih, b_ih)
    with kernel_range(f"fastrnn::{cell}_layer_fwd[{impl.name}]", x.device):
        h_seq, h_T, c_T, _ = impl.rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, False)
    return h_seq, h_T, c_T

