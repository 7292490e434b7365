"""Functional API: validate inputs, run layers and directions, call the recurrence op.

Shape letters: T time, B batch, I input, H hidden, Hr projected hidden, G gate width (4H LSTM,
3H GRU, H RNN), L layers, D directions.

The variants of docs/variants.md (layer norm, peephole, recurrent dropout, zoneout, GRU
``reset_after=False``, state resets) are keyword arguments here; with all of them off the op is
called exactly as before (no ``ln_ih`` / ``variant``), so the plain path is untouched.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from . import backends, precision
from .contract.checks import check_batch_sizes
from .contract.rnn import GATES, Variant, check_cell, packed_mask
from .ops import small_calls
from .ops.rnn_layer import rnn_cell as _rnn_cell_op
from .ops.rnn_layer import rnn_layer

_CELL_KIND = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


def _check_same(tensors, what, ref):
    for name, t in tensors:
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise RuntimeError(f"fastrnn: {name} has dtype {t.dtype} but {what} has dtype {ref.dtype}; "
                               "all inputs, states and weights must share one dtype")
        if t.device != ref.device:
            raise RuntimeError(f"fastrnn: {name} is on {t.device} but {what} is on {ref.device}; "
                               "all inputs, states and weights must be on one device")


def _check_floating(x):
    if not x.dtype.is_floating_point:
        raise RuntimeError(f"fastrnn: expected a floating-point input (float16, bfloat16, float32 or "
                           f"float64), got {x.dtype}")


def _is_tensor(name, t, optional=False):
    if not (isinstance(t, torch.Tensor) or (optional and t is None)):
        raise TypeError(f"fastrnn: {name} must be a tensor{' or None' if optional else ''}, got {type(t).__name__}")


def _fmt(shape):
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _check_rnn_args(cell, x, h0, c0, weights, num_layers, bidirectional, batch_sizes):
    """Every size and device ``rnn`` relies on, before anything runs (dtypes are checked after the
    precision plan: under autocast the inputs may mix dtypes). Messages and types are torch's
    (``nn.RNNBase.check_forward_args`` and its device check) where torch has one.

    x [T, B, I] (or packed [N, I] with batch_sizes [T]: ``check_batch_sizes``, sum N); per layer
    and direction w_ih [G, I_l] (I_0 = I, later D * Hr), w_hh [G, Hr], b_ih / b_hh [G] or None,
    w_hr [Hr, H] (LSTM; in every group or none; without it Hr = H); G = gates * H from the first
    group's w_hh; h0 [L*D, B, Hr]; c0 [L*D, B, H] for LSTM, None otherwise."""
    check_cell(cell)
    lstm = cell == "lstm"
    _is_tensor("input", x)
    _is_tensor("hx" if lstm else "h0", h0)
    _is_tensor("cx", c0, optional=True)
    D = 2 if bidirectional else 1
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"fastrnn: weights must be a list of weight groups, got {type(weights).__name__}")
    if len(weights) != num_layers * D:  # RuntimeError, as torch._VF.lstm & co. for a missing group
        raise RuntimeError(f"fastrnn: expected {num_layers * D} weight groups (one per layer and direction), "
                           f"got {len(weights)}")
    for k, group in enumerate(weights):
        if not isinstance(group, (list, tuple)) or len(group) != 5:
            got = f"{len(group)} entries" if isinstance(group, (list, tuple)) else f"a {type(group).__name__}"
            raise RuntimeError(f"fastrnn: weight group {k} must be (w_ih, w_hh, b_ih, b_hh, w_hr), got {got}")
        for name, t in zip(("w_ih", "w_hh", "b_ih", "b_hh", "w_hr"), group):
            _is_tensor(f"{name} of weight group {k}", t, optional=name not in ("w_ih", "w_hh"))
    packed = batch_sizes is not None
    if x.dim() != (2 if packed else 3):
        raise RuntimeError(f"input must have {2 if packed else 3} dimensions, got {x.dim()}")
    if packed:
        B = check_batch_sizes(batch_sizes, N=x.shape[0])
        if B == 0:  # no time step at all (torch: the same error as for an empty padded sequence)
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    else:
        B = x.shape[1]
    gates, w_hh0, w_hr0 = GATES[cell], weights[0][1], weights[0][4]
    if w_hh0.dim() != 2 or w_hh0.shape[0] == 0 or w_hh0.shape[0] % gates:
        raise RuntimeError(f"fastrnn: w_hh of weight group 0 has shape {_fmt(w_hh0.shape)}; expected [G, Hr] "
                           f"with G = {gates} * hidden_size ({_CELL_KIND[cell]})")
    H = w_hh0.shape[0] // gates
    Hr = w_hr0.shape[0] if lstm and w_hr0 is not None and w_hr0.dim() == 2 else H
    G = gates * H
    if weights[0][0].dim() == 2 and x.shape[-1] != weights[0][0].shape[1]:
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {weights[0][0].shape[1]}, "
                           f"got {x.shape[-1]}")
    for k, (w_ih, w_hh, b_ih, b_hh, w_hr) in enumerate(weights):
        I_l = x.shape[-1] if k < D else D * Hr
        where = f"weight group {k} (layer {k // D}{', reverse' if k % D else ''})"
        if w_hr is not None and not lstm:
            raise RuntimeError(f"fastrnn: {where} has a w_hr, but only LSTM has a projection (proj_size)")
        if (w_hr is None) != (w_hr0 is None):
            raise RuntimeError(f"fastrnn: {where}: w_hr (proj_size) must be in every weight group or in none")
        want = [("w_ih", w_ih, (G, I_l), "[G, I]" if k < D else "[G, D * Hr]"), ("w_hh", w_hh, (G, Hr), "[G, Hr]"),
                ("b_ih", b_ih, (G,), "[G]"), ("b_hh", b_hh, (G,), "[G]"), ("w_hr", w_hr, (Hr, H), "[Hr, H]")]
        for name, t, shape, letters in want:
            if t is not None and t.shape != shape:
                raise RuntimeError(f"fastrnn: {name} of {where} has shape {_fmt(t.shape)}, expected {letters} = "
                                   f"{_fmt(shape)}")
    want_h = (num_layers * D, B, Hr)
    if h0.shape != want_h:
        msg = "Expected hidden[0] size {}, got {}" if lstm else "Expected hidden size {}, got {}"
        raise RuntimeError(msg.format(want_h, list(h0.shape)))
    if lstm:
        if c0 is None:
            raise RuntimeError("fastrnn: LSTM needs both states (h0, c0), got c0=None")
        if c0.shape != (num_layers * D, B, H):
            raise RuntimeError("Expected hidden[1] size {}, got {}".format((num_layers * D, B, H), list(c0.shape)))
    elif c0 is not None:
        raise RuntimeError(f"fastrnn: {_CELL_KIND[cell]} has one state; c0 must be None")
    device = x.device
    cpu = device.type == "cpu"  # is_cpu: half the cost of building a torch.device to compare
    for what, tensors in (("parameter", [t for group in weights for t in group]), ("hidden", (h0, c0))):
        for t in tensors:
            if t is not None and (not t.is_cpu if cpu else t.device != device):
                raise RuntimeError(f"Input and {what} tensors are not at the same device, found input tensor at "
                                   f"{device} and {what} tensor at {t.device}")


