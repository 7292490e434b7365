"""Pieces of the recurrence contract that every backend shares.

Shape letters: T time, B batch, I input, H hidden, Hr projected hidden (proj_size or H),
G gate width (4H LSTM, 3H GRU, H RNN).
"""
from __future__ import annotations

import torch

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def check_cell(cell: str) -> None:
    if cell not in GATES:
        raise ValueError(f"fastrnn: unknown cell {cell!r}; expected one of {CELLS}")


def time_steps(T: int, reverse: bool) -> range:
    """The order in which a direction visits the time steps."""
    return range(T - 1, -1, -1) if reverse else range(T)


def active_rows(batch_sizes: torch.Tensor | None, t: int, B: int) -> int:
    """Rows active at step t. With ``batch_sizes`` (descending, from a PackedSequence) the
    active rows are always the prefix ``[0, batch_sizes[t])``."""
    return B if batch_sizes is None else int(batch_sizes[t])


def previous_states(seq: torch.Tensor, init: torch.Tensor, batch_sizes: torch.Tensor | None,
                    reverse: bool) -> torch.Tensor:
    """The state each step started from: ``prev[t, b]`` for every row active at step t.

    seq [T, B, K] holds the state after each step, init [B, K] the initial state.
    Forward direction: ``prev[t] = seq[t-1]`` (``init`` at t=0); rows active at t were active
    at t-1 because batch sizes only shrink. Reverse direction: ``prev[t] = seq[t+1]`` for rows
    still active at t+1, else ``init`` (a packed row starts from ``init`` at its own last step).
    Rows inactive at t get a value that callers must ignore.
    """
    if not reverse:
        return torch.cat([init.unsqueeze(0), seq[:-1]], 0)
    prev = torch.cat([seq[1:], init.unsqueeze(0)], 0)
    if batch_sizes is not None:
        B = seq.shape[1]
        next_bs = torch.cat([batch_sizes[1:], batch_sizes.new_zeros(1)]).to(seq.device)
        started = torch.arange(B, device=seq.device).unsqueeze(0) < next_bs.unsqueeze(1)  # [T, B]
        prev = torch.where(started.unsqueeze(-1), prev, init.unsqueeze(0))
    return prev


def packed_mask(batch_sizes: torch.Tensor, B: int, device) -> torch.Tensor:
    """[T, B] boolean, True where row b is active at step t. Row-major order over this mask is
    exactly the order of ``PackedSequence.data`` (time-major, active prefix per step)."""
    return torch.arange(B, device=device).unsqueeze(0) < batch_sizes.to(device).unsqueeze(1)
