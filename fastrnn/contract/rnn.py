"""The recurrence contract's data: what the op layer (``fastrnn/ops``) and every backend
(``fastrnn/backends``) agree on. Operations and equations: ``fastrnn/backends/reference_rnn.py``.
Imports only torch, so that backends never import the op layer.

Shape letters: T time, B batch, I input, H hidden, Hr projected hidden (proj_size or H),
G gate width (4H LSTM, 3H GRU, H RNN).
"""
from __future__ import annotations

from typing import NamedTuple

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


# ---------------------------------------------------------------------------------------------
# Variants beyond cuDNN (layer norm, peephole, recurrent dropout, zoneout, GRU reset-before,
# state resets). The equations are in docs/variants.md and in the reference backend; this is the
# contract's data. ``variant=None`` (the default everywhere) is the plain cell, bit for bit.
# ---------------------------------------------------------------------------------------------

LN_EPS = 1e-5


class Variant(NamedTuple):
    """What a backend needs to run a variant of one layer and direction (all optional).

    ln_hh_weight, ln_hh_bias [G]   layer norm of the hidden product ``h_in W_hh^T`` over its G
                                   entries (both present or both None)
    ln_c_weight, ln_c_bias  [H]    LSTM: ``h = o * tanh(LN(c_t))`` (both present or both None)
    peephole                [3, H] LSTM: diagonal peephole weights for i, f (see c_{t-1}) and o (sees c_t)
    rec_mask                [B, Hr] multiplier of ``h_{t-1}`` in the recurrent product
                                   (recurrent dropout: 0 or 1/(1-p), one mask per sequence)
    zoneout_h               [T, B, Hr] weight of the previous state: ``h_t = z h_prev + (1-z) h_new``
                                   (training: 0/1 draws; eval: the probability p)
    zoneout_c               [T, B, H]  the same for the LSTM cell state
    reset                   [T, B] bool: before step t (in the direction's visiting order) the
                                   row's state is replaced by its initial state (h0, c0)
    reset_after             GRU only: False = ``n = tanh(x_n + (r * h_in) W_hn^T + b_hn)``
    """
    ln_hh_weight: torch.Tensor | None = None
    ln_hh_bias: torch.Tensor | None = None
    ln_c_weight: torch.Tensor | None = None
    ln_c_bias: torch.Tensor | None = None
    peephole: torch.Tensor | None = None
    rec_mask: torch.Tensor | None = None
    zoneout_h: torch.Tensor | None = None
    zoneout_c: torch.Tensor | None = None
    reset: torch.Tensor | None = None
    reset_after: bool = True


class VariantGrads(NamedTuple):
    """The sixth element of ``rnn_backward``'s result when a variant ran (None for the plain cell):
    the gradients of the variant's own parameters, summed over steps and rows.

    ln_hh_weight, ln_hh_bias [G]; ln_c_weight, ln_c_bias [H]; peephole [3, H].
    """
    ln_hh_weight: torch.Tensor | None = None
    ln_hh_bias: torch.Tensor | None = None
    ln_c_weight: torch.Tensor | None = None
    ln_c_bias: torch.Tensor | None = None
    peephole: torch.Tensor | None = None


def is_plain(variant: Variant | None) -> bool:
    return variant is None or variant == Variant()


def check_variant(cell: str, variant: Variant | None) -> Variant | None:
    """The variant with its combinations checked, normalised: ``None`` for the plain cell (None or
    ``Variant()``), the one representation backends see. The saved layout (``saved_layout``)
    assumes these pairings, so a backend may rely on them."""
    if is_plain(variant):
        return None
    v = variant
    if (v.ln_hh_weight is None) != (v.ln_hh_bias is None) or (v.ln_c_weight is None) != (v.ln_c_bias is None):
        raise ValueError("fastrnn: layer norm needs both its weight and its bias")
    if cell != "lstm" and (v.ln_c_weight is not None or v.peephole is not None or v.zoneout_c is not None):
        raise ValueError(f"fastrnn: ln_c, peephole and zoneout_c are LSTM options, not {cell}'s")
    if v.ln_c_weight is not None and v.ln_hh_weight is None:
        raise ValueError("fastrnn: the cell-state layer norm comes with the hidden-product layer norm")
    if cell == "lstm" and (v.zoneout_h is None) != (v.zoneout_c is None):
        raise ValueError("fastrnn: LSTM zoneout needs both zoneout_h and zoneout_c")
    if not v.reset_after and (cell != "gru" or v.ln_hh_weight is not None):
        raise ValueError("fastrnn: reset_after=False is a GRU option and excludes layer norm")
    return v


