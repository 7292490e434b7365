"""Benchmark fastrnn against torch in one process: correctness gate first, then interleaved timing.

Used by ``python -m fastrnn bench`` and by the pytest-benchmark suite under ``bench/``.

Method: for every case (op, shape, mode) the torch baseline and each fastrnn backend are built
with the same weights; a correctness gate compares outputs (and, for training, the input and
weight gradients) with torch before anything is timed. Timing interleaves the candidates round
by round (torch, backend 1, backend 2, torch, ...) so that drift on a shared machine hits all of
them alike, and reports medians, the ratio torch / backend (> 1: fastrnn is faster) and each
case's spread, (max - min) / median of its rounds. Kernels that compile on first use (numba)
are compiled in a stage of their own before the timed grid, so that the progress bar's estimate
is about the timing alone.

Grids: ``default`` (one representative shape per op, minutes), ``full`` (every shape),
``quick`` (tiny shapes, a smoke test).

Dtypes: float32 (the default), or bfloat16 / float16 for every model and input, torch's too. A
low-precision gate cannot use a float32 tolerance (both sides round every GEMM operand): it runs
the torch model once more in float64 on the same (exactly representable) inputs and asks that
fastrnn's error against it be at most twice torch's own, tensor by tensor, plus one bfloat16 unit.
"""
from __future__ import annotations

import copy
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

from .testing import low_precision_errors, max_error

# (T, B, I, H); ids like T100_B32_I256_H256. DEFAULT is FULL's middle: batch 1 is a GEMV per step
# and the 512-wide shape takes the longest; --full runs them.
FULL_SHAPES = [(100, 1, 256, 256), (100, 32, 256, 256), (50, 64, 512, 512)]
DEFAULT_SHAPES = [(100, 32, 256, 256)]
QUICK_SHAPES = [(20, 4, 32, 32)]
RNN_OPS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
MODES = ("infer", "train")
GRIDS = ("default", "full", "quick")
# the median case's spread above which the ratios of a run are not worth much (a busy machine)
NOISY_SPREAD = 0.20
# backends whose kernels compile on first use (per device type), warmed up before the timing
JIT_BACKENDS = {"cpu": ("numba",), "cuda": ("triton",)}


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
    torch_spread: float = 0.0  # the same for torch's rounds
    dtype: str = "float32"

    @property
    def noise(self) -> float:
        """The larger spread of the two timings the ratio divides."""
        return max(self.spread, self.torch_spread)


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
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx2", "avx512f", "avx512_bf16", "avx512_fp16",
                                                                "fma", "amx"))),
        "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "fastrnn": fastrnn.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # other work on the machine when the run started (1-minute load average vs logical CPUs)
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # see __main__._passive_wait_if_busy
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


LOW = (torch.bfloat16, torch.float16)
# the absolute part of the low-precision gate: one unit in the last place of bfloat16, of the
# tensor's scale (1 + its largest value)
LOW_FLOOR = 2.0 ** -8


def _gate(fast, ref, exact, tol):
    """(error, ok) of fastrnn's tensors ``fast`` against torch's ``ref``. float32 / float64
    (``exact`` None): the largest difference, within ``tol``. Low precision: fastrnn's and torch's
    largest errors against ``exact`` (torch's model in float64; ``fastrnn.testing``'s rule),
    fastrnn's at most twice torch's plus LOW_FLOOR of the tensor's scale for every tensor; the
    error reported is fastrnn's (absolute) against float64."""
    if exact is None:
        err = max(max_error(a, b) for a, b in zip(fast, ref))
        return err, err <= tol
    errs = [low_precision_errors(a, b, e) + (e.abs().max().item() if e.numel() else 0.0,)
            for a, b, e in zip(fast, ref, exact)]
    return max(f for f, _, _ in errs), all(f <= 2 * t + LOW_FLOOR * (1 + scale) for f, t, scale in errs)


def _outputs(module, x, g, mode, model_inputs=None):
    """A module's outputs (and, in training, the gradients of <outputs[0], g> for x and every
    parameter) as a flat list; ``model_inputs``: the call's arguments after x."""
    xg = x.detach().clone().requires_grad_(mode == "train")
    out = module(xg, *(model_inputs or ()))
    flat = [t for o in out for t in (o if isinstance(o, tuple) else (o,)) if isinstance(t, torch.Tensor)]
    if mode == "train":
        # autograd.grad, not .backward(): the torch module is shared by every backend's gate
        flat += torch.autograd.grad((flat[0] * g.to(flat[0].dtype)).sum(), [xg, *module.parameters()])
    return flat


def float64_copy(module):
    """``module`` in float64 (the low-precision gate's reference), or None for float32 / float64."""
    dtype = next(module.parameters()).dtype
    return copy.deepcopy(module).double() if dtype in LOW else None


