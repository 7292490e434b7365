"""Low precision at the public boundary: autocast as torch's own layers, and dtypes a backend does
not compute in.

- **Autocast.** Inside ``torch.autocast(device_type, dtype)``, torch runs some of the modules fastrnn
  replaces in the autocast dtype and others in float32; fastrnn follows the same policy (measured on
  torch 2.13, CPU, by running each torch module under autocast; ``AUTOCAST_CPU`` below), so a model
  gives the same dtypes with fastrnn's modules as with torch's. Like torch's autocast, only floating
  tensors other than float64 are cast.
- **Compute dtype.** A backend computes in the dtypes it lists (``dtypes``): the cpp recurrences in
  bfloat16 where oneDNN's bf16 brgemm runs (AVX512_BF16 or AMX: bf16 GEMMs with float32
  accumulation, float32 states and gate math; fastrnn/backends/cpp_rnn.py), triton in float16 and
  bfloat16 on GPUs. Anything else (float16 on the CPU backends, bfloat16 on numba, on cpp's
  attention and decoder, or on a CPU without bf16 instructions) runs in float32 and the results are
  cast back to the input dtype, with the casts differentiable (the gradients reach the
  low-precision leaves in their dtype): correct, not faster than float32
  (``fastrnn.backends.plan``; ``python -m fastrnn info`` says which).
"""
from __future__ import annotations

import contextlib

import torch

LOW = (torch.float16, torch.bfloat16)

# (op, packed) pairs that torch 2.13 runs in the autocast dtype on CPU: LSTM through oneDNN
# (unpacked only; packed LSTM stays float32), RNN tanh/relu and RNNCell through linear (both), SDPA.
# GRU, GRUCell and LSTMCell stay float32.
AUTOCAST_CPU = {("lstm", False), ("rnn_tanh", False), ("rnn_tanh", True), ("rnn_relu", False),
                ("rnn_relu", True), ("rnn_tanh_cell", False), ("rnn_relu_cell", False),
                ("sdpa", False)}


def autocast_dtype(op: str, device_type: str, packed: bool = False) -> torch.dtype | None:
    """The dtype torch's autocast would run ``op`` in (``"lstm"``, ``"gru"``, ``"rnn_tanh"``,
    ``"rnn_relu"``, ``"<cell>_cell"``, ``"sdpa"``) on ``device_type``; None when autocast is off or
    leaves that op in float32. CUDA: torch casts every RNN layer (cuDNN) and cell to the autocast
    dtype; not measured here (no GPU)."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    if device_type == "cpu" and (op, packed) not in AUTOCAST_CPU:
        return None
    return torch.get_autocast_dtype(device_type)


def cast(tree, dtype: torch.dtype):
    """``tree`` (a tensor, None, or nested tuples / lists of them) with every floating tensor that
    is not float64 cast to ``dtype`` (autocast's rule); other leaves unchanged."""
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() and tree.dtype != torch.float64 else tree
    if isinstance(tree, (tuple, list)):
        return type(tree)(cast(t, dtype) for t in tree)
    return tree


def no_autocast(device_type: str):
    """A context in which the fastrnn ops run as written (their internal GEMMs in the dtype they
    were given), even inside a user's autocast region."""
    return (torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda")
            else contextlib.nullcontext())
