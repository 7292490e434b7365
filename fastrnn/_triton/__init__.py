"""Triton kernels for fastrnn. Import a kernel module only after deciding on ``TRITON_INTERPRET``:
``@triton.jit`` reads it when a kernel is decorated, not when it runs."""
from __future__ import annotations

import functools
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
    if device_type == "cpu":
        return _interpreter_defect()
    return None


@functools.cache
def _interpreter_defect() -> str | None:
    """Why this Triton's interpreter cannot run the kernels, else None. Before the fix of
    triton-lang/triton#9171 (Triton 3.6 has it, 3.9 does not) the interpreter turns a loop bound
    into ``int(array)``, which NumPy >= 2.4 refuses for the 1-element arrays it holds: every
    kernel with a ``range(0, n)`` loop then fails. One loop of that kind tells."""
    import numpy as np
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _loop(x_ptr, n):
        for i in range(0, n):
            tl.store(x_ptr + i, i + 1)

    x = torch.zeros(2, dtype=torch.int32)
    try:
        _loop[(1,)](x, 2)
        if x.tolist() == [1, 2]:
            return None
        problem = f"a two-step loop wrote {x.tolist()}"
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    return (f"the interpreter of triton {triton.__version__} cannot run a loop with numpy "
            f"{np.__version__} ({problem}; triton-lang/triton#9171): install triton >= 3.9 or "
            "numpy < 2.4")
