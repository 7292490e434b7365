"""Drop-in modules: subclasses of torch's RNN modules and cells, so parameters, initialisation,
``state_dict``, ``repr`` and ``isinstance`` checks are torch's own; only ``forward`` runs fastrnn.

Every class takes torch's constructor arguments plus keyword-only ``backend=`` (``None`` picks
by the registry's rule; see ``fastrnn.backends``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import functional as FR


class _FusedRNNBase:
    """forward() shared by LSTM, GRU and RNN; validation uses torch's own check methods."""

    def _cell_name(self) -> str:
        return {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}[self.mode]

    def _weight_groups(self):
        """One ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` tuple per layer and direction, read fresh from
        the module's attributes (so ``functional_call`` and shared parameters work)."""
        names = self._flat_weights_names
        per = len(names) // len(self._all_weights)
        groups = []
        for k in range(len(self._all_weights)):
            ws = {n.rsplit("_l", 1)[0]: getattr(self, n) for n in names[k * per:(k + 1) * per]}
            groups.append((ws["weight_ih"], ws["weight_hh"], ws.get("bias_ih"), ws.get("bias_hh"),
                           ws.get("weight_hr")))
        return groups

    def forward(self, input, hx=None):
        self._update_flat_weights()
        is_lstm = self.mode == "LSTM"
        D = 2 if self.bidirectional else 1
        Hr = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        is_batched = True
        if packed:
            x, batch_sizes, sorted_indices, unsorted_indices = input
            B = int(batch_sizes[0])
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                tensor = " tensor" if self.mode.startswith("RNN") else ""  # torch's own wording differs
                raise ValueError(f"{self.mode[:3].rstrip('_')}: Expected input to be 2D or 3D, "
                                 f"got {input.dim()}D{tensor} instead")
            is_batched = input.dim() == 3
            x = input if is_batched else input.unsqueeze(1 if not self.batch_first else 0)
            B = x.shape[0 if self.batch_first else 1]
        if hx is None:
            zeros = dict(dtype=x.dtype, device=x.device)
            h0 = torch.zeros(self.num_layers * D, B, Hr, **zeros)
            hx = (h0, torch.zeros(self.num_layers * D, B, self.hidden_size, **zeros)) if is_lstm else h0
        else:
            states = hx if is_lstm else (hx,)
            want = 3 if is_batched else 2
            if any(s.dim() != want for s in states):
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                if is_lstm:
                    got = f"({states[0].dim()}-D, {states[1].dim()}-D) tensors"
                    raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got {got}")
                raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")
            if not is_batched:
                hx = tuple(s.unsqueeze(1) for s in hx) if is_lstm else hx.unsqueeze(1)
            hx = self.permute_hidden(hx, sorted_indices)
        # torch's own checks (dtype, feature size, state shapes), in the caller's layout.
        self.check_forward_args(x, hx, batch_sizes)
        if self.batch_first and not packed:
            x = x.transpose(0, 1)
        h0, c0 = hx if is_lstm else (hx, None)

        out, h_n, c_n = FR.rnn(self._cell_name(), x, h0, c0, self._weight_groups(),
                               num_layers=self.num_layers, bidirectional=self.bidirectional,
                               dropout=self.dropout, training=self.training,
                               batch_sizes=batch_sizes, backend=self.backend)
        hidden = (h_n, c_n) if is_lstm else h_n
        if packed:
            return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), \
                self.permute_hidden(hidden, unsorted_indices)
        if self.batch_first:
            out = out.transpose(0, 1)
        if not is_batched:
            out = out.squeeze(0 if self.batch_first else 1)
            hidden = tuple(s.squeeze(1) for s in hidden) if is_lstm else hidden.squeeze(1)
        return out, hidden

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", backend={self.backend!r}" if self.backend is not None else "")


class _BackendArg:
    """torch's constructor plus the keyword-only ``backend=``."""

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend


