"""The ``torch.ops.fastrnn`` namespace: every fastrnn op, registered once for every backend.

Each op family has a public, differentiable op (``fastrnn::rnn_layer``, ``fastrnn::rnn_cell``,
``fastrnn::sdpa``) and the two ops its autograd formula calls (``*_fwd`` saves what backward
needs, ``*_bwd``). All take the backend's name as their first argument (``""`` = the registry's
automatic choice), so one registration serves cpp, numba, triton and the reference; the kernels
pick the backend module through ``fastrnn.backends`` when they run.

Why the low-level ``torch.library.Library`` API and not ``torch.library.custom_op``: a
``custom_op`` with ``register_autograd`` goes through a generic Python wrapper (pytree flattening,
schema checks) on every call; measured on this project's CPU, a call plus its backward cost
~96 us against ~44 us for the same op defined here with an ``Autograd`` kernel that is a plain
``autograd.Function`` (and ~33 us for that Function without any registration). At T=10, B=1,
H=32 a whole LSTM layer's forward and backward take ~150 us, so the difference decides whether
the registered path is free. What the op is to torch is the same either way: a schema, a kernel
(``CompositeExplicitAutograd``: any device), a fake kernel (``register_fake``: shapes for
``torch.compile`` and meta tensors) and an autograd kernel; ``torch.library.opcheck`` tests all
four (tests/test_library.py).

torch.func and higher derivatives (docs/architecture.md, "Double backward and torch.func"): the
autograd kernels are ``autograd.Function``s with ``setup_context`` and ``generate_vmap_rule`` (a
classic twin of each runs outside torch.func transforms, for speed), the ops have vmap rules
(``torch.library.register_vmap``, which serves ``Library``-defined ops too),
the ``*_bwd`` ops have autograd kernels of their own whose backward (the double backward)
differentiates the reference backend's equations (``backward_of_backward``), and every kernel
returns contiguous tensors, which its fake kernel promises.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils import _pytree as pytree

LIB = torch.library.Library("fastrnn", "DEF")


def define(schema: str, kernel, fake, autograd=None, vmap=None) -> None:
    """Define ``fastrnn::<name>`` with its kernel (every device), fake kernel and, when given,
    its autograd kernel (a function of the op's arguments that calls an autograd.Function) and
    its vmap rule (``rule(info, in_dims, *args) -> (outputs, out_dims)``, called with the
    batched dims removed; ``torch.library.register_vmap``)."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, _autocast_off(kernel), "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastrnn::{name}", fake, lib=LIB)
    if autograd is not None:
        LIB.impl(name, autograd, "Autograd")
    if vmap is not None:
        torch.library.register_vmap(f"fastrnn::{name}", vmap, lib=LIB)


def _autocast_off(kernel):
    """The kernel with autocast off while it runs: the ops have no autocast kernel, so inside a
    user's autocast region the torch ops *within* a kernel (the big GEMMs) would otherwise run in
    the autocast dtype. The user-facing functions apply torch's autocast policy to the op's inputs
    (fastrnn.precision); the kernel computes in the dtype it is given."""
    def run(*args):
        on = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        if not on:
            return kernel(*args)
        with contextlib.ExitStack() as stack:
            for d in on:
                stack.enter_context(torch.autocast(d, enabled=False))
            return kernel(*args)
    return run


def below_autograd():
    """Context for calling an op's forward/backward from inside its autograd formula: skips
    the op's own autograd kernel (the formula is the autograd)."""
    return torch._C._AutoDispatchBelowAutograd()


def backend_arg(backend: str | None) -> str:
    return "" if backend is None else backend


def define_composite(schema: str, fn) -> None:
    """Define ``fastrnn::<name>`` as a composition of other fastrnn ops: autograd, fake kernels
    and torch.compile see through it to the ops it calls."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, fn, "CompositeImplicitAutograd")


def arg_names(schema_args: str) -> list[str]:
    """The argument names of a schema's argument list, in order (positions by name, not number)."""
    return [a.split()[-1] for a in schema_args.split(", ")]


# ---- torch.func: vmap rules --------------------------------------------------------------------

def is_batched(in_dim) -> bool:
    """Whether a vmap ``in_dims`` entry (an int, None, or a list of them for ``Tensor[]``) is
    batched at all."""
    if isinstance(in_dim, (list, tuple)):
        return any(d is not None for d in in_dim)
    return in_dim is not None


def _sample(arg, in_dim, i):
    if not is_batched(in_dim):
        return arg
    if isinstance(arg, (list, tuple)):
        return [a if d is None else a.select(d, i) for a, d in zip(arg, in_dim)]
    return arg.select(in_dim, i)


def vmap_by_loop(op):
    """A vmap rule that runs ``op`` once per sample and stacks the results (out_dims 0): the
    rule for what cannot be folded into the op's own batch (shared weights that need per-sample
    gradients, packed sequences, per-row dropout seeds). The op is called with the vmapped
    level excluded, so each call runs the real kernel."""
    def rule(info, in_dims, *args):
        results = [op(*(_sample(a, d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)]
        stacked = pytree.tree_map(lambda *xs: torch.stack(xs), *results)
        return stacked, pytree.tree_map(lambda _: 0, results[0])
    return rule


def fold(t: torch.Tensor, in_dim, row_dim: int, V: int) -> torch.Tensor:
    """A per-sample tensor whose rows (the op's own batch) are dim ``row_dim``, vmapped at
    ``in_dim`` (None: the same for every sample), as one batch of ``V * rows`` rows, sample v's
    at ``[v * rows, (v + 1) * rows)``. An unbatched tensor is copied V times."""
    if in_dim is None:
        t = t.unsqueeze(row_dim).expand(*t.shape[:row_dim], V, *t.shape[row_dim:])
    else:
        t = t.movedim(in_dim, row_dim)
    return t.flatten(row_dim, row_dim + 1)


def unfold(t: torch.Tensor, row_dim: int, V: int) -> torch.Tensor:
    """The inverse of ``fold`` for an output: ``[.., V * rows, ..] -> [.., V, rows, ..]``; its
    vmap out_dim is ``row_dim``."""
    return t.unflatten(row_dim, (V, t.shape[row_dim] // V))


# ---- double backward ---------------------------------------------------------------------------

def backward_of_backward(recompute, args, grad_pos, grad_outputs, cotangents, want_args,
                         want_grad_outputs):
    """The backward of an op's backward, for ops whose backward is the vector-Jacobian product
    ``grads[k] = d <grad_outputs, recompute(*args)> / d args[grad_pos[k]]``.

    ``recompute`` is the op's forward written with differentiable torch operations (the
    reference backend's equations); its VJP is differentiated once more, against ``cotangents``
    (one per entry of ``grad_pos``; None = zero). Returns the gradients of ``args[p]`` for ``p``
    in ``want_args`` followed by those of ``grad_outputs[k]`` for ``k`` in ``want_grad_outputs``
    (None for an absent grad output).

    Written with ``torch.func.vjp`` rather than ``torch.autograd.grad``: it works the same in
    eager mode and inside torch.func transforms (``jacrev(jacrev(f))`` runs this under vmap and
    grad), and its result stays differentiable by the caller's autograd (third derivatives).
    """
    diff_pos = sorted(set(grad_pos) | set(want_args))
    live = [k for k, g in enumerate(grad_outputs) if g is not None]

    def outputs(*diff):
        full = list(args)
        for p, t in zip(diff_pos, diff):
            full[p] = t
        outs = recompute(*full)
        return tuple(outs[k] for k in live)

    def first_order(diff, gos):
        _, vjp = torch.func.vjp(outputs, *diff)
        grads = vjp(tuple(gos))
        return tuple(grads[diff_pos.index(p)] for p in grad_pos)

    primal = (tuple(args[p] for p in diff_pos), tuple(grad_outputs[k] for k in live))
    first, vjp = torch.func.vjp(first_order, *primal)
    d_args, d_gos = vjp(tuple(torch.zeros_like(f) if c is None else c for f, c in zip(first, cotangents)))
    return ([d_args[diff_pos.index(p)] for p in want_args]
            + [d_gos[live.index(k)] if k in live else None for k in want_grad_outputs])
