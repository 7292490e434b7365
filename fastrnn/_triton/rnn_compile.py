"""Compile the recurrence kernels for a CUDA target without a GPU (Triton front end, LLVM, ptxas).

The interpreter runs kernel bodies as numpy code, so it accepts things the compiler rejects
(and never sees register pressure or unsupported dtype combinations). This ahead-of-time check
catches those on a machine with no GPU:

    python -m fastrnn._triton.rnn_compile                 # every variant, fp32/fp16/bf16/fp64, sm_90
    python -m fastrnn._triton.rnn_compile --quick fp16    # one variant of each kernel

``TRITON_INTERPRET`` must be unset: the kernels have to be decorated as compiled kernels.
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

TORCH_TO_TRITON = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp64": "fp64"}


def _compile(kernel, dtype, ptr_dtypes, constexprs, config, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn  # the Autotuner wraps the JITFunction
    constexprs = dict(constexprs, **config.kwargs)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + ptr_dtypes.get(name, dtype)
        else:
            signature[name] = "i32"
    src = ASTSource(fn, signature, {(fn.arg_names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def variants(dtype, quick=False):
    """(kernel name, pointer dtypes, constexprs) for every flag combination the backend launches
    (the variant kernels: see ``_variant_kernels``)."""
    import triton.language as tl

    from . import rnn_kernels as k
    acc = "fp64" if dtype == "fp64" else "fp32"
    precisions = ["ieee", "tf32"] if dtype == "fp32" and not quick else ["ieee"]
    out = []
    for precision in precisions:
        base = dict(ACC=tl.float64 if dtype == "fp64" else tl.float32, DOT_PRECISION=precision)
        for cell, ng in (("lstm", 4), ("gru", 3), ("rnn_tanh", 1), ("rnn_relu", 1)):
            code = k.CELL_CODES[cell]
            state = acc if cell == "lstm" else dtype  # c_seq is kept in ACC
            projs = (False, True) if cell == "lstm" else (False,)
            for proj, training, bias in itertools.product(projs, (False, True), (False, True)):
                out.append(("rnn_fwd_step", {"c_ptr": acc, "c_seq_ptr": acc},
                            dict(base, CELL=code, NG=ng, HAS_BIAS=bias, HAS_PROJ=proj, TRAINING=training)))
            for proj, has_prev in itertools.product(projs, (False, True)):
                out.append(("rnn_bwd_step", {"dh_ptr": acc, "dc_ptr": acc, "state_ptr": state, "prev_ptr": state},
                            dict(base, CELL=code, NG=ng, HAS_PROJ=proj, HAS_PREV=has_prev)))
            for store in (False, True):
                out.append(("rnn_bwd_dh", {"dh_ptr": acc},
                            dict(base, NG=ng, IS_GRU=cell == "gru", HAS_PREV=True, STORE_SEQ=store)))
        out.append(("rnn_proj_step", {}, base))
    if quick:  # training LSTM (with and without projection) and GRU: every code path once
        full = ("TRAINING", "HAS_BIAS", "HAS_PREV", "IS_GRU", "STORE_SEQ")
        cells = (k.CELL_CODES["lstm"], k.CELL_CODES["gru"])
        out = [(name, ptrs, c) for name, ptrs, c in out
               if c.get("CELL", cells[0]) in cells and all(c.get(f, True) for f in full)]
    base = dict(ACC=tl.float64 if dtype == "fp64" else tl.float32, DOT_PRECISION="ieee")
    return out + _variant_kernels(k, dtype, acc, base, quick)


# the options of each cell (docs/variants.md); GRU reset_after=False excludes layer norm
_OPTIONS = {"lstm": ("LN", "PEEP", "HAS_MASK", "ZONE", "HAS_RESET"),
            "gru": ("LN", "HAS_MASK", "ZONE", "HAS_RESET", "RB"),
            "rnn_tanh": ("LN", "HAS_MASK", "ZONE", "HAS_RESET"), "rnn_relu": ("LN", "HAS_MASK", "ZONE", "HAS_RESET")}


def _option_sets(cell, quick):
    """Every option on (with and without layer norm: row and tile mode), and each option alone."""
    opts = _OPTIONS[cell]
    full = [set(opts) - {"RB"}, set(opts) - {"LN"}]
    return full if quick else full + [{o} for o in opts]


def _variant_kernels(k, dtype, acc, base, quick):
    """The variant kernels' flag combinations (pointer dtypes as ``triton_rnn`` passes them); IEEE
    dots only (TF32 changes nothing but the dot's precision, which the plain kernels cover).
    quick: LSTM and GRU in training, every option on with and without layer norm."""
    out = []
    cells = (("lstm", 4), ("gru", 3)) if quick else (("lstm", 4), ("gru", 3), ("rnn_tanh", 1), ("rnn_relu", 1))
    for cell, ng in cells:
        code = k.CELL_CODES[cell]
        lstm = cell == "lstm"
        for on in _option_sets(cell, quick):
            ln, rb = "LN" in on, "RB" in on
            var = dict(HAS_RESET="HAS_RESET" in on, HAS_MASK="HAS_MASK" in on)
            zh = "ZONE" in on
            for proj, training in itertools.product((False, True) if lstm else (False,),
                                                    (True,) if quick else (False, True)):
                ptrs = {"c_ptr": acc, "c_seq_ptr": acc, "a_ptr": acc, "rh_ptr": acc, "reset_ptr": "u8",
                        "cnew_ptr": dtype if zh and training else acc,
                        "acts_ptr": dtype if training else acc}
                flags = dict(base, **var, CELL=code, NG=ng, HAS_BIAS=True, HAS_PROJ=proj, TRAINING=training,
                             PEEP="PEEP" in on, ZONE_H=zh, ZONE_C=zh and lstm, LN=ln, LN_C=ln and lstm)
                for phase in ((1, 2) if rb else (0,)):
                    out.append(("rnn_fwd_var", ptrs, dict(flags, PHASE=phase)))
            out.append(("rnn_bwd_dh_var", {"dh_ptr": acc, "h0acc_ptr": acc, "x_prev_ptr": acc, "reset_prev_ptr": "u8",
                                           "dhnew_ptr": acc},
                        dict(base, **var, IS_GRU=cell == "gru", RB=rb, HAS_PREV=True, ZONE_H=zh, STORE_NEW=True,
                             LN=False)))
            for proj in (False, True) if lstm else (False,):
                fuse = not (ln or proj)  # as triton_rnn._backward_var decides
                out.append(("rnn_bwd_var", {"dhu_ptr": acc, "cnew_ptr": dtype if zh else acc,
                                            "prev_ptr": acc if lstm else dtype, "dc_ptr": acc, "c0acc_ptr": acc,
                                            "reset_ptr": "u8", "dyc_ptr": acc, "dh_ptr": acc, "h0acc_ptr": acc,
                                            "x_prev_ptr": acc, "reset_prev_ptr": "u8"},
                            dict(base, **var, CELL=code, NG=ng, PEEP="PEEP" in on, ZONE_C=zh and lstm, LN=ln,
                                 LN_C=ln and lstm, RB=rb, FUSE_DH=fuse, HAS_PREV=True, ZONE_H=zh)))
            if ln:
                out.append(("rnn_var_gemm", {"a_ptr": acc, "reset_ptr": "u8"}, dict(base, **var, LN=False)))
            if rb:
                out.append(("rnn_bwd_gru_rb", {"reset_ptr": "u8", "x_ptr": acc}, dict(base, **var, LN=False)))
    for bwd in (False, True):
        out.append(("rnn_proj_var", {"out_ptr": acc if bwd else dtype, "reset_ptr": "u8"},
                    dict(base, BWD=bwd, HAS_RESET=True, ZONE_H=True, LN=False)))
    return out


def compile_all(dtypes, quick=False, arch=90, configs=None, log=print, only=None):
    """Compile every variant (``only``: kernels whose name contains it) with the smallest and the
    largest tile (quick: the smallest); row-mode launches (layer norm) with the row-mode tiles."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter has nothing to compile")
    from . import rnn_kernels as k
    gpu = k.configs(interpreted=False)
    if configs is None:
        configs = [gpu[0], gpu[-1]] if not quick else [gpu[0]]  # smallest and largest tiles
    rows = [c for c in k.var_configs(interpreted=False) if c.kwargs["BLOCK_B"] < 16]
    row_configs = [rows[0], rows[-1]] if not quick else [rows[0]]
    n, t0 = 0, time.time()
    for dtype in dtypes:
        for name, ptrs, consts in variants(dtype, quick):
            if only and only not in name:
                continue
            for config in (row_configs if consts.get("LN") else configs):
                _compile(getattr(k, name), TORCH_TO_TRITON[dtype], ptrs, consts, config, arch)
                n += 1
        log(f"{dtype}: {n} kernels compiled for sm_{arch} in {time.time() - t0:.0f} s")
    return n


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dtypes", nargs="*", default=["fp32", "fp16", "bf16", "fp64"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--only", help="compile only the kernels whose name contains this")
    a = ap.parse_args()
    compile_all(a.dtypes, a.quick, a.arch, only=a.only)
