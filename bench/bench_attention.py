"""Benchmark: fastrnn.scaled_dot_product_attention (cpp, numba) against torch's
F.scaled_dot_product_attention (its CPU flash kernel) in one process.

    python bench/bench_attention.py                      # full run, markdown on stdout
    python bench/bench_attention.py --out bench/results/attention_cpu.md
    python bench/bench_attention.py --quick              # fewer rounds, smaller memory check

What it does, in order:
1. Correctness gate: every backend against torch (outputs and q/k/v gradients, float32, the
   project tolerance of fastrnn.testing) at every benchmarked shape. Nothing is timed if it fails.
2. Wall clock at torch's thread count: per round, each implementation runs forward (no grad)
   and forward+backward once, in a rotating order (interleaved, so load from other processes
   hits all of them alike). A ratio is torch's time / fastrnn's time *in the same round*; the
   table gives the median ratio and its spread (min-max) over rounds -- the noise.
3. One thread, CPU time of the calling thread (time.thread_time): insensitive to other
   processes taking the cores; the cleanest per-core comparison on a shared machine.
4. Peak memory at B=1, H=8, L=S=4096, E=64: a fresh subprocess per (implementation, pass)
   resets the kernel's high-water mark (/proc/self/clear_refs) after making the inputs and reports
   VmHWM - VmRSS, i.e. everything the call allocated, C++ buffers included.
FLOPs: forward 4*B*H*L*S*E (half when causal), backward 2.5x forward (the FlashAttention
convention); GFLOP/s is reported against torch.mm's float32 rate measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import fastrnn
from fastrnn.testing import assert_close

CONFIGS = [  # B, H, L, S, E, causal
    (4, 8, 512, 512, 64, False),
    (4, 8, 512, 512, 64, True),
    (1, 8, 2048, 2048, 64, False),
]
MEMORY_SHAPE = (1, 8, 4096, 4096, 64)


def attention(impl):
    if impl == "torch":
        return F.scaled_dot_product_attention
    return lambda *a, **kw: fastrnn.scaled_dot_product_attention(*a, backend=impl, **kw)


def make_inputs(B, H, L, S, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, E, generator=g)
    k = torch.randn(B, H, S, E, generator=g)
    v = torch.randn(B, H, S, E, generator=g)
    return q, k, v, torch.randn(B, H, L, E, generator=g)


def gate(impls):
    """Every backend against torch at every benchmarked shape (float32)."""
    for B, H, L, S, E, causal in CONFIGS:
        q, k, v, g = make_inputs(B, H, L, S, E, seed=1)
        results = {}
        for impl in ["torch"] + impls:
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = attention(impl)(*leaves, is_causal=causal)
            out.backward(g)
            results[impl] = [out.detach()] + [t.grad for t in leaves]
        for impl in impls:
            for name, a, e in zip(("out", "grad_q", "grad_k", "grad_v"), results[impl], results["torch"]):
                assert_close(a, e, f"{impl} {name} at {(B, H, L, S, E, causal)}", grad=name != "out")


def timed_runs(impls, rounds, clock):
    """{config: {impl: {"fwd": [s...], "fwdbwd": [s...]}}}, interleaved and rotated per round."""
    res = {}
    for cfg in CONFIGS:
        B, H, L, S, E, causal = cfg
        q, k, v, g = make_inputs(B, H, L, S, E)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        order = ["torch"] + impls
        res[cfg] = {impl: {"fwd": [], "fwdbwd": []} for impl in order}

        def fwd(impl):
            with torch.no_grad():
                attention(impl)(q, k, v, is_causal=causal)

        def fwdbwd(impl):
            out = attention(impl)(*leaves, is_causal=causal)
            torch.autograd.grad(out, leaves, g)

        for impl in order:  # warm-up (numba compiles here, brgemm JITs its kernels)
            fwd(impl)
            fwdbwd(impl)
        for r in range(rounds):
            rot = order[r % len(order):] + order[:r % len(order)]
            for impl in rot:
                for kind, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
                    t0 = clock()
                    fn(impl)
                    res[cfg][impl][kind].append(clock() - t0)
    return res


def flops(cfg, kind):
    B, H, L, S, E, causal = cfg
    f = 4 * B * H * L * S * E * (0.5 if causal else 1.0)
    return f * (3.5 if kind == "fwdbwd" else 1.0)


def matmul_rate(clock, n=2048, reps=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = clock()
        a @ b
        times.append(clock() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def table(res, impls, mm_rate, title):
    lines = [f"### {title}", "",
             f"torch.mm float32 2048^3 in the same setting: **{mm_rate:.0f} GFLOP/s**.", "",
             "| shape (B, H, L=S, E) | causal | pass | torch ms | " +
             " | ".join(f"{i} ms | {i} ratio (min-max) | {i} GFLOP/s" for i in impls) + " |",
             "|---|---|---|---|" + "---|---|---|" * len(impls)]
    for cfg, per in res.items():
        B, H, L, S, E, causal = cfg
        for kind in ("fwd", "fwdbwd"):
            t_torch = per["torch"][kind]
            cells = [f"({B}, {H}, {L}, {E})", "yes" if causal else "no",
                     "forward" if kind == "fwd" else "fwd+bwd", f"{statistics.median(t_torch) * 1e3:.1f}"]
            for impl in impls:
                t = per[impl][kind]
                ratios = [a / b for a, b in zip(t_torch, t)]
                cells += [f"{statistics.median(t) * 1e3:.1f}",
                          f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f})",
                          f"{flops(cfg, kind) / statistics.median(t) / 1e9:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- peak memory (one subprocess per measurement) ---------------------------------------------------

def _status_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def memory_child(impl, bwd):
    B, H, L, S, E = MEMORY_SHAPE
    fn = attention(impl)
    small = [torch.randn(1, 1, 64, E, requires_grad=True) for _ in range(3)]
    fn(*small).sum().backward()  # libraries loaded, kernels compiled
    q, k, v, g = make_inputs(B, H, L, S, E)
    leaves = [t.requires_grad_(bwd) for t in (q, k, v)]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _status_mib("VmRSS")
    out = fn(*leaves)
    if bwd:
        out.backward(g)
    print(f"{_status_mib('VmHWM') - base:.1f}")


def peak_memory(impls):
    rows = []
    for bwd in (False, True):
        cells = {}
        for impl in ["torch"] + impls:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", impl, str(int(bwd))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            cells[impl] = float(out.strip().splitlines()[-1])
        rows.append((bwd, cells))
    B, H, L, S, E = MEMORY_SHAPE
    inputs = B * H * L * E * 4 / 2 ** 20
    lines = [f"### Peak memory above the inputs, B={B}, H={H}, L=S={L}, E={E} (each of q, k, v, "
             f"grad_out is {inputs:.0f} MiB)", "",
             "| pass | " + " | ".join(f"{i} MiB" for i in ["torch"] + impls) + " |",
             "|---|" + "---|" * (len(impls) + 1)]
    for bwd, cells in rows:
        lines.append(f"| {'fwd+bwd' if bwd else 'forward'} | " +
                     " | ".join(f"{cells[i]:.1f}" for i in ["torch"] + impls) + " |")
    return "\n".join(lines)


def machine():
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:20]
    except OSError:
        lscpu = ["lscpu not available"]
    from fastrnn.backends import cpp_sdpa
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod in ("numba", "triton", "numpy"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return ("```\n" + "\n".join(lscpu) + "\n```\n\n" + ", ".join(versions) +
            f"; torch threads {torch.get_num_threads()}; fastrnn cpp GEMM: {cpp_sdpa.info()['blas']}; "
            f"load average at start: {os.getloadavg()[0]:.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    ap.add_argument("--backends", default="cpp,numba")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child[0], args.memory_child[1] == "1")
    impls = [b for b in args.backends.split(",") if b]
    rounds = 3 if args.quick else args.rounds
    parts = ["## Machine", "", machine(), ""]
    gate(impls)
    parts += ["Correctness gate passed: outputs and q/k/v gradients of every backend match torch "
              "(float32, fastrnn.testing tolerances) at every shape below.", ""]
    nthreads = torch.get_num_threads()
    res = timed_runs(impls, rounds, time.perf_counter)
    parts += [table(res, impls, matmul_rate(time.perf_counter),
                    f"Wall clock, {nthreads} threads, median of {rounds} interleaved rounds "
                    "(ratio = torch time / fastrnn time in the same round; > 1 means fastrnn is faster)"), ""]
    torch.set_num_threads(1)
    res1 = timed_runs(impls, rounds, time.thread_time)
    parts += [table(res1, impls, matmul_rate(time.thread_time),
                    f"One thread, CPU time of the thread, median of {rounds} interleaved rounds"), ""]
    torch.set_num_threads(nthreads)
    if not args.no_memory:
        parts += [peak_memory(impls), ""]
    parts += [f"Load average at the end: {os.getloadavg()[0]:.1f}", ""]
    report = "\n".join(parts)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
