"""GPU benchmark: fastrnn's triton backend against torch.nn.LSTM / nn.GRU (cuDNN), same process.

    python bench/gpu_rnn.py                         # default sizes, fp32 (IEEE) + fp16 + bf16
    python bench/gpu_rnn.py --tf32                  # fp32 with TF32 on both sides
    python bench/gpu_rnn.py --sizes 100,64,512,512 --cells lstm --dtypes fp16 --json out.json
    TRITON_INTERPRET=1 python bench/gpu_rnn.py --device cpu --sizes 4,3,5,6 --dtypes fp32
                                                    # smoke test of this script on a CPU (no timing value)

For every (cell, dtype, T, B, I, H) it
  1. builds nn.<Cell> and fastrnn.<Cell>(backend="triton") with the same weights (strict state_dict);
  2. checks correctness before timing: the output and every gradient of both, against the same
     module run in float64, must satisfy the project's rule (fastrnn's error at most 2x torch's
     own error in that dtype, plus a small floor);
  3. times inference (no_grad forward) and training (forward + backward to the input and every
     parameter) with CUDA-event timing (``triton.testing.do_bench``, median);
  4. reports the time ratio torch / fastrnn (> 1: fastrnn faster), and the achieved FLOP/s of
     both against the device's matmul rate measured in this same run with torch.matmul.

FLOP count per layer and direction (forward): 2*T*B*G*(I + Hr) (+ 2*T*B*H*Hr with a projection);
training counts 3x forward (the backward does two GEMMs for each forward one). Element-wise work
is not counted. The first calls compile, autotune and capture the CUDA graph: do_bench's
warm-up covers them, and a first untimed call is made explicitly as well.
Precision: fp32 runs with TF32 off on both sides (cuDNN's RNN uses TF32 by default, fastrnn
does not) unless ``--tf32`` turns it on for both (torch.backends.cudnn.allow_tf32 and
FASTRNN_TRITON_TF32=1); the matmul rate is measured with the same setting.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULT_SIZES = ["100,16,512,512", "100,64,512,512", "100,64,1024,1024", "100,256,1024,1024",
                 "50,32,2048,2048"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", default="lstm,gru", help="comma list of lstm,gru,rnn")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma list of fp32,fp16,bf16")
    ap.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="T,B,I,H (several allowed)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--bidirectional", action="store_true")
    ap.add_argument("--proj", type=int, default=0, help="LSTM proj_size")
    ap.add_argument("--tf32", action="store_true", help="fp32 through TF32 on both sides")
    ap.add_argument("--no-graphs", action="store_true", help="FASTRNN_TRITON_CUDA_GRAPHS=0")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: smoke test through the Triton interpreter (needs TRITON_INTERPRET=1)")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per case")
    ap.add_argument("--json", help="also write the results here")
    return ap.parse_args(argv)


# bench/gpu_check.py imports this module and sets ``args`` itself: read the command line only
# when run as a script.
args = parse_args(None if __name__ == "__main__" else [])
if args.tf32:
    os.environ["FASTRNN_TRITON_TF32"] = "1"
if args.no_graphs:
    os.environ["FASTRNN_TRITON_CUDA_GRAPHS"] = "0"
if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("--device cpu needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")

import torch  # noqa: E402  (after the environment is settled)
from torch import nn  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn.testing import assert_low_precision  # noqa: E402

PAIRS = {"lstm": (nn.LSTM, fastrnn.LSTM), "gru": (nn.GRU, fastrnn.GRU), "rnn": (nn.RNN, fastrnn.RNN)}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


# -- timing -------------------------------------------------------------------------------------
def bench_ms(fn, device, rep_ms):
    """Median milliseconds of fn(); CUDA events on the GPU, wall clock otherwise."""
    fn()  # compile / autotune / first sight for the CUDA-graph cache
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def matmul_rate(dtype, device, rep_ms):
    """FLOP/s of torch.matmul on large square matrices in `dtype` (the device's practical peak)."""
    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench_ms(lambda: a @ b, device, rep_ms)
    return 2 * n ** 3 / (ms * 1e-3)


# -- one case -----------------------------------------------------------------------------------
def make_pair(cell, I, H, dtype, device):
    torch_cls, fast_cls = PAIRS[cell]
    kw = dict(num_layers=args.layers, bidirectional=args.bidirectional)
    if cell == "lstm" and args.proj:
        kw["proj_size"] = args.proj
    ref = torch_cls(I, H, **kw).to(device=device, dtype=dtype)
    fast = fast_cls(I, H, backend="triton", **kw).to(device=device, dtype=dtype)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def flops_forward(cell, T, B, I, H):
    Hr = args.proj if cell == "lstm" and args.proj else H
    D = 2 if args.bidirectional else 1
    G = GATES[cell] * H
    total = 0
    for layer in range(args.layers):
        width = I if layer == 0 else D * Hr
        per_dir = 2 * T * B * G * (width + Hr) + (2 * T * B * H * Hr if Hr != H else 0)
        total += D * per_dir
    return total


def outputs_and_grads(m, x, grad_out):
    x = x.detach().requires_grad_()
    out, _ = m(x)
    params = list(m.parameters())
    grads = torch.autograd.grad(out, [x] + params, grad_out)
    return [out.detach()] + list(grads)


def correctness_gate(cell, ref, fast, x, grad_out, dtype):
    """fastrnn's error <= 2x torch's (same dtype), both against torch in float64 (the project's
    rule, ``fastrnn.testing.assert_low_precision``; the floor scales with the tensor's size)."""
    exact = [t.double() for t in outputs_and_grads(_to64(ref), x.double(), grad_out.double())]
    got_ref = outputs_and_grads(ref, x, grad_out)
    got_fast = outputs_and_grads(fast, x, grad_out)
    names = ["out", "grad x"] + [f"grad {n}" for n, _ in ref.named_parameters()]
    worst = 0.0
    for name, e, r, f in zip(names, exact, got_ref, got_fast):
        scale = 1 + e.abs().max().item()
        assert_low_precision(f, r, e, f"{cell}/{dtype}/{name}", floor=1e-5 * scale)
        worst = max(worst, (f.double() - e).abs().max().item() / scale)
    return worst


def _to64(m):
    import copy
    return copy.deepcopy(m).double()


def run_case(cell, dtype, T, B, I, H, device, rates):
    torch.manual_seed(0)
    ref, fast = make_pair(cell, I, H, dtype, device)
    x = torch.randn(T, B, I, device=device, dtype=dtype)
    with torch.no_grad():
        out_shape = ref(x)[0].shape
    grad_out = torch.randn(out_shape, device=device, dtype=dtype)
    worst = correctness_gate(cell, ref, fast, x, grad_out, dtype)

    def infer(m):
        def go():
            with torch.no_grad():
                m(x)
        return go

    def train(m):
        xl = x.detach().requires_grad_()
        params = list(m.parameters())

        def go():
            out, _ = m(xl)
            torch.autograd.grad(out, [xl] + params, grad_out)
        return go

    fl = flops_forward(cell, T, B, I, H)
    row = dict(cell=cell, dtype=str(dtype).replace("torch.", ""), T=T, B=B, I=I, H=H, layers=args.layers,
               bidirectional=args.bidirectional, proj=args.proj if cell == "lstm" else 0,
               max_rel_error=worst)
    for mode, make, flops in (("infer", infer, fl), ("train", train, 3 * fl)):
        t_ref = bench_ms(make(ref), device, args.rep_ms)
        t_fast = bench_ms(make(fast), device, args.rep_ms)
        row[f"{mode}_torch_ms"] = t_ref
        row[f"{mode}_fastrnn_ms"] = t_fast
        row[f"{mode}_speedup"] = t_ref / t_fast
        row[f"{mode}_torch_tflops"] = flops / (t_ref * 1e-3) / 1e12
        row[f"{mode}_fastrnn_tflops"] = flops / (t_fast * 1e-3) / 1e12
        row[f"{mode}_fastrnn_of_matmul"] = flops / (t_fast * 1e-3) / rates[row["dtype"]]
        row[f"{mode}_torch_of_matmul"] = flops / (t_ref * 1e-3) / rates[row["dtype"]]
    return row


def machine(device):
    info = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                fastrnn=fastrnn.__version__, tf32=args.tf32, cuda_graphs=not args.no_graphs)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(cpu=platform.processor(), threads=torch.get_num_threads(),
                    note="CPU smoke test through the Triton interpreter: timings mean nothing")
    return info


