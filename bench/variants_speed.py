"""Issue 8's benchmark: each variant in fastrnn against the same variant written as a plain
PyTorch loop over time steps, and against that loop under torch.compile, in one process.

    python bench/variants_speed.py [--quick] [--cases lstm_all,gru_zoneout] [--backends cpp,numba]
                                   [--rounds 7] [--threads 2] [--no-compile] [--out PATH]

Target (issue 8): fastrnn >= 5x the eager loop and >= 2x the compiled loop at T=100, B=32,
I=H=256 on CPU, training (forward + backward of ``out.sum()``).

Per variant (``variant_loops.CASES``):
1. build the fastrnn module per backend and the loop with the same parameter values; compile a
   second copy of the loop (``torch.compile(dynamic=False, fullgraph=True)``; without fullgraph
   only if that fails, which the report says) and time its first training call: compile time;
2. gate (``variant_loops.gate``): every fastrnn backend and the compiled loop against the eager
   loop -- outputs, final states, gradients of the input and of every parameter, in training
   mode from the same RNG state (the loop draws its masks in fastrnn.functional's documented
   order). fastrnn backends are compared in float64 (float32 layer-norm gradients at T=100 are
   too ill-conditioned to compare implementations); the compiled loop, in float32 against the
   float64 loop, may be at most 4x as far off as the eager loop. A failed gate is reported and
   its ratios are not;
3. time in interleaved rounds: each round runs every candidate once (inner calls averaged),
   alternating the order every round and leaving a short idle gap between candidates (torch's
   OpenMP pool and numba's spin for milliseconds after their last parallel region), so drift on
   a shared machine hits all alike. Reports medians and ratio = loop time / fastrnn time (> 1:
   fastrnn faster); "best" is the ratio of the fastest rounds.

Writes a markdown report (default bench/results/variants_cpu.md; --quick prints only unless
--out is given). Run it on an otherwise idle machine: ``uptime`` load well below 1.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

import fastrnn
from fastrnn.bench import machine, shape_id

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from variant_loops import CASES, CASES_BY_NAME, VariantLoop, build, compile_loop, gate, gate_tolerance, make_inputs  # noqa: E402

FULL = (100, 32, 256, 256)   # issue 8's T, B, I, H
QUICK = (20, 4, 32, 32)
TARGET_EAGER, TARGET_COMPILED = 5.0, 2.0
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "variants_cpu.md")


def train_step(m, x, reset):
    """A zero-argument training step: forward, ``out.sum().backward()`` (grads accumulate; the
    same for every candidate)."""
    xg = x.detach().clone().requires_grad_()
    m.train()

    def run():
        y, _ = m(xg, reset_mask=reset) if reset is not None else m(xg)
        y.sum().backward()
    return run


def interleaved(fns: dict, rounds: int, inner: int, gap_s: float = 0.03) -> dict:
    """Milliseconds per call, ``rounds`` samples per candidate; order alternates every round."""
    samples = {k: [] for k in fns}
    order = list(fns)
    for fn in fns.values():  # warm-up: allocator, caches, numba's first call
        fn()
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            time.sleep(gap_s)
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[k]()
            samples[k].append((time.perf_counter() - t0) / inner * 1e3)
    return samples


def compiled_loop(case, I, H, state, run_args):
    """A compiled copy of the loop and (compile seconds, fullgraph). The first training call
    compiles forward and backward; its time is the compile time (it includes one step's run)."""
    for fullgraph in (True, False):
        torch._dynamo.reset()  # fresh caches: one compiled loop at a time, clean compile time
        loop = VariantLoop.for_case(case, I, H)
        loop.load_state_dict(state)
        compile_loop(loop, fullgraph=fullgraph)
        t0 = time.perf_counter()
        try:
            train_step(loop, *run_args)()
        except Exception as e:  # noqa: BLE001 -- dynamo raises many types for a graph break
            if not fullgraph:
                raise
            print(f"  fullgraph=True failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                  "compiling with graph breaks", file=sys.stderr)
            continue
        return loop, time.perf_counter() - t0, fullgraph


def run_case(case, shape, backends, rounds, do_compile):
    T, B, I, H = shape
    x, reset = make_inputs(case, T, B, I)
    # every build uses the same seed: the same parameters for all backends and the loop
    fast = {b: build(case, I, H, b)[0] for b in backends}
    loop = build(case, I, H, "torch")[1]
    row = {"case": case.name, "shape": shape_id(*shape), "backends": {}, "compile_s": None,
           "fullgraph": None, "gates": {}}
    cands = {"loop": loop}
    if do_compile:
        comp, row["compile_s"], row["fullgraph"] = compiled_loop(case, I, H, loop.state_dict(), (x, reset))
        cands["compiled"] = comp
    cands.update(fast)
    for k, m in cands.items():
        if k == "loop":
            continue
        res = gate(m, loop, x, reset, in_float64=k != "compiled")
        worst = max(res, key=lambda n: res[n][0] / (1 if res[n][3] else 1e-30))  # a failure first
        f32 = max(res, key=lambda n: res[n][1])
        row["gates"][k] = (worst, res[worst][0], all(v[3] for v in res.values()), res[f32][1], res[f32][2])
    fns = {k: train_step(m, x, reset) for k, m in cands.items()}
    probe = interleaved({"loop": fns["loop"]}, 1, 1, 0)["loop"][0]
    inner = max(1, min(20, int(50 / max(probe, 1e-3))))  # >= ~50 ms per sample
    samples = interleaved(fns, rounds, inner)
    row["ms"] = {k: statistics.median(v) for k, v in samples.items()}
    row["best_ms"] = {k: min(v) for k, v in samples.items()}
    row["spread"] = {k: (max(v) - min(v)) / statistics.median(v) for k, v in samples.items()}
    row["rounds"], row["inner"] = rounds, inner
    return row


def ratio(row, base, b, best=False):
    t = row["best_ms" if best else "ms"]
    return t[base] / t[b]


def report(rows, info, args, shape, backends) -> str:
    T, B, I, H = shape
    lines = [
        "# Variants (issue 8): fastrnn vs the same variant as a PyTorch loop, eager and compiled", "",
        "`" + " ".join(["python bench/variants_speed.py", *args.argv]) + "`", "",
        f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs ({', '.join(info['cpu_flags'])}); "
        f"torch {info['torch']}, {info['torch_threads']} threads; numba {info['numba']}; python {info['python']}; "
        f"{datetime.date.today().isoformat()}.", "",
        f"Training (forward + backward of `out.sum()`), T={T}, B={B}, I={I}, H={H}, float32, one layer. "
        f"Median of {rows[0]['rounds'] if rows else '?'} interleaved rounds (order alternating each round). "
        "**ratio = loop time / fastrnn time** (> 1: fastrnn faster); `best` = the same for the fastest rounds. "
        f"Targets: >= {TARGET_EAGER:g}x the eager loop, >= {TARGET_COMPILED:g}x the compiled loop. "
        "The gate (`variant_loops.gate`: outputs, final states and every gradient against the eager loop, "
        "training mode, same random masks; fastrnn in float64, the compiled loop by the low-precision rule "
        "in float32) passed unless marked FAIL.", "",
    ]
    comp = any(r["compile_s"] is not None for r in rows)
    head = "| variant | loop ms |" + (" compiled ms | compile s |" if comp else "")
    sep = "|---|---:|" + ("---:|---:|" if comp else "")
    for b in backends:
        head += f" {b} ms | loop/{b} (best) |" + (f" compiled/{b} (best) |" if comp else "")
        sep += "---:|---:|" + ("---:|" if comp else "")
    lines += [head, sep]
    fails, misses = [], []
    for r in rows:
        ms = r["ms"]
        line = f"| {r['case']} | {ms['loop']:.1f} |"
        if comp:
            fg = "" if r["fullgraph"] else " (graph breaks)"
            line += f" {ms['compiled']:.1f} | {r['compile_s']:.0f}{fg} |"
        for b in backends:
            worst, err, ok = r["gates"][b][:3]
            if not ok:
                fails.append(f"{r['case']}/{b}: {worst} error {err:.2g}")
                line += f" {ms[b]:.1f} | gate FAIL |" + (" gate FAIL |" if comp else "")
                continue
            e, eb = ratio(r, "loop", b), ratio(r, "loop", b, True)
            if e < TARGET_EAGER:
                misses.append(f"{r['case']}/{b} vs eager {e:.2f}x")
            line += f" {ms[b]:.1f} | **{e:.2f}x** ({eb:.2f}) |"
            if comp:
                if not r["gates"]["compiled"][2]:
                    line += " compiled gate FAIL |"
                else:
                    c, cb = ratio(r, "compiled", b), ratio(r, "compiled", b, True)
                    if c < TARGET_COMPILED:
                        misses.append(f"{r['case']}/{b} vs compiled {c:.2f}x")
                    line += f" **{c:.2f}x** ({cb:.2f}) |"
        lines.append(line)
    spreads = sorted(s for r in rows for s in r["spread"].values())
    lines.append("")
    e64 = [g[1] for r in rows for k, g in r["gates"].items() if k != "compiled"]
    if e64:
        lines.append(f"Gate, fastrnn in float64: largest error {max(e64):.1e} "
                     f"(tolerance {gate_tolerance(T, max(I, H), torch.float64, True):.1e}).")
    lines.append("Float32 error against the float64 loop, largest over outputs and gradients, "
                 "candidate / eager loop: " + "; ".join(
                     f"{r['case']} " + ", ".join(f"{k} {g[3]:.1e}" for k, g in r["gates"].items())
                     + f" / {next(iter(r['gates'].values()))[4]:.1e}" for r in rows if r["gates"]) + ".")
    if spreads:
        lines.append(f"Noise: (max - min) / median of a candidate's rounds: median {statistics.median(spreads):.0%}, "
                     f"largest {spreads[-1]:.0%}.")
    lines.append("")
    lines.append("Gate failures: " + ("; ".join(fails) if fails else "none") + ".")
    lines.append("Below target: " + ("; ".join(misses) if misses else "none") + ".")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"T,B,I,H = {QUICK}, 3 rounds, no file unless --out")
    ap.add_argument("--cases", default=",".join(c.name for c in CASES))
    ap.add_argument("--backends", default=None, help="default: the available CPU backends but torch")
    ap.add_argument("--rounds", type=int, default=None, help="default 7 (3 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="fastrnn.set_num_threads(n) first")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile loop")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.threads:
        fastrnn.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    rounds = args.rounds or (3 if args.quick else 7)
    backends = (args.backends.split(",") if args.backends else
                [b for b in fastrnn.available_backends("cpu", "rnn") if b not in ("torch", "triton")])
    unknown = [c for c in args.cases.split(",") if c not in CASES_BY_NAME]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {list(CASES_BY_NAME)}")
    info = machine()
    print(f"{info['cpu']}, torch {info['torch']}, {info['torch_threads']} threads; load average "
          f"{os.getloadavg()[0]:.2f}; shape {shape_id(*shape)}; backends {backends}", file=sys.stderr)
    rows = []
    for name in args.cases.split(","):
        case = CASES_BY_NAME[name]
        t0 = time.perf_counter()
        rows.append(run_case(case, shape, backends, rounds, not args.no_compile))
        r = rows[-1]
        print(f"  {name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["ms"].items())
              + (f", compile {r['compile_s']:.0f} s" if r["compile_s"] is not None else "")
              + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    text = report(rows, info, args, shape, backends)
    print(text)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
