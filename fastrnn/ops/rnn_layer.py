"""One autograd path for every recurrence backend: one layer, one direction, whole sequence,
registered as ``torch.ops.fastrnn`` ops (see ``fastrnn/ops/library.py``).

Ops (argument lists: ``LAYER_ARGS`` below; backend ``""`` = automatic choice):
    fastrnn::rnn_layer(...)     -> (h_seq [T,B,Hr], h_T [B,Hr], c_T [B,H] | [0])   differentiable
    fastrnn::rnn_cell(...)      -> (h' [B,Hr], c' [B,H] | [0])   the layer op at T = 1 (composite)
    fastrnn::rnn_layer_fwd(..., training) -> (h_seq, h_T, c_T, saved Tensor[])
    fastrnn::rnn_layer_bwd(..., grad_h_seq, grad_h_T, grad_c_T?, h_seq, saved, needs) -> grads
                                differentiable (double backward: the reference, recomputed)
``c_T`` is an empty tensor for GRU / RNN (an op cannot return None). Every output of every
kernel is contiguous. All ops have vmap rules (torch.func; docs/architecture.md).

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
from ..contract import checks
from ..contract.rnn import GATES, LN_EPS, Variant, by_name, is_plain, recurrent_inputs, saved_layout
from .library import (
    arg_names,
    backend_arg,
    backward_of_backward,
    below_autograd,
    define,
    define_composite,
    fold,
    is_batched,
    unfold,
    vmap_by_loop,
)
from .profiling import kernel_range

# The variant fields in the op schemas, in Variant's order (reset_after follows as a bool).
VARIANT_TENSORS = Variant._fields[:-1]
LAYER_ARGS = ("str backend, str cell, Tensor x, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
              "Tensor? b_hh, Tensor h0, Tensor? c0, Tensor? w_hr, Tensor? batch_sizes, bool reverse, "
              "Tensor? ln_ih_weight, Tensor? ln_ih_bias, "
              + "".join(f"Tensor? {n}, " for n in VARIANT_TENSORS) + "bool reset_after")
NAMES = arg_names(LAYER_ARGS)
N_ARGS = len(NAMES)
# Differentiable arguments: (position in LAYER_ARGS, name), positions from the schema; rnn_layer_bwd
# returns the gradients of those its ``needs`` flags ask for, in this order.
GRAD_ARGS = tuple((NAMES.index(n), n) for n in (
    "x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0", "w_hr", "ln_ih_weight", "ln_ih_bias", "ln_hh_weight",
    "ln_hh_bias", "ln_c_weight", "ln_c_bias", "peephole"))


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


def _layout(impl, cell, T, B, G, Hr, dtype, has_proj, variant):
    """The backend's saved layout (``contract.rnn.saved_layout`` unless it has its own)."""
    return getattr(impl, "saved_layout", saved_layout)(cell, T, B, G // GATES[cell], Hr, dtype, has_proj, True,
                                                       variant)


# ---- kernels (run on real tensors; any device the backend supports) ----------------------------

def _forward(backend, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes, reverse,
             ln_ih_weight, ln_ih_bias, *var, training):
    checks.check_layer_args(backend, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes, reverse,
                            ln_ih_weight, ln_ih_bias, *var)
    impl = backends.resolve(backend or None, x.device, "rnn")
    variant = _variant(var)
    T, B, I = x.shape
    G = w_ih.shape[0]
    ln = ln_ih_weight is not None
    # xw is a fresh tensor the backend owns (it may overwrite it).
    xw = _linear(impl, x.reshape(T * B, I), w_ih, None if ln else b_ih).view(T, B, G)
    extra = []
    if ln:
        # a backend's projection may be float32 for bfloat16 inputs (cpp): the norm runs in x's
        # dtype, as on every backend, so that its saved tensors have the layout's dtype
        xraw = xw.to(x.dtype)
        xw, mean, rstd = torch.native_layer_norm(xraw, [G], ln_ih_weight, ln_ih_bias, LN_EPS)
        if b_ih is not None:
            xw += b_ih
        extra = [xraw, mean, rstd] if training else []
    with kernel_range(f"fastrnn::{cell}_layer_fwd[{impl.name}]", x.device):
        h_seq, h_T, c_T, saved = impl.rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes,
                                                  reverse, training, **_kw(variant))
    if c_T is None:
        c_T = x.new_empty(0)
    # saved[0] is h_seq, an output already (an op's outputs may not alias each other). Every
    # output is contiguous, as the fake kernel promises (torch.compile checks the strides).
    return (h_seq.contiguous(), h_T.contiguous(), c_T.contiguous(),
            [t.contiguous() for t in list(saved[1:]) + extra])


