"""Triton kernels for fastrnn. Import a kernel module only after deciding on ``TRITON_INTERPRET``:
``@triton.jit`` reads it when a kernel is decorated, not when it runs."""
from __future__ import annotations

import importlib.util
import os


def availability(device_type: str, load_kernels) -> str | None:
    """The one availability rule of every triton op (``load_kernels()`` imports the op's kernel
    module): CUDA when torch sees a GPU; CPU only through the interpreter, which is for tests."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cpu" and not interpret:
        return ("triton runs on CPU only through the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported (slow; meant for tests)")
    if device_type not in ("cpu", "cuda"):
        return f"triton backend does not support device type {device_type!r}"
    import torch
    if device_type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available to torch"
    try:
        kernels = load_kernels()
    except Exception as exc:  # a broken triton install: report it, don't crash the registry
        return f"importing the triton kernels failed: {type(exc).__name__}: {exc}"
    if device_type == "cpu" and getattr(kernels, "INTERPRETED", True) is False:
        return ("the triton kernels were already compiled for the GPU: TRITON_INTERPRET=1 was set "
                "after they were imported")
    return None
