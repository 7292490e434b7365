"""The fused attention decoder (``fastrnn.AttentionDecoder``) against the loop users write
(``fastrnn.testing.LoopAttentionDecoder``: ``nn.LSTMCell`` / ``nn.GRUCell`` + attention in torch
ops), eager and under ``torch.compile``, in one process, interleaved.

    python bench/decoder_speed.py [--threads 1 2] [--backends cpp numba] [--no-compile] [--quick]

Teacher-forced rows: T=50 decoder steps over S=50 memory steps, B=32, I=M=H=256, one layer, input
feeding; inference (no_grad) and training (forward + backward of a sum of the outputs). Decoding
rows: B=1, 50 ``step`` calls with a prepared memory against 50 calls of the loop at T=1.
A correctness gate (outputs, attention and every parameter gradient against the eager loop)
runs before anything is timed. Each round times every candidate once, in turn; the table gives
the median time and the median (min-max) of the per-round ratios loop / fastrnn.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastrnn
from fastrnn.testing import LoopAttentionDecoder, assert_close

T, S, B, I, M, H = 50, 50, 32, 256, 256, 256


def _models(cell, attention, backends, compile_loop):
    torch.manual_seed(0)
    fused = {b: fastrnn.AttentionDecoder(cell, I, H, M, attention=attention, backend=b) for b in backends}
    first = next(iter(fused.values()))
    for dec in fused.values():
        dec.load_state_dict(first.state_dict())
    loop = LoopAttentionDecoder(cell, I, H, M, attention).load_from(first)
    models = {"eager loop": loop}
    if compile_loop:
        models["compiled loop"] = torch.compile(loop, dynamic=False)
    models.update({f"fastrnn {b}": dec for b, dec in fused.items()})
    return models


def _data(batch):
    torch.manual_seed(1)
    x, mem = torch.randn(T, batch, I), torch.randn(S, batch, M)
    lengths = torch.randint(S // 2, S + 1, (batch,))
    mask = torch.arange(S).unsqueeze(0) < lengths.unsqueeze(1)  # padded encoder outputs
    return x, mem, mask


def _teacher_forced(model, x, mem, mask, train):
    if train:
        out, attn, _ = model(x, mem, mask)
        out.sum().backward()
    else:
        with torch.no_grad():
            model(x, mem, mask)


def _decode(model, x, mem, mask):
    """Greedy decoding's shape: one step at a time, the state carried (inputs given, so every
    candidate does the same work)."""
    with torch.no_grad():
        state = None
        if isinstance(model, fastrnn.AttentionDecoder):
            prepared = model.prepare_memory(mem, mask)
            for t in range(x.shape[0]):
                _, _, state = model.step(x[t], prepared, state=state)
        else:
            for t in range(x.shape[0]):
                _, _, state = model(x[t:t + 1], mem, mask, state)


def _gate(models, x, mem, mask):
    """Every fastrnn candidate equals the eager loop (float32 tolerances) before timing."""
    ref = models["eager loop"]
    out, attn, _ = ref(x, mem, mask)
    out.sum().backward()
    want = [p.grad.clone() for p in ref.parameters()]
    ref.zero_grad()
    for name, m in models.items():
        if not name.startswith("fastrnn"):
            continue
        o, a, _ = m(x, mem, mask)
        o.sum().backward()
        assert_close(o, out, f"{name} outputs", scale=10)
        assert_close(a, attn, f"{name} attention", scale=10)
        got = dict(m.named_parameters())
        assert_close(got["output_weight"].grad, want[-1], f"{name} d output_weight", grad=True, scale=10)
        assert_close(got["weight_hh_l0"].grad, want[1], f"{name} d weight_hh_l0", grad=True, scale=10)
        m.zero_grad()


def run(cell, attention, threads, backends, compile_loop, rounds):
    torch.set_num_threads(threads)
    fastrnn.set_num_threads(threads)
    models = _models(cell, attention, backends, compile_loop)
    x, mem, mask = _data(B)
    _gate(models, x, mem, mask)
    xs, mems, masks = _data(1)
    jobs = {
        "inference": lambda m: _teacher_forced(m, x, mem, mask, False),
        "training": lambda m: _teacher_forced(m, x, mem, mask, True),
        "decode B=1": lambda m: _decode(m, xs, mems, masks),
    }
    rows = []
    for job, fn in jobs.items():
        cands = {n: m for n, m in models.items() if not (job == "decode B=1" and n == "compiled loop")}
        for m in cands.values():  # warm up: compiles, numba caches, allocator
            fn(m)
            fn(m)
        times = {n: [] for n in cands}
        for _ in range(rounds):
            for n, m in cands.items():
                t0 = time.perf_counter()
                fn(m)
                times[n].append(time.perf_counter() - t0)
        for n in cands:
            if not n.startswith("fastrnn"):
                continue
            for base in ("eager loop", "compiled loop"):
                if base not in times:
                    continue
                ratios = [b / f for b, f in zip(times[base], times[n])]
                rows.append((cell, attention, threads, job, n, base, statistics.median(times[base]) * 1e3,
                             statistics.median(times[n]) * 1e3, statistics.median(ratios), min(ratios), max(ratios)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--backends", nargs="+", default=[b for b in ("cpp", "numba")
                                                      if b in fastrnn.available_backends("cpu", "decoder")])
    ap.add_argument("--cells", nargs="+", default=["lstm", "gru"])
    ap.add_argument("--attention", nargs="+", default=["additive", "dot"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, T={T} S={S} B={B} I=M=H={H}, one layer, input feeding; "
          f"rounds={args.rounds}")
    print("| cell | attention | threads | job | fastrnn | baseline | baseline ms | fastrnn ms | speed-up (min-max) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        for cell in args.cells:
            for attention in args.attention:
                for r in run(cell, attention, threads, args.backends, not args.no_compile, args.rounds):
                    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]:.1f} | {r[7]:.1f} | "
                          f"{r[8]:.2f}x ({r[9]:.2f}-{r[10]:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
