"""C++ backend ``"cpp"`` for the attention decoder: thin wrapper over ``fastrnn._C_decoder``
(csrc/decoder.cpp).

Same contract and same saved tensors as the reference (``reference_decoder``; the additive score's
``tanh(q + keys_s)`` is recomputed in backward). The whole time loop runs in C++: batch rows split
into one block per thread, each task running every step for its rows (no barrier per step); the
step GEMMs on oneDNN's brgemm micro-kernel (csrc/gemm.h) with weights packed once per call; the
gate, softmax and attention math vectorised per ISA. This file only makes tensors contiguous (w_feed
may keep a row stride) and turns the C++ result lists into the contract's tuples. Design notes in the header of
``csrc/decoder.cpp``.
"""
from __future__ import annotations

import torch

from ..contract.decoder import DecoderGrads, check_decoder_backward, check_decoder_forward

name = "cpp"
dtypes = (torch.float32, torch.float64)

try:
    from .. import _C_decoder as _C
    _IMPORT_ERROR = None
except ImportError as exc:  # not built (FASTRNN_SKIP_CPP_BUILD, failed compile, no compiler)
    _C, _IMPORT_ERROR = None, exc

_CELL = {"lstm": 0, "gru": 1}


def availability(device_type: str) -> str | None:
    if _C is None:
        return (f"C++ extension fastrnn._C_decoder is not built ({_IMPORT_ERROR}); reinstall with "
                "`pip install --no-build-isolation -e .` and read the build log")
    if device_type != "cpu":
        return f"the cpp backend runs on CPU only, not {device_type}"
    return None


def info() -> dict:
    return {"gemm": _C.gemm_engine() if _C is not None else None, "threads": torch.get_num_threads()}


def _c(t):
    return None if t is None else t.contiguous()


def _rows(t):
    """w_feed as the module passes it (a column slice of weight_ih_l0) without a copy: the C++
    side takes its row stride."""
    return t if t is None or (t.stride(-1) == 1 and t.stride(0) >= t.shape[1]) else t.contiguous()


def _args(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop):
    """The C++ entry points' common arguments, in their order, contiguous."""
    p = params
    return (_CELL[cell], _c(xw), _c(keys), _c(memory), _c(mask), _rows(p.w_feed), _c(p.w_in), _c(p.b_in), _c(p.w_hh),
            _c(p.b_hh), _c(p.w_q), _c(p.b_q), _c(p.v), _c(p.w_c), _c(h0), _c(c0), _c(feed0), _c(drop))


def decoder_forward(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop, training):
    check_decoder_forward(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop, training)
    out, attn, h_n, c_n, *saved = _C.decoder_forward(*_args(cell, xw, keys, memory, mask, params, h0, c0, feed0,
                                                            drop), bool(training))
    return out, attn, h_n, (c_n if cell == "lstm" else None), (tuple(saved) if training else ())


def decoder_backward(cell, grad_out, grad_attn, grad_h_n, grad_c_n, xw, keys, memory, mask, params,
                     h0, c0, feed0, drop, out, attn, saved):
    check_decoder_backward(cell, grad_out, grad_attn, grad_h_n, grad_c_n, xw, keys, memory, mask, params,
                           h0, c0, feed0, drop, out, attn, saved)
    additive = params.v is not None
    (grad_gi, grad_gh, grad_opre, grad_q, grad_v, grad_keys, grad_memory, grad_h0, grad_c0,
     grad_feed0) = _C.decoder_backward(_CELL[cell], _c(grad_out), _c(grad_attn), _c(grad_h_n), _c(grad_c_n),
                                       *_args(cell, xw, keys, memory, mask, params, h0, c0, feed0, drop)[1:],
                                       _c(out), _c(attn), [t.contiguous() for t in saved])
    return DecoderGrads(grad_gi, grad_gh, grad_opre, grad_q if additive else None, grad_v if additive else None,
                        grad_keys, grad_memory, grad_h0, grad_c0 if cell == "lstm" else None, grad_feed0)