def rnn_gate(ref, fast, x, mode, exact=None):
    """Error of fastrnn vs torch: outputs and final states; in training also the input and every
    parameter gradient. Returns (error, ok) (``_gate``; ``exact``: ``float64_copy(ref)``)."""
    g = torch.randn(x.shape[0], x.shape[1], ref.hidden_size, device=x.device, dtype=torch.float64)
    want = _outputs(exact, x.double(), g, mode) if exact is not None else None
    # float32 with long reductions (T steps, K = I or H): scale the unit tolerance by sqrt(K*T)
    T, _, I = x.shape
    tol = 1e-5 * (max(I, ref.hidden_size) * T) ** 0.5 * (10 if mode == "train" else 1)
    return _gate(_outputs(fast, x, g, mode), _outputs(ref, x, g, mode), want, tol)


def time_interleaved(fns: dict, rounds: int, inner: int = 1, device="cpu") -> dict:
    """Interleaved timing: each round runs every candidate ``inner`` times, one after the other,
    so that drift on a shared machine hits all of them alike. ``fns``: name -> zero-argument
    function. Returns name -> list of ``rounds`` times in ms (per call)."""
    device = torch.device(device)
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


_time = time_interleaved  # the name bench/library_overhead.py imports


def _spread(ms: list) -> float:
    return (max(ms) - min(ms)) / statistics.median(ms)


def _results(op, shape, mode, backends, base, samples, gates, dtype) -> list:
    """One Result per backend from the interleaved samples (``base``: torch's key)."""
    t_ref = statistics.median(samples[base])
    out = []
    for b in backends:
        t = statistics.median(samples[b])
        err, ok = gates[b]
        out.append(Result(op, shape, mode, b, t_ref, t, t_ref / t, err, ok, len(samples[b]),
                          _spread(samples[b]), min(samples[base]) / min(samples[b]),
                          torch_spread=_spread(samples[base]), dtype=str(dtype).removeprefix("torch.")))
    return out


def run_rnn_case(op, shape, mode, backends, rounds=7, device="cpu", dtype=torch.float32):
    T, B, I, H = shape
    device = torch.device(device)
    torch.manual_seed(0)
    ref = getattr(nn, RNN_OPS[op])(I, H, device=device, dtype=dtype)
    x = torch.randn(T, B, I, device=device, dtype=dtype)
    BASE = "nn"  # the torch.nn baseline (not the "torch" reference backend)
    fns = {BASE: _rnn_runner(op, ref, x, mode)}
    fast, gates, exact = {}, {}, float64_copy(ref)
    for b in backends:
        m = getattr(fastrnn, RNN_OPS[op])(I, H, device=device, dtype=dtype, backend=b)
        m.load_state_dict(ref.state_dict())
        fast[b] = m
        gates[b] = rnn_gate(ref, m, x, mode, exact)
        fns[b] = _rnn_runner(op, m, x, mode)
    # aim for ~20 ms per sample so timer noise stays small on tiny shapes
    probe = time_interleaved({BASE: fns[BASE]}, 1, 1, device)[BASE][0]
    inner = max(1, min(50, int(20 / max(probe, 1e-3))))
    samples = time_interleaved(fns, rounds, inner, device)
    return _results(op, shape_id(*shape), mode, backends, BASE, samples, gates, dtype)


# attention: (B, H, L, S, E, causal); the grid, and a small one for --quick
SDPA_FULL = [(4, 8, 512, 512, 64, False), (4, 8, 512, 512, 64, True), (1, 8, 2048, 2048, 64, False)]
SDPA_DEFAULT = SDPA_FULL[:1]
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

    g = torch.randn(B, H, L, E, device=device, dtype=torch.float64)

    def outputs(fn, dt):
        ins = [t.detach().to(dt).requires_grad_(mode == "train") for t in (q, k, v)]
        out = fn(*ins)
        return [out] + (list(torch.autograd.grad((out * g.to(dt)).sum(), ins)) if mode == "train" else [])

    def ref_fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    exact = outputs(ref_fn, torch.float64) if dtype in LOW else None

    def gate(fn):
        return _gate(outputs(fn, dtype), outputs(ref_fn, dtype), exact,
                     1e-5 * (S * E) ** 0.5 * (10 if mode == "train" else 1))

    BASE = "F.sdpa"
    fns = {BASE: runner(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))}
    gates = {}
    for b in backends:
        fn = (lambda b: lambda q, k, v: fastrnn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=b))(b)
        gates[b] = gate(fn)
        fns[b] = runner(fn)
    samples = time_interleaved(fns, rounds, 1, device)
    flops = 4 * B * H * L * S * E // (2 if causal else 1) * (3.5 if mode == "train" else 1)
    out = _results("sdpa", sdpa_id(*shape), mode, backends, BASE, samples, gates, dtype)
    for r in out:
        r.extra = {"gflops_per_s": flops / r.backend_ms / 1e6, "torch_gflops_per_s": flops / r.torch_ms / 1e6}
    return out


