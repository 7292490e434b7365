"""``python -m fastrnn {bench,info,profile}``.

The parser is built from the standard library alone, so that ``--help`` and a mistyped option
answer at once; torch, the backends and the benchmark are imported by the command that needs
them; ``fastrnn/__init__.py`` defers its own imports when run this way (``_running_cli``).
"""
from __future__ import annotations

import argparse
import os
import sys

# = sorted(fastrnn.backends.BACKENDS), written out so the parser needs no import of the registry
# (tests/test_docs_snippets.py checks that the two agree)
BACKEND_NAMES = ("cpp", "numba", "torch", "triton")
RNN_OPS = ("lstm", "gru", "rnn")
OPS = RNN_OPS + ("sdpa",)
BENCH_OPS = OPS + ("decoder",)  # the decoder only when asked for (its numba kernels compile for a minute)
PROG = "python -m fastrnn"
DTYPES = ("float32", "bfloat16", "float16")


class _Parser(argparse.ArgumentParser):
    """Errors on one line, defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


class UsageError(Exception):
    """A request this machine cannot serve (no such device, backend unavailable): one line, exit 2."""


def _device(name: str):
    import torch
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: fastrnn runs on cpu and cuda")
    return device


def _check_backends(names, device, families):
    from fastrnn import backends
    bad = [f"{b} ({fam}): {r}" for b in names for fam in sorted(families)
           if (r := backends.unavailable_reason(b, device, fam)) is not None]
    if bad:
        raise UsageError("backend cannot run here: " + "; ".join(bad))


def _passive_wait_if_busy(argv) -> None:
    """On a busy machine, run the command again with ``OMP_WAIT_POLICY=PASSIVE`` (only from the
    command line, and only if the user has not set the policy). OpenMP's default lets a thread that
    waits for the others at the end of a parallel region spin; when other processes hold the cores
    it spins in the place of the thread it waits for. Measured on 2 cores at load 3.4: the default
    grid took 211 s with a median spread of 89% (ratios meaningless), and 14 s with a spread of 13%
    with PASSIVE (bench/results/bench_time_cpu.md). The variable is read when the OpenMP runtime
    loads (with torch), so it takes a new process. On an idle machine nothing changes."""
    if argv is not None or "OMP_WAIT_POLICY" in os.environ or not hasattr(os, "getloadavg"):
        return
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load < cpus:
        return
    print(f"note: the machine is busy (load average {load:.1f} on {cpus} CPUs): running with "
          "OMP_WAIT_POLICY=PASSIVE, which keeps waiting threads from spinning (set OMP_WAIT_POLICY "
          "yourself to choose)", file=sys.stderr, flush=True)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, "-m", "fastrnn", *sys.argv[1:]])


def cmd_bench(args) -> int:
    import torch

    import fastrnn
    from fastrnn import bench
    device = _device(args.device)
    if args.threads:
        fastrnn.set_num_threads(args.threads)
    if args.backends:
        # an explicit backend that cannot run is an error, not a silently shorter table
        _check_backends(args.backends, device, {bench.family(op) for op in args.ops})
    grid = "full" if args.full else "quick" if args.quick else "default"
    info = bench.machine()
    load = info["load_average"]
    print(f"fastrnn bench ({grid} grid, {args.dtype}) on {info['cpu']} ({info['logical_cpus']} CPUs, "
          f"torch {info['torch']}, "
          f"{info['torch_threads']} threads" + (f", load average {load:.1f}" if load is not None else "")
          + (f", OMP_WAIT_POLICY={info['omp_wait_policy']}" if info["omp_wait_policy"] else "") + ")",
          flush=True)
    results = bench.run(ops=args.ops, backends=args.backends, modes=args.modes, grid=grid,
                        rounds=args.rounds, device=device, progress=not args.no_progress,
                        dtype=getattr(torch, args.dtype))
    if not results:
        print("fastrnn bench: no case ran (no usable backend); nothing written", file=sys.stderr)
        return 1
    print(bench.table(results))
    paths = bench.save(results, args.out, info)
    print("wrote " + ", ".join(paths.values()))
    warning = bench.noise_warning(results, info)
    if warning:
        print(warning, file=sys.stderr)
    bad = [r for r in results if not r.gate_ok]
    if bad:
        print(f"correctness gate FAILED for {len(bad)} case(s)", file=sys.stderr)
        return 1
    return 0


def cmd_info(args) -> int:
    import json

    import torch

    import fastrnn
    from fastrnn import backends, bench
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


def _profile_step(args, device):
    """A zero-argument function running the op once (forward, and backward in train mode)."""
    import torch

    import fastrnn
    train = args.mode == "train"
    if args.op == "sdpa":
        q, k, v = (torch.randn(args.batch, args.heads, args.seq_len, args.head_dim, device=device,
                               requires_grad=train) for _ in range(3))

        def fn():
            return fastrnn.scaled_dot_product_attention(q, k, v, is_causal=args.causal, backend=args.backend)
    else:
        kind = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[args.op]
        m = getattr(fastrnn, kind)(args.input_size, args.hidden_size, num_layers=args.layers,
                                   bidirectional=args.bidirectional, backend=args.backend, device=device)
        x = torch.randn(args.seq_len, args.batch, args.input_size, device=device, requires_grad=train)

        def fn():
            return m(x)[0]

    def step():
        if train:
            fn().sum().backward()
        else:
            with torch.no_grad():
                fn()
    return step


def cmd_profile(args) -> int:
    from torch.profiler import ProfilerActivity, profile
    device = _device(args.device)
    if args.backend:
        _check_backends([args.backend], device, {"sdpa" if args.op == "sdpa" else "rnn"})
    step = _profile_step(args, device)
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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="fastrnn's command line: benchmark against torch, report what "
                "is usable here, profile one op.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{bench,info,profile}", parser_class=_Parser)

    b = sub.add_parser("bench", help="time fastrnn against torch in one process (correctness gate first)",
                       description="Time fastrnn against torch in one process, interleaved, after a "
                       "correctness gate; writes bench.json, bench.md, bench.png. The default grid takes "
                       "about 20 s on an idle 2-core machine, minutes on a busy one; --full about 3x that "
                       "(bench/results/bench_time_cpu.md).")
    b.add_argument("--ops", nargs="+", default=list(OPS), choices=BENCH_OPS,
                   help="ops to time; decoder (the fused attention decoder against its Python loop) only when named")
    b.add_argument("--backends", nargs="+", default=None, choices=BACKEND_NAMES,
                   help="backends to time (None: every usable one but the torch reference)")
    b.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"],
                   help="infer: forward under no_grad; train: forward + backward")
    grid = b.add_mutually_exclusive_group()
    grid.add_argument("--full", action="store_true",
                      help="every shape (batch 1 and the 512-wide layer, three attention shapes), not one per op")
    grid.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds: a smoke test, seconds")
    b.add_argument("--rounds", type=_positive, default=None,
                   help="timing rounds per case, median reported (None: 7, or 3 with --quick)")
    b.add_argument("--threads", type=_positive, default=None, help="CPU threads (None: torch's default)")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="the models' and inputs' dtype, torch's too (low precision: the correctness gate "
                        "compares both with float64)")
    b.add_argument("--out", default="bench/out", help="folder for bench.json, bench.md, bench.png")
    b.add_argument("--no-progress", action="store_true", help="no progress bar or per-case lines")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="versions, usable backends and why not, threads, CPU flags",
                       description="Versions, which backends are usable on which device and why not, "
                       "threads, CPU flags; compiles (or loads) numba's kernels to report the time.")
    i.set_defaults(func=cmd_info)

    f = sub.add_parser("profile", help="run one op under torch.profiler",
                       description="Run one op under torch.profiler; fastrnn's kernels appear by name "
                       "(fastrnn::lstm_layer_fwd[cpp], fastrnn::sdpa_bwd[numba], ...).")
    f.add_argument("--op", default="lstm", choices=OPS, help="a recurrence, or sdpa (attention)")
    f.add_argument("--backend", default=None, choices=BACKEND_NAMES, help="None: automatic")
    f.add_argument("--mode", default="train", choices=["infer", "train"], help="train adds backward")
    f.add_argument("--seq-len", "-T", type=_positive, default=50,
                   help="sequence length (sdpa: query and key length)")
    f.add_argument("--batch", "-B", type=_positive, default=16, help="batch size")
    f.add_argument("--input-size", "-I", type=_positive, default=128, help="RNN input features")
    f.add_argument("--hidden-size", "-H", type=_positive, default=128, help="RNN hidden units")
    f.add_argument("--layers", type=_positive, default=1, help="RNN layers")
    f.add_argument("--bidirectional", action="store_true", help="RNN in both directions")
    f.add_argument("--heads", type=_positive, default=8, help="sdpa: attention heads")
    f.add_argument("--head-dim", "-E", type=_positive, default=64, help="sdpa: features per head")
    f.add_argument("--causal", action="store_true", help="sdpa: causal mask")
    f.add_argument("--iters", type=_positive, default=3, help="profiled repetitions")
    f.add_argument("--rows", type=_positive, default=15, help="rows of the printed table")
    f.add_argument("--device", default="cpu", help="cpu or cuda")
    f.add_argument("--trace", default=None, help="write a Chrome trace here")
    f.set_defaults(func=cmd_profile)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "bench":
        _passive_wait_if_busy(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"{PROG} {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. --out or --trace where nothing can be written
        print(f"{PROG} {args.cmd}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
