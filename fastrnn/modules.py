"""Drop-in modules with torch's parameters, initialisation, ``state_dict``, ``repr`` and checks;
only ``forward`` runs fastrnn.

The cells subclass ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell``. The layers subclass
``nn.RNNBase`` and reproduce ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``'s constructors and borrow their
check methods, but are not instances of those classes: torch.compile's dynamo refuses to trace
any instance of them, subclasses included ("Attempted to wrap RNN, GRU, or LSTM", pytorch issue
#141184), which would make every model holding a fastrnn layer break its graph.
``isinstance(m, nn.RNNBase)`` holds; ``fastrnn.to_torch`` turns them back into torch's classes.

Every class takes torch's constructor arguments plus keyword-only ``backend=`` (``None`` picks
by the registry's rule; see ``fastrnn.backends``) and the variant options of docs/variants.md
(``layer_norm``, ``peephole``, ``recurrent_dropout``, ``zoneout``, ``reset_after``,
``forget_bias``), each where it applies. With every option off a module has exactly torch's
parameters, RNG draws and numbers; options add parameters registered after torch's.
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn
from torch.nn import init
from torch.nn.utils.rnn import PackedSequence

from . import backends
from . import functional as FR
from .contract.rnn import GATES
from .ops import small_calls

# option -> its "off" value. Also the class-level defaults: convert() builds a module from a torch
# module's __dict__, which has none of these attributes.
_OPTIONS = dict(layer_norm=False, peephole=False, recurrent_dropout=0.0, zoneout=0.0,
                reset_after=True, forget_bias=0.0)


def _torch_mode(torch_class, self, args, kwargs):
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``'s own constructor logic (mode, nonlinearity, the
    proj_size check), which calls ``super()`` and so cannot run on a non-instance."""
    if torch_class is nn.LSTM:
        return "LSTM", args, kwargs
    if "proj_size" in kwargs:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
    if torch_class is nn.GRU:
        return "GRU", args, kwargs
    if len(args) > 3:
        self.nonlinearity, args = args[3], args[:3] + args[4:]
    else:
        self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
    if self.nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
    return f"RNN_{self.nonlinearity.upper()}", args, kwargs