# the attention decoder: (cell, attention, T, S, B, H), H also the input and memory width; against
# the loop users write (fastrnn.testing.LoopAttentionDecoder). Not in the default ops (`--ops decoder`):
# its numba kernels add a compile of about a minute to a first run.
DECODER_FULL = [("lstm", "additive", 50, 50, 32, 256), ("gru", "dot", 50, 50, 32, 256)]
DECODER_DEFAULT = DECODER_FULL[:1]
DECODER_QUICK = [("lstm", "additive", 5, 7, 3, 16)]


def decoder_id(cell, attention, T, S, B, H):
    return f"{cell}_{attention[:3]}_T{T}_S{S}_B{B}_H{H}"  # lstm_add_T50_S50_B32_H256


def run_decoder_case(shape, mode, backends, rounds=7, device="cpu", dtype=torch.float32):
    """fastrnn.AttentionDecoder per backend vs the same decoder as a Python loop over nn.*Cell."""
    from .testing import LoopAttentionDecoder
    cell, attention, T, S, B, H = shape
    device = torch.device(device)
    torch.manual_seed(0)
    x, mem = torch.randn(T, B, H, device=device, dtype=dtype), torch.randn(S, B, H, device=device, dtype=dtype)
    mask = torch.arange(S, device=device) < torch.randint(S // 2 + 1, S + 1, (B, 1), device=device)  # padding
    decs = {b: fastrnn.AttentionDecoder(cell, H, H, H, attention=attention, backend=b, device=device, dtype=dtype)
            for b in backends}
    for d in decs.values():
        d.load_state_dict(next(iter(decs.values())).state_dict())
    BASE = "loop"
    models = {BASE: LoopAttentionDecoder.from_decoder(next(iter(decs.values()))) if decs else None, **decs}

    def runner(m):
        if mode == "infer":
            def run():
                with torch.no_grad():
                    return m(x, mem, mask)
            return run

        def run():
            m(x, mem, mask)[0].sum().backward()
        return run

    exact = float64_copy(models[BASE]) if decs else None
    g = torch.randn(T, B, H, device=device, dtype=torch.float64)

    def outputs(mm, dt):
        out = mm(x.to(dt), mem.to(dt), mask)[0]
        if mode == "infer":
            return [out]
        grads = torch.autograd.grad((out * g.to(dt)).sum(), list(mm.parameters()))
        return [out, grads[1]]  # weight_hh_l0 / cells.0.weight_hh

    def gate(m):
        return _gate(outputs(m, dtype), outputs(models[BASE], dtype),
                     outputs(exact, torch.float64) if exact is not None else None, 1e-4)

    if not decs:
        return []
    gates = {b: gate(m) for b, m in decs.items()}
    samples = time_interleaved({n: runner(m) for n, m in models.items()}, rounds, 1, device)
    return _results("decoder", decoder_id(*shape), mode, list(decs), BASE, samples, gates, dtype)


def family(op: str) -> str:
    """The registry's op family of a bench op (lstm, gru, rnn -> rnn)."""
    return op if op in ("sdpa", "decoder") else "rnn"


def default_backends(family: str, device="cpu") -> list:
    """What the bench times when not told: every usable backend but the reference (and not the
    Triton interpreter on a CPU)."""
    return [b for b in fastrnn.available_backends(device, family) if b != "torch"
            and not (b == "triton" and torch.device(device).type == "cpu")]


def cases(ops, modes, grid="default") -> list:
    """The (op, shape, mode) cases of a grid, op by op."""
    shapes = {"rnn": {"default": DEFAULT_SHAPES, "full": FULL_SHAPES, "quick": QUICK_SHAPES},
              "sdpa": {"default": SDPA_DEFAULT, "full": SDPA_FULL, "quick": SDPA_QUICK},
              "decoder": {"default": DECODER_DEFAULT, "full": DECODER_FULL, "quick": DECODER_QUICK}}
    return [(op, s, m) for op in ops for s in shapes[family(op)][grid] for m in modes]


def case_id(op, shape) -> str:
    return {"sdpa": sdpa_id, "decoder": decoder_id}.get(family(op), shape_id)(*shape)


def _run_case(op, shape, mode, backends, rounds, device, dtype=torch.float32):
    if op == "sdpa":
        return run_sdpa_case(shape, mode, backends, rounds, device, dtype)
    if op == "decoder":
        return run_decoder_case(shape, mode, backends, rounds, device, dtype)
    return run_rnn_case(op, shape, mode, backends, rounds, device, dtype)


def compile_kernels(ops, backends_of, modes, device="cpu", dtype=torch.float32) -> list:
    """Run every (op, mode) once at the quick grid's size with each backend that compiles on first
    use, so that the timed grid after it measures kernels, not the compiler. Numba compiles
    (tens of seconds a dtype, minutes on a busy machine) only in the first process after a change
    to its kernels; later processes load them from its on-disk cache in about a second. Returns
    the backends it ran."""
    jit = JIT_BACKENDS.get(torch.device(device).type, ())
    ran = set()
    for op, shape, mode in cases(ops, modes, "quick"):
        bks = [b for b in backends_of(op) if b in jit]
        if bks:
            _run_case(op, shape, mode, bks, 1, device, dtype)
            ran.update(bks)
    return sorted(ran)


def run(ops=("lstm", "gru", "rnn"), backends=None, modes=MODES, grid="default", rounds=None,
        device="cpu", progress=True, dtype=torch.float32):
    """Run the benchmark grid (``default``, ``full`` or ``quick``) in ``dtype`` (the models' and
    inputs', torch's too); returns a list of Result.

    With ``progress``: a labelled compile stage (if a backend compiles on first use), a tqdm bar
    over the cases and one line per result as it completes, on stderr."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")

    def backends_of(op):
        bks = backends if backends is not None else default_backends(family(op), device)
        return [b for b in bks if fastrnn.backends.unavailable_reason(b, device, family(op)) is None]

    rounds = rounds or (3 if grid == "quick" else 7)
    todo = cases(ops, modes, grid)
    if any(b in JIT_BACKENDS.get(torch.device(device).type, ()) for op in ops for b in backends_of(op)):
        if progress:
            print("compiling numba kernels (first run only: later runs load them from numba's cache) ...",
                  file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        ran = compile_kernels(ops, backends_of, modes, device, dtype)
        if progress:
            print(f"  {', '.join(ran)}: ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="timing", unit="case", file=sys.stderr)
        except ImportError:
            pass
    results = []
    for op, shape, mode in todo:
        name = case_id(op, shape)
        if bar is not None:
            bar.set_postfix_str(f"{op} {name} {mode}")
        new = _run_case(op, shape, mode, backends_of(op), rounds, device, dtype)
        results += new
        if progress:
            for line in table(new).splitlines()[2:]:
                (bar.write if bar is not None else print)(line, file=sys.stderr)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


def median_noise(results) -> float:
    """The median case's spread (the larger of torch's and the backend's)."""
    return statistics.median(r.noise for r in results) if results else 0.0


def noise_warning(results, info=None) -> str | None:
    """A warning when the run was too noisy for its ratios to mean much, else None."""
    noise = median_noise(results)
    if noise <= NOISY_SPREAD:
        return None
    load = (info or {}).get("load_average")
    cpus = (info or {}).get("logical_cpus")
    busy = f" (load average {load:.1f} on {cpus} CPUs when it started)" if load is not None else ""
    return (f"warning: the machine was noisy{busy}: the median case's rounds spread over {noise:.0%} "
            f"of their median (> {NOISY_SPREAD:.0%}), so a ratio can be off by about as much. Rerun on "
            "an idle machine, with OMP_WAIT_POLICY=PASSIVE (waiting threads then do not spin), with "
            "--threads 1, or with more --rounds.")


def table(results) -> str:
    head = (f"{'op':<7} {'shape':<27} {'mode':<6} {'dtype':<8} {'backend':<7} {'torch ms':>9} {'fastrnn ms':>10} "
            f"{'speedup':>8} {'spread':>7} {'max err':>9}  gate")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.op:<7} {r.shape:<27} {r.mode:<6} {r.dtype:<8} {r.backend:<7} {r.torch_ms:>9.3f} "
                     f"{r.backend_ms:>10.3f} "
                     f"{r.speedup:>7.2f}x {r.noise:>7.0%} {r.max_error:>9.1e}  {'ok' if r.gate_ok else 'FAIL'}")
    return "\n".join(lines)


def markdown(results, info) -> str:
    lines = [f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} "
             f"({info['torch_threads']} threads). Speedup = torch time / fastrnn time, same process. "
             "Spread = (max - min) / median of a case's rounds, the larger of torch's and fastrnn's.", "",
             "| op | shape | mode | dtype | backend | torch ms | fastrnn ms | speedup | spread | max err |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.op} | {r.shape} | {r.mode} | {r.dtype} | {r.backend} | {r.torch_ms:.2f} | "
                     f"{r.backend_ms:.2f} | **{r.speedup:.2f}x** | {r.noise:.0%} | {r.max_error:.1e} |")
    warning = noise_warning(results, info)
    return "\n".join(lines + ([f"\n{warning}"] if warning else []))


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
        json.dump({"machine": info, "median_spread": median_noise(results),
                   "results": [asdict(r) for r in results]}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(results, info) + "\n")
    png = os.path.join(out_dir, "bench.png")
    if chart(results, png):
        paths["png"] = png
    return paths
