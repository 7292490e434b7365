"""One autograd path for every attention backend (contract: ``fastrnn/backends/reference_sdpa.py``),
registered as ``torch.ops.fastrnn`` ops (see ``fastrnn/ops/library.py``).

Ops (argument list: ``SDPA_ARGS``; backend ``""`` = automatic choice):
    fastrnn::sdpa(...)      -> out [N, L, Ev]                   differentiable
    fastrnn::sdpa_fwd(...)  -> (out, lse [N, L])                what backward needs
    fastrnn::sdpa_bwd(..., grad_out, out, lse, needs) -> [grad_q, grad_k, grad_v, grad_bias]
                                                                differentiable (double backward)
Every output is contiguous; all three ops have vmap rules (torch.func; docs/architecture.md).

The user function (``fastrnn.attention.scaled_dot_product_attention``) validates and flattens
torch's broadcasting into the contract's shapes; the autograd formula saves
``(q, k, v, out, lse)`` -- O(L) beyond the inputs and output -- and calls the backend's backward.
The dropout seed is a tensor argument (drawn from torch's generator, so it is part of a compiled
graph too) and travels with the op, so backward regenerates the same mask.
"""
from __future__ import annotations

import torch

from .. import backends
from ..contract import checks
from ..contract.sdpa import SdpaMask
from .library import arg_names, backend_arg, backward_of_backward, below_autograd, define, fold, unfold, vmap_by_loop
from .profiling import kernel_range

SDPA_ARGS = ("str backend, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? rows, float scale, "
             "bool causal, float dropout_p, Tensor? seed")
NAMES = arg_names(SDPA_ARGS)
N_ARGS = len(NAMES)
GRAD_POS = tuple(NAMES.index(n) for n in ("q", "k", "v", "bias"))  # the differentiable arguments


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
    checks.check_sdpa_args(backend, q, k, v, bias, rows, scale, causal, dropout_p, seed)
    impl = _impl(backend, q, k, v)
    with kernel_range(f"fastrnn::sdpa_fwd[{impl.name}]", q.device):
        out, lse = impl.sdpa_forward(*_contract(q, k, v, bias, rows, scale, causal, dropout_p, seed))
    return out.contiguous(), lse.contiguous()  # the layout the fake kernel promises


def _backward(backend, q, k, v, bias, rows, scale, causal, dropout_p, seed, grad_out, out, lse, needs):
    checks.check_sdpa_bwd_args(backend, q, k, v, bias, rows, scale, causal, dropout_p, seed, grad_out, out, lse,
                               needs)
    impl = _impl(backend, q, k, v)
    q, k, v, mask, *flags = _contract(q, k, v, bias, rows, scale, causal, dropout_p, seed)
    args = (grad_out.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), mask, *flags)
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
    return [g.contiguous() if need else empty for g, need in zip(grads, needs)]


def _fake_forward(backend, q, k, v, bias, rows, scale, causal, dropout_p, seed):
    N, L, _ = q.shape
    return q.new_empty(N, L, v.shape[-1]), q.new_empty(N, L, dtype=torch.float32 if q.dtype in (
        torch.float16, torch.bfloat16) else q.dtype)


def _fake_backward(*args):
    # contiguous (new_empty), not empty_like: the real kernel returns contiguous gradients for
    # non-contiguous inputs too (a transposed q), and compiled graphs assert the fake strides
    needs, empty = args[-1], args[1].new_empty(0)
    return [args[pos].new_empty(args[pos].shape) if need else empty for pos, need in zip(GRAD_POS, needs)]


def _reference_sdpa(backend, q, k, v, bias, rows, scale, causal, dropout_p, seed):
    """``out`` as ``_forward`` computes it, by the reference backend's equations (plain,
    differentiable torch operations; the same dropout mask). For the double backward."""
    return (backends.load("torch", "sdpa").sdpa_forward(
        *_contract(q, k, v, bias, rows, scale, causal, dropout_p, seed))[0],)


