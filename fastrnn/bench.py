"""Benchmark fastrnn against torch in one process: correctness gate first, then interleaved timing.

Used by ``python -m fastrnn bench`` and by the pytest-benchmark suite under ``bench/``.

Method: for every case (op, shape, mode) the torch baseline and each fastrnn backend are built
with the same weights; a correctness gate compares outputs (and, for training, the input and
weight gradients) with torch before anything is timed. Timing interleaves the candidates round
by round (torch, backend 1, backend 2, torch, ...) so that drift on a shared machine hits all of
them alike, and reports medians and the ratio torch / backend (> 1: fastrnn is faster).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

import fastrnn

from .testing import max_error

# name -> (T, B, I, H); ids like T100_B32_I256_H256
FULL_SHAPES = [(100, 1, 256, 256), (100, 32, 256, 256), (50, 64, 512, 512)]
QUICK_SHAPES = [(20, 4, 32, 32)]
RNN_OPS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
MODES = ("infer", "train")


def shape_id(T, B, I, H) -> str:
    return f"T{T}_B{B}_I{I}_H{H}"


@dataclass
class Result:
    op: str
    shape: str
    mode: str
    backend: str
    torch_ms: float
    backend_ms: float
    speedup: float
    max_error: float
    gate_ok: bool
    rounds: int
    spread: float = 0.0  # (max - min) / median of the backend's rounds: how noisy it was
    best_speedup: float = 0.0  # torch's fastest round / the backend's fastest round
    extra: dict = field(default_factory=dict)


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), cpu)
        flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    except OSError:
        flags = []
    out = {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx2", "avx512f", "fma", "amx"))),
        "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "fastrnn": fastrnn.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("numba", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rnn_runner(kind, module, x, mode):
    """A zero-argument function running one forward (and backward in training)."""
    if mode == "infer":
        def run():
            with torch.no_grad():
                return module(x)
        return run
    xg = x.detach().clone().requires_grad_()

    def run():
        out, _ = module(xg)
        out.sum().backward()
    return run


def _rnn_gate(ref, fast, x, mode):
    """Max error of fastrnn vs torch: outputs and final states; in training also the input and
    every parameter gradient. Returns (error, within tolerance)."""
    x1, x2 = (x.detach().clone().requires_grad_(mode == "train") for _ in range(2))
    (y1, h1), (y2, h2) = ref(x1), fast(x2)
    s1 = h1 if isinstance(h1, tuple) else (h1,)
    s2 = h2 if isinstance(h2, tuple) else (h2,)
    errs = [max_error(y2, y1)] + [max_error(a, b) for a, b in zip(s2, s1)]
    if mode == "train":
        g = torch.randn_like(y1)
        # autograd.grad, not .backward(): the torch module is shared by every backend's gate
        g1 = torch.autograd.grad((y1 * g).sum(), [x1, *ref.parameters()])
        g2 = torch.autograd.grad((y2 * g).sum(), [x2, *fast.parameters()])
        errs += [max_error(a, b) for a, b in zip(g2, g1)]
    err = max(errs)
    # float32 with long reductions (T steps, K = I or H): scale the unit tolerance by sqrt(K*T)
    T, _, I = x.shape
    tol = 1e-5 * (max(I, ref.hidden_size) * T) ** 0.5 * (10 if mode == "train" else 1)
    return err, err <= tol


def _time(fns: dict, rounds: int, inner: int, device) -> dict:
    """Interleaved medians in ms: each round runs every candidate `inner` times."""
    samples = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (JIT compiles, allocator, caches)
        fn()
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            samples[k].append((time.perf_counter() - t0) / inner * 1e3)
    return samples


def run_rnn_case(op, shape, mode, backends, rounds=7, device="cpu", dtype=torch.float32):
    T, B, I, H = shape
    device = torch.device(device)
    torch.manual_seed(0)
    ref = getattr(nn, RNN_OPS[op])(I, H, device=device, dtype=dtype)
    x = torch.randn(T, B, I, device=device, dtype=dtype)
    BASE = "nn"  # the torch.nn baseline (not the "torch" reference backend)
    fns = {BASE: _rnn_runner(op, ref, x, mode)}
    fast, gates = {}, {}
    for b in backends:
        m = getattr(fastrnn, RNN_OPS[op])(I, H, device=device, dtype=dtype, backend=b)
        m.load_state_dict(ref.state_dict())
        fast[b] = m
        gates[b] = _rnn_gate(ref, m, x, mode)
        fns[b] = _rnn_runner(op, m, x, mode)
    # aim for ~20 ms per sample so timer noise stays small on tiny shapes
    probe = _time({BASE: fns[BASE]}, 1, 1, device)[BASE][0]
    inner = max(1, min(50, int(20 / max(probe, 1e-3))))
    samples = _time(fns, rounds, inner, device)
    t_ref = statistics.median(samples[BASE])
    out = []
    for b in backends:
        t = statistics.median(samples[b])
        err, ok = gates[b]
        out.append(Result(op, shape_id(*shape), mode, b, t_ref, t, t_ref / t, err, ok, rounds,
                          (max(samples[b]) - min(samples[b])) / t, min(samples[BASE]) / min(samples[b])))
    return out


# attention: (B, H, L, S, E, causal); the grid, and a small one for --quick
SDPA_FULL = [(4, 8, 512, 512, 64, False), (4, 8, 512, 512, 64, True), (1, 8, 2048, 2048, 64, False)]
SDPA_QUICK = [(1, 2, 64, 48, 16, False)]


def sdpa_id(B, H, L, S, E, causal):
    return f"B{B}_H{H}_L{L}_S{S}_E{E}" + ("_causal" if causal else "")


def run_sdpa_case(shape, mode, backends, rounds=7, device="cpu", dtype=torch.float32):
    """fastrnn.scaled_dot_product_attention per backend vs F.scaled_dot_product_attention."""
    import torch.nn.functional as F
    B, H, L, S, E, causal = shape
    device = torch.device(device)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, n, E, device=device, dtype=dtype) for n in (L, S, S))

    def runner(fn):
        if mode == "infer":
            def run():
                with torch.no_grad():
                    return fn(q, k, v)
            return run
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

        def run():
            fn(qg, kg, vg).sum().backward()
        return run

    def gate(fn):
        ins = [t.detach().clone().requires_grad_(mode == "train") for t in (q, k, v)]
        ref_ins = [t.detach().clone().requires_grad_(mode == "train") for t in (q, k, v)]
        out, ref = fn(*ins), F.scaled_dot_product_attention(*ref_ins, is_causal=causal)
        errs = [max_error(out, ref)]
        if mode == "train":
            g = torch.randn_like(ref)
            errs += [max_error(a, b) for a, b in zip(torch.autograd.grad((out * g).sum(), ins),
                                                    torch.autograd.grad((ref * g).sum(), ref_ins))]
        err = max(errs)
        return err, err <= 1e-5 * (S * E) ** 0.5 * (10 if mode == "train" else 1)

    BASE = "F.sdpa"
    fns = {BASE: runner(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))}
    gates = {}
    for b in backends:
        fn = (lambda b: lambda q, k, v: fastrnn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=b))(b)
        gates[b] = gate(fn)
        fns[b] = runner(fn)
    samples = _time(fns, rounds, 1, device)
    t_ref = statistics.median(samples[BASE])
    flops = 4 * B * H * L * S * E // (2 if causal else 1) * (3.5 if mode == "train" else 1)
    out = []
    for b in backends:
        t = statistics.median(samples[b])
        err, ok = gates[b]
        out.append(Result("sdpa", sdpa_id(*shape), mode, b, t_ref, t, t_ref / t, err, ok, rounds,
                          (max(samples[b]) - min(samples[b])) / t, min(samples[BASE]) / min(samples[b]),
                          {"gflops_per_s": flops / t / 1e6, "torch_gflops_per_s": flops / t_ref / 1e6}))
    return out


def run(ops=("lstm", "gru", "rnn"), backends=None, modes=MODES, quick=False, rounds=None,
        device="cpu", progress=True):
    """Run the benchmark grid; returns a list of Result."""
    def default_backends(op):
        return [b for b in fastrnn.available_backends(device, op) if b != "torch"
                and not (b == "triton" and device == "cpu")]
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    sdpa_shapes = SDPA_QUICK if quick else SDPA_FULL
    rounds = rounds or (3 if quick else 7)
    cases = [(op, s, m) for op in ops for s in (sdpa_shapes if op == "sdpa" else shapes) for m in modes]
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(cases), desc="fastrnn bench", unit="case", file=sys.stderr)
        except ImportError:
            pass
    results = []
    for op, shape, mode in cases:
        name = sdpa_id(*shape) if op == "sdpa" else shape_id(*shape)
        if bar is not None:
            bar.set_postfix_str(f"{op} {name} {mode}")
        elif progress:
            print(f"  {op} {name} {mode} ...", file=sys.stderr, flush=True)
        family = "sdpa" if op == "sdpa" else "rnn"
        bks = backends if backends is not None else default_backends(family)
        bks = [b for b in bks if fastrnn.backends.unavailable_reason(b, device, family) is None]
        if op == "sdpa":
            results += run_sdpa_case(shape, mode, bks, rounds, device)
        else:
            results += run_rnn_case(op, shape, mode, bks, rounds, device)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


def table(results) -> str:
    head = f"{'op':<5} {'shape':<27} {'mode':<6} {'backend':<7} {'torch ms':>9} {'fastrnn ms':>10} {'speedup':>8} {'max err':>9}  gate"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.op:<5} {r.shape:<27} {r.mode:<6} {r.backend:<7} {r.torch_ms:>9.3f} {r.backend_ms:>10.3f} "
                     f"{r.speedup:>7.2f}x {r.max_error:>9.1e}  {'ok' if r.gate_ok else 'FAIL'}")
    return "\n".join(lines)


def markdown(results, info) -> str:
    lines = [f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} "
             f"({info['torch_threads']} threads). Speedup = torch time / fastrnn time, same process.", "",
             "| op | shape | mode | backend | torch ms | fastrnn ms | speedup | max err |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.op} | {r.shape} | {r.mode} | {r.backend} | {r.torch_ms:.2f} | {r.backend_ms:.2f} | "
                     f"**{r.speedup:.2f}x** | {r.max_error:.1e} |")
    return "\n".join(lines)


def chart(results, path) -> bool:
    """Bar chart of speedup per case and backend; False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(dict.fromkeys(f"{r.op} {r.shape} {r.mode}" for r in results))
    backends = list(dict.fromkeys(r.backend for r in results))
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.45 * len(cases))), 5.5))
    width = 0.8 / max(1, len(backends))
    for k, b in enumerate(backends):
        vals = {f"{r.op} {r.shape} {r.mode}": r.speedup for r in results if r.backend == b}
        xs = [i + k * width for i in range(len(cases))]
        ax.bar(xs, [vals.get(c, 0) for c in cases], width, label=b)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("speedup vs torch (higher is better)")
    ax.set_title("fastrnn vs torch, same process")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def save(results, out_dir, info=None) -> dict:
    """Write bench.json, bench.md and bench.png to out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    info = info or machine()
    paths = {"json": os.path.join(out_dir, "bench.json"), "md": os.path.join(out_dir, "bench.md")}
    with open(paths["json"], "w") as f:
        json.dump({"machine": info, "results": [asdict(r) for r in results]}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(results, info) + "\n")
    png = os.path.join(out_dir, "bench.png")
    if chart(results, png):
        paths["png"] = png
    return paths