def _check_cell_args(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    """Sizes of a cell step: input [B, I], w_ih [G, I], w_hh [G, H], b_ih / b_hh [G] or None,
    hx [B, H], cx [B, H] (LSTM); torch's messages (``_VF.lstm_cell`` and friends) where it has one."""
    check_cell(cell)
    for name, t, optional in (("input", input, False), ("hx", hx, False), ("cx", cx, True),
                              ("weight_ih", w_ih, False), ("weight_hh", w_hh, False),
                              ("bias_ih", b_ih, True), ("bias_hh", b_hh, True)):
        _is_tensor(name, t, optional)
        if name in ("input", "weight_ih", "weight_hh") and t.dim() != 2:
            raise RuntimeError(f"fastrnn: {name} must be 2-D, got shape {_fmt(t.shape)}")
    if input.shape[1] != w_ih.shape[1]:
        raise RuntimeError(f"input has inconsistent input_size: got {input.shape[1]} expected {w_ih.shape[1]}")
    if cell == "lstm" and cx is None:
        raise RuntimeError("fastrnn: an LSTM cell needs both states (hx, cx), got cx=None")
    for k, state in enumerate((hx, cx)):
        if state is None:
            continue
        if state.dim() != 2 or state.shape[1] != w_hh.shape[1]:
            got = state.shape[-1] if state.dim() else 0
            raise RuntimeError(f"hidden{k} has inconsistent hidden_size: got {got}, expected {w_hh.shape[1]}")
        if state.shape[0] != input.shape[0]:
            raise RuntimeError(f"Input batch size {input.shape[0]} doesn't match hidden{k} batch size {state.shape[0]}")
    gates, H = GATES[cell], w_hh.shape[1]
    for name, w in (("weight_ih", w_ih), ("weight_hh", w_hh)):
        if w.shape[0] != gates * H:
            raise RuntimeError(f"{name} first dim must be {gates} * hidden_size = {gates * H}, but got {w.shape[0]}")
    for name, b in (("bias_ih", b_ih), ("bias_hh", b_hh)):
        if b is not None and b.shape != (gates * H,):
            raise RuntimeError(f"fastrnn: {name} has shape {_fmt(b.shape)}, expected [{gates} * hidden_size] = "
                               f"[{gates * H}]")
    for name, t in (("hx", hx), ("cx", cx), ("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih),
                    ("bias_hh", b_hh)):
        if t is not None and t.device != input.device:
            raise RuntimeError(f"fastrnn: {name} is on {t.device} but input is on {input.device}; "
                               "all inputs, states and weights must be on one device")


_MEANING = {"recurrent_dropout": "the probability of dropping a unit of h in the recurrent product",
            "zoneout": "the probability of a unit keeping its previous value"}


def _check_probability(name, p):
    # torch's own rule for nn.LSTM(dropout=): a real number in [0, 1], not a bool.
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
        raise ValueError(f"fastrnn: {name} should be a number in range [0, 1] ({_MEANING[name]}), got {p!r}")


def check_options(cell, *, layer_norm=False, peephole=False, recurrent_dropout=0.0, zoneout=0.0,
                  reset_after=True, forget_bias=0.0, bias=True):
    """Validate the variant options for ``cell`` (shared by the modules' constructors and the
    functional API). An option that does not exist for the cell raises TypeError, a value out of
    range or an impossible combination ValueError."""
    kind = _CELL_KIND.get(cell, cell)  # an unknown cell fails where it runs, as torch's RNNCell does
    if peephole and cell != "lstm":
        raise TypeError(f"fastrnn: peephole=True applies to LSTM only (got it for {kind})")
    if forget_bias and cell != "lstm":
        raise TypeError(f"fastrnn: forget_bias applies to LSTM only (got it for {kind})")
    if reset_after is not True and cell != "gru":
        raise TypeError(f"fastrnn: reset_after applies to GRU only (got it for {kind})")
    if not isinstance(reset_after, bool):
        raise TypeError(f"fastrnn: reset_after must be a bool, got {reset_after!r}")
    if not reset_after and layer_norm:
        raise ValueError("fastrnn: layer_norm=True with reset_after=False is not supported: the layer "
                         "norm over all G hidden-side entries would need n's product before r exists")
    _check_probability("recurrent_dropout", recurrent_dropout)
    _check_probability("zoneout", zoneout)
    if isinstance(forget_bias, bool) or not isinstance(forget_bias, numbers.Real):
        raise TypeError(f"fastrnn: forget_bias must be a number, got {forget_bias!r}")
    if forget_bias and not bias:
        raise ValueError("fastrnn: forget_bias needs bias=True (it is added to bias_ih's forget gate)")


def _check_extras(cell, x, H, G, n_groups, layer_norm, peephole):
    """Shapes, dtypes and devices of the per-group layer-norm and peephole parameters."""
    n_ln = 6 if cell == "lstm" else 4
    for what, groups, per in (("layer_norm", layer_norm, n_ln), ("peephole", peephole, None)):
        if groups is None:
            continue
        if len(groups) != n_groups:
            raise ValueError(f"fastrnn: expected {n_groups} {what} groups, got {len(groups)}")
        for k, group in enumerate(groups):
            if per is None:
                shapes = {"peephole": (group, (3, H))}
            else:
                if len(group) != per:
                    raise ValueError(f"fastrnn: layer_norm group {k} must hold {per} tensors "
                                     "(ih weight, ih bias, hh weight, hh bias"
                                     f"{', c weight, c bias' if cell == 'lstm' else ''}), got {len(group)}")
                names = ["ih_weight", "ih_bias", "hh_weight", "hh_bias", "c_weight", "c_bias"][:per]
                shapes = {f"layer_norm_{n}": (t, (H,) if n.startswith("c_") else (G,)) for n, t in zip(names, group)}
            for name, (t, shape) in shapes.items():
                if tuple(t.shape) != shape:
                    raise ValueError(f"fastrnn: {name} of group {k} has shape {tuple(t.shape)}, expected {shape}")
                _check_same([(f"{name} of group {k}", t)], "input", x)


def _check_reset_mask(reset_mask, T, B, x):
    """reset_mask [T, B] bool (time-major; the functional layer's layout)."""
    if not isinstance(reset_mask, torch.Tensor) or reset_mask.dtype != torch.bool:
        got = reset_mask.dtype if isinstance(reset_mask, torch.Tensor) else type(reset_mask).__name__
        raise TypeError(f"fastrnn: reset_mask must be a bool tensor, got {got}")
    if tuple(reset_mask.shape) != (T, B):
        raise ValueError(f"fastrnn: reset_mask has shape {tuple(reset_mask.shape)}, expected "
                         f"[T, B] = {(T, B)} (time-major, in the padded layout of the batch)")
    return reset_mask.to(x.device).contiguous()


def _draw_masks(cell, T, B, H, Hr, like, training, recurrent_dropout, zoneout):
    """This direction's random tensors, in the documented draw order: rec_mask [B, Hr], then
    zoneout_h [T, B, Hr], then (LSTM) zoneout_c [T, B, H]. None where the option is off."""
    kw = dict(dtype=like.dtype, device=like.device)
    rec_mask = zoneout_h = zoneout_c = None
    if training and recurrent_dropout > 0:
        keep = 1.0 - recurrent_dropout
        rec_mask = torch.empty(B, Hr, **kw).bernoulli_(keep)
        if keep > 0:  # p = 1: all zeros (bernoulli(0)), not 0/0
            rec_mask.div_(keep)
    if zoneout > 0:
        # Training: each unit keeps its previous value with probability p (0/1 draws);
        # eval: the expectation, a constant p.
        shapes = [(T, B, Hr)] + ([(T, B, H)] if cell == "lstm" else [])
        draws = [torch.empty(s, **kw).bernoulli_(zoneout) if training else torch.full(s, float(zoneout), **kw)
                 for s in shapes]
        zoneout_h = draws[0]
        zoneout_c = draws[1] if cell == "lstm" else None
    return rec_mask, zoneout_h, zoneout_c


def _direction_inputs(cell, ln, peephole, masks, reset, reset_after):
    """``(ln_ih, variant)`` for one layer and direction; ``variant`` is None when nothing is on,
    so the op runs its plain path."""
    ln_ih = (ln[0], ln[1]) if ln is not None else None
    rec_mask, zoneout_h, zoneout_c = masks
    variant = Variant(
        ln_hh_weight=ln[2] if ln is not None else None, ln_hh_bias=ln[3] if ln is not None else None,
        ln_c_weight=ln[4] if ln is not None and cell == "lstm" else None,
        ln_c_bias=ln[5] if ln is not None and cell == "lstm" else None,
        peephole=peephole, rec_mask=rec_mask, zoneout_h=zoneout_h, zoneout_c=zoneout_c,
        reset=reset, reset_after=reset_after)
    plain = all(v is None for v in variant[:-1]) and variant.reset_after
    return ln_ih, (None if plain else variant)


def _variant_kwargs(ln_ih, variant):
    # Only pass what is on: the plain call stays exactly the op's plain signature.
    kw = {}
    if ln_ih is not None:
        kw["ln_ih"] = ln_ih
    if variant is not None:
        kw["variant"] = variant
    return kw


def _precision_plan(op, x, tensors, backend, packed=False):
    """``(run dtype, result dtype)`` when a call must run in another dtype than it was given
    (fastrnn.precision: torch's autocast policy, or a low-precision input that the backend computes
    in float32), else None. Outside autocast the inputs must share one dtype (torch's rule), so that
    is checked before anything is cast."""
    want = precision.autocast_dtype(op, x.device.type, packed)
    if want is None and x.dtype not in precision.LOW:
        return None
    if want is None:
        _check_same([(f"tensor {k}", t) for k, t in enumerate(tensors)], "input", x)
    target = want if want is not None and x.dtype != torch.float64 else x.dtype
    if not target.is_floating_point:
        return None
    _, run = backends.plan(backend, x.device, "rnn", target)
    if want is None and run == x.dtype:
        return None  # the backend computes in the inputs' dtype (triton: float16 / bfloat16)
    return run, target


def _flat(*trees):
    for t in trees:
        if isinstance(t, (tuple, list)):
            yield from _flat(*t)
        elif isinstance(t, torch.Tensor):
            yield t


def rnn(cell, x, h0, c0, weights, *, num_layers, bidirectional, dropout=0.0, training=False,
        batch_sizes=None, backend=None, layer_norm=None, peephole=None, recurrent_dropout=0.0,
        zoneout=0.0, reset_after=True, reset_mask=None):
    """Multi-layer, optionally bidirectional recurrence in time-major layout.

    x        [T, B, I], or PackedSequence data [N, I] when ``batch_sizes`` [T] is given
    h0       [L*D, B, Hr];  c0 [L*D, B, H] (LSTM) or None
    weights  one tuple ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` per layer and direction, in torch's
             order (layer-major, forward then reverse); biases / w_hr may be None
    returns  ``(out [T, B, D*Hr] or [N, D*Hr], h_n [L*D, B, Hr], c_n [L*D, B, H] | None)``

    Dropout with probability ``dropout`` is applied to the output of every layer but the last,
    in training only (as torch).

    Variants (docs/variants.md), all off by default:

    layer_norm         None, or one tuple per layer and direction (the order of ``weights``):
                       ``(ih_weight [G], ih_bias [G], hh_weight [G], hh_bias [G])`` and, for
                       LSTM, ``+ (c_weight [H], c_bias [H])``
    peephole           None, or one [3, H] tensor (rows i, f, o) per layer and direction (LSTM)
    recurrent_dropout  p: ``h_{t-1}`` in the recurrent product times a mask of 0 or 1/(1-p),
                       one mask [B, Hr] per layer and direction per call; training only
    zoneout            p: training: each unit of h (and LSTM c) keeps its previous value with
                       probability p (fresh 0/1 draws [T, B, *] per layer and direction); eval:
                       the expectation ``h_t = p h_prev + (1-p) h_new``
    reset_after        GRU: False = ``n = tanh(x_n + (r * h) W_hn^T + b_hn)``
    reset_mask         [T, B] bool (with ``batch_sizes``: the padded layout of the packed batch,
                       i.e. its sorted order): a row's state is reset to its initial state before
                       step t. The reverse direction gets ``reset[t + 1]`` at step t (False at
                       T-1), so both directions see the same episodes.

    RNG draw order (the benchmark reproduces it): for each layer, for each direction (forward,
    then reverse): ``rec_mask = empty(B, Hr).bernoulli_(1-p).div_(1-p)`` (training and p > 0),
    then ``zoneout_h = empty(T, B, Hr).bernoulli_(p)``, then (LSTM) ``zoneout_c =
    empty(T, B, H).bernoulli_(p)`` (training and p > 0); then the between-layer dropout of that
    layer (as torch). B and T are the padded shape (packed batches included: the backends ignore
    masks on inactive rows). Eval mode draws nothing.
    """
    _check_rnn_args(cell, x, h0, c0, weights, num_layers, bidirectional, batch_sizes)
    plan = _precision_plan(cell, x, list(_flat(h0, c0, weights, layer_norm, peephole)), backend,
                           packed=batch_sizes is not None)
    if plan is not None:
        run, result = plan
        with precision.no_autocast(x.device.type):
            out, h_n, c_n = rnn(
                cell, *precision.cast((x, h0, c0, weights), run), num_layers=num_layers,
                bidirectional=bidirectional, dropout=dropout, training=training,
                batch_sizes=batch_sizes, backend=backend, layer_norm=precision.cast(layer_norm, run),
                peephole=precision.cast(peephole, run), recurrent_dropout=recurrent_dropout,
                zoneout=zoneout, reset_after=reset_after, reset_mask=reset_mask)
        return precision.cast((out, h_n, c_n), result)
    D = 2 if bidirectional else 1
    _check_same([("hx" if c0 is not None else "h0", h0), ("cx", c0)], "input", x)
    _check_same([(f"weight group {k}", w) for k, group in enumerate(weights) for w in group], "input", x)
    _check_floating(x)
    check_options(cell, layer_norm=layer_norm is not None, peephole=peephole is not None,
                  recurrent_dropout=recurrent_dropout, zoneout=zoneout, reset_after=reset_after)

    mask = None
    if batch_sizes is not None:
        batch_sizes = batch_sizes.cpu()
        B = int(batch_sizes[0])
        mask = packed_mask(batch_sizes, B, x.device)
        padded = x.new_zeros(len(batch_sizes), B, x.shape[-1])
        x = padded.masked_scatter(mask.unsqueeze(-1), x)
    if x.shape[0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

    T, B = x.shape[0], x.shape[1]
    Hr, H = h0.shape[-1], weights[0][1].shape[0] // GATES[cell]
    _check_extras(cell, x, H, GATES[cell] * H, num_layers * D, layer_norm, peephole)
    resets = None
    if reset_mask is not None:
        reset = _check_reset_mask(reset_mask, T, B, x)
        # The reverse direction visits t = T-1 .. 0: an episode boundary before step t (forward
        # time) is crossed right before it visits step t-1.
        resets = (reset, torch.cat([reset[1:], reset.new_zeros(1, B)]))

    # Nothing on: skip building per-direction variants altogether (the plain path as it was).
    plain = (layer_norm is None and peephole is None and not (training and recurrent_dropout > 0)
             and zoneout == 0 and reset_after and resets is None)
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            ln_ih = variant = None
            if not plain:
                masks = _draw_masks(cell, T, B, H, Hr, x, training, recurrent_dropout, zoneout)
                ln_ih, variant = _direction_inputs(
                    cell, layer_norm[k] if layer_norm is not None else None,
                    peephole[k] if peephole is not None else None, masks,
                    resets[d] if resets is not None else None, reset_after)
            h_seq, h_T, c_T = rnn_layer(cell, x, w_ih, w_hh, b_ih, b_hh, h0[k],
                                        c0[k] if c0 is not None else None, w_hr,
                                        batch_sizes, reverse=d == 1, backend=backend,
                                        **_variant_kwargs(ln_ih, variant))
            outs.append(h_seq)
            h_n.append(h_T)
            c_n.append(c_T)
        x = outs[0] if D == 1 else torch.cat(outs, -1)
        if dropout > 0 and training and layer < num_layers - 1:
            if mask is None:
                x = F.dropout(x, dropout, training=True)
            else:
                # torch draws the mask on the packed data [N, D*Hr]: the same draws, same numbers
                x = x.new_zeros(x.shape).masked_scatter(
                    mask.unsqueeze(-1), F.dropout(x[mask], dropout, training=True))

    out = x if mask is None else x[mask]
    return out, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)


def cell_step(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend, layer_norm=None, peephole=None,
              zoneout=0.0, training=False, rec_mask=None, reset_after=True):
    """One step of a cell (``"lstm"``, ``"gru"``, ``"rnn_tanh"``, ``"rnn_relu"``): what
    ``lstm_cell`` / ``gru_cell`` / ``rnn_cell`` and the cell modules run.
    input [B, I]; hx [B, H]; cx [B, H] (LSTM) or None -> ``(h' [B, H], c' [B, H] | None)``.

    layer_norm: None or the tuple of ``rnn``'s layer_norm groups; peephole [3, H] or None;
    rec_mask [B, H] or None (the caller's recurrent-dropout mask: a cell cannot know where a
    sequence starts, so it never draws one); zoneout p (training: one 0/1 draw [1, B, H] for h,
    then one for c; eval: p)."""
    if layer_norm is None and peephole is None and not zoneout and rec_mask is None and reset_after is True:
        out = small_calls.step(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend)  # small calls' path
        if out is not None:
            return out
    _check_cell_args(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    plan = _precision_plan(f"{cell}_cell", input, list(_flat(hx, cx, w_ih, w_hh, b_ih, b_hh, layer_norm,
                                                             peephole, rec_mask)), backend)
    if plan is not None:
        run, result = plan
        with precision.no_autocast(input.device.type):
            h, c = cell_step(cell, *precision.cast((input, hx, cx, w_ih, w_hh, b_ih, b_hh), run), backend,
                         precision.cast(layer_norm, run), precision.cast(peephole, run), zoneout,
                         training, precision.cast(rec_mask, run), reset_after)
        return precision.cast((h, c), result)
    _check_same([("hx", hx), ("cx", cx)], "input", input)
    _check_same([("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh)], "input", input)
    _check_floating(input)
    check_options(cell, layer_norm=layer_norm is not None, peephole=peephole is not None,
                  zoneout=zoneout, reset_after=reset_after)
    B, H = input.shape[0], w_hh.shape[1]
    _check_extras(cell, input, H, w_hh.shape[0], 1, None if layer_norm is None else [layer_norm],
                  None if peephole is None else [peephole])
    if rec_mask is not None:
        if tuple(rec_mask.shape) != (B, H):
            raise ValueError(f"fastrnn: rec_mask has shape {tuple(rec_mask.shape)}, expected [B, H] = {(B, H)}")
        _check_same([("rec_mask", rec_mask)], "input", input)
        rec_mask = rec_mask.contiguous()
    _, zoneout_h, zoneout_c = _draw_masks(cell, 1, B, H, H, input, training, 0.0, zoneout)
    ln_ih, variant = _direction_inputs(cell, layer_norm, peephole, (rec_mask, zoneout_h, zoneout_c),
                                       None, reset_after)
    return _rnn_cell_op(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend=backend,
                        **_variant_kwargs(ln_ih, variant))


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, backend=None, *, layer_norm=None,
              peephole=None, zoneout=0.0, training=False, rec_mask=None):
    """LSTM cell step: input [B, I], hx = (h [B, H], c [B, H]) -> (h' [B, H], c' [B, H]).

    layer_norm: None or ``(ih_weight [4H], ih_bias [4H], hh_weight [4H], hh_bias [4H],
    c_weight [H], c_bias [H])``; peephole: [3, H] or None; zoneout: p (``training`` decides draws
    vs expectation); rec_mask: [B, H] recurrent-dropout multiplier of h, or None."""
    return cell_step("lstm", input, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh, backend, layer_norm, peephole,
                 zoneout, training, rec_mask)


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, backend=None, *, layer_norm=None,
             zoneout=0.0, training=False, rec_mask=None, reset_after=True):
    """GRU cell step: input [B, I], hx [B, H] -> h' [B, H]. Variant keywords as ``lstm_cell``
    (layer_norm without the c entries) plus ``reset_after``."""
    return cell_step("gru", input, hx, None, w_ih, w_hh, b_ih, b_hh, backend, layer_norm, None,
                 zoneout, training, rec_mask, reset_after)[0]


def rnn_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh", backend=None, *,
             layer_norm=None, zoneout=0.0, training=False, rec_mask=None):
    """Elman cell step: input [B, I], hx [B, H] -> h' [B, H]. Variant keywords as ``gru_cell``."""
    if nonlinearity not in ("tanh", "relu"):
        raise RuntimeError(f"Unknown nonlinearity: {nonlinearity}")  # nn.RNNCell.forward's error
    return cell_step(f"rnn_{nonlinearity}", input, hx, None, w_ih, w_hh, b_ih, b_hh, backend, layer_norm,
                 None, zoneout, training, rec_mask)[0]