class _FusedRNNBase:
    """forward() shared by LSTM, GRU and RNN; validation uses torch's own check methods."""

    _torch_class: type = nn.RNNBase  # the torch class whose constructor and checks this reproduces

    def __init__(self, *args, **kwargs):
        mode, args, kwargs = _torch_mode(self._torch_class, self, args, kwargs)
        nn.RNNBase.__init__(self, mode, *args, **kwargs)

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

    def _torch_parameter_names(self):
        return self._flat_weights_names

    def _group_suffixes(self):
        return [f"_l{layer}{sfx}" for layer in range(self.num_layers)
                for sfx in ("", "_reverse")[:2 if self.bidirectional else 1]]

    def _reset_layout(self, reset_mask, packed, is_batched, T, B, sorted_indices):
        """The caller's reset_mask ([T, B]; [B, T] with batch_first; [T] unbatched; [T, B] in the
        original batch order for a PackedSequence) -> [T, B] time-major in the layout that
        functional.rnn sees (for packed input: the sorted order)."""
        if not isinstance(reset_mask, torch.Tensor) or reset_mask.dtype != torch.bool:
            got = reset_mask.dtype if isinstance(reset_mask, torch.Tensor) else type(reset_mask).__name__
            raise TypeError(f"fastrnn: reset_mask must be a bool tensor, got {got}")
        if packed:
            want, layout = (T, B), "[T, B] (the padded layout of the packed batch, original order)"
        elif not is_batched:
            want, layout = (T,), "[T] (unbatched input)"
        elif self.batch_first:
            want, layout = (B, T), "[B, T] (batch_first)"
        else:
            want, layout = (T, B), "[T, B]"
        if tuple(reset_mask.shape) != want:
            raise ValueError(f"fastrnn: reset_mask has shape {tuple(reset_mask.shape)}, expected "
                             f"{layout} = {want}")
        if packed:
            return reset_mask if sorted_indices is None else reset_mask[:, sorted_indices.to(reset_mask.device)]
        if not is_batched:
            return reset_mask.unsqueeze(1)
        return reset_mask.t() if self.batch_first else reset_mask

    def _one_step(self, input, hx):
        """A T = 1 call of a plain module (streaming, RL policies) as one fused cell step per layer
        and direction (fastrnn/ops/small_calls.py, small calls); None when it is not such a call or
        the step path turns it down: the caller's general path then checks and runs it. Layouts
        as forward's: input [1, B, I] ([B, 1, I] batch_first) or unbatched [1, I]; hx [L*D, B, H]
        ([L*D, H] unbatched), a pair for LSTM."""
        if (not isinstance(input, torch.Tensor) or input.dim() not in (2, 3) or self.proj_size
                or (self.dropout and self.training and self.num_layers > 1) or self._variant_kwargs()):
            return None
        batched = input.dim() == 3
        T = input.shape[1 if batched and self.batch_first else 0]
        if T != 1:
            return None
        x = (input[:, 0] if self.batch_first else input[0]) if batched else input
        B, H, L, D = x.shape[0], self.hidden_size, self.num_layers, 2 if self.bidirectional else 1
        lstm = self.mode == "LSTM"
        if hx is None:
            h0 = c0 = x.new_zeros(L * D, B, H)
        else:
            if not (isinstance(hx, tuple) and len(hx) == 2 if lstm else isinstance(hx, torch.Tensor)):
                return None
            h0, c0 = hx if lstm else (hx, None)
            want = (L * D, B, H) if batched else (L * D, H)
            if not all(isinstance(s, torch.Tensor) and s.shape == want for s in (h0, c0) if s is not None):
                return None
            if not batched:
                h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if lstm else None)
        names = self._flat_weights_names
        per, cell = len(names) // (L * D), self._cell_name()
        h_n, c_n = [], []
        for layer in range(L):
            outs = []
            for k in range(layer * D, layer * D + D):
                w = [getattr(self, n) for n in names[k * per:(k + 1) * per]]
                b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
                step = small_calls.step(cell, x, h0[k], c0[k] if lstm else None, w[0], w[1], b_ih, b_hh, self.backend)
                if step is None:
                    return None
                outs.append(step[0])
                h_n.append(step[0])
                c_n.append(step[1])
            x = outs[0] if D == 1 else torch.cat(outs, 1)
        out = (x.unsqueeze(1) if self.batch_first else x.unsqueeze(0)) if batched else x
        h_n, c_n = torch.stack(h_n), (torch.stack(c_n) if lstm else None)
        if not batched:
            h_n, c_n = h_n[:, 0], (c_n[:, 0] if lstm else None)
        return out, ((h_n, c_n) if lstm else h_n)

    def forward(self, input, hx=None, *, reset_mask=None):
        """torch's forward, plus ``reset_mask`` (bool; [T, B], [B, T] with batch_first, [T]
        unbatched, [T, B] in the original batch order for a PackedSequence): a row's state is
        reset to its initial state (hx, or zeros) before that step (docs/variants.md)."""
        if reset_mask is None:
            out = self._one_step(input, hx)  # T = 1: the small calls' path
            if out is not None:
                return out
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
        if reset_mask is not None:
            T = len(batch_sizes) if packed else x.shape[0]
            reset_mask = self._reset_layout(reset_mask, packed, is_batched, T, B, sorted_indices)

        out, h_n, c_n = FR.rnn(self._cell_name(), x, h0, c0, self._weight_groups(),
                               num_layers=self.num_layers, bidirectional=self.bidirectional,
                               dropout=self.dropout, training=self.training,
                               batch_sizes=batch_sizes, backend=self.backend,
                               **self._variant_kwargs(), reset_mask=reset_mask)
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


