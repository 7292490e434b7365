"""One autograd path for every attention-decoder backend (contract:
``fastrnn/backends/reference_decoder.py``), registered as ``torch.ops.fastrnn`` ops (see
``fastrnn/ops/library.py``).

Ops (argument list: ``DECODER_ARGS``; backend ``""`` = automatic choice):
    fastrnn::decoder(...)              -> (out [T, B, H], attn [T, B, S], h_n [L, B, H], c_n)
                                          differentiable; c_n [L, B, H] (LSTM) or [0] (GRU)
    fastrnn::decoder_fwd(..., training) -> the same and the saved tensors (gates, cells, hs, ctx)
    fastrnn::decoder_bwd(..., grads, out, attn, saved, needs) -> one gradient per ``GRAD_NAMES``
                                          differentiable (double backward)

The kernels run the whole teacher-forced loop; this layer does the big GEMMs around them, as for
the recurrence: the weight gradients ``d W_feed``, ``d W_in``, ``d W_hh``, ``d W_c``, ``d W_q`` are
one GEMM each over all T steps (``_weight_grads``), from the pre-activation gradients the
backend returns and the states it saved. The input projection ``xw`` and the memory projection
``keys`` are computed by the caller (``fastrnn.decoder``) with torch ops, so autograd carries
their gradients through ``d xw`` and ``d keys``.
"""
from __future__ import annotations

import torch

from .. import backends
from ..contract import decoder as contract
from ..contract.decoder import DecoderParams
from .library import arg_names, backend_arg, backward_of_backward, below_autograd, define, vmap_by_loop
from .profiling import kernel_range

DECODER_ARGS = ("str backend, str cell, Tensor xw, Tensor keys, Tensor memory, Tensor? mask, Tensor? w_feed, "
                "Tensor w_in, Tensor b_in, Tensor w_hh, Tensor b_hh, Tensor? w_q, Tensor? b_q, Tensor? v, "
                "Tensor w_c, Tensor h0, Tensor? c0, Tensor feed0, Tensor? drop")
NAMES = arg_names(DECODER_ARGS)
N_ARGS = len(NAMES)
GRAD_NAMES = ("xw", "keys", "memory", "w_feed", "w_in", "b_in", "w_hh", "b_hh", "w_q", "b_q", "v", "w_c",
              "h0", "c0", "feed0")
GRAD_POS = tuple(NAMES.index(n) for n in GRAD_NAMES)
_PARAMS = slice(NAMES.index("w_feed"), NAMES.index("w_c") + 1)
OUTPUTS = ("out", "attn", "h_n", "c_n")
BWD_NAMES = NAMES + ["grad_out", "grad_attn", "grad_h_n", "grad_c_n", "out", "attn", "gates", "cells", "hs",
                     "ctx", "needs"]


def _unpack(args):
    """The op's arguments as the contract's: (backend, cell, xw, keys, memory, mask, params, h0, c0,
    feed0, drop)."""
    a = list(args[:N_ARGS])
    return (*a[:_PARAMS.start], DecoderParams(*a[_PARAMS]), *a[_PARAMS.stop:])


def _impl(backend, xw):
    return backends.resolve(backend or None, xw.device, "decoder")


def _forward(*args):
    *args, training = args
    backend, cell, *contract_args = _unpack(args)
    contract.check_decoder_forward(cell, *contract_args, training)
    impl = _impl(backend, args[2])
    with kernel_range(f"fastrnn::decoder_fwd[{impl.name}]", args[2].device):
        out, attn, h_n, c_n, saved = impl.decoder_forward(cell, *contract_args, training)
    empty = args[2].new_empty(0)
    saved = tuple(saved) if training else (empty,) * 4
    return tuple(t.contiguous() for t in (out, attn, h_n, c_n if c_n is not None else empty, *saved))


def _fake_forward(*args):
    *args, training = args
    backend, cell, xw, keys, memory, mask, params, h0, c0, feed0, drop = _unpack(args)
    T, B, _ = xw.shape
    L, _, H = h0.shape
    S, M = memory.shape[1], memory.shape[2]
    new = xw.new_empty
    saved = (tuple(new(s) for s in contract.saved_shapes(cell, T, L, B, H, M)) if training
             else (new(0),) * 4)
    return (new(T, B, H), new(T, B, S), new(L, B, H), new(L, B, H) if cell == "lstm" else new(0), *saved)


