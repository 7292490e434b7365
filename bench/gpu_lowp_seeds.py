"""Seed sweep of the triton bf16/fp16 variant low-precision rule on a GPU: per tensor the ratio of
fastrnn's error to the torch reference's in the same dtype (both against float64), max and RMS,
over torch.manual_seed(0..11). Why tests/test_triton.py's variant rule is on RMS error; results in
bench/results/h200/low_precision_seeds.txt.

    PYTHONPATH=. FASTRNN_TRITON_TILES=32x32x32x4,2x32x16x4 python bench/gpu_lowp_seeds.py
"""
import os
import sys

import torch

sys.path.insert(0, "tests")
os.environ.setdefault("FASTRNN_TEST_DEVICE", "cuda")
import test_triton as tt  # noqa: E402

from fastrnn import backends  # noqa: E402
from fastrnn.contract.rnn import Variant  # noqa: E402
from fastrnn.testing import low_precision_errors  # noqa: E402

GRIDS = [("lstm", 20, "ln,peephole,dropout,zoneout,reset"), ("lstm", 0, "peephole,zoneout,reset")]
T, B, H, SEEDS = 17, 40, 72, 12  # the test's sizes


def _cast(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def one_seed(cell, proj, opts, dtype, seed):
    """{tensor name: (max ratio, RMS ratio)} for one seed."""
    torch.manual_seed(seed)
    args, grads = tt._case(cell, T=T, B=B, H=H, proj=proj, dtype=torch.float64, packed=True, device="cuda")
    variant = tt._variant(cell, opts.split(","), T, B, H, proj or H, torch.float64, device="cuda")

    def run(impl, d):
        a = {n: _cast(v, d) for n, v in args.items()}
        g = {n: _cast(v, d) for n, v in grads.items()}
        return tt._run(impl, cell, a, g, True, Variant(*(_cast(x, d) for x in variant)))
    ref = backends.load("torch", "rnn")
    exact, lowp, actual = run(ref, torch.float64), run(ref, dtype), run(tt._triton(), dtype)
    ratios = {}
    for name, e in exact.items():
        if e is not None:
            (em, bm), (er, br) = (low_precision_errors(actual[name], lowp[name], e, rms=r) for r in (False, True))
            ratios[name] = (em / max(bm, 1e-30), er / max(br, 1e-30))
    return ratios


def main():
    for cell, proj, opts in GRIDS:
        for dtype in (torch.bfloat16, torch.float16):
            per_seed = [one_seed(cell, proj, opts, dtype, s) for s in range(SEEDS)]
            print(cell, opts, proj, dtype)
            for name in per_seed[0]:
                m = max(r[name][0] for r in per_seed)
                rms = [round(r[name][1], 2) for r in per_seed]
                print(f"  {name:24s} worst max-ratio {m:.2f} worst rms-ratio {max(rms):.2f} rms per seed {rms}")


if __name__ == "__main__":
    main()
