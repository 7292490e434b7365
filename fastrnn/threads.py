"""One thread setting for every backend: torch (its OpenMP / MKL pool, used by the cpp backend
and by the big GEMMs of the op code) and numba (its own pool, used by the numba kernels) share
the machine's cores."""
from __future__ import annotations

import importlib.util

import torch


def _numba():
    """The numba module if it is installed (imported on demand), else None."""
    if importlib.util.find_spec("numba") is None:
        return None
    try:
        import numba
    except Exception:  # installed but broken: the numba backend reports why; threads still work
        return None
    return numba


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in torch and, if it is installed, in numba.

    numba cannot use more threads than it started with (``NUMBA_NUM_THREADS``, by default the
    number of cores), so it gets ``min(n, NUMBA_NUM_THREADS)``. torch is set last: starting
    numba's OpenMP pool can reset torch's count where both share one OpenMP runtime (numba#9387).
    The numba kernels use ``min(torch's count, numba's count)``: numba's is per Python thread
    (a new thread starts at ``NUMBA_NUM_THREADS``), torch's per process, so ``torch.set_num_threads``
    alone (as DataLoader workers do) also rules them; a fork child runs them on one thread
    (``fastrnn._numba.runtime``).
    """
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    numba = _numba()
    if numba is not None:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(n)


def get_num_threads() -> int:
    """torch's thread count (``set_num_threads`` keeps numba's equal to it where it can)."""
    return torch.get_num_threads()
