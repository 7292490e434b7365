"""One autograd path for every recurrence backend: one layer, one direction, whole sequence,
registered as ``torch.ops.fastrnn`` ops (see ``fastrnn/ops/library.py``).

Ops (argument lists: ``LAYER_ARGS`` below; backend ``""`` = automatic choice):
    fastrnn::rnn_layer(...)     -> (h_seq [T,B,Hr], h_T [B,Hr], c_T [B,H] | [0])   differentiable
    fastrnn::rnn_cell(...)      -> (h' [B,Hr], c' [B,H] | [0])   the layer op at T = 1 (composite)
    fastrnn::rnn_layer_fwd(..., training) -> (h_seq, h_T, c_T, saved Tensor[])
    fastrnn::rnn_layer_bwd(..., grad_h_seq, grad_h_T, grad_c_T?, h_seq, saved, needs) -> grads
``c_T`` is an empty tensor for GRU / RNN (an op cannot return None).

The input projection ``xw = x W_ih^T + b_ih`` for all T steps (with ``layer_norm``:
``LN(x W_ih^T) + b_ih``) and the weight gradients ``dW_ih = grad_xw^T x``,
``dW_hh = grad_hw^T h_in`` are single large GEMMs here; the backend runs only the sequential
part (the time loop with its small GEMM and fused cell step; contract in ``reference_rnn``,
variants in docs/variants.md).

A backend may also provide the big GEMMs themselves (``linear(x, w, b)``, ``mm(a, b)``,
``mm_tn(a, b) = a^T b``) when it has a faster GEMM than torch's on its device: the cpp backend
does (oneDNN's brgemm runs ~1.8x faster than MKL's sgemm on AMD CPUs). Otherwise torch does them.
"""
from __future__ import annotations

import torch

from .. import backends
from .library import backend_arg, below_autograd, define, define_composite
from .profiling import kernel_range
from .recurrence import GATES, LN_EPS, Variant, is_plain, recurrent_inputs, saved_layout

# The variant fields in the op schemas, in Variant's order (reset_after follows as a bool).
VARIANT_TENSORS = Variant._fields[:-1]
LAYER_ARGS = ("str backend, str cell, Tensor x, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
              "Tensor? b_hh, Tensor h0, Tensor? c0, Tensor? w_hr, Tensor? batch_sizes, bool reverse, "
              "Tensor? ln_ih_weight, Tensor? ln_ih_bias, "
              + "".join(f"Tensor? {n}, " for n in VARIANT_TENSORS) + "bool reset_after")
N_ARGS = LAYER_ARGS.count(",") + 1
# Differentiable arguments: (position in LAYER_ARGS, name); rnn_layer_bwd returns the gradients
# of those its ``needs`` flags ask for, in this order.
GRAD_ARGS = ((2, "x"), (3, "w_ih"), (4, "w_hh"), (5, "b_ih"), (6, "b_hh"), (7, "h0"), (8, "c0"),
             (9, "w_hr"), (12, "ln_ih_weight"), (13, "ln_ih_bias"), (14, "ln_hh_weight"),
             (15, "ln_hh_bias"), (16, "ln_c_weight"), (17, "ln_c_bias"), (18, "peephole"))


def _linear(impl, x, w, b):
    if hasattr(impl, "linear"):
        return impl.linear(x, w, b)
    return torch.addmm(b, x, w.t()) if b is not None else x @ w.t()


def _mm(impl, a, b):
    return impl.mm(a, b) if hasattr(impl, "mm") else a @ b


def _mm_tn(impl, a, b):
    """a [K, M], b [K, N] -> a^T b (weight gradients: K = T*B)."""
    return impl.mm_tn(a, b) if hasattr(impl, "mm_tn") else a.t() @ b


def _variant(var) -> Variant | None:
    """The op's variant arguments as the backend contract's Variant (None = the plain cell)."""
    v = Variant(*var)
    if is_plain(v):
        return None
    return v._replace(**{n: getattr(v, n).contiguous() for n in VARIANT_TENSORS if getattr(v, n) is not None})


