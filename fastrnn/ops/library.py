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
"""
from __future__ import annotations

import contextlib

import torch

LIB = torch.library.Library("fastrnn", "DEF")


def define(schema: str, kernel, fake, autograd=None) -> None:
    """Define ``fastrnn::<name>`` with its kernel (every device), fake kernel and, when given,
    its autograd kernel (a function of the op's arguments that calls an autograd.Function)."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, _autocast_off(kernel), "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastrnn::{name}", fake, lib=LIB)
    if autograd is not None:
        LIB.impl(name, autograd, "Autograd")


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
