"""GPU check and benchmark of the triton attention decoder against the reference backend.

    python bench/gpu_decoder.py                      # bench shape T=50 S=50 B=32 H=256 M=256 L=1
    python bench/gpu_decoder.py --sizes 50,50,64,512,512,2 --reps 20
    TRITON_INTERPRET=1 python bench/gpu_decoder.py --device cpu --sizes 3,5,4,8,6,2 --reps 1
                                                     # smoke test of this script on a CPU (no timing value)

For every cell (lstm, gru) and score (additive, dot) it
  1. builds one random case (input feeding, a memory mask with a fully masked row, float32);
  2. checks correctness before timing: every output, saved tensor and gradient of the triton
     backend (``fastrnn.backends.triton_decoder``) and of the reference backend run in float32
     on the same device, each against the reference run in float64; triton's error must be at
     most 2x the reference's own float32 error plus a floor of 1e-5 relative to the largest
     value (both compute in float32 IEEE: TF32 is off on both sides);
  3. times the backend calls themselves (the contract's ``decoder_forward`` /
     ``decoder_backward``; no op layer, no weight-gradient GEMMs): inference forward, and
     training forward + backward, with CUDA events, median of ``--reps`` after warm-up (the first
     triton call compiles);
  4. prints a markdown table (ms and the speedup reference / triton).

The reference backend on the GPU is a Python loop of torch ops (a few dozen small kernels per
step). Nothing is downloaded; the whole run is bounded by ``--timeout`` seconds (SIGALRM).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["50,50,32,256,256,1"], help="T,S,B,H,M,L (several allowed)")
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--scores", default="additive,dot")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: smoke test through the Triton interpreter (set TRITON_INTERPRET=1)")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions per case (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=600, help="seconds for the whole run")
    return ap.parse_args(argv)


def make_case(cell, additive, T, S, B, H, M, L, device, dtype, seed=0):
    """Contract arguments (as ``tests/decoder_harness.py`` builds them) and output gradients, in float64
    on ``device``, then cast by the caller."""
    import torch

    from fastrnn.contract.decoder import GATES, DecoderParams
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell] * H
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)  # noqa: E731
    w = 1.0 / H ** 0.5  # weights scaled like nn.Linear's init: activations stay in range at H = 256
    params = DecoderParams(r(G, H, scale=w), r(L - 1, G, H, scale=w), r(L - 1, G, scale=w), r(L, G, H, scale=w),
                           r(L, G, scale=w), *((r(H, H, scale=w), r(H, scale=w), r(H, scale=w)) if additive
                                               else (None, None, None)),
                           r(H, M + H, scale=1.0 / (M + H) ** 0.5))
    mask = torch.rand(B, S, generator=g) > 0.3
    mask[:, 0] = True
    if B > 1:
        mask[1] = False  # a row that attends to nothing
    args = dict(cell=cell, xw=r(T, B, G), keys=r(B, S, H), memory=r(B, S, M), mask=mask, params=params,
                h0=r(L, B, H), c0=r(L, B, H) if cell == "lstm" else None, feed0=r(B, H), drop=None)
    grads = dict(grad_out=r(T, B, H), grad_attn=r(T, B, S), grad_h_n=r(L, B, H),
                 grad_c_n=r(L, B, H) if cell == "lstm" else None)
    return cast(args, device, dtype), cast(grads, device, dtype)


def cast(d, device, dtype):
    import torch

    from fastrnn.contract.decoder import DecoderParams

    def one(x):
        if isinstance(x, torch.Tensor):
            return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        if isinstance(x, DecoderParams):
            return DecoderParams(*(None if t is None else one(t) for t in x))
        return x
    return {k: one(v) for k, v in d.items()}


def run_all(impl, args, grads):
    """Every named result of forward (training) + backward."""
    out, attn, h_n, c_n, saved = impl.decoder_forward(**args, training=True)
    res = dict(out=out, attn=attn, h_n=h_n, c_n=c_n)
    res.update(zip(("gates", "cells", "hs", "ctx"), saved))
    res.update(impl.decoder_backward(**grads, **args, out=out, attn=attn, saved=saved)._asdict())
    return res


def max_err(got, want):
    return 0.0 if got is None else (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


def check(ref, tri, args32, grads32, args64, grads64):
    """Names whose triton error exceeds 2x the reference's own float32 error plus a floor."""
    want = run_all(ref, args64, grads64)
    got_ref, got_tri = run_all(ref, args32, grads32), run_all(tri, args32, grads32)
    worst, bad = {}, []
    for name, w in want.items():
        if w is None:
            continue
        e_ref, e_tri = max_err(got_ref[name], w), max_err(got_tri[name], w)
        floor = 1e-5 * max(1.0, w.abs().max().item() if w.numel() else 1.0)
        worst[name] = (e_tri, e_ref)
        if not e_tri <= 2 * e_ref + floor:
            bad.append(name)
    return bad, worst