class LSTM(_BackendArg, _FusedRNNBase, nn.LSTM):
    """``torch.nn.LSTM`` with a fused recurrence. Extra keyword: ``backend``."""


class GRU(_BackendArg, _FusedRNNBase, nn.GRU):
    """``torch.nn.GRU`` with a fused recurrence. Extra keyword: ``backend``."""


class RNN(_BackendArg, _FusedRNNBase, nn.RNN):
    """``torch.nn.RNN`` (tanh or relu) with a fused recurrence. Extra keyword: ``backend``."""


def _cell_inputs(name, input, states):
    """torch's cell-input handling: 1-D (unbatched) or 2-D input and states."""
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for idx, s in enumerate(states or ()):
        if s.dim() not in (1, 2):
            label = f"hx[{idx}]" if len(states) > 1 else "hidden"
            raise ValueError(f"{name}: Expected {label} to be 1D or 2D, got {s.dim()}D instead")
    is_batched = input.dim() == 2
    if not is_batched:
        input = input.unsqueeze(0)
    if states is None:
        return input, None, is_batched
    return input, tuple(s if is_batched else s.unsqueeze(0) for s in states), is_batched


def _zeros(input, hidden_size):
    return torch.zeros(input.size(0), hidden_size, dtype=input.dtype, device=input.device)


class LSTMCell(_BackendArg, nn.LSTMCell):
    """``torch.nn.LSTMCell`` running the fused cell step. Extra keyword: ``backend``."""

    def forward(self, input, hx=None):
        input, hx, is_batched = _cell_inputs("LSTMCell", input, hx)
        if hx is None:
            hx = (_zeros(input, self.hidden_size), _zeros(input, self.hidden_size))
        h, c = FR.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                            backend=self.backend)
        return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))


class _OneStateCell(_BackendArg):
    """forward() of the cells with one state (GRUCell, RNNCell); `_step` is the functional op."""

    def forward(self, input, hx=None):
        input, hx, is_batched = _cell_inputs(self._get_name(), input, None if hx is None else (hx,))
        hx = _zeros(input, self.hidden_size) if hx is None else hx[0]
        h = self._step(input, hx)
        return h if is_batched else h.squeeze(0)


class GRUCell(_OneStateCell, nn.GRUCell):
    """``torch.nn.GRUCell`` running the fused cell step. Extra keyword: ``backend``."""

    def _step(self, input, hx):
        return FR.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                           backend=self.backend)


class RNNCell(_OneStateCell, nn.RNNCell):
    """``torch.nn.RNNCell`` (tanh or relu) running the fused cell step. Extra keyword: ``backend``."""

    def _step(self, input, hx):
        return FR.rnn_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                           nonlinearity=self.nonlinearity, backend=self.backend)


# torch class -> fastrnn class. Exact types only: a user subclass may have its own forward.
SWAPS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN,
         nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell, nn.RNNCell: RNNCell}


def _swap(module: nn.Module, table: dict, backend):
    cls = table.get(type(module))
    if cls is None:
        return module
    new = cls.__new__(cls)
    # Same parameter tensors, own containers: the new module shares weights with the old one
    # but registering a parameter on one later does not change the other.
    new.__dict__ = {k: copy.copy(v) if isinstance(v, (dict, list, set)) else v
                    for k, v in module.__dict__.items()}
    if backend is not None or "backend" not in new.__dict__:
        new.backend = backend
    return new


def convert(module: nn.Module, backend: str | None = None) -> nn.Module:
    """Replace every ``nn.LSTM/GRU/RNN`` and ``nn.LSTMCell/GRUCell/RNNCell`` in ``module``
    (the module itself included) by its fastrnn counterpart sharing the same parameter tensors.
    Children are replaced in place; returns the (possibly new) top-level module."""
    for name, child in module.named_children():
        setattr(module, name, convert(child, backend))
    if isinstance(module, (LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell)):
        if backend is not None:
            module.backend = backend
        return module
    return _swap(module, SWAPS, backend)
