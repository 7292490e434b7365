"""Small calls (streaming decoders, RL policies, online ASR): a cell or a T=1 layer at batch 1-8,
fastrnn against torch, interleaved in one process.

    python bench/small_calls.py --threads 1 [--backend cpp] [--rounds 7] [--calls 200] [--quick]
                                [--dtype bfloat16] [--modules LSTMCell,GRU]

Grid: LSTMCell, GRUCell, RNNCell and the T=1 layers LSTM, GRU, RNN (one layer) at B in {1, 2, 8},
I = H in {64, 256}; jobs "no_grad" (forward under torch.no_grad) and "fwd+bwd" (forward, then
backward of the sum of every output with input and weights requiring grad). Each round times
`--calls` calls of torch's module and then of fastrnn's (same parameters), alternating; the ratio
is torch / fastrnn per round, reported as median (min-max) over the rounds. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastrnn

MODULES = ("LSTMCell", "GRUCell", "RNNCell", "LSTM", "GRU", "RNN")


def _pair(name, size, backend, dtype):
    t = getattr(torch.nn, name)(size, size).to(dtype)
    f = getattr(fastrnn, name)(size, size, backend=backend).to(dtype)
    f.load_state_dict(t.state_dict())
    return t, f


def _inputs(name, B, size, grad, dtype):
    cell = name.endswith("Cell")
    shape = (B, size) if cell else (1, B, size)
    x, h = torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)
    state = (h, torch.randn_like(h)) if name.startswith("LSTM") else h
    return x.requires_grad_(grad), state


def _call(module, x, state, grad):
    def no_grad():
        with torch.no_grad():
            module(x, state)

    def train():
        out = module(x, state)
        flat = [t for t in (out if isinstance(out, tuple) else (out,)) for t in (t if isinstance(t, tuple) else (t,))]
        sum(t.sum() for t in flat).backward()
    return train if grad else no_grad


def _time(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def measure(name, B, size, job, backend, rounds, calls, dtype=torch.float32):
    torch.manual_seed(0)
    tm, fm = _pair(name, size, backend, dtype)
    grad = job == "fwd+bwd"
    x, state = _inputs(name, B, size, grad, dtype)
    a, b = _call(tm, x, state, grad), _call(fm, x, state, grad)
    for _ in range(max(10, calls // 10)):  # warm up both (allocator, first-call work)
        a(), b()
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(_time(a, calls))
        tb.append(_time(b, calls))
    ratios = sorted(x / y for x, y in zip(ta, tb))
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios), ratios[0], ratios[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="cpp")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="one size, one batch (a smoke run)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="modules and inputs")
    p.add_argument("--modules", default=",".join(MODULES), help="comma list of %(default)s")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    batches, sizes = ((2,), (64,)) if args.quick else ((1, 2, 8), (64, 256))
    print(f"threads={torch.get_num_threads()} backend={args.backend} dtype={args.dtype} rounds={args.rounds} "
          f"calls={args.calls}\n")
    print("| module | B | H | job | torch us | fastrnn us | torch / fastrnn (min-max) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.modules.split(","):
        for size in sizes:
            for B in batches:
                for job in ("no_grad", "fwd+bwd"):
                    ta, tb, r, lo, hi = measure(name, B, size, job, args.backend, args.rounds, args.calls, dtype)
                    print(f"| {name} | {B} | {size} | {job} | {ta:.1f} | {tb:.1f} | {r:.2f}x ({lo:.2f}-{hi:.2f}) |",
                          flush=True)


if __name__ == "__main__":
    main()
