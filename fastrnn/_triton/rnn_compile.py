"""Compile the recurrence kernels for a CUDA target without a GPU (Triton front end, LLVM, ptxas).

The interpreter runs kernel bodies as numpy code, so it accepts things the compiler rejects
(and never sees register pressure or unsupported dtype combinations). This ahead-of-time check
catches those on a machine with no GPU:

    python -m fastrnn._triton.rnn_compile                 # every configuration, fp32/fp16/bf16/fp64, sm_90
    python -m fastrnn._triton.rnn_compile --quick fp16    # LSTM (+proj) and GRU in training: plain, all options
    python -m fastrnn._triton.rnn_compile --ops sdpa,decoder fp32 fp64   # the attention and decoder kernels

What is compiled is what the backend launches: the time loops of ``fastrnn.backends.triton_rnn``
run on small CPU tensors against a stand-in for the kernel module that records every launch's
keyword arguments instead of running it (a tensor becomes a pointer of its dtype, None a
constexpr None, a Python int an i32 or, equal to 1, a constexpr, as the JIT specialises them).
So the list follows the launch code by construction; each distinct launch is compiled once per
tile.

``TRITON_INTERPRET`` must be unset: the kernels have to be decorated as compiled kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

T, B, H, PROJ = 3, 2, 16, 8  # three steps: the backward loop launches with and without HAS_PREV
# the options of each cell (docs/variants.md); GRU reset_after=False ("before") excludes layer norm
_OPTIONS = {"lstm": ("ln", "peephole", "dropout", "zoneout", "reset"),
            "gru": ("ln", "dropout", "zoneout", "reset", "before"),
            "rnn_tanh": ("ln", "dropout", "zoneout", "reset"), "rnn_relu": ("ln", "dropout", "zoneout", "reset")}


def _option_sets(cell, quick):
    """The plain cell, every option on with and without layer norm (row and tile mode) and, in
    full, each option alone."""
    opts = set(_OPTIONS[cell])
    sets = [set(), opts - {"before"}, opts - {"ln"}]
    return sets if quick else sets + [{o} for o in sorted(opts)]


def _cases(quick):
    """(cell, proj, options, training, bias, tf32): quick = LSTM (with and without projection) and
    GRU in training; full = every cell, inference too, plain without bias and with TF32 dots."""
    cells = ("lstm", "gru") if quick else ("lstm", "gru", "rnn_tanh", "rnn_relu")
    for cell in cells:
        for proj in (0, PROJ) if cell == "lstm" else (0,):
            for opts in _option_sets(cell, quick):
                for training in (True,) if quick else (False, True):
                    for bias, tf32 in ([(True, False)] if quick or opts else
                                       [(True, False), (False, False), (True, True)]):
                        yield cell, proj, opts, training, bias, tf32


def _jit_function(value):
    """The JITFunction of a kernel (an Autotuner wraps one), else None."""
    fn = value.fn if hasattr(value, "configs") else value
    return fn if hasattr(fn, "arg_names") and hasattr(fn, "params") else None


class _Recorder:
    """Stands in for a kernel module: ``kernel[grid](*args, **kwargs)`` appends ``(name, kwargs)``
    with the positional arguments named (``num_warps`` and other launch options stay in kwargs)."""

    def __init__(self, kernels):
        self.kernels, self.launches = kernels, []

    def __getattr__(self, name):
        value = getattr(self.kernels, name)
        fn = _jit_function(value)
        if fn is None:  # not a kernel
            return value
        launches = self.launches

        class Launcher:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((name, {**dict(zip(fn.arg_names, args)), **kwargs}))
        return Launcher()


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name)
        else:
            os.environ[name] = old


def _run(tr, dtype, cell, proj, opts, training, bias):
    """One forward (and in training one backward) through the backend on dummy CPU tensors."""
    import torch

    from ..contract.rnn import GATES, Variant
    G, Hr = GATES[cell] * H, proj or H
    r = lambda *shape: torch.rand(*shape).to(dtype)
    v = {}
    if "ln" in opts:
        v.update(ln_hh_weight=r(G), ln_hh_bias=r(G))
        if cell == "lstm":
            v.update(ln_c_weight=r(H), ln_c_bias=r(H))
    if "peephole" in opts:
        v.update(peephole=r(3, H))
    if "dropout" in opts:
        v.update(rec_mask=r(B, Hr))
    if "zoneout" in opts:
        v.update(zoneout_h=r(T, B, Hr), **({"zoneout_c": r(T, B, H)} if cell == "lstm" else {}))
    if "reset" in opts:
        v.update(reset=torch.zeros(T, B, dtype=torch.bool))
    if "before" in opts:
        v.update(reset_after=False)
    variant = Variant(**v) if v else None
    w_hh, w_hr, h0, c0 = r(G, Hr), r(Hr, H) if proj else None, r(B, Hr), r(B, H) if cell == "lstm" else None
    h_seq, h_T, c_T, saved = tr.rnn_forward(cell, r(T, B, G), w_hh, r(G) if bias else None, h0, c0, w_hr, None,
                                            False, training, variant)
    if training:
        tr.rnn_backward(cell, r(T, B, Hr), r(B, Hr), c0, w_hh, w_hr, h0, c0, None, False, saved, variant)


def launches(dtype, quick=False):
    """Every distinct launch ``(kernel name, keyword arguments)`` of the backend for ``dtype``."""
    import torch

    from ..backends import triton_rnn as tr
    from . import rnn_kernels as k
    recorder = _Recorder(k)
    saved_module, tr._kernels_module = tr._kernels_module, recorder
    try:
        with torch.no_grad():
            for cell, proj, opts, training, bias, tf32 in _cases(quick):
                if tf32 and dtype != torch.float32:
                    continue
                with _env(tr.TF32_ENV, "1" if tf32 else "0"):
                    _run(tr, dtype, cell, proj, opts, training, bias)
    finally:
        tr._kernels_module = saved_module
    unique = {}
    for name, kwargs in recorder.launches:  # the tiles' BLOCK_* are not in kwargs yet: the same for all
        signature, constexprs = _signature(getattr(k, name).fn, kwargs)
        unique.setdefault((name, *signature.values(), *map(repr, constexprs.values())), (name, kwargs))
    return list(unique.values())


TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "uint8": "u8",
                "int64": "i64", "int32": "i32"}


def _signature(fn, kwargs):
    """The signature and constexprs of the compiled kernel a launch selects, specialised as the JIT
    does: a None argument and an int equal to 1 (a unit stride) become constexprs."""
    import torch
    signature, constexprs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = kwargs.get(name)
        if param.is_constexpr or value is None or (type(value) is int and value == 1 and not param.do_not_specialize):
            signature[name], constexprs[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[str(value.dtype).removeprefix("torch.")]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    return signature, constexprs


def _compile(kernel, kwargs, config, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(kernel)
    signature, constexprs = _signature(fn, dict(kwargs, **config.kwargs))
    return triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


@contextlib.contextmanager
def _patched(module, **attrs):
    old = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


def _sdpa_calls(dtype, quick):
    """Forward and backward of the attention backend: every mask / causal / dropout combination,
    E = Ev and E != Ev (GQA group of 2); quick: E != Ev with every option on."""
    import torch

    from ..backends import triton_sdpa as ts
    from ..contract.sdpa import SdpaMask
    N, Nk, L, S = 4, 2, 37, 45
    for E, Ev in ((8, 5),) if quick else ((64, 64), (8, 5)):
        q, k, v = torch.randn(N, L, E).to(dtype), torch.randn(Nk, S, E).to(dtype), torch.randn(Nk, S, Ev).to(dtype)
        g, lse = torch.randn(N, L, Ev).to(dtype), torch.randn(N, L, dtype=torch.float64 if dtype == torch.float64
                                                              else torch.float32)
        masked = SdpaMask(torch.randn(1, L, S).to(dtype), torch.zeros(N, dtype=torch.long))
        for mask in (masked,) if quick else (None, masked):
            for causal in (True,) if quick else (False, True):
                for dropout_p, seed in ((0.25, torch.tensor(12345)),) + (() if quick else ((0.0, torch.tensor(0)),)):
                    ts.sdpa_forward(q, k, v, mask, 0.4, causal, dropout_p, seed)
                    ts.sdpa_backward(g, q, k, v, g, lse, mask, 0.4, causal, dropout_p, seed)


def _decoder_calls(dtype, quick):
    """Forward (training and inference) and backward of the decoder backend: LSTM and GRU, two
    layers, additive with feeding, mask and dropout, and dot without them; quick: the LSTM with
    all of them, training."""
    import torch

    from ..backends import triton_decoder as td
    from ..contract.decoder import GATES, DecoderParams
    Ly, T, B, S, M, H = 2, 3, 5, 7, 6, 16
    r = lambda *shape: torch.randn(*shape).to(dtype)  # noqa: E731
    for cell in ("lstm",) if quick else ("lstm", "gru"):
        G = GATES[cell] * H
        for full in (True,) if quick else (True, False):
            params = DecoderParams(r(G, H) if full else None, r(Ly - 1, G, H), r(Ly - 1, G), r(Ly, G, H), r(Ly, G),
                                   *((r(H, H), r(H), r(H)) if full else (None,) * 3), r(H, M + H))
            mask = torch.rand(B, S) > 0.4 if full else None
            drop = r(T, Ly - 1, B, H) if full else None
            c0 = r(Ly, B, H) if cell == "lstm" else None
            args = (r(T, B, G), r(B, S, H), r(B, S, M), mask, params, r(Ly, B, H), c0, r(B, H), drop)
            if not quick:
                td.decoder_forward(cell, *args, False)
            out, attn, h_n, c_n, saved = td.decoder_forward(cell, *args, True)
            td.decoder_backward(cell, r(T, B, H), r(T, B, S), r(Ly, B, H), c0, *args, out, attn, saved)


def op_launches(op, dtype, quick=False):
    """Every distinct launch ``(kernel name, kwargs)`` of the ``"sdpa"`` or ``"decoder"`` backend
    on a GPU, recorded from CPU tensors with the GPU's block sizes."""
    import torch

    from ..backends import triton_decoder as td
    from ..backends import triton_sdpa as ts
    if op == "sdpa":
        from . import sdpa_kernels as kernels
        recorder = _Recorder(kernels)
        patch = _patched(ts, _kernels_module=recorder, INTERPRETER_BLOCKS=ts.GPU_BLOCKS,
                         _compute_dtype=lambda *t: (list(t), None))
        calls = _sdpa_calls
    else:
        from . import decoder_kernels as kernels
        recorder = _Recorder(kernels)
        patch = _patched(td, _kernels_module=recorder, INTERPRETER_BLOCKS=td.GPU_BLOCKS)
        calls = _decoder_calls
    with patch, torch.no_grad():
        calls(dtype, quick)
    unique = {}
    for name, kwargs in recorder.launches:
        signature, constexprs = _signature(_jit_function(getattr(kernels, name)), kwargs)
        unique.setdefault((name, *signature.values(), *map(repr, constexprs.values())), (name, kwargs))
    return kernels, list(unique.values())