def _backward(backend, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes, reverse,
              ln_ih_weight, ln_ih_bias, *rest):
    *var, grad_h_seq, grad_h_T, grad_c_T, h_seq, saved, needs = rest
    impl = backends.resolve(backend or None, x.device, "rnn")
    checks.check_layer_bwd_args(backend, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes, reverse,
                                ln_ih_weight, ln_ih_bias, *rest, layout=getattr(impl, "saved_layout", None))
    variant = _variant(var)
    need = dict(zip((n for _, n in GRAD_ARGS), needs))
    T, B, I = x.shape
    G, Hr = w_hh.shape
    H = G // GATES[cell]
    ln = ln_ih_weight is not None
    # contiguous: the op may be given views (vmap hands each sample a slice of a folded batch)
    backend_saved = tuple(t.contiguous() for t in (h_seq, *(saved[:-3] if ln else saved)))

    def named(name):  # a saved tensor by name (the layout is built only when one is read)
        return by_name(_layout(impl, cell, T, B, G, Hr, x.dtype, w_hr is not None, variant), backend_saved)[name]
    with kernel_range(f"fastrnn::{cell}_layer_bwd[{impl.name}]", x.device):
        grad_xw, grad_hw, grad_h0, grad_c0, grad_hproj, vgrads = impl.rnn_backward(
            cell, grad_h_seq.contiguous(), grad_h_T.contiguous(),
            grad_c_T.contiguous() if grad_c_T is not None else None,
            w_hh, w_hr, h0, c0, batch_sizes, reverse, backend_saved, **_kw(variant))
    grads = dict(h0=grad_h0, c0=grad_c0)
    if need["w_hr"]:  # h_t = hu_t W_hr^T: one GEMM over all steps
        grads["w_hr"] = _mm_tn(impl, grad_hproj.reshape(T * B, Hr), named("hu").reshape(T * B, H))
    gx = grad_xw.reshape(T * B, G)
    if need["b_ih"]:
        grads["b_ih"] = gx.sum(0)  # b_ih is added after the input layer norm
    if ln:
        # contiguous: torch's CPU native_layer_norm_backward reads mean / rstd as if they were
        # (torch 2.13; a strided view, e.g. one vmapped sample's, gives silently wrong gradients)
        xraw, mean, rstd = (t.contiguous() for t in saved[-3:])
        gxr, grads["ln_ih_weight"], grads["ln_ih_bias"] = torch.ops.aten.native_layer_norm_backward(
            grad_xw.to(xraw.dtype), xraw, [G], mean, rstd, ln_ih_weight, ln_ih_bias,
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
            # rows 2H:3H (W_hn) multiply r * h_in, not h_in (r: the saved gates' first H columns)
            r_h_in = (named("gates")[..., :H].reshape(T * B, H) * h_in)
            grads["w_hh"] = torch.cat([_mm_tn(impl, gh[:, :2 * H], h_in), _mm_tn(impl, gh[:, 2 * H:], r_h_in)], 0)
        else:
            grads["w_hh"] = _mm_tn(impl, gh, h_in)
    if need["b_hh"]:
        # with a hidden-side layer norm b_hh is added after it, like the norm's own bias
        ln_hh = variant is not None and variant.ln_hh_weight is not None
        grads["b_hh"] = vgrads.ln_hh_bias if ln_hh else gh.sum(0)
    if vgrads is not None:
        for n in ("ln_hh_weight", "ln_hh_bias", "ln_c_weight", "ln_c_bias", "peephole"):
            grads[n] = getattr(vgrads, n)
    # contiguous whatever the inputs' strides (batch_first x is a transposed view): the fake says so;
    # in the argument's dtype (a bfloat16 call's GEMMs on cpp return float32)
    layer = (backend, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes, reverse, ln_ih_weight, ln_ih_bias,
             *var)
    return [grads[n].to(layer[pos].dtype).contiguous() for pos, n in GRAD_ARGS if need[n]]


def _layer(*args):
    """fastrnn::rnn_layer without autograd (inference, or below the autograd formula)."""
    return tuple(_forward(*args, training=False)[:3])


def _cell_layer_args(backend, cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, *rest):
    """rnn_cell's arguments as rnn_layer's (T = 1)."""
    ln_w, ln_b, *var = rest
    return (backend, cell, input.unsqueeze(0), w_ih, w_hh, b_ih, b_hh, hx, cx, None, None, False, ln_w, ln_b,
            *var)


def _cell(*args):
    """fastrnn::rnn_cell: the layer op with T = 1 (the same fused step), states in and out."""
    _, h, c = torch.ops.fastrnn.rnn_layer(*_cell_layer_args(*args))
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
    variant = None if is_plain(Variant(*var)) else Variant(*var)
    layout = _layout(impl, cell, T, B, G, Hr, x.dtype, w_hr is not None, variant)
    saved = [x.new_empty(entry.shape, dtype=entry.dtype) for entry in layout[1:]]
    if ln_ih_weight is not None:
        xraw = x.new_empty(T, B, G)
        _, mean, rstd = torch.native_layer_norm(xraw, [G], ln_ih_weight, ln_ih_bias, LN_EPS)
        saved += [xraw, mean, rstd]
    return h_seq, h_T, c_T, saved


def _fake_backward(*args):
    # contiguous (new_empty), not empty_like: the real kernel returns contiguous gradients even
    # for a non-contiguous input, and compiled graphs assert the fake strides
    return [args[pos].new_empty(args[pos].shape) for (pos, _), need in zip(GRAD_ARGS, args[-1]) if need]


def _fake_layer(*args):
    return _fake_forward(*args, training=False)[:3]


# ---- reference recomputation (double backward) -------------------------------------------------

def _reference_layer(backend, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes, reverse,
                     ln_ih_weight, ln_ih_bias, *var):
    """What ``_forward`` computes, written with differentiable torch operations: the input
    projection here and the reference backend's recurrence (for every ``backend``: all of them
    compute these equations). Returns ``(h_seq [T, B, Hr], h_T [B, Hr], c_T [B, H] | None)``."""
    ref = backends.load("torch", "rnn")
    G = w_ih.shape[0]
    xw = x @ w_ih.t()
    if ln_ih_weight is not None:
        xw = torch.nn.functional.layer_norm(xw, [G], ln_ih_weight, ln_ih_bias, LN_EPS)
    if b_ih is not None:
        xw = xw + b_ih
    v = Variant(*var)
    h_seq, h_T, c_T, _ = ref.rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse,
                                         False, None if is_plain(v) else v)
    return h_seq, h_T, c_T


