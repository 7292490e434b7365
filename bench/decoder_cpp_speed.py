"""Speed of the cpp attention decoder (csrc/decoder.cpp) against the reference backend
(fastrnn/backends/reference_decoder.py, plain PyTorch) in one process, float32.

    python bench/decoder_cpp_speed.py                 # bench shape, 1 and 2 threads
    python bench/decoder_cpp_speed.py --rounds 5 --threads 1

Bench shape: T=50 decoder steps, S=50 memory steps, B=32, H=M=256, L=1, input feeding on,
LSTM and GRU, additive and bilinear (dot/general) score. Per round each implementation runs
forward (training=False), forward (training=True) and backward once, in an order that rotates
between rounds (interleaved, so load from other processes hits both alike); the table gives the
median wall time over rounds and the reference / cpp ratio. "floor" = FLOPs / (200 GFLOP/s x
threads): what the step GEMMs and attention would take at the GEMM engine's rate (the FLOP
count of csrc/decoder.cpp's header, computed below). A correctness gate runs first.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, "tests")
from fastrnn.backends import cpp_decoder, reference_decoder  # noqa: E402
from fastrnn.contract.decoder import DecoderParams  # noqa: E402
from fastrnn.testing import assert_low_precision  # noqa: E402

import decoder_harness as harness  # noqa: E402

SHAPE = dict(L=1, T=50, B=32, S=50, M=256, H=256)
GFLOPS_PER_CORE = 200.0


def flops(cell, additive, L, T, B, S, M, H):
    """Forward FLOPs (multiply-add = 2): step GEMMs + scores + context; backward about the same."""
    G = (4 if cell == "lstm" else 3) * H
    # two gate GEMMs a layer (W_feed or W_in, and W_hh), W_c [ctx; h], scores h.k_s and context
    per_row = 2 * L * 2 * G * H + 2 * (M + H) * H + 2 * S * (H + M)
    if additive:
        per_row += 2 * H * H + 2 * S * H  # W_q and v . tanh(q + k) (tanh not counted)
    return T * B * per_row


def _f64(d):
    return {k: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else
                DecoderParams(*(None if t is None else t.double() for t in x)) if isinstance(x, DecoderParams) else x)
            for k, x in d.items()}


def gate(args, grads):
    """Correctness gate at the bench shape, the low-precision rule of fastrnn.testing: the cpp
    float32 error against the float64 reference within 4x the reference's own float32 error (+1e-5).
    (A fixed tolerance does not fit: the scores h . k_s over H=256 are large, so the softmax
    amplifies float32 rounding in any implementation.)"""
    exact = harness.run("torch", _f64(args), _f64(grads))
    lowp, cpp = harness.run("torch", args, grads), harness.run("cpp", args, grads)
    for name, ref in exact.items():
        if isinstance(ref, torch.Tensor) and ref.numel():
            assert_low_precision(cpp[name], lowp[name], ref, name, factor=4.0)


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(cell, additive, rounds, threads):
    torch.set_num_threads(threads)
    opts = frozenset(("feed", "mask", "additive") if additive else ("feed", "mask"))
    args, grads = harness.make_case(cell, opts, dtype=torch.float32, **SHAPE)
    # The harness draws weights ~N(0, 0.5^2): at H=256 the pre-activations are ~8 sigma, the
    # recurrence is chaotic and float32 rounding grows to O(1) over 50 steps in *any* two
    # implementations. Rescale to the usual 1/sqrt(fan_in) initialisation for a meaningful gate.
    args["params"] = DecoderParams(*(None if w is None else w * (2.0 / w.shape[-1] ** 0.5) if w.dim() > 1 else w
                                     for w in args["params"]))
    impls = {"torch": reference_decoder, "cpp": cpp_decoder}
    fwd_train = {k: m.decoder_forward(**args, training=True) for k, m in impls.items()}
    gate(args, grads)

    def passes(k, m):
        out, attn, _, _, saved = fwd_train[k]
        return {"fwd infer": lambda: m.decoder_forward(**args, training=False),
                "fwd train": lambda: m.decoder_forward(**args, training=True),
                "backward": lambda: m.decoder_backward(**grads, **args, out=out, attn=attn, saved=saved)}

    fns = {k: passes(k, m) for k, m in impls.items()}
    times = {(k, p): [] for k in impls for p in fns[k]}
    order = list(impls)
    for r in range(rounds + 1):  # round 0 warms up
        for k in order[r % 2:] + order[:r % 2]:
            for p, f in fns[k].items():
                dt = timed(f)
                if r:
                    times[(k, p)].append(dt)
    floor = flops(cell, additive, **SHAPE) / (GFLOPS_PER_CORE * 1e9 * threads)
    rows = []
    for p in fns["cpp"]:
        ref, cpp = statistics.median(times[("torch", p)]), statistics.median(times[("cpp", p)])
        rows.append((p, ref, cpp, floor))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    a = ap.parse_args()
    print(f"decoder float32, {SHAPE}, feeding on, median of {a.rounds} interleaved rounds; "
          f"gemm {cpp_decoder.info()['gemm']}")
    print("| threads | cell | score | pass | reference ms | cpp ms | speed-up | floor ms |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in a.threads:
        for cell in ("lstm", "gru"):
            for additive in (True, False):
                for p, ref, cpp, floor in bench(cell, additive, a.rounds, threads):
                    print(f"| {threads} | {cell} | {'additive' if additive else 'dot'} | {p} | {ref * 1e3:.1f} | "
                          f"{cpp * 1e3:.1f} | {ref / cpp:.1f}x | {floor * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
