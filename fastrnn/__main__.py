"""``python -m fastrnn {bench,info,profile}``."""
from __future__ import annotations

import argparse
import json
import sys

import torch

import fastrnn
from fastrnn import backends


def cmd_bench(args) -> int:
    from . import bench
    if args.threads:
        fastrnn.set_num_threads(args.threads)
    if args.backends:
        # an explicit backend that cannot run is an error, not a silently shorter table
        families = {"sdpa" if op == "sdpa" else "rnn" for op in args.ops}
        bad = {f"{b} ({fam}): {r}" for b in args.backends for fam in families
               if (r := backends.unavailable_reason(b, args.device, fam)) is not None}
        if bad:
            print("fastrnn bench: requested backend(s) cannot run here:\n  " + "\n  ".join(sorted(bad)),
                  file=sys.stderr)
            return 2
    info = bench.machine()
    print(f"fastrnn bench on {info['cpu']} ({info['logical_cpus']} CPUs, torch {info['torch']}, "
          f"{info['torch_threads']} threads)", flush=True)
    results = bench.run(ops=args.ops, backends=args.backends, modes=args.modes, quick=args.quick,
                        rounds=args.rounds, device=args.device, progress=not args.no_progress)
    if not results:
        print("fastrnn bench: no case ran (no usable backend); nothing written", file=sys.stderr)
        return 1
    print(bench.table(results))
    paths = bench.save(results, args.out, info)
    print("wrote " + ", ".join(paths.values()))
    bad = [r for r in results if not r.gate_ok]
    if bad:
        print(f"correctness gate FAILED for {len(bad)} case(s)", file=sys.stderr)
        return 1
    return 0


def cmd_info(args) -> int:
    from . import bench
    info = bench.machine()
    print("fastrnn", fastrnn.__version__)
    for k, v in info.items():
        print(f"  {k}: {v}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for op in backends.OPS:
            print(f"backends for {op} on {dev}:")
            for name, reason in backends.backend_status(dev, op).items():
                print(f"  {name:<7} {'usable' if reason is None else 'unavailable: ' + reason}")
    print("backend details:")
    for name in backends.BACKENDS:
        mod = backends.load(name, "rnn")
        if not isinstance(mod, str) and hasattr(mod, "info"):
            try:
                print(f"  {name}: {json.dumps(mod.info(), default=str)}")
            except Exception as exc:  # info must never break the command
                print(f"  {name}: info failed: {exc}")
    print(f"threads: torch {torch.get_num_threads()}")
    return 0


def cmd_profile(args) -> int:
    from torch.profiler import ProfilerActivity, profile
    kind = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[args.op]
    device = torch.device(args.device)
    m = getattr(fastrnn, kind)(args.input_size, args.hidden_size, num_layers=args.layers,
                               bidirectional=args.bidirectional, backend=args.backend, device=device)
    x = torch.randn(args.seq_len, args.batch, args.input_size, device=device, requires_grad=args.mode == "train")

    def step():
        if args.mode == "train":
            y, _ = m(x)
            y.sum().backward()
        else:
            with torch.no_grad():
                m(x)

    step()  # warm-up outside the trace (JIT compiles, first-touch allocations)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        for _ in range(args.iters):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"wrote Chrome trace {args.trace} (open in chrome://tracing or ui.perfetto.dev)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastrnn", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bench", help="time fastrnn against torch (correctness gate first)")
    b.add_argument("--ops", nargs="+", default=["lstm", "gru", "rnn", "sdpa"], choices=["lstm", "gru", "rnn", "sdpa"])
    b.add_argument("--backends", nargs="+", default=None, choices=sorted(backends.BACKENDS),
                   help="default: every usable one but the reference")
    b.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"],
                   help="infer: forward under no_grad; train: forward + backward")
    b.add_argument("--quick", action="store_true", help="one small shape, few rounds (a smoke test)")
    b.add_argument("--rounds", type=int, default=None)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--device", default="cpu")
    b.add_argument("--out", default="bench/out", help="folder for bench.json, bench.md, bench.png")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="versions, usable backends and why not, threads, CPU flags")
    i.set_defaults(func=cmd_info)

    f = sub.add_parser("profile", help="run one op under torch.profiler")
    f.add_argument("--op", default="lstm", choices=["lstm", "gru", "rnn"])
    f.add_argument("--backend", default=None, choices=sorted(backends.BACKENDS))
    f.add_argument("--mode", default="train", choices=["infer", "train"])
    f.add_argument("--seq-len", "-T", type=int, default=50)
    f.add_argument("--batch", "-B", type=int, default=16)
    f.add_argument("--input-size", "-I", type=int, default=128)
    f.add_argument("--hidden-size", "-H", type=int, default=128)
    f.add_argument("--layers", type=int, default=1)
    f.add_argument("--bidirectional", action="store_true")
    f.add_argument("--iters", type=int, default=3)
    f.add_argument("--rows", type=int, default=15)
    f.add_argument("--device", default="cpu")
    f.add_argument("--trace", default=None, help="write a Chrome trace here")
    f.set_defaults(func=cmd_profile)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