def _kw(variant):
    return {} if variant is None else {"variant": variant}


# ---- kernels (run on real tensors; any device the backend supports) ----------------------------

def _forward(backend, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes, reverse,
             ln_ih_weight, ln_ih_bias, *var, training):
    impl = backends.resolve(backend or None, x.device, "rnn")
    variant = _variant(var)
    T, B, I = x.shape
    G = w_ih.shape[0]
    ln = ln_ih_weight is not None
    # xw is a fresh tensor the backend owns (it may overwrite it).
    xw = _linear(impl, x.reshape(T * B, I), w_ih, None if ln else b_ih).view(T, B, G)
    extra = []
    if ln:
        xraw = xw
        xw, mean, rstd = torch.native_layer_norm(xraw, [G], ln_ih_weight, ln_ih_bias, LN_EPS)
        if b_ih is not None:
            xw += b_ih
        extra = [xraw, mean, rstd] if training else []
    with kernel_range(f"fastrnn::{cell}_layer_fwd[{impl.name}]", x.device):
        h_seq, h_T, c_T, saved = impl.rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes,
                                                  reverse, training, **_kw(variant))
    if c_T is None:
        c_T = x.new_empty(0)
    # saved[0] is h_seq, an output already (an op's outputs may not alias each other)
    return h_seq, h_T, c_T, list(saved[1:]) + extra