def _weight_grads(g, params, h0, feed0, drop, out, hs, ctx, needs):
    """Every gradient of ``GRAD_NAMES`` from the backend's ``DecoderGrads``: the weight gradients
    as one GEMM over all T * B rows each (``_flat``); None where not needed."""
    L = hs.shape[1]
    want = dict(zip(GRAD_NAMES, needs))
    res = dict(xw=g.grad_gi[:, 0], keys=g.grad_keys, memory=g.grad_memory, h0=g.grad_h0, c0=g.grad_c0,
               feed0=g.grad_feed0, v=g.grad_v)
    top = hs[:, L - 1]
    if want["w_feed"] and params.w_feed is not None:
        feed_prev = torch.cat([feed0.unsqueeze(0), out[:-1]])  # what layer 0 read at each step
        res["w_feed"] = _flat(g.grad_gi[:, 0]).T @ _flat(feed_prev)
    if want["w_in"]:
        below = hs[:, :-1] if drop is None else hs[:, :-1] * drop  # [T, L-1, B, H]
        res["w_in"] = _per_layer(g.grad_gi[:, 1:]).transpose(1, 2) @ _per_layer(below)
    if want["b_in"]:
        res["b_in"] = g.grad_gi[:, 1:].sum((0, 2))
    if want["w_hh"]:
        h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]])  # [T, L, B, H]
        res["w_hh"] = _per_layer(g.grad_gh).transpose(1, 2) @ _per_layer(h_prev)
    if want["b_hh"]:
        res["b_hh"] = g.grad_gh.sum((0, 2))
    if want["w_c"]:
        res["w_c"] = _flat(g.grad_opre).T @ _flat(torch.cat([ctx, top], -1))
    if g.grad_q is not None:
        if want["w_q"]:
            res["w_q"] = _flat(g.grad_q).T @ _flat(top)
        if want["b_q"]:
            res["b_q"] = g.grad_q.sum((0, 1))
    return res


def _flat(t):
    """[T, B, K] -> [T * B, K]."""
    return t.reshape(-1, t.shape[-1])


def _per_layer(t):
    """[T, L, B, K] -> [L, T * B, K] (one GEMM per layer as a batched matmul)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[-1])


def _backward(*args):
    *args, needs = args
    grad_out, grad_attn, grad_h_n, grad_c_n, out, attn, gates, cells, hs, ctx = args[N_ARGS:]
    backend, cell, xw, keys, memory, mask, params, h0, c0, feed0, drop = _unpack(args)
    saved = (gates, cells, hs, ctx)
    contract.check_decoder_backward(cell, grad_out, grad_attn, grad_h_n, grad_c_n, xw, keys, memory, mask, params,
                                    h0, c0, feed0, drop, out, attn, saved)
    if len(needs) != len(GRAD_NAMES):
        raise RuntimeError(f"fastrnn: needs must have {len(GRAD_NAMES)} entries, got {len(needs)}")
    impl = _impl(backend, xw)
    with kernel_range(f"fastrnn::decoder_bwd[{impl.name}]", xw.device):
        g = impl.decoder_backward(cell, grad_out, grad_attn, grad_h_n, grad_c_n, xw, keys, memory, mask, params,
                                  h0, c0, feed0, drop, out, attn, saved)
    with kernel_range("fastrnn::decoder_weight_grads", xw.device):
        res = _weight_grads(g, params, h0, feed0, drop, out, hs, ctx, needs)
    empty = xw.new_empty(0)
    return [res[n].contiguous() if need and res.get(n) is not None else empty for n, need in zip(GRAD_NAMES, needs)]


def _fake_backward(*args):
    needs, empty = args[-1], args[2].new_empty(0)
    return [args[p].new_empty(args[p].shape) if need and args[p] is not None else empty
            for p, need in zip(GRAD_POS, needs)]


def _reference(*args):
    """The four outputs as ``_forward`` computes them, by the reference backend's equations
    (plain, differentiable torch operations). For the double backward."""
    backend, cell, *contract_args = _unpack(args)
    out, attn, h_n, c_n, _ = backends.load("torch", "decoder").decoder_forward(cell, *contract_args, False)
    return out, attn, h_n, c_n if c_n is not None else out.new_empty(0)


def _materialise(grads, outputs):
    """Output gradients as the backward op takes them: zeros for an unused output; an LSTM's
    ``grad_c_n`` always a tensor, a GRU's None."""
    out = [torch.zeros_like(o) if g is None else g for g, o in zip(grads[:3], outputs[:3])]
    c_n = outputs[3]
    out.append(None if c_n.numel() == 0 else (torch.zeros_like(c_n) if grads[3] is None else grads[3]))
    return out


