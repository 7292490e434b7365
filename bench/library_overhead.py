"""What the torch.library registration costs in eager mode (issue 7).

The registered path (``torch.ops.fastrnn.rnn_layer``: dispatcher -> autograd kernel ->
``rnn_layer_fwd`` below autograd; backward through ``rnn_layer_bwd``) against the plain autograd
path it replaced: one ``autograd.Function`` calling the very same Python kernels directly
(``fastrnn.ops.rnn_layer._forward`` / ``_backward``), no dispatcher. Same module, same weights,
same backend, interleaved rounds in one process; the ratio registered / plain is the overhead
(target: <= 1.10 at T=10, B=1, H=32).

    python bench/library_overhead.py [--quick] [--threads 2] [--out bench/results/library_overhead_cpu.md]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

import fastrnn
import fastrnn.functional as FR
from fastrnn.bench import _time, machine
from fastrnn.contract.rnn import Variant
from fastrnn.ops import rnn_layer as RL
from fastrnn.ops.library import backend_arg


class _PlainLayer(torch.autograd.Function):
    """The unregistered path: fastrnn.ops.rnn_layer's autograd formula, saving the same tensors,
    with the kernels called straight from it instead of through the dispatcher."""

    @staticmethod
    def forward(ctx, *args):
        h_seq, h_T, c_T, saved = RL._forward(*args, training=True)
        ctx.flags = (args[0], args[1], args[11], args[-1])
        ctx.save_for_backward(*(a if isinstance(a, torch.Tensor) or a is None else None for a in args),
                              h_seq, *saved)
        return h_seq, h_T, c_T

    @staticmethod
    def backward(ctx, grad_h_seq, grad_h_T, grad_c_T):
        tensors = ctx.saved_tensors
        args = list(tensors[:RL.N_ARGS])
        args[0], args[1], args[11], args[-1] = ctx.flags
        h_seq, saved = tensors[RL.N_ARGS], list(tensors[RL.N_ARGS + 1:])
        needs = [ctx.needs_input_grad[pos] for pos, _ in RL.GRAD_ARGS]
        grads = RL._backward(*args, grad_h_seq, grad_h_T, grad_c_T if args[1] == "lstm" else None,
                             h_seq, saved, needs)
        result = [None] * len(args)
        for pos, g in zip((pos for (pos, _), need in zip(RL.GRAD_ARGS, needs) if need), grads):
            result[pos] = g
        return tuple(result)


def plain_rnn_layer(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, w_hr=None, batch_sizes=None,
                    reverse=False, backend=None, *, ln_ih=None, variant=None):
    ln_w, ln_b = ln_ih if ln_ih is not None else (None, None)
    args = (backend_arg(backend), cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes,
            reverse, ln_w, ln_b, *(variant or Variant()))
    if torch.is_grad_enabled() and any(args[p] is not None and args[p].requires_grad for p, _ in RL.GRAD_ARGS):
        h_seq, h_T, c_T = _PlainLayer.apply(*args)
    else:
        h_seq, h_T, c_T = RL._forward(*args, training=False)[:3]
    return h_seq, h_T, (c_T if cell == "lstm" else None)


@contextlib.contextmanager
def layer_path(fn):
    """Route fastrnn.functional's layer calls through ``fn`` while active (both contenders pay
    for this switch, so it does not bias the ratio)."""
    saved = FR.rnn_layer
    FR.rnn_layer = fn
    try:
        yield
    finally:
        FR.rnn_layer = saved


def _runner(module, x, mode, plain):
    xg = x.detach().clone().requires_grad_(mode == "train")
    path = plain_rnn_layer if plain else RL.rnn_layer

    def run():
        with layer_path(path):
            if mode == "infer":
                with torch.no_grad():
                    module(xg)
            else:
                out, _ = module(xg)
                out.sum().backward()
    return run


def measure(ops=("LSTM", "GRU"), backends=("cpp", "numba"), shape=(10, 1, 32, 32), rounds=15,
            inner=200):
    """Rows of (op, backend, mode, registered us, plain us, ratio, spread of ratios)."""
    T, B, I, H = shape
    rows = []
    for op in ops:
        for backend in backends:
            if fastrnn.backends.unavailable_reason(backend, "cpu") is not None:
                continue
            torch.manual_seed(0)
            module = getattr(fastrnn, op)(I, H, backend=backend)
            x = torch.randn(T, B, I)
            for mode in ("train", "infer"):
                fns = {"registered": _runner(module, x, mode, False), "plain": _runner(module, x, mode, True)}
                s = _time(fns, rounds, inner, torch.device("cpu"))
                ratios = [a / b for a, b in zip(s["registered"], s["plain"])]
                reg, pl = statistics.median(s["registered"]) * 1e3, statistics.median(s["plain"]) * 1e3
                rows.append((op, backend, mode, reg, pl, statistics.median(ratios),
                             (max(ratios) - min(ratios))))
    return rows


def markdown(rows, shape, info) -> str:
    T, B, I, H = shape
    lines = [f"# Eager cost of the torch.library registration (T={T}, B={B}, I={I}, H={H})", "",
             "Registered path (`torch.ops.fastrnn.rnn_layer`) vs the plain autograd path calling the "
             "same kernels (bench/library_overhead.py). Module forward (+ backward in train), "
             "medians of interleaved rounds; ratio = median of per-round registered / plain.", "",
             "| op | backend | mode | registered us | plain us | ratio | ratio range |",
             "|---|---|---|---|---|---|---|"]
    for op, backend, mode, reg, pl, ratio, spread in rows:
        lines.append(f"| {op} | {backend} | {mode} | {reg:.1f} | {pl:.1f} | {ratio:.3f} | {spread:.3f} |")
    lines += ["", f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch "
              f"{info['torch']} ({info['torch_threads']} threads), Python {info['python']}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (smoke test)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write a markdown table here")
    args = parser.parse_args(argv)
    if args.threads:
        fastrnn.set_num_threads(args.threads)
    shape = (10, 1, 32, 32)
    rows = measure(shape=shape, rounds=2 if args.quick else 15, inner=5 if args.quick else 200)
    text = markdown(rows, shape, machine())
    print(text)
    if args.out:
        args.out.write_text(text)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
