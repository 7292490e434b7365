"""C++ backend ``"cpp"`` for the recurrence: thin wrapper over ``fastrnn._C_rnn`` (csrc/rnn.cpp).

Same contract and same saved tensors as the reference (see ``reference_rnn``), variants included
(docs/variants.md: the default ``saved_layout`` of ``fastrnn.contract.rnn``). The time loop,
the per-step GEMM (oneDNN brgemm, chunked per hidden units) and the fused gate math run in C++; this file only makes
tensors contiguous and turns the C++ result lists into the contract's tuples. The plain cell (``variant`` None
once the contract check has normalised it) calls ``rnn_forward`` / ``rnn_backward``, a variant the ``_variant``
entry points: the same C++ time loops, specialised at compile time for the variant's options.

bfloat16 (where oneDNN's bf16 brgemm runs: AVX512_BF16 or AMX; ``_C.low_gemm()``): the same float32
loops with every GEMM in bf16 and float32 accumulation -- the input projection and gradient GEMMs
(``linear`` / ``mm`` / ``mm_tn`` below return float32 for a bf16 operand) and each step's recurrent
product (W_hh packed once per call into bf16 panels, h_prev rounded to bf16 per step). States, gate
math and the saved tensors stay float32 (``saved_layout``: everything after h_seq); h_seq, h_T, c_T
and the states' gradients are bf16. xw reaches ``rnn_forward`` in float32 from ``linear``.
float16 is not native here: it computes in float32 (``fastrnn.precision``).
"""
from __future__ import annotations

import torch

from ..contract import rnn as recurrence
from ..contract.checks import check_rnn_backward, check_rnn_forward
from ..contract.rnn import VariantGrads

name = "cpp"

try:
    from .. import _C_rnn as _C
    _IMPORT_ERROR = None
except ImportError as exc:  # not built (FASTRNN_SKIP_CPP_BUILD, failed compile, no compiler)
    _C, _IMPORT_ERROR = None, exc

_CELL = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}

# What the loops compute in (other dtypes: float32, fastrnn.backends.plan)
dtypes = (torch.float32, torch.float64) + ((torch.bfloat16,) if _C is not None and _C.low_gemm() else ())


def saved_layout(cell, T, B, H, Hr, dtype, has_proj, training, variant=None, state_dtype=None):
    """The default layout (``fastrnn.contract.rnn.saved_layout``); for bfloat16 everything after
    h_seq is float32 (the loops' own tensors, kept as they computed them)."""
    layout = recurrence.saved_layout(cell, T, B, H, Hr, dtype, has_proj, training, variant, state_dtype)
    if dtype != torch.bfloat16:
        return layout
    return layout[:1] + [entry._replace(dtype=torch.float32) for entry in layout[1:]]


def availability(device_type: str) -> str | None:
    if _C is None:
        return (f"C++ extension fastrnn._C_rnn is not built ({_IMPORT_ERROR}); reinstall with "
                "`pip install --no-build-isolation -e .` and read the build log")
    if device_type != "cpu":
        return f"the cpp backend runs on CPU only, not {device_type}"
    return None


def info() -> dict:
    low = torch.bfloat16 in dtypes
    return {"gemm": _C.gemm_engine() if _C is not None else None, "threads": torch.get_num_threads(),
            "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
            "bfloat16": "native: oneDNN brgemm bf16 GEMMs, float32 accumulation, states and gate math" if low else
            "computes in float32 (cast back): no bf16 brgemm on this CPU or build (needs AVX512_BF16 or AMX)",
            "float16": "computes in float32 (cast back): no fp16 path yet"}


def _c(t):
    return None if t is None else t.contiguous()


# The op code's big GEMMs, on the same GEMM engine as the recurrence (see fastrnn.ops.rnn_layer).
def linear(x, w, b):
    """x [N, I], w [G, I], b [G] | None -> x w^T + b [N, G] (float32 for bfloat16 operands)"""
    return _C.linear(x.contiguous(), w.contiguous(), _c(b))


def mm(a, b):
    """a [M, K], b [K, N] -> a b"""
    return _C.mm(a.contiguous(), b.contiguous())


def mm_tn(a, b):
    """a [K, M], b [K, N] -> a^T b"""
    return _C.mm_tn(a.contiguous(), b.contiguous())


# One plain cell step in one call each way (fastrnn/ops/small_calls.py: small calls). No Python checks
# here: the C++ entry points check everything themselves; cell_step / cell_forward return [] for
# what they do not take. (_C.cell_forward / cell_backward, the step without its autograd node,
# are the node's parts, bound for the tests of their checks.)
def cell_step(cell, x, hx, cx, w_ih, w_hh, b_ih, b_hh):
    """x [B, I], hx [B, H], cx [B, H] | None -> [] | [h', c' | None], with a C++ autograd node when
    grad mode is on and an argument requires grad (its backward is cell_backward's)."""
    return _C.cell_step(_CELL[cell], x, hx, cx, w_ih, w_hh, b_ih, b_hh)


def set_create_graph_backward(fn):
    """What the node's backward calls under create_graph=True: fn(cell, x, hx, cx, w_ih, w_hh, b_ih,
    b_hh, needs, grad_h, grad_c) -> 7 gradients, differentiable."""
    _C.set_create_graph_backward(fn)


def _variant_args(v):
    """The C++ variant arguments: the (checked) Variant's tensors, contiguous, and reset_after."""
    return (_c(v.ln_hh_weight), _c(v.ln_hh_bias), _c(v.ln_c_weight), _c(v.ln_c_bias), _c(v.peephole),
            _c(v.rec_mask), _c(v.zoneout_h), _c(v.zoneout_c), _c(v.reset), bool(v.reset_after))


def rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, variant=None):
    variant = check_rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, variant)
    args = (_CELL[cell], xw.contiguous(), _c(w_hh), _c(b_hh), _c(h0), _c(c0), _c(w_hr), _c(batch_sizes),
            reverse, training)
    if variant is None:
        out = _C.rnn_forward(*args)
    else:
        out = _C.rnn_forward_variant(*args, *_variant_args(variant))
    return out[0], out[1], (out[2] if cell == "lstm" else None), tuple(out[3:])


def rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved,
                 variant=None):
    variant = check_rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse,
                                 saved, variant, layout=saved_layout)
    args = (_CELL[cell], _c(grad_h_seq), _c(grad_h_T), _c(grad_c_T), _c(w_hh), _c(w_hr), _c(h0), _c(c0),
            _c(batch_sizes), reverse, [t.contiguous() for t in saved])  # the C++ loops index saved tensors densely
    if variant is None:
        grad_xw, grad_hw, grad_h0, grad_c0, grad_hproj = _C.rnn_backward(*args)
        grads = None
    else:
        (grad_xw, grad_hw, grad_h0, grad_c0, grad_hproj, *vgrads) = _C.rnn_backward_variant(
            *args, *_variant_args(variant))
        grads = VariantGrads(*vgrads)
    return (grad_xw, grad_hw, grad_h0, (grad_c0 if cell == "lstm" else None),
            (grad_hproj if w_hr is not None else None), grads)
