r"""Backend ``"triton"`` for the attention decoder: persistent Triton kernels
(``fastrnn/_triton/decoder_kernels.py``). Contract and equations:
``fastrnn/backends/reference_decoder.py``.

Forward is one launch (``decoder_fwd``) and backward one launch (``decoder_bwd``), each with grid
``(cdiv(B, BLOCK_B),)``: a program owns BLOCK_B batch rows and runs the whole time loop for them
(batch rows are independent; the weights are shared and read-only), so no step needs a grid-wide
synchronisation and no Python loop launches per step. Backward adds one torch reduction after
the launch (grad_v's per-program partials, summed deterministically).

State lives in global buffers the kernels read back (hidden sizes are runtime values and the
states do not fit registers): the saved ``hs`` and ``cells`` are views into ``[T+1, L, B, H]``
buffers whose first step holds h0 / c0, so a step always reads its predecessor from the same
buffer, and ``out`` is a view into ``[T+1, B, H]`` whose first step holds feed0.

Devices and dtypes: CUDA, and CPU through the Triton interpreter (``TRITON_INTERPRET=1`` before
triton is imported; tiny problems only); float32 and float64 (the decoder contract's dtypes).
Float32 ``tl.dot`` is IEEE by default; ``FASTRNN_TRITON_TF32=1`` allows TF32.

Limits of this design (see the kernel module): with B = 32 and BLOCK_B = 16 only two programs
run, so a GPU is mostly idle at small batch; the work per program is the full per-row GEMV
traffic of the weights each step.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

from .. import _triton as _triton_pkg
from ..contract.decoder import DecoderGrads, check_decoder_backward, check_decoder_forward

name = "triton"
dtypes = (torch.float32, torch.float64)

TF32_ENV = "FASTRNN_TRITON_TF32"
# BLOCK_B, BLOCK_N, BLOCK_K (gate / output GEMM tiles: tl.dot needs every dim >= 16), BLOCK_S,
# BLOCK_D (the [BLOCK_B, BLOCK_S, BLOCK_D] score / context tiles), num_warps
# GPU: chosen by compiling for sm_90 offline (ptxas -v, no GPU run yet): every candidate sits at 255
# registers; this one spills least (72 B forward, ~530 B backward; 16x64 tiles or 4 warps spill 0.4-3.6 KB)
GPU_BLOCKS = dict(BLOCK_B=16, BLOCK_N=32, BLOCK_K=32, BLOCK_S=16, BLOCK_D=16, num_warps=8)
INTERPRETER_BLOCKS = dict(BLOCK_B=16, BLOCK_N=16, BLOCK_K=16, BLOCK_S=16, BLOCK_D=16)
INT32_LIMIT = 2 ** 31  # the kernels index with int32 offsets

_kernels_module = None


def _kernels():
    """The kernel module, imported on first use (importing triton costs about a second)."""
    global _kernels_module
    if _kernels_module is None:
        _kernels_module = importlib.import_module("fastrnn._triton.decoder_kernels")
    return _kernels_module


def availability(device_type: str) -> str | None:
    return _triton_pkg.availability(device_type, _kernels)


def _meta(dtype, device):
    """Block sizes and constexprs of a launch."""
    import triton.language as tl
    interpreted = _kernels().INTERPRETED or device.type == "cpu"
    blocks = dict(INTERPRETER_BLOCKS if interpreted else GPU_BLOCKS)
    precision = "tf32" if dtype == torch.float32 and os.environ.get(TF32_ENV) == "1" else "ieee"
    return dict(ACC=tl.float64 if dtype == torch.float64 else tl.float32, PRECISION=precision, **blocks)


def _c(t):
    return None if t is None else t.contiguous()


def _nonempty(t):
    """An L = 1 decoder has empty w_in / b_in: pass a one-element stand-in (never read) rather
    than a null pointer."""
    return t if t.numel() > 0 else t.new_zeros(1)


def _check_launch(tensors, dtype, device, meta):
    """What the kernels rely on and do not check themselves: contiguous row-major tensors (the
    kernels compute offsets from the sizes, not strides) of one dtype and device, int32 offsets,
    and tl.dot tiles of at least 16."""
    for label, t in tensors.items():
        if t is None:
            continue
        if not t.is_contiguous():
            raise RuntimeError(f"fastrnn: triton decoder: {label} must be contiguous")
        if t.device != device:
            raise RuntimeError(f"fastrnn: triton decoder: {label} is on {t.device}, expected {device}")
        if t.dtype not in (dtype, torch.uint8):
            raise RuntimeError(f"fastrnn: triton decoder: {label} is {t.dtype}, expected {dtype}")
        if t.numel() >= INT32_LIMIT:
            raise RuntimeError(f"fastrnn: triton decoder: {label} has {t.numel()} elements; the kernels index "
                               f"with int32 offsets (at most {INT32_LIMIT - 1})")
    if min(meta["BLOCK_B"], meta["BLOCK_N"], meta["BLOCK_K"]) < 16:
        raise RuntimeError("fastrnn: triton decoder: tl.dot tiles need BLOCK_B, BLOCK_N, BLOCK_K >= 16")
    if dtype not in dtypes:
        raise RuntimeError(f"fastrnn: triton decoder computes in {dtypes}, got {dtype}")


def _grid(B, meta):
    return (-(-B // meta["BLOCK_B"]),)


def _mask_u8(mask):
    return None if mask is None else mask.contiguous().view(torch.uint8)


def decoder_forward(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop, training):
    check_decoder_forward(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop, training)
    p = params
    T, B, G = xw.shape
    L, _, H = h0.shape
    S, M = memory.shape[1:]
    lstm = cell == "lstm"
    dtype, device = xw.dtype, xw.device
    meta = _meta(dtype, device)
    additive = p.v is not None
    drop = drop if drop is not None and drop.numel() > 0 else None  # L = 1: no layer boundary
    # state buffers with the initial state in front (module docstring)
    hs = torch.empty(T + 1, L, B, H, dtype=dtype, device=device)
    hs[0] = h0
    cs = None
    if lstm:
        cs = torch.empty(T + 1, L, B, H, dtype=dtype, device=device)
        cs[0] = c0
    outs = torch.empty(T + 1, B, H, dtype=dtype, device=device)
    outs[0] = feed0
    attn = torch.empty(T, B, S, dtype=dtype, device=device)
    gates = torch.empty(T, L, B, 4 * H, dtype=dtype, device=device) if training else None
    ctx = torch.empty(T if training else 1, B, M, dtype=dtype, device=device)  # inference: one step's scratch
    qp = torch.empty(B, H, dtype=dtype, device=device) if additive else None
    args = dict(xw_ptr=_c(xw), keys_ptr=_c(keys), mem_ptr=_c(memory), mask_ptr=_mask_u8(mask),
                w_feed_ptr=_c(p.w_feed), w_in_ptr=_nonempty(_c(p.w_in)), b_in_ptr=_nonempty(_c(p.b_in)),
                w_hh_ptr=_c(p.w_hh), b_hh_ptr=_c(p.b_hh), w_q_ptr=_c(p.w_q), b_q_ptr=_c(p.b_q), v_ptr=_c(p.v),
                w_c_ptr=_c(p.w_c), drop_ptr=_c(drop), hs_ptr=hs, cs_ptr=cs, out_ptr=outs, attn_ptr=attn,
                gates_ptr=gates, ctx_ptr=ctx, qp_ptr=qp)
    _check_launch(args, dtype, device, meta)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _kernels().decoder_fwd[_grid(B, meta)](**args, T=T, B=B, S=S, M=M, H=H, L=L,
                                               ctx_step=B * M if training else 0, LSTM=lstm, **meta)
    out = outs[1:]
    h_n = hs[T].clone()
    c_n = cs[T].clone() if lstm else None
    if not training:
        return out, attn, h_n, c_n, ()
    saved = (gates, cs[1:] if lstm else xw.new_empty(0), hs[1:], ctx)
    return out, attn, h_n, c_n, saved


def decoder_backward(cell, grad_out, grad_attn, grad_h_n, grad_c_n, xw, keys, memory, mask, params,
                     h0, c0, feed0, drop, out, attn, saved):
    check_decoder_backward(cell, grad_out, grad_attn, grad_h_n, grad_c_n, xw, keys, memory, mask, params,
                           h0, c0, feed0, drop, out, attn, saved)
    p = params
    gates, cells, hs, _ctx = saved
    T, L, B, H = hs.shape
    S, M = memory.shape[1:]
    G = xw.shape[2]
    lstm = cell == "lstm"
    dtype, device = xw.dtype, xw.device
    meta = _meta(dtype, device)
    additive = p.v is not None
    drop = drop if drop is not None and drop.numel() > 0 else None  # L = 1: no layer boundary
    # the states with the initial ones in front, as forward had them (saved may be any backend's)
    hs_full = torch.cat([h0.unsqueeze(0), hs], 0)
    cs_full = torch.cat([c0.unsqueeze(0), cells], 0) if lstm else None
    grad_gi = torch.empty(T, L, B, G, dtype=dtype, device=device)
    grad_gh = grad_gi if lstm else torch.empty(T, L, B, G, dtype=dtype, device=device)
    grad_opre = torch.empty(T, B, H, dtype=dtype, device=device)
    grad_q = torch.empty(T, B, H, dtype=dtype, device=device) if additive else None
    n_prog = _grid(B, meta)[0]
    grad_v_part = torch.zeros(n_prog, H, dtype=dtype, device=device) if additive else None
    grad_keys = torch.zeros(B, S, H, dtype=dtype, device=device)
    grad_memory = torch.zeros(B, S, M, dtype=dtype, device=device)
    grad_h0 = grad_h_n.contiguous().clone()  # the carried dh_rec, in place
    grad_c0 = grad_c_n.contiguous().clone() if lstm else None
    grad_feed0 = torch.zeros(B, H, dtype=dtype, device=device)  # the carried dfeed
    scratch = dict(dnext_ptr=torch.empty(B, H, dtype=dtype, device=device),
                   dctx_ptr=torch.empty(B, M, dtype=dtype, device=device),
                   da_ptr=torch.empty(B, S, dtype=dtype, device=device),
                   qp_ptr=torch.empty(B, H, dtype=dtype, device=device) if additive else None)
    args = dict(grad_out_ptr=_c(grad_out), grad_attn_ptr=_c(grad_attn), keys_ptr=_c(keys), mem_ptr=_c(memory),
                w_feed_ptr=_c(p.w_feed), w_in_ptr=_nonempty(_c(p.w_in)), w_hh_ptr=_c(p.w_hh), w_q_ptr=_c(p.w_q),
                b_q_ptr=_c(p.b_q), v_ptr=_c(p.v), w_c_ptr=_c(p.w_c), drop_ptr=_c(drop),
                hs_ptr=hs_full, cs_ptr=cs_full, out_ptr=_c(out), attn_ptr=_c(attn), gates_ptr=_c(gates),
                grad_gi_ptr=grad_gi, grad_gh_ptr=grad_gh, grad_opre_ptr=grad_opre, grad_q_ptr=grad_q,
                grad_v_ptr=grad_v_part, grad_keys_ptr=grad_keys, grad_mem_ptr=grad_memory,
                dh_ptr=grad_h0, dc_ptr=grad_c0, dfeed_ptr=grad_feed0, **scratch)
    _check_launch(args, dtype, device, meta)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _kernels().decoder_bwd[_grid(B, meta)](**args, T=T, B=B, S=S, M=M, H=H, L=L, LSTM=lstm, **meta)
    grad_v = grad_v_part.sum(0) if additive else None  # per-program partials, summed in a fixed order
    return DecoderGrads(grad_gi, grad_gh, grad_opre, grad_q, grad_v, grad_keys, grad_memory,
                        grad_h0, grad_c0, grad_feed0)