def recurrent_inputs(h_seq, h0, batch_sizes, reverse, variant: Variant | None):
    """``h_in`` [T, B, Hr]: the left operand of step t's recurrent product, for dW_hh.

    ``h_prev`` (previous_states), replaced by ``h0`` where ``reset`` is set, times ``rec_mask``.
    """
    prev = previous_states(h_seq, h0, batch_sizes, reverse)
    if variant is None:
        return prev
    if variant.reset is not None:
        prev = torch.where(variant.reset.unsqueeze(-1), h0.unsqueeze(0), prev)
    if variant.rec_mask is not None:
        prev = prev * variant.rec_mask
    return prev


class Saved(NamedTuple):
    """One entry of the saved layout."""
    name: str
    shape: tuple
    dtype: torch.dtype


def saved_layout(cell, T, B, H, Hr, dtype, has_proj, training, variant: Variant | None = None,
                 state_dtype=None) -> list[Saved]:
    """The ``saved`` tuple of a training forward, by name (the one place that knows its order;
    reference, cpp, numba and triton all save it):

        h_seq   [T, B, Hr]  every cell (the op's output; the op layer passes it back as saved[0])
        gates   [T, B, G]   LSTM, GRU: the activated gates (i, f, g, o / r, z, n)
        c_seq   [T, B, H]   LSTM: cell states (after zoneout), in ``state_dtype`` when given
        hu      [T, B, H]   LSTM with a projection: the unprojected outputs ``o * tanh(.)``
        h_n     [T, B, H]   GRU: the hidden-side n pre-activation
        hw_hat  [T, B, G], hw_rstd [T, B]   hidden-product layer norm
        c_hat   [T, B, H], c_rstd  [T, B]   LSTM cell-state layer norm
        c_new / h_new [T, B, H]             zoneout: LSTM's cell state / RNN's state before mixing

    ``state_dtype``: LSTM's ``c_seq`` dtype when it differs from ``dtype`` (triton keeps float32
    cell states for float16 / bfloat16). Shapes may be symbolic (torch.compile's fake kernels).
    Empty when not training.
    """
    if not training:
        return []
    G = GATES[cell] * H
    out = [Saved("h_seq", (T, B, Hr), dtype)]
    if cell == "lstm":
        out += [Saved("gates", (T, B, G), dtype), Saved("c_seq", (T, B, H), state_dtype or dtype)]
        if has_proj:
            out.append(Saved("hu", (T, B, H), dtype))
    elif cell == "gru":
        out += [Saved("gates", (T, B, G), dtype), Saved("h_n", (T, B, H), dtype)]
    if variant is None:
        return out
    if variant.ln_hh_weight is not None:
        out += [Saved("hw_hat", (T, B, G), dtype), Saved("hw_rstd", (T, B), dtype)]
        if cell == "lstm" and variant.ln_c_weight is not None:
            out += [Saved("c_hat", (T, B, H), dtype), Saved("c_rstd", (T, B), dtype)]
    if variant.zoneout_h is not None and cell != "gru":
        out.append(Saved("c_new" if cell == "lstm" else "h_new", (T, B, H), dtype))
    return out


def by_name(layout: list[Saved], saved) -> dict[str, torch.Tensor]:
    """``saved`` (in ``layout``'s order) as ``{name: tensor}``."""
    return {entry.name: t for entry, t in zip(layout, saved)}