BWD_NAMES = NAMES + ["grad_out", "out", "lse", "needs"]
_FLAGS = [p for p, a in enumerate(SDPA_ARGS.split(", ")) if a.split()[0] in ("str", "float", "bool")]
_GRAD_OUT = N_ARGS  # position of grad_out among sdpa_bwd's arguments


def _sdpa_args(ctx, tensors):
    args = list(tensors[:N_ARGS])
    for p, value in ctx.flags.items():
        args[p] = value
    return args


class _SDPA(torch.autograd.Function):
    """The autograd formula of ``fastrnn::sdpa``: ``sdpa_fwd``, then ``sdpa_bwd`` (torch.func's
    form, as ``fastrnn.ops.rnn_layer._RNNLayer``: ``lse`` is an extra non-differentiable output)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        with below_autograd():
            return tuple(torch.ops.fastrnn.sdpa_fwd(*args))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_sdpa(ctx, inputs, *output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out, _):
        *tensors, out, lse = ctx.saved_tensors
        needs = [ctx.needs_input_grad[pos] for pos in GRAD_POS]
        grads = _sdpa_bwd_autograd(*_sdpa_args(ctx, tensors), grad_out, out, lse, needs)
        result = [None] * N_ARGS
        for pos, need, g in zip(GRAD_POS, needs, grads):
            if need:
                result[pos] = g
        return tuple(result)


def _save_sdpa(ctx, args, out, lse):
    ctx.flags = {p: args[p] for p in _FLAGS}
    ctx.save_for_backward(*(a if isinstance(a, torch.Tensor) else None for a in args), out, lse)


class _SDPAEager(torch.autograd.Function):
    """``_SDPA`` outside torch.func transforms, in the classic form (see
    ``fastrnn.ops.rnn_layer._RNNLayerEager``: one output, no per-call ``inspect`` binding)."""

    @staticmethod
    def forward(ctx, *args):
        out, lse = _SDPA.forward(*args)
        _save_sdpa(ctx, args, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _SDPA.backward(ctx, grad_out, None)


class _SDPABwd(torch.autograd.Function):
    """The autograd formula of ``fastrnn::sdpa_bwd`` (double backward; see
    ``fastrnn.ops.rnn_layer._RNNLayerBwd``): forward the fused backward kernel, backward the
    reference forward recomputed under autograd and its vector-Jacobian product differentiated.
    Arguments: attention's, then ``grad_out, out, lse, needs``."""
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        *sdpa_args, grad_out, out, lse, needs = args
        with below_autograd():
            return tuple(torch.ops.fastrnn.sdpa_bwd(*sdpa_args, grad_out, out, lse, list(needs)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.flags = {p: inputs[p] for p in _FLAGS}
        ctx.needs = inputs[-1]
        ctx.save_for_backward(*(a if isinstance(a, torch.Tensor) else None for a in inputs[:N_ARGS + 1]))

    @staticmethod
    def backward(ctx, *cotangents):
        tensors = ctx.saved_tensors
        want_args = [pos for pos in GRAD_POS if ctx.needs_input_grad[pos]]
        want_grad_out = [0] if ctx.needs_input_grad[_GRAD_OUT] else []
        grads = backward_of_backward(
            _reference_sdpa, _sdpa_args(ctx, tensors), [pos for pos, need in zip(GRAD_POS, ctx.needs) if need],
            [tensors[_GRAD_OUT]], [c for c, need in zip(cotangents, ctx.needs) if need], want_args, want_grad_out)
        result = [None] * len(ctx.needs_input_grad)
        for pos, g in zip(want_args + [_GRAD_OUT] * len(want_grad_out), grads):
            result[pos] = g
        return tuple(result)


def _requires_grad(args, positions):
    return torch.is_grad_enabled() and any(args[p] is not None and args[p].requires_grad for p in positions)


def _sdpa_autograd(*args):
    """Autograd kernel of ``fastrnn::sdpa``."""
    if _requires_grad(args, GRAD_POS):
        if torch._C._are_functorch_transforms_active():
            return _SDPA.apply(*args)[0]
        return _SDPAEager.apply(*args)
    with below_autograd():
        return torch.ops.fastrnn.sdpa(*args)


def _sdpa_bwd_autograd(*args):
    """Autograd kernel of ``fastrnn::sdpa_bwd``: the fused kernel when no graph is being built
    (a first-order backward), ``_SDPABwd`` with grad mode on (``create_graph=True``, torch.func)."""
    if _requires_grad(args, GRAD_POS + (_GRAD_OUT,)):
        *sdpa_args, grad_out, out, lse, needs = args
        return list(_SDPABwd.apply(*sdpa_args, grad_out, out, lse, tuple(needs)))
    with below_autograd():
        return torch.ops.fastrnn.sdpa_bwd(*args)


# ---- vmap rules --------------------------------------------------------------------------------

# Per-sample tensors and their row dim (N: batch x heads; Nk for k, v); bias [Nm, L, S] is
# indexed through rows [N] and handled apart; scale, causal, dropout_p are plain values.
_ROW_DIM = {"q": 0, "k": 0, "v": 0, "grad_out": 0, "out": 0, "lse": 0}


def _vmap_sdpa(op, names, grads):
    """The vmap rule of an attention op. The V samples run as one problem of V * N rows when the
    dropout mask does not depend on the row index (no dropout; it hashes the row) and ``rows`` /
    ``seed`` are not batched; otherwise once per sample. A mask's rows are offset per sample
    (a mask shared by every sample is copied only when its gradient is asked for)."""
    loop = vmap_by_loop(op)
    pos = {n: p for p, n in enumerate(names)}

    def rule(info, in_dims, *args):
        V = info.batch_size
        dims = dict(zip(names, in_dims))
        a = dict(zip(names, args))
        if (a["dropout_p"] > 0 and a["seed"] is not None) or dims["rows"] is not None or dims["seed"] is not None:
            return loop(info, in_dims, *args)
        folded = list(args)
        for name, row_dim in _ROW_DIM.items():
            if name in pos:
                folded[pos[name]] = fold(a[name], dims[name], row_dim, V)
        bias, rows = a["bias"], a["rows"]
        if bias is not None:
            bias_grad = grads and a["needs"][3]
            if dims["bias"] is not None or bias_grad:
                Nm = bias.shape[1 if dims["bias"] == 0 else 0]  # rows of one sample's mask
                bias = fold(bias, dims["bias"], 0, V)
                if bias.stride(-1) not in (0, 1):  # the contract: S stride 0 or 1
                    bias = bias.contiguous()
                rows = (torch.arange(V, device=rows.device).unsqueeze(1) * Nm + rows).reshape(-1)
            else:
                rows = rows.repeat(V)
            folded[pos["bias"]], folded[pos["rows"]] = bias, rows
        out = op(*folded)
        if not grads:  # (out, lse) or out
            if isinstance(out, torch.Tensor):
                return unfold(out, 0, V), 0
            return tuple(unfold(t, 0, V) for t in out), (0, 0)
        needs = a["needs"]
        return ([unfold(g, 0, V) if need else g for g, need in zip(out, needs)],
                [0 if need else None for need in needs])
    return rule


define(f"sdpa_fwd({SDPA_ARGS}) -> (Tensor, Tensor)", _forward, _fake_forward,
       vmap=_vmap_sdpa(lambda *a: torch.ops.fastrnn.sdpa_fwd(*a), NAMES, grads=False))
define(f"sdpa_bwd({SDPA_ARGS}, Tensor grad_out, Tensor out, Tensor lse, bool[] needs) -> Tensor[]",
       _backward, _fake_backward, _sdpa_bwd_autograd,
       vmap=_vmap_sdpa(lambda *a: torch.ops.fastrnn.sdpa_bwd(*a), BWD_NAMES, grads=True))
define(f"sdpa({SDPA_ARGS}) -> Tensor", lambda *a: _forward(*a)[0], lambda *a: _fake_forward(*a)[0],
       _sdpa_autograd, vmap=_vmap_sdpa(lambda *a: torch.ops.fastrnn.sdpa(*a), NAMES, grads=False))


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