class _BackendArg:
    """torch's constructor plus the keyword-only ``backend=`` and variant options; the variant
    parameters, their initialisation and ``extra_repr`` (shared by the six classes)."""

    layer_norm = _OPTIONS["layer_norm"]
    peephole = _OPTIONS["peephole"]
    recurrent_dropout = _OPTIONS["recurrent_dropout"]
    zoneout = _OPTIONS["zoneout"]
    reset_after = _OPTIONS["reset_after"]
    forget_bias = _OPTIONS["forget_bias"]
    _variant_names = ()  # names of the variant parameters, in registration order

    def __init__(self, *args, backend: str | None = None, layer_norm=False, peephole=False,
                 recurrent_dropout=0.0, zoneout=0.0, reset_after=True, forget_bias=0.0, **kwargs):
        # torch's __init__ draws torch's parameters (through our reset_parameters, which at that
        # point sees the class defaults: no variant parameters, no forget_bias).
        backends.check_name(backend)  # before torch's __init__ draws any parameter
        super().__init__(*args, **kwargs)
        self.backend = backend
        if recurrent_dropout and isinstance(self, nn.RNNCellBase):
            raise TypeError("fastrnn: recurrent_dropout is one mask per sequence, which a cell cannot "
                            "see; use the layer module, or functional.*_cell(..., rec_mask=) with your "
                            "own mask")
        FR.check_options(self._cell_name(), layer_norm=layer_norm, peephole=peephole,
                         recurrent_dropout=recurrent_dropout, zoneout=zoneout, reset_after=reset_after,
                         forget_bias=forget_bias, bias=self.bias)
        self.layer_norm, self.peephole = bool(layer_norm), bool(peephole)
        self.recurrent_dropout, self.zoneout = float(recurrent_dropout), float(zoneout)
        self.reset_after, self.forget_bias = reset_after, float(forget_bias)
        self._register_variant_parameters()
        self._reset_variant_parameters()

    def _register_variant_parameters(self):
        """Per layer and direction (suffix ``_l{k}[_reverse]``; cells: none): layer-norm gains and
        biases (ih [G], hh [G], LSTM c [H]) and the LSTM peephole [3, H], after torch's."""
        H = self.hidden_size
        G = GATES[self._cell_name()] * H
        ref = getattr(self, self._torch_parameter_names()[0])
        names = []
        for sfx in self._group_suffixes():
            shapes = []
            if self.layer_norm:
                for side in ("ih", "hh") + (("c",) if self._cell_name() == "lstm" else ()):
                    n = H if side == "c" else G
                    shapes += [(f"layer_norm_{side}_weight{sfx}", n), (f"layer_norm_{side}_bias{sfx}", n)]
            if self.peephole:
                shapes.append((f"weight_peephole{sfx}", (3, H)))
            for name, shape in shapes:
                self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=ref.dtype, device=ref.device)))
                names.append(name)
        self._variant_names = tuple(names)

    def _reset_variant_parameters(self):
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        with torch.no_grad():
            for name in self._variant_names:
                p = getattr(self, name)
                if name.startswith("weight_peephole"):
                    init.uniform_(p, -stdv, stdv)
                elif name.startswith("layer_norm_") and "_weight" in name:
                    init.ones_(p)
                else:
                    init.zeros_(p)
            if self.forget_bias:
                H = self.hidden_size
                for name in self._torch_parameter_names():
                    if name.startswith("bias_ih"):
                        getattr(self, name)[H:2 * H] += self.forget_bias

    def reset_parameters(self) -> None:
        """torch's initialisation of torch's parameters (the same draws in the same order), then
        the variant parameters (layer norm 1 / 0, peephole U(-1/sqrt(H), 1/sqrt(H))) and
        forget_bias."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for name in self._torch_parameter_names():
            w = getattr(self, name)
            if w is not None:
                init.uniform_(w, -stdv, stdv)
        self._reset_variant_parameters()

    def _variant_kwargs(self):
        """functional's variant keywords (only those that are on: nothing for a plain module),
        parameters read fresh from the attributes (so ``functional_call`` works)."""
        kw = {}
        if self.layer_norm or self.peephole:
            suffixes = self._group_suffixes()
        if self.layer_norm:
            sides = ("ih", "hh") + (("c",) if self._cell_name() == "lstm" else ())
            kw["layer_norm"] = [tuple(getattr(self, f"layer_norm_{side}_{wb}{sfx}")
                                      for side in sides for wb in ("weight", "bias")) for sfx in suffixes]
        if self.peephole:
            kw["peephole"] = [getattr(self, f"weight_peephole{sfx}") for sfx in suffixes]
        if self.recurrent_dropout:
            kw["recurrent_dropout"] = self.recurrent_dropout
        if self.zoneout:
            kw["zoneout"] = self.zoneout
        if not self.reset_after:
            kw["reset_after"] = False
        return kw

    def extra_repr(self) -> str:
        s = super().extra_repr()
        for opt, off in _OPTIONS.items():
            value = getattr(self, opt)
            if value != off:
                s += f", {opt}={value!r}"
        return s + (f", backend={self.backend!r}" if self.backend is not None else "")


class LSTM(_BackendArg, _FusedRNNBase, nn.RNNBase):
    """``torch.nn.LSTM`` with a fused recurrence. Extra keywords: ``backend``, ``layer_norm``,
    ``peephole``, ``recurrent_dropout``, ``zoneout``, ``forget_bias`` (docs/variants.md);
    ``forward(input, hx=None, *, reset_mask=None)``."""

    _torch_class = nn.LSTM
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden


class GRU(_BackendArg, _FusedRNNBase, nn.RNNBase):
    """``torch.nn.GRU`` with a fused recurrence. Extra keywords: ``backend``, ``layer_norm``,
    ``recurrent_dropout``, ``zoneout``, ``reset_after`` (docs/variants.md);
    ``forward(input, hx=None, *, reset_mask=None)``."""

    _torch_class = nn.GRU


class RNN(_BackendArg, _FusedRNNBase, nn.RNNBase):
    """``torch.nn.RNN`` (tanh or relu) with a fused recurrence. Extra keywords: ``backend``,
    ``layer_norm``, ``recurrent_dropout``, ``zoneout`` (docs/variants.md);
    ``forward(input, hx=None, *, reset_mask=None)``."""

    _torch_class = nn.RNN


def _cell_inputs(name, input, states):
    """torch's cell-input handling: 1-D (unbatched) or 2-D input and states."""
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for idx, s in enumerate(states if states is not None else ()):
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


