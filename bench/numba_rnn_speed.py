"""Speed of the numba backend against torch.nn.LSTM / GRU (oneDNN on CPU), in one process.

    python bench/numba_rnn_speed.py [--rounds 9] [--backends numba] [--shapes all|small]
                                    [--threads N] [--clock wall|thread]

For each (cell, shape, mode) it first checks that the outputs (and, for training, the input
gradient) agree with torch, then runs ``rounds`` rounds; each round times torch and every
backend once each (``inner`` calls, averaged), alternating which goes first, so that noise from
other processes hits all of them alike. It prints the median time of each, the median, min and
max over rounds of the per-round ratio torch time / backend time (> 1: faster than torch), and
the ratio of the best (minimum) times, the least disturbed runs on a shared machine.
Modes: inference = forward under torch.no_grad(); training = forward + backward.

``--clock thread`` (only with ``--threads 1``) measures the CPU time of the calling thread
instead of wall time: time other processes take from the core is then not counted, which
makes single-thread comparisons stable on a loaded machine.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch

import fastrnn

SHAPES = {"all": [(100, 1, 256), (100, 32, 256), (50, 64, 512)], "small": [(20, 1, 64), (20, 8, 64)]}


def make(kind, H, backend):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(H, H)
    fast = {b: getattr(fastrnn, kind)(H, H, backend=b) for b in backend}
    for m in fast.values():
        m.load_state_dict(ref.state_dict())
    return ref, fast


def runner(m, x, grad, training):
    if training:
        xg = x.clone().requires_grad_()

        def run():
            out, _ = m(xg)
            out.backward(grad)
            xg.grad = None
            for p in m.parameters():
                p.grad = None
    else:
        def run():
            with torch.no_grad():
                m(x)
    return run


def check(ref, fast, x, grad, training, name):
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = []
    for m, xi in zip((ref, fast), xs):
        with torch.set_grad_enabled(training):
            out, _ = m(xi)
        if training:
            out.backward(grad)
        outs.append(out.detach())
    err = ((outs[1] - outs[0]).abs() / (1 + outs[0].abs())).max().item()
    assert err < 1e-4, f"{name}: output differs from torch by {err:.3g}"
    if training:
        gerr = ((xs[1].grad - xs[0].grad).abs() / (1 + xs[0].grad.abs())).max().item()
        assert gerr < 1e-3, f"{name}: grad_x differs from torch by {gerr:.3g}"


CLOCK = time.perf_counter


def timed(fn, inner):
    t0 = CLOCK()
    for _ in range(inner):
        fn()
    return (CLOCK() - t0) / inner


def machine() -> str:
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:20]
    except OSError:
        cpu = [platform.processor()]
    import numba
    return "\n".join(cpu + [f"python {platform.python_version()}, torch {torch.__version__}, "
                            f"numba {numba.__version__}, torch threads {torch.get_num_threads()}"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--backends", default="numba")
    ap.add_argument("--shapes", default="all", choices=list(SHAPES))
    ap.add_argument("--kinds", default="LSTM,GRU")
    ap.add_argument("--modes", default="inference,training")
    ap.add_argument("--threads", type=int, default=None, help="fastrnn.set_num_threads(n) first")
    ap.add_argument("--clock", default="wall", choices=["wall", "thread"])
    args = ap.parse_args()
    global CLOCK
    if args.threads:
        fastrnn.set_num_threads(args.threads)
    if args.clock == "thread":
        if torch.get_num_threads() != 1:
            raise SystemExit("--clock thread needs --threads 1 (other threads' time would be missed)")
        CLOCK = time.thread_time
    names = args.backends.split(",")
    print(machine())
    print(f"clock: {args.clock}, threads: torch {torch.get_num_threads()}, rounds: {args.rounds}")
    print()
    print("| cell | T | B | I=H | mode | torch ms | " + " | ".join(
        f"{b} ms | torch/{b} median [min, max] | best/best" for b in names) + " |")
    print("|---|---|---|---|---|---|" + "---|---|---|" * len(names))
    for kind in args.kinds.split(","):
        for T, B, H in SHAPES[args.shapes]:
            ref, fast = make(kind, H, names)
            x = torch.randn(T, B, H)
            grad = torch.randn(T, B, H)
            for mode in args.modes.split(","):
                training = mode == "training"
                for b in names:
                    check(ref, fast[b], x, grad, training, f"{kind}/{b}/{mode}")
                fns = {"torch": runner(ref, x, grad, training)}
                fns.update({b: runner(fast[b], x, grad, training) for b in names})
                once = timed(fns["torch"], 1)
                inner = max(1, int(0.05 / max(once, 1e-6)))
                for fn in fns.values():   # warm-up
                    timed(fn, inner)
                times = {k: [] for k in fns}
                order = list(fns)
                for r in range(args.rounds):
                    for k in (order if r % 2 == 0 else order[::-1]):
                        # torch's OpenMP pool and numba's spin for milliseconds after their last
                        # parallel region; let the previous contender's threads go idle first
                        time.sleep(0.03)
                        times[k].append(timed(fns[k], inner))
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                cells = []
                for b in names:
                    ratios = sorted(t / n for t, n in zip(times["torch"], times[b]))
                    cells.append(f"{med[b]:.2f} | **{statistics.median(ratios):.2f}** "
                                 f"[{ratios[0]:.2f}, {ratios[-1]:.2f}] | {min(times['torch']) / min(times[b]):.2f}")
                print(f"| {kind} | {T} | {B} | {H} | {mode} | {med['torch']:.2f} | " + " | ".join(cells) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
