"""Speed of the numba attention decoder (``fastrnn.backends.numba_decoder``) against the reference
backend (``fastrnn.backends.reference_decoder``, plain PyTorch), in one process.

    python bench/decoder_numba_speed.py [--rounds 7] [--threads 1,2] [--cells lstm,gru]
        [--scores additive,dot] [--blocks 0] [--dtype float32] [--mask] [--clock wall|thread]
        [--T 50 --S 50 --B 32 --H 256 --M 256 --L 1]

Calls the backends' ``decoder_forward`` (training False and True) and ``decoder_backward``
directly (no op layer, no autograd), input feeding on. For each case it first checks the numba
results against the reference, then runs ``rounds`` rounds; each round times the reference and
numba once per kernel, alternating which goes first, so that noise from other processes hits
both alike. Prints the median time of each and the median per-round ratio reference / numba
(> 1: numba faster). ``--blocks`` sweeps ``numba_decoder.ROW_BLOCK`` (rows per task; 0 = the
backend's rule, one block per thread; 1 = one row per task, i.e. per-row GEMVs). Threads:
torch's and numba's counts are both set (the kernels run on ``min`` of the two,
``runtime.kernel_call``). Results: the docstring of ``fastrnn/backends/numba_decoder.py``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numba
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fastrnn.backends import numba_decoder, reference_decoder  # noqa: E402

import decoder_harness as harness  # noqa: E402


def make_case(cell, opts, **shape):
    """The harness's case with the weights at the usual init scale (std 1/sqrt(fan-in)): its
    std-0.5 weights make a 256-wide recurrence chaotic (float32 rounding differences grow ~5x per
    step and the check below could not pass at T=50)."""
    args, grads = harness.make_case(cell, opts, empty_row=False, **shape)
    H, M = shape["H"], shape["M"]
    p = args["params"]
    s = lambda t, fan: None if t is None else t * (2.0 / fan ** 0.5)  # noqa: E731  (harness: std 0.5)
    args["params"] = p._replace(w_feed=s(p.w_feed, H), w_in=s(p.w_in, H), w_hh=s(p.w_hh, H), w_q=s(p.w_q, H),
                                v=s(p.v, H), w_c=s(p.w_c, M + H))
    return args, grads


def check(got, want):
    """The largest error over every output and gradient, relative to that tensor's largest
    magnitude; a sanity check (rounding differences grow along 50 steps, a bug is O(1))."""
    worst = 0.0
    for k, w in want.items():
        if isinstance(w, torch.Tensor) and w.numel():
            worst = max(worst, ((got[k].double() - w.double()).abs().max() / (w.double().abs().max() + 1e-30)).item())
    if not worst < 1e-2:
        raise AssertionError(f"numba differs from the reference: relative error {worst:.3g}")
    return worst


def kernels(impl, args, grads):
    """{mode: zero-argument callable} for the three kernels of one backend."""
    saved = impl.decoder_forward(**args, training=True)
    out, attn, _, _, sv = saved
    return {
        "fwd infer": lambda: impl.decoder_forward(**args, training=False),
        "fwd train": lambda: impl.decoder_forward(**args, training=True),
        "backward": lambda: impl.decoder_backward(**grads, **args, out=out, attn=attn, saved=sv),
    }


CLOCK = time.perf_counter


def timed(f):
    t0 = CLOCK()
    f()
    return CLOCK() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--scores", default="additive,dot")
    ap.add_argument("--blocks", default="0")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mask", action="store_true")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="thread: CPU time of the calling thread (1 thread only), which does not count "
                         "time other processes take from the core")
    for k, d in dict(T=50, S=50, B=32, H=256, M=256, L=1).items():
        ap.add_argument(f"--{k}", type=int, default=d)
    o = ap.parse_args()
    dtype = getattr(torch, o.dtype)
    global CLOCK
    if o.clock == "thread":
        if o.threads != "1":
            ap.error("--clock thread measures the calling thread only: use it with --threads 1")
        CLOCK = time.thread_time
    print(f"T={o.T} S={o.S} B={o.B} H={o.H} M={o.M} L={o.L} {o.dtype}, input feeding, mask={o.mask}; "
          f"median of {o.rounds} rounds ({o.clock} clock, ms); ratio = reference / numba")
    for nth in (int(x) for x in o.threads.split(",")):
        torch.set_num_threads(nth)
        numba.set_num_threads(nth)
        for cell in o.cells.split(","):
            for score in o.scores.split(","):
                opts = {"feed"} | ({"additive"} if score == "additive" else set()) | ({"mask"} if o.mask else set())
                args, grads = make_case(cell, frozenset(opts), L=o.L, T=o.T, B=o.B, S=o.S, M=o.M, H=o.H,
                                        dtype=dtype)
                err = check(harness.run("numba", args, grads), harness.run("torch", args, grads))
                ref = kernels(reference_decoder, args, grads)
                for block in (int(x) for x in o.blocks.split(",")):
                    numba_decoder.ROW_BLOCK = block or None
                    fast = kernels(numba_decoder, args, grads)
                    for f in fast.values():
                        f()  # warm
                    times = {m: ([], []) for m in ref}
                    for r in range(o.rounds):
                        for m in ref:
                            pair = [(0, ref[m]), (1, fast[m])]
                            for which, f in (pair if r % 2 else pair[::-1]):
                                times[m][which].append(timed(f))
                    for m, (tr, tn) in times.items():
                        ratios = [a / b for a, b in zip(tr, tn)]
                        print(f"threads={nth} {cell:4} {score:8} block={block:2} {m:9}  "
                              f"reference {1e3 * statistics.median(tr):8.2f}  numba {1e3 * statistics.median(tn):8.2f}"
                              f"  ratio {statistics.median(ratios):5.2f}  (rel. err {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