class _CellBase(_BackendArg):
    """What the three cells share: torch's parameter names, no suffix on the variant parameters,
    and the functional keywords for one step."""

    def _torch_parameter_names(self):
        return ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])

    def _group_suffixes(self):
        return [""]

    def _run_step(self, cell, input, hx, cx):
        """One step through ``functional.cell_step`` (which tries the small calls' path first).
        -> (h', c' | None)"""
        plain = not (self.layer_norm or self.peephole or self.zoneout) and self.reset_after is True
        return FR.cell_step(cell, input, hx, cx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                            self.backend, **({} if plain else self._step_kwargs()))

    def _step_kwargs(self):
        kw = self._variant_kwargs()
        if "layer_norm" in kw:
            kw["layer_norm"] = kw["layer_norm"][0]
        if "peephole" in kw:
            kw["peephole"] = kw["peephole"][0]
        if "zoneout" in kw:
            kw["training"] = self.training
        return kw


class LSTMCell(_CellBase, nn.LSTMCell):
    """``torch.nn.LSTMCell`` running the fused cell step. Extra keywords: ``backend``,
    ``layer_norm``, ``peephole``, ``zoneout``, ``forget_bias`` (docs/variants.md)."""

    def _cell_name(self):
        return "lstm"

    def forward(self, input, hx=None):
        if isinstance(hx, torch.Tensor) and input.dim() == 2:  # torch's binding refuses it so
            raise TypeError("lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, not Tensor")
        input, hx, is_batched = _cell_inputs("LSTMCell", input, hx)
        if hx is None:
            hx = (_zeros(input, self.hidden_size), _zeros(input, self.hidden_size))
        h, c = self._run_step("lstm", input, hx[0], hx[1])
        return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))


