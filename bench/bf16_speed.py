"""bfloat16 on the CPU: torch's modules in bf16 against fastrnn's cpp backend in bf16, natively
(bf16 GEMMs, this backend's ``dtypes``) and as before it had the path (computing in float32 and
casting back: what ``fastrnn.backends.plan`` does for a dtype a backend does not list), with
float32 alongside for scale. Every candidate is timed interleaved in one process.

    python bench/bf16_speed.py [--threads 1] [--rounds 9] [--out bench/results/bf16_cpu/speed_t1.json]

Results: bench/results/bf16_cpu.md.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch import nn

import fastrnn
from fastrnn.backends import cpp_rnn
from fastrnn.bench import machine, time_interleaved

SHAPES = [(100, 32, 256, 256), (50, 64, 512, 512)]
OPS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


class Float32Path:
    """The cpp backend without bf16 in its dtypes while a call runs: bf16 computes in float32."""

    def __init__(self, module):
        self.module = module

    def __call__(self, x):
        saved = cpp_rnn.dtypes
        cpp_rnn.dtypes = (torch.float32, torch.float64)
        try:
            return self.module(x)
        finally:
            cpp_rnn.dtypes = saved


def runner(module, x, mode):
    if mode == "infer":
        def run():
            with torch.no_grad():
                module(x)
        return run
    xg = x.detach().clone().requires_grad_()

    def run():
        module(xg)[0].float().sum().backward()
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    fastrnn.set_num_threads(args.threads)
    if torch.bfloat16 not in cpp_rnn.dtypes:
        raise SystemExit("the cpp backend has no bf16 path on this CPU (python -m fastrnn info)")
    rows = []
    for op, cls in OPS.items():
        for T, B, I, H in SHAPES:
            torch.manual_seed(0)
            ref32 = getattr(nn, cls)(I, H)
            fast32 = getattr(fastrnn, cls)(I, H, backend="cpp")
            fast32.load_state_dict(ref32.state_dict())
            ref16 = getattr(nn, cls)(I, H).bfloat16()
            ref16.load_state_dict(ref32.state_dict())
            fast16 = getattr(fastrnn, cls)(I, H, backend="cpp").bfloat16()
            fast16.load_state_dict(ref32.state_dict())
            x32 = torch.randn(T, B, I)
            x16 = x32.bfloat16()
            for mode in ("infer", "train"):
                fns = {"torch bf16": runner(ref16, x16, mode), "fastrnn bf16": runner(fast16, x16, mode),
                       "fastrnn bf16 via f32": runner(Float32Path(fast16), x16, mode),
                       "torch f32": runner(ref32, x32, mode), "fastrnn f32": runner(fast32, x32, mode)}
                ms = time_interleaved(fns, args.rounds)
                med = {k: statistics.median(v) for k, v in ms.items()}
                row = {"op": op, "shape": f"T{T}_B{B}_I{I}_H{H}", "mode": mode, "median_ms": med,
                       "spread": {k: (max(v) - min(v)) / statistics.median(v) for k, v in ms.items()}}
                rows.append(row)
                print(f"{op:<5} {row['shape']:<20} {mode:<6} " + "  ".join(f"{k} {v:7.2f}" for k, v in med.items())
                      + f"  | torch bf16 / fastrnn bf16 {med['torch bf16'] / med['fastrnn bf16']:.2f}x,"
                      f" was {med['torch bf16'] / med['fastrnn bf16 via f32']:.2f}x", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