def _backward(backend, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes, reverse,
              ln_ih_weight, ln_ih_bias, *rest):
    *var, grad_h_seq, grad_h_T, grad_c_T, h_seq, saved, needs = rest
    impl = backends.resolve(backend or None, x.device, "rnn")
    variant = _variant(var)
    need = dict(zip((n for _, n in GRAD_ARGS), needs))
    T, B, I = x.shape
    G, Hr = w_hh.shape
    ln = ln_ih_weight is not None
    backend_saved = (h_seq, *(saved[:-3] if ln else saved))
    with kernel_range(f"fastrnn::{cell}_layer_bwd[{impl.name}]", x.device):
        out = impl.rnn_backward(cell, grad_h_seq.contiguous(), grad_h_T.contiguous(),
                                grad_c_T.contiguous() if grad_c_T is not None else None,
                                w_hh, w_hr, h0, c0, batch_sizes, reverse, backend_saved, **_kw(variant))
    grad_xw, grad_hw, grad_h0, grad_c0, grad_w_hr = out[:5]
    vgrads = out[5] if len(out) > 5 else None
    grads = dict(h0=grad_h0, c0=grad_c0, w_hr=grad_w_hr)
    gx = grad_xw.reshape(T * B, G)
    if need["b_ih"]:
        grads["b_ih"] = gx.sum(0)  # b_ih is added after the input layer norm
    if ln:
        xraw, mean, rstd = saved[-3:]
        gxr, grads["ln_ih_weight"], grads["ln_ih_bias"] = torch.ops.aten.native_layer_norm_backward(
            grad_xw, xraw, [G], mean, rstd, ln_ih_weight, ln_ih_bias,
            [need["x"] or need["w_ih"], need["ln_ih_weight"], need["ln_ih_bias"]])
        gx = gxr.reshape(T * B, G) if gxr is not None else None
    if need["x"]:
        grads["x"] = _mm(impl, gx, w_ih).view(T, B, I)
    if need["w_ih"]:
        grads["w_ih"] = _mm_tn(impl, gx, x.reshape(T * B, I))
    gh = grad_hw.reshape(T * B, G)
    if need["w_hh"]:
        h_in = recurrent_inputs(h_seq, h0, batch_sizes, reverse, variant).reshape(T * B, Hr)
        if variant is not None and cell == "gru" and not variant.reset_after:
            # rows 2H:3H multiply r * h_in, not h_in: the backend formed their gradient
            H2 = 2 * (G // 3)
            grads["w_hh"] = torch.cat([_mm_tn(impl, gh[:, :H2], h_in), vgrads.w_hn], 0)
        else:
            grads["w_hh"] = _mm_tn(impl, gh, h_in)
    if need["b_hh"]:
        # with a hidden-side layer norm b_hh is added after it, like the norm's own bias
        ln_hh = variant is not None and variant.ln_hh_weight is not None
        grads["b_hh"] = vgrads.ln_hh_bias if ln_hh else gh.sum(0)
    if vgrads is not None:
        for n in ("ln_hh_weight", "ln_hh_bias", "ln_c_weight", "ln_c_bias", "peephole"):
            grads[n] = getattr(vgrads, n)
    return [grads[n] for _, n in GRAD_ARGS if need[n]]


def _layer(*args):
    """fastrnn::rnn_layer without autograd (inference, or below the autograd formula)."""
    return tuple(_forward(*args, training=False)[:3])


def _cell(backend, cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, *rest):
    """fastrnn::rnn_cell: the layer op with T = 1 (the same fused step), states in and out."""
    ln_w, ln_b, *var = rest
    _, h, c = torch.ops.fastrnn.rnn_layer(backend, cell, input.unsqueeze(0), w_ih, w_hh, b_ih, b_hh,
                                          hx, cx, None, None, False, ln_w, ln_b, *var)
    return h, c


# ---- fake kernels (shapes and dtypes only: torch.compile, meta tensors) -------------------------

def _fake_forward(backend, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes, reverse,
                  ln_ih_weight, ln_ih_bias, *var, training):
    T, B, _ = x.shape
    G, Hr = w_hh.shape
    H = G // GATES[cell]
    h_seq, h_T = x.new_empty(T, B, Hr), x.new_empty(B, Hr)
    c_T = x.new_empty(B, H) if cell == "lstm" else x.new_empty(0)
    if not training:
        return h_seq, h_T, c_T, []
    impl = backends.resolve(backend or None, x.device, "rnn")
    layout = getattr(impl, "saved_layout", saved_layout)
    variant = None if is_plain(Variant(*var)) else Variant(*var)
    shapes = layout(cell, T, B, H, Hr, x.dtype, w_hr is not None, True, variant)
    saved = [x.new_empty(shape, dtype=dtype) for shape, dtype in shapes[1:]]
    if ln_ih_weight is not None:
        xraw = x.new_empty(T, B, G)
        _, mean, rstd = torch.native_layer_norm(xraw, [G], ln_ih_weight, ln_ih_bias, LN_EPS)
        saved += [xraw, mean, rstd]
    return h_seq, h_T, c_T, saved


def _fake_backward(*args):
    return [torch.empty_like(args[pos]) for (pos, _), need in zip(GRAD_ARGS, args[-1]) if need]


def _fake_layer(*args):
    return _fake_forward(*args, training=False)[:3]


# ---- autograd ----------------------------------------------------------------------------------

class _RNNLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        with below_autograd():
            h_seq, h_T, c_T, saved = torch.ops.fastrnn.rnn_layer_fwd(*args, True)
        ctx.n_saved = len(saved)
        ctx.plain = (args[0], args[1], args[11], args[-1])  # backend, cell, reverse, reset_after
        ctx.save_for_backward(*(a if isinstance(a, torch.Tensor) or a is None else None for a in args),
                              h_seq, *saved)
        if args[1] != "lstm":
            ctx.mark_non_differentiable(c_T)
        return h_seq, h_T, c_T

    @staticmethod
    def backward(ctx, grad_h_seq, grad_h_T, grad_c_T):
        tensors = ctx.saved_tensors
        args = list(tensors[:N_ARGS])
        args[0], args[1], args[11], args[-1] = ctx.plain
        h_seq, saved = tensors[N_ARGS], list(tensors[N_ARGS + 1:])
        needs = [ctx.needs_input_grad[pos] for pos, _ in GRAD_ARGS]
        grads = torch.ops.fastrnn.rnn_layer_bwd(
            *args, grad_h_seq, grad_h_T, grad_c_T if args[1] == "lstm" else None, h_seq, saved, needs)
        result = [None] * N_ARGS
        for pos, g in zip((pos for (pos, _), need in zip(GRAD_ARGS, needs) if need), grads):
            result[pos] = g
        return tuple(result)


def _layer_autograd(*args):
    if torch.is_grad_enabled() and any(
            args[pos] is not None and args[pos].requires_grad for pos, _ in GRAD_ARGS):
        return _RNNLayer.apply(*args)
    with below_autograd():
        return torch.ops.fastrnn.rnn_layer(*args)


define(f"rnn_layer_fwd({LAYER_ARGS}, bool training) -> (Tensor, Tensor, Tensor, Tensor[])",
       lambda *a: _forward(*a[:-1], training=a[-1]), lambda *a: _fake_forward(*a[:-1], training=a[-1]))
define(f"rnn_layer_bwd({LAYER_ARGS}, Tensor grad_h_seq, Tensor grad_h_T, Tensor? grad_c_T, "
       "Tensor h_seq, Tensor[] saved, bool[] needs) -> Tensor[]", _backward, _fake_backward)
define(f"rnn_layer({LAYER_ARGS}) -> (Tensor, Tensor, Tensor)", _layer, _fake_layer, _layer_autograd)
define_composite(
    "rnn_cell(str backend, str cell, Tensor input, Tensor hx, Tensor? cx, Tensor w_ih, Tensor w_hh, "
    "Tensor? b_ih, Tensor? b_hh, Tensor? ln_ih_weight, Tensor? ln_ih_bias, "
    + "".join(f"Tensor? {n}, " for n in VARIANT_TENSORS) + "bool reset_after) -> (Tensor, Tensor)", _cell)


# ---- entry point ------------------------------------------------------------------------------

def rnn_layer(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, w_hr=None, batch_sizes=None,
              reverse=False, backend=None, *, ln_ih=None, variant=None):
    """One layer and direction of an RNN over a whole (padded) sequence.

    x [T, B, I]; w_ih [G, I]; w_hh [G, Hr]; b_ih, b_hh [G] or None; h0 [B, Hr];
    c0 [B, H] (LSTM) or None; w_hr [Hr, H] or None; batch_sizes [T] (int64, CPU, descending)
    or None; ln_ih = (weight [G], bias [G]) of the input-side layer norm or None; variant: a
    ``fastrnn.ops.recurrence.Variant`` or None (docs/variants.md).
    Returns ``(h_seq [T, B, Hr], h_T [B, Hr], c_T [B, H] | None)``.
    """
    variant = variant or Variant()
    ln_w, ln_b = ln_ih if ln_ih is not None else (None, None)
    args = (backend_arg(backend), cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes, reverse,
            ln_w, ln_b, *variant)
    h_seq, h_T, c_T = _call_layer(args)
    return h_seq, h_T, (c_T if cell == "lstm" else None)


def _call_layer(args):
    """``torch.ops.fastrnn.rnn_layer(*args)``. In eager mode the op's own autograd kernel is
    entered directly: a dispatcher round trip into Python costs ~5 us, a tenth of a small
    layer's time (bench/library_overhead.py); the kernels still run as registered ops
    (``rnn_layer_fwd`` / ``rnn_layer_bwd`` in training, ``rnn_layer`` below autograd in
    inference). Under torch.compile the graph gets the op itself."""
    if torch.compiler.is_compiling():
        return torch.ops.fastrnn.rnn_layer(*args)
    return _layer_autograd(*args)


def rnn_cell(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend=None, *, ln_ih=None, variant=None):
    """One step: input [B, I], hx [B, H], cx [B, H] (LSTM) or None -> ``(h' [B, H], c' | None)``,
    through ``fastrnn::rnn_cell`` (the layer op at T = 1); variant tensors with T = 1."""
    variant = variant or Variant()
    ln_w, ln_b = ln_ih if ln_ih is not None else (None, None)
    h, c = torch.ops.fastrnn.rnn_cell(backend_arg(backend), cell, input, hx, cx, w_ih, w_hh, b_ih,
                                      b_hh, ln_w, ln_b, *variant)
    return h, (c if cell == "lstm" else None)