class _OneStateCell(_CellBase):
    """forward() of the cells with one state (GRUCell, RNNCell); `_step` is the functional op."""

    def forward(self, input, hx=None):
        input, hx, is_batched = _cell_inputs(self._get_name(), input, None if hx is None else (hx,))
        hx = _zeros(input, self.hidden_size) if hx is None else hx[0]
        h = self._step(input, hx)
        return h if is_batched else h.squeeze(0)


class GRUCell(_OneStateCell, nn.GRUCell):
    """``torch.nn.GRUCell`` running the fused cell step. Extra keywords: ``backend``,
    ``layer_norm``, ``zoneout``, ``reset_after`` (docs/variants.md)."""

    def _cell_name(self):
        return "gru"

    def _step(self, input, hx):
        return self._run_step("gru", input, hx, None)[0]


class RNNCell(_OneStateCell, nn.RNNCell):
    """``torch.nn.RNNCell`` (tanh or relu) running the fused cell step. Extra keywords:
    ``backend``, ``layer_norm``, ``zoneout`` (docs/variants.md)."""

    def _cell_name(self):
        # torch accepts any nonlinearity at construction and refuses it at forward: the parameters
        # are those of an Elman cell either way
        return f"rnn_{self.nonlinearity}" if self.nonlinearity in ("tanh", "relu") else "rnn_tanh"

    def _step(self, input, hx):
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return self._run_step(self._cell_name(), input, hx, None)[0]


# torch class -> fastrnn class. Exact types only by default: a user subclass may have its own forward.
SWAPS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN,
         nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell, nn.RNNCell: RNNCell}


def _share(module: nn.Module, cls: type, exclude=()) -> nn.Module:
    """A ``cls`` object with ``module``'s state: the same parameter tensors, own containers (so
    registering a parameter on one later does not change the other)."""
    new = cls.__new__(cls)
    new.__dict__ = {k: copy.copy(v) if isinstance(v, (dict, list, set)) else v
                    for k, v in module.__dict__.items() if k not in exclude}
    return new


_SUBCLASS_SWAPS: dict[type, type] = {}


def _fused_subclass(sub: type, torch_cls: type) -> type:
    """``sub`` (a user subclass of ``torch_cls``) with the fused forward where torch's stood.

    The new class derives from ``sub`` and from a class that is both fastrnn's and ``torch_cls``
    (the cells already are; for the layers, ``LSTM`` + ``nn.LSTM``), so Python's method order puts
    fastrnn's methods right before ``torch_cls``'s: ``sub``'s own ``forward`` runs, and its
    ``super().forward(...)`` reaches the fused one. The object is still an instance of ``sub`` and
    of ``torch_cls`` (so dynamo's refusal to trace nn.LSTM/GRU/RNN instances applies to it)."""
    if sub not in _SUBCLASS_SWAPS:
        fast = SWAPS[torch_cls]
        middle = fast if issubclass(fast, torch_cls) else type(fast.__name__, (fast, torch_cls), {})
        _SUBCLASS_SWAPS[sub] = type(sub.__name__, (sub, middle),
                                    {"__module__": sub.__module__, "__qualname__": sub.__qualname__,
                                     "_fastrnn_subclass_of": sub})
    return _SUBCLASS_SWAPS[sub]


def _torch_base(module: nn.Module) -> type | None:
    """The torch RNN class ``module`` is an instance of through a user subclass, else None."""
    if type(module) in SWAPS:
        return None
    return next((t for t in SWAPS if isinstance(module, t)), None)