def compile_ops(ops, dtypes, quick=False, arch=90, log=print):
    """Compile every launch of the attention (``"sdpa"``) and decoder backends for ``arch``, with
    the launch's own ``num_warps``; the decoder runs float32 / float64 only."""
    import torch
    import triton
    n, t0 = 0, time.time()
    for op in ops:
        for dtype in dtypes:
            if op == "decoder" and dtype not in ("fp32", "fp64"):
                continue
            torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                           "fp64": torch.float64}[dtype]
            kernels, launches = op_launches(op, torch_dtype, quick)
            for name, kwargs in launches:
                config = triton.Config({}, num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 2))
                _compile(getattr(kernels, name), kwargs, config, arch)
                n += 1
            log(f"{op} {dtype}: {n} kernels compiled for sm_{arch} in {time.time() - t0:.0f} s")
    return n


DTYPES = ("fp32", "fp16", "bf16", "fp64")


def compile_all(dtypes, quick=False, arch=90, configs=None, log=print, only=None):
    """Compile every launch (``only``: of the kernels whose name contains it) with the smallest and
    the largest tile (quick: the smallest); row-mode launches (layer norm) with the row-mode tiles."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter has nothing to compile")
    import torch

    from . import rnn_kernels as k
    ends = lambda c: c[:1] if quick or len(c) == 1 else [c[0], c[-1]]
    tiles = configs or ends(k.configs(interpreted=False))
    rows = ends(k.configs(interpreted=False, row_mode=True))
    n, t0 = 0, time.time()
    for dtype in dtypes:
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                       "fp64": torch.float64}[dtype]
        for name, kwargs in launches(torch_dtype, quick):
            if only and only not in name:
                continue
            for config in (rows if kwargs.get("LN") else tiles):
                _compile(getattr(k, name), kwargs, config, arch)
                n += 1
        log(f"{dtype}: {n} kernels compiled for sm_{arch} in {time.time() - t0:.0f} s")
    return n


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dtypes", nargs="*", default=list(DTYPES), help=f"of {DTYPES}")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--only", help="compile only the kernels whose name contains this")
    ap.add_argument("--ops", default="rnn", help="comma list of rnn, sdpa, decoder (default %(default)s)")
    a = ap.parse_args()
    ops = a.ops.split(",")
    if "rnn" in ops:
        compile_all(a.dtypes, a.quick, a.arch, only=a.only)
    compile_ops([o for o in ops if o != "rnn"], a.dtypes, a.quick, a.arch)