def bench(fn, reps, warmup, device):
    """Median milliseconds of ``fn()``: CUDA events on a GPU, wall clock on a CPU."""
    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    a = parse_args(argv)
    signal.signal(signal.SIGALRM, lambda *_: (print(f"TIMEOUT after {a.timeout} s", flush=True), os._exit(124)))
    signal.alarm(a.timeout)
    if a.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--device cpu needs TRITON_INTERPRET=1 (set before triton is imported)")
    os.environ.pop("FASTRNN_TRITON_TF32", None)  # float32 IEEE on both sides
    import torch

    from fastrnn import backends
    torch.backends.cuda.matmul.allow_tf32 = False
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    reason = backends.unavailable_reason("triton", a.device, "decoder")
    if reason is not None:
        sys.exit(f"triton decoder unavailable: {reason}")
    ref, tri = backends.load("torch", "decoder"), backends.load("triton", "decoder")
    if a.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows, failed = [], False
    for size in a.sizes:
        T, S, B, H, M, L = (int(v) for v in size.split(","))
        for cell in a.cells.split(","):
            for score in a.scores.split(","):
                additive = score == "additive"
                args32, grads32 = make_case(cell, additive, T, S, B, H, M, L, a.device, torch.float32)
                args64, grads64 = make_case(cell, additive, T, S, B, H, M, L, a.device, torch.float64)
                bad, worst = check(ref, tri, args32, grads32, args64, grads64)
                top = max(worst, key=lambda k: worst[k][0] / (2 * worst[k][1] + 1e-30))
                status = "ok" if not bad else "FAIL " + ",".join(bad)
                failed |= bool(bad)
                print(f"T={T} S={S} B={B} H={H} M={M} L={L} {cell} {score}: check {status} "
                      f"(closest: {top} triton {worst[top][0]:.2e} vs reference fp32 {worst[top][1]:.2e})", flush=True)

                def fwd(impl):
                    return lambda: impl.decoder_forward(**args32, training=False)

                def train(impl):
                    def step():
                        out, attn, _, _, saved = impl.decoder_forward(**args32, training=True)
                        impl.decoder_backward(**grads32, **args32, out=out, attn=attn, saved=saved)
                    return step

                with torch.no_grad():
                    t = {(k, n): bench(f(impl), a.reps, a.warmup, a.device)
                         for k, f in (("fwd", fwd), ("train", train)) for n, impl in (("ref", ref), ("tri", tri))}
                rows.append((f"{T},{S},{B},{H},{M},{L}", cell, score, status, t))
    print()
    print("| T,S,B,H,M,L | cell | score | check | fwd ref ms | fwd triton ms | fwd speedup "
          "| fwd+bwd ref ms | fwd+bwd triton ms | fwd+bwd speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, cell, score, status, t in rows:
        print(f"| {size} | {cell} | {score} | {status} | {t['fwd', 'ref']:.2f} | {t['fwd', 'tri']:.2f} "
              f"| {t['fwd', 'ref'] / t['fwd', 'tri']:.2f}x | {t['train', 'ref']:.2f} | {t['train', 'tri']:.2f} "
              f"| {t['train', 'ref'] / t['train', 'tri']:.2f}x |")
    signal.alarm(0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