def convert(module: nn.Module, backend: str | None = None, *, subclasses=False, report: bool = False):
    """Replace every ``nn.LSTM/GRU/RNN`` and ``nn.LSTMCell/GRUCell/RNNCell`` in ``module``
    (the module itself included) by its fastrnn counterpart sharing the same parameter tensors.
    Children are replaced in place; returns the (possibly new) top-level module.

    Subclasses of those classes (e.g. a library's ``class LSTM(nn.LSTM)`` that overrides
    ``forward``) are left unchanged with a warning naming them, since their code may do anything.
    ``subclasses=True`` (or a tuple of the classes to take) converts them too, for subclasses whose
    ``forward`` wraps torch's: their own methods run and ``super().forward`` reaches the fused
    kernel (an instance of the subclass still; ``to_torch`` turns it back).

    ``report=True`` returns ``(module, report)``: one ``(path, class name, result)`` row per RNN
    module met, ``result`` the fastrnn class name or ``"skipped: <why>"``.
    """
    backends.check_name(backend)
    if not isinstance(subclasses, (bool, tuple, list, set)):
        raise TypeError(f"fastrnn.convert: subclasses must be a bool or a tuple of classes, got {subclasses!r}")
    rows = []
    new = _convert(module, backend, subclasses, rows, "")
    skipped = [f"{path or '<root>'} ({name})" for path, name, result in rows if result.startswith("skipped")]
    if skipped:
        warnings.warn("fastrnn.convert left these subclasses of torch's RNN modules unchanged (their "
                      "own code may differ from torch's): " + ", ".join(skipped) + ". If their forward "
                      "wraps torch's, convert them with convert(..., subclasses=True) or "
                      "subclasses=(TheClass,).", UserWarning, stacklevel=2)
    return (new, rows) if report else new


def _convert(module, backend, subclasses, rows, path):
    for name, child in module.named_children():
        setattr(module, name, _convert(child, backend, subclasses, rows, f"{path}.{name}" if path else name))
    cls_name = type(module).__qualname__
    if isinstance(module, (LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell)):
        if backend is not None:
            module.backend = backend
        rows.append((path, cls_name, f"{cls_name} (already fastrnn)"))
        return module
    if type(module) in SWAPS:
        new = _share(module, SWAPS[type(module)])
        if backend is not None or "backend" not in new.__dict__:
            new.backend = backend
        rows.append((path, cls_name, type(new).__name__))
        return new
    torch_cls = _torch_base(module)
    if torch_cls is None:
        return module
    if subclasses is True or (not isinstance(subclasses, bool) and type(module) in tuple(subclasses)):
        new = _share(module, _fused_subclass(type(module), torch_cls))
        new.backend = backend
        rows.append((path, cls_name, f"{cls_name} on fastrnn.{SWAPS[torch_cls].__name__}"))
        return new
    rows.append((path, cls_name, f"skipped: a subclass of torch.nn.{torch_cls.__name__} with code of "
                                 "its own (pass subclasses=True to convert it)"))
    return module


# fastrnn class -> torch class, for to_torch().
_UNSWAPS = {fast: torch_cls for torch_cls, fast in SWAPS.items()}
_FASTRNN_ATTRS = ("backend", "_variant_names", *_OPTIONS)


def _unswap(module: nn.Module) -> nn.Module:
    cls = getattr(type(module), "_fastrnn_subclass_of", None) or _UNSWAPS.get(type(module))
    if cls is None:
        return module
    on = [opt for opt, off in _OPTIONS.items() if getattr(module, opt) != off]
    if on:
        raise ValueError(f"fastrnn.to_torch: {type(module).__name__} uses {', '.join(on)}, which "
                         f"torch.nn.{cls.__name__} cannot express")
    return _share(module, cls, exclude=_FASTRNN_ATTRS)


def to_torch(module: nn.Module) -> nn.Module:
    """The inverse of ``convert``: every fastrnn ``LSTM/GRU/RNN`` and cell in ``module`` (the
    module itself included) becomes its ``torch.nn`` class sharing the same parameter tensors,
    for ONNX / TorchScript export or code that checks ``isinstance(m, nn.LSTM)``. Modules using a
    variant option (docs/variants.md) raise ValueError: torch has no equivalent."""
    for name, child in module.named_children():
        setattr(module, name, to_torch(child))
    return _unswap(module)