# ---- autograd ----------------------------------------------------------------------------------

BWD_NAMES = NAMES + ["grad_h_seq", "grad_h_T", "grad_c_T", "h_seq", "saved", "needs"]
_CELL, _BATCH_SIZES = NAMES.index("cell"), NAMES.index("batch_sizes")
_PLAIN = [p for p, a in enumerate(LAYER_ARGS.split(", ")) if a.split()[0] in ("str", "bool")]
_GRAD_OUTPUTS = range(N_ARGS, N_ARGS + 3)  # grad_h_seq, grad_h_T, grad_c_T after the layer's arguments


def _layer_args(ctx, tensors):
    """The layer's arguments back from ``save_for_backward`` (tensors) and ctx (str / bool)."""
    args = list(tensors[:N_ARGS])
    for p, value in ctx.plain.items():
        args[p] = value
    return args


class _RNNLayer(torch.autograd.Function):
    """The autograd formula of ``fastrnn::rnn_layer``: ``rnn_layer_fwd``, then ``rnn_layer_bwd``.

    In torch.func's form: ``forward`` takes no ctx and returns what the backend saved as extra,
    non-differentiable outputs, which ``setup_context`` keeps; under vmap these methods run on
    batched tensors (``generate_vmap_rule``) and reach the ops' own vmap rules."""
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        with below_autograd():
            h_seq, h_T, c_T, saved = torch.ops.fastrnn.rnn_layer_fwd(*args, True)
        return (h_seq, h_T, c_T, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h_seq, _, c_T, *saved = output
        _save_layer(ctx, inputs, h_seq, saved)
        ctx.mark_non_differentiable(*saved, *([] if inputs[_CELL] == "lstm" else [c_T]))

    @staticmethod
    def backward(ctx, grad_h_seq, grad_h_T, grad_c_T, *_):
        tensors = ctx.saved_tensors
        args = _layer_args(ctx, tensors)
        h_seq, saved = tensors[N_ARGS], list(tensors[N_ARGS + 1:])
        needs = [ctx.needs_input_grad[pos] for pos, _ in GRAD_ARGS]
        grads = _layer_bwd_autograd(*args, grad_h_seq, grad_h_T,
                                    grad_c_T if args[_CELL] == "lstm" else None, h_seq, saved, needs)
        result = [None] * N_ARGS
        for pos, g in zip((pos for (pos, _), need in zip(GRAD_ARGS, needs) if need), grads):
            result[pos] = g
        return tuple(result)


def _save_layer(ctx, args, h_seq, saved):
    ctx.plain = {p: args[p] for p in _PLAIN}
    ctx.save_for_backward(*(a if isinstance(a, torch.Tensor) else None for a in args), h_seq, *saved)


class _RNNLayerEager(torch.autograd.Function):
    """``_RNNLayer`` outside torch.func transforms: the same forward, saved tensors and backward
    in the classic form (ctx in forward, three outputs). The saved tensors need not travel as
    extra outputs, and ``apply`` does not bind arguments with ``inspect`` (it does once
    ``setup_context`` is defined): ~10 us less per layer call, a few percent of a small layer."""

    @staticmethod
    def forward(ctx, *args):
        h_seq, h_T, c_T, *saved = _RNNLayer.forward(*args)
        _save_layer(ctx, args, h_seq, saved)
        if args[_CELL] != "lstm":
            ctx.mark_non_differentiable(c_T)
        return h_seq, h_T, c_T

    backward = _RNNLayer.backward


class _RNNLayerBwd(torch.autograd.Function):
    """The autograd formula of ``fastrnn::rnn_layer_bwd``: what makes double backward (gradient
    penalties, ``create_graph=True``) and torch.func's nested transforms work. Forward: the fused
    backward kernel. Backward: the layer recomputed with the reference equations under autograd,
    its vector-Jacobian product differentiated (``library.backward_of_backward``): exact on every
    backend, at the reference's speed.

    Arguments: the layer's, then ``grad_h_seq, grad_h_T, grad_c_T, h_seq, needs, *saved``
    (``saved`` flattened: an autograd.Function tracks only its top-level arguments)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        layer, (grad_h_seq, grad_h_T, grad_c_T, h_seq, needs), saved = (
            args[:N_ARGS], args[N_ARGS:N_ARGS + 5], args[N_ARGS + 5:])
        with below_autograd():
            return tuple(torch.ops.fastrnn.rnn_layer_bwd(*layer, grad_h_seq, grad_h_T, grad_c_T, h_seq,
                                                         list(saved), list(needs)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.plain = {p: inputs[p] for p in _PLAIN}
        ctx.needs = inputs[N_ARGS + 4]
        # the double backward recomputes: the layer's arguments and the output gradients suffice
        ctx.save_for_backward(*(a if isinstance(a, torch.Tensor) else None for a in inputs[:N_ARGS + 3]))

    @staticmethod
    def backward(ctx, *cotangents):
        tensors = ctx.saved_tensors
        want_args = [pos for pos, _ in GRAD_ARGS if ctx.needs_input_grad[pos]]
        want_grad_outputs = [k for k, pos in enumerate(_GRAD_OUTPUTS) if ctx.needs_input_grad[pos]]
        grads = backward_of_backward(
            _reference_layer, _layer_args(ctx, tensors),
            [pos for (pos, _), need in zip(GRAD_ARGS, ctx.needs) if need],
            tensors[N_ARGS:N_ARGS + 3], cotangents, want_args, want_grad_outputs)
        result = [None] * len(ctx.needs_input_grad)
        for pos, g in zip(want_args + [_GRAD_OUTPUTS[k] for k in want_grad_outputs], grads):
            result[pos] = g
        return tuple(result)


_LAYER_GRAD_POS = [pos for pos, _ in GRAD_ARGS]
_BWD_GRAD_POS = _LAYER_GRAD_POS + list(_GRAD_OUTPUTS)


def _requires_grad(args, positions):
    return torch.is_grad_enabled() and any(
        args[pos] is not None and args[pos].requires_grad for pos in positions)


def _layer_autograd(*args):
    """Autograd kernel of ``fastrnn::rnn_layer``."""
    if _requires_grad(args, _LAYER_GRAD_POS):
        if torch._C._are_functorch_transforms_active():
            return _RNNLayer.apply(*args)[:3]
        return _RNNLayerEager.apply(*args)
    with below_autograd():
        return torch.ops.fastrnn.rnn_layer(*args)


def _layer_bwd_autograd(*args):
    """Autograd kernel of ``fastrnn::rnn_layer_bwd``. A first-order backward runs with grad mode
    off and goes straight to the fused kernel, as before; with grad mode on (``create_graph=True``,
    torch.func) ``_RNNLayerBwd`` builds gradients that can be differentiated again."""
    if _requires_grad(args, _BWD_GRAD_POS):
        *layer, grad_h_seq, grad_h_T, grad_c_T, h_seq, saved, needs = args
        return list(_RNNLayerBwd.apply(*layer, grad_h_seq, grad_h_T, grad_c_T, h_seq, tuple(needs), *saved))
    with below_autograd():
        return torch.ops.fastrnn.rnn_layer_bwd(*args)


# ---- vmap rules (torch.func.vmap, and vmap over the autograd formulas above) ------------------

# The per-sample arguments and the dim of their rows (the batch B); every other tensor is shared
# by the whole batch (weights, layer norms, peephole, batch_sizes).
_ROW_DIM = {"x": 1, "h0": 0, "c0": 0, "rec_mask": 0, "zoneout_h": 1, "zoneout_c": 1, "reset": 1,
            "grad_h_seq": 1, "grad_h_T": 0, "grad_c_T": 0, "h_seq": 1, "saved": 1}


def _vmap_layer(op, names, unfold_outputs, foldable=lambda args: True):
    """The vmap rule of a layer op. When only per-sample tensors are batched (x, states, masks,
    output gradients), the sequence is not packed and ``foldable(args)``, the V samples run as
    one batch of V * B rows (one kernel call); otherwise once per sample. ``unfold_outputs(out,
    args, V)`` splits the outputs back: ``(per-sample outputs, out_dims)``."""
    loop = vmap_by_loop(op)

    def rule(info, in_dims, *args):
        V = info.batch_size
        batched = {names[p] for p, d in enumerate(in_dims) if is_batched(d)}
        if args[_BATCH_SIZES] is not None or not batched <= _ROW_DIM.keys() or not foldable(args):
            return loop(info, in_dims, *args)
        folded = list(args)
        for p, name in enumerate(names):
            if name == "saved":
                dims = in_dims[p] if isinstance(in_dims[p], (list, tuple)) else [None] * len(args[p])
                folded[p] = [fold(t, d, 1, V) for t, d in zip(args[p], dims)]
            elif name in _ROW_DIM and args[p] is not None:
                folded[p] = fold(args[p], in_dims[p], _ROW_DIM[name], V)
        return unfold_outputs(op(*folded), args, V)
    return rule


def _unfold_forward(out, args, V):
    h_seq, h_T, c_T = out[:3]
    lstm = args[_CELL] == "lstm"  # GRU / RNN: c_T is an empty placeholder, the same for all
    outputs = [unfold(h_seq, 1, V), unfold(h_T, 0, V), unfold(c_T, 0, V) if lstm else c_T]
    dims = [1, 0, 0 if lstm else None]
    if len(out) == 4:  # rnn_layer_fwd: saved, [T, B, ...] each
        outputs.append([unfold(t, 1, V) for t in out[3]])
        dims.append([1] * len(out[3]))
    return tuple(outputs), tuple(dims)


def _needed(args):
    return [n for (_, n), need in zip(GRAD_ARGS, args[-1]) if need]


def _backward_foldable(args):
    """Only per-sample gradients: a shared argument's gradient (a weight's) is a sum over rows,
    which one folded call would add up across samples (those loop)."""
    return set(_needed(args)) <= {"x", "h0", "c0"}


def _unfold_backward(out, args, V):
    dims = [_ROW_DIM[n] for n in _needed(args)]
    return [unfold(g, d, V) for g, d in zip(out, dims)], dims


# A vmap rule calls its op by name at the level below (the lambdas resolve it when they run).
define(f"rnn_layer_fwd({LAYER_ARGS}, bool training) -> (Tensor, Tensor, Tensor, Tensor[])",
       lambda *a: _forward(*a[:-1], training=a[-1]), lambda *a: _fake_forward(*a[:-1], training=a[-1]),
       vmap=_vmap_layer(lambda *a: torch.ops.fastrnn.rnn_layer_fwd(*a), NAMES + ["training"], _unfold_forward))
define(f"rnn_layer_bwd({LAYER_ARGS}, Tensor grad_h_seq, Tensor grad_h_T, Tensor? grad_c_T, "
       "Tensor h_seq, Tensor[] saved, bool[] needs) -> Tensor[]", _backward, _fake_backward,
       _layer_bwd_autograd, vmap=_vmap_layer(lambda *a: torch.ops.fastrnn.rnn_layer_bwd(*a), BWD_NAMES,
                                             _unfold_backward, _backward_foldable))
define(f"rnn_layer({LAYER_ARGS}) -> (Tensor, Tensor, Tensor)", _layer, _fake_layer, _layer_autograd,
       vmap=_vmap_layer(lambda *a: torch.ops.fastrnn.rnn_layer(*a), NAMES, _unfold_forward))
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
    ``fastrnn.contract.rnn.Variant`` or None (docs/variants.md).
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
    inference). It is also what lets torch.func's grad transform in: an autograd.Function
    applied from inside the dispatcher (the op's Autograd kernel) cannot run under it.
    Under torch.compile the graph gets the op itself."""
    if torch.compiler.is_compiling():
        return torch.ops.fastrnn.rnn_layer(*args)
    return _layer_autograd(*args)


def rnn_cell(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend=None, *, ln_ih=None, variant=None):
    """One step: input [B, I], hx [B, H], cx [B, H] (LSTM) or None -> ``(h' [B, H], c' | None)``,
    through ``fastrnn::rnn_cell`` (the layer op at T = 1); variant tensors with T = 1."""
    variant = variant or Variant()
    ln_w, ln_b = ln_ih if ln_ih is not None else (None, None)
    args = (backend_arg(backend), cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, ln_w, ln_b, *variant)
    if torch.compiler.is_compiling():
        h, c = torch.ops.fastrnn.rnn_cell(*args)
    else:
        # as _call_layer, and for torch.func: an autograd.Function entered from inside the
        # dispatcher (the composite op's kernel) cannot run under torch.func's grad transform
        # (torch.library.custom_op has the same limit), one entered from Python can
        _, h, c = _call_layer(_cell_layer_args(*args))
    return h, (c if cell == "lstm" else None)
