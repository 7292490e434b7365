"""One thread setting for every backend: torch (its OpenMP / MKL pool, used by the cpp backend
and by the big GEMMs of the op code) and numba share the machine's cores."""
from __future__ import annotations

import torch


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in torch and, if it is installed and loaded, numba."""
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    torch.set_num_threads(n)


def get_num_threads() -> int:
    return torch.get_num_threads()
