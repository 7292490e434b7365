"""One range per fastrnn kernel call, visible by name in torch.profiler (CPU and CUDA) and, on
CUDA, as an NVTX range for Nsight Systems."""
from __future__ import annotations

import contextlib

import torch
from torch.autograd.profiler import record_function

_NOTHING = contextlib.nullcontext()


def kernel_range(name: str, device: torch.device):
    """``with kernel_range("fastrnn::lstm_layer_fwd[cpp]", x.device): ...``

    On CPU the range is opened only while a profiler records (``torch.profiler``,
    ``torch.autograd.profiler``): ``record_function`` costs ~10 us a call even when nothing
    listens, a tenth of a small cell step (bench/results/small_calls_cpu.md); otherwise this
    returns a shared no-op context (a generator-based context manager costs ~1.5 us more)."""
    if device.type != "cuda" and not torch._C._autograd._profiler_enabled():
        return _NOTHING
    return _range(name, device)


@contextlib.contextmanager
def _range(name, device):
    with record_function(name):
        if device.type == "cuda":
            torch.cuda.nvtx.range_push(name)
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()
        else:
            yield