def main():
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark needs a GPU (use --device cpu for a smoke test)")
    reason = fastrnn.backends.unavailable_reason("triton", device, "rnn")
    if reason is not None:
        sys.exit(f"triton backend unavailable on {device}: {reason}")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32

    dtypes = [getattr(torch, DTYPES[d]) for d in args.dtypes.split(",")]
    if device == "cpu":
        dtypes = [d for d in dtypes if d == torch.float32] or [torch.float32]
    info = machine(device)
    rates = {str(d).replace("torch.", ""): matmul_rate(d, device, args.rep_ms) for d in dtypes}
    info["matmul_tflops"] = {k: v / 1e12 for k, v in rates.items()}
    print(json.dumps(info, indent=1))

    rows = []
    header = (f"{'cell':5} {'dtype':8} {'T':>4} {'B':>4} {'I':>5} {'H':>5} |"
              f" {'infer: torch ms':>15} {'fastrnn ms':>10} {'x':>5} {'%mm t/f':>9} |"
              f" {'train: torch ms':>15} {'fastrnn ms':>10} {'x':>5} {'%mm t/f':>9}")
    print(header + "\n" + "-" * len(header))
    for cell in args.cells.split(","):
        for dtype in dtypes:
            for size in args.sizes:
                T, B, I, H = (int(v) for v in size.split(","))
                r = run_case(cell, dtype, T, B, I, H, device, rates)
                rows.append(r)
                line = f"{cell:5} {r['dtype']:8} {T:4} {B:4} {I:5} {H:5} |"
                for mode in ("infer", "train"):
                    line += (f" {r[mode + '_torch_ms']:15.3f} {r[mode + '_fastrnn_ms']:10.3f}"
                             f" {r[mode + '_speedup']:5.2f} {100 * r[mode + '_torch_of_matmul']:4.0f}"
                             f"/{100 * r[mode + '_fastrnn_of_matmul']:<4.0f} |")
                print(line, flush=True)
    print("x = torch time / fastrnn time (> 1: fastrnn faster); %mm t/f = achieved FLOP/s of torch / "
          "fastrnn as % of torch.matmul's rate measured above")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(machine=info, results=rows), fh, indent=1)


if __name__ == "__main__":
    main()