class _Decoder(torch.autograd.Function):
    """The autograd formula of ``fastrnn::decoder``: ``decoder_fwd`` (training), then
    ``decoder_bwd``. Saves the inputs, out, attn and the backend's saved tensors."""
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        with below_autograd():
            return tuple(torch.ops.fastrnn.decoder_fwd(*args, True))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.strings = inputs[:2]
        ctx.save_for_backward(*inputs[2:], *output)
        ctx.mark_non_differentiable(*output[4:])

    @staticmethod
    def backward(ctx, *grads):
        tensors = ctx.saved_tensors
        args = [*ctx.strings, *tensors[:N_ARGS - 2]]
        out, attn, h_n, c_n, *saved = tensors[N_ARGS - 2:]
        needs = [ctx.needs_input_grad[p] for p in GRAD_POS]
        go = _materialise(grads[:4], (out, attn, h_n, c_n))
        result = _decoder_bwd_autograd(*args, *go, out, attn, *saved, needs)
        full = [None] * N_ARGS
        for p, need, g in zip(GRAD_POS, needs, result):
            if need:
                full[p] = g
        return tuple(full)


class _DecoderBwd(torch.autograd.Function):
    """The autograd formula of ``fastrnn::decoder_bwd`` (double backward, as
    ``fastrnn.ops.rnn_layer._RNNLayerBwd``): forward the fused backward, backward the reference
    forward recomputed under autograd and its vector-Jacobian product differentiated."""
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        *rest, needs = args
        with below_autograd():
            return tuple(torch.ops.fastrnn.decoder_bwd(*rest, list(needs)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.strings, ctx.needs = inputs[:2], inputs[-1]
        ctx.save_for_backward(*inputs[2:N_ARGS + 4])

    @staticmethod
    def backward(ctx, *cotangents):
        tensors = ctx.saved_tensors
        args = [*ctx.strings, *tensors[:N_ARGS - 2]]
        grad_outputs = list(tensors[N_ARGS - 2:])
        grad_pos = [p for p, need in zip(GRAD_POS, ctx.needs) if need]
        want_args = [p for p in GRAD_POS if ctx.needs_input_grad[p]]
        want_go = [k for k in range(4) if ctx.needs_input_grad[N_ARGS + k] and grad_outputs[k] is not None]
        grads = backward_of_backward(_reference, args, grad_pos, grad_outputs,
                                     [c for c, need in zip(cotangents, ctx.needs) if need], want_args, want_go)
        result = [None] * len(ctx.needs_input_grad)
        for pos, g in zip(want_args + [N_ARGS + k for k in want_go], grads):
            result[pos] = g
        return tuple(result)


def _requires_grad(args, positions):
    return torch.is_grad_enabled() and any(args[p] is not None and args[p].requires_grad for p in positions)


def _decoder_autograd(*args):
    """Autograd kernel of ``fastrnn::decoder``."""
    if _requires_grad(args, GRAD_POS):
        return _Decoder.apply(*args)[:4]
    with below_autograd():
        return torch.ops.fastrnn.decoder(*args)


def _decoder_bwd_autograd(*args):
    """Autograd kernel of ``fastrnn::decoder_bwd``: the fused kernels for a first-order backward,
    ``_DecoderBwd`` while a graph is being built (``create_graph=True``)."""
    if _requires_grad(args, GRAD_POS + tuple(range(N_ARGS, N_ARGS + 4))):
        *rest, needs = args
        return list(_DecoderBwd.apply(*rest, tuple(needs)))
    with below_autograd():
        return torch.ops.fastrnn.decoder_bwd(*args)


define(f"decoder_fwd({DECODER_ARGS}, bool training) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
       "Tensor)", _forward, _fake_forward,
       vmap=vmap_by_loop(lambda *a: torch.ops.fastrnn.decoder_fwd(*a)))
define(f"decoder_bwd({DECODER_ARGS}, Tensor grad_out, Tensor grad_attn, Tensor grad_h_n, Tensor? grad_c_n, "
       "Tensor out, Tensor attn, Tensor gates, Tensor cells, Tensor hs, Tensor ctx, bool[] needs) -> Tensor[]",
       _backward, _fake_backward, _decoder_bwd_autograd,
       vmap=vmap_by_loop(lambda *a: torch.ops.fastrnn.decoder_bwd(*a)))
define(f"decoder({DECODER_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)", lambda *a: _forward(*a, False)[:4],
       lambda *a: _fake_forward(*a, False)[:4], _decoder_autograd,
       vmap=vmap_by_loop(lambda *a: torch.ops.fastrnn.decoder(*a)))


def decoder(backend, cell, xw, keys, memory, mask, params: DecoderParams, h0, c0, feed0, drop):
    """The fused decoder on contract shapes through the backend named ``backend`` (None:
    automatic). Returns ``(out [T, B, H], attn [T, B, S], h_n [L, B, H], c_n [L, B, H] | None)``."""
    args = (backend_arg(backend), cell, xw, keys, memory, mask, *params, h0, c0, feed0, drop)
    if torch.compiler.is_compiling():
        out, attn, h_n, c_n = torch.ops.fastrnn.decoder(*args)
    else:
        out, attn, h_n, c_n = _decoder_autograd(*args)
    return out, attn, h_n, (c_n if cell == "lstm" else None)
