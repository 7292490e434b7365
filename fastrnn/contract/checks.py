"""The validation boundary of every registered op and backend contract (shared/design.md, "Two
boundaries"): the full argument set of each op is checked before anything runs, so that no input
reaches a kernel that could make it read or write out of bounds.

Who calls what:
    op kernels (fastrnn/ops/rnn_layer.py, fastrnn/ops/attention.py)
        check_layer_args(*rnn_layer's arguments)          rnn_layer, rnn_layer_fwd
        check_layer_bwd_args(*rnn_layer_bwd's arguments)   rnn_layer_bwd (grads, h_seq, saved, needs)
        check_sdpa_args(*sdpa's arguments)                 sdpa, sdpa_fwd
        check_sdpa_bwd_args(*sdpa_bwd's arguments)         sdpa_bwd
    backend launchers (fastrnn/backends/{cpp,numba,triton}_{rnn,sdpa}.py), first line of each
    contract function: check_rnn_forward / check_rnn_backward / check_sdpa_forward / check_sdpa_backward
The attention decoder's checks live with its contract data (``contract/decoder.py``:
``check_decoder_forward`` / ``check_decoder_backward``, called by fastrnn/ops/decoder.py and every
``*_decoder`` backend). The C++ entry points check again what they rely on (csrc/rnn.cpp, csrc/sdpa.cpp,
csrc/decoder.cpp), so a direct call
of the extension is safe too. The reference backend (plain torch ops) cannot index out of bounds
and has no launcher check.

Exceptions follow torch: RuntimeError for a wrong shape, dtype or device (what torch's RNN and
SDPA kernels raise), ValueError for an unknown cell, an impossible variant combination
(``contract.rnn.check_variant``) and batch_sizes off the CPU (torch's PackedSequence), TypeError for
something that is not a tensor. Messages name the argument and give the expected and the actual
shape.

Cost: the checks run on every call, so the passing path only reads attributes (shape, dtype,
device) and compares them inline; messages are built by the cold ``_raise_*`` helpers. The only
tensor data read are ``batch_sizes`` [T] and ``rows`` [N] (a Python list when short, torch
reductions when long). Measured on this machine (2-core AMD EPYC, Python 3.11, torch 2.13, lightly
loaded; best of 5 x 20000 calls): ``check_layer_args`` 3.2 us for a plain LSTM (9.7 with every
variant tensor), ``check_rnn_forward`` 1.9, ``check_layer_bwd_args`` 7.6, ``check_rnn_backward``
4.8, ``check_sdpa_args`` 1.7 (4.1 with a mask of 32 rows), ``check_sdpa_forward`` 4.4 with that
mask. End to end (the same op call with the checks switched off, interleaved, medians), a
T=10, B=1, H=32 LSTM layer on the cpp backend: ``rnn_layer`` 41 -> 49 us, ``rnn_layer_bwd``
84 -> 108 us; ``sdpa`` N=8, L=S=16 with a mask 30 -> 40 us. At sizes where a layer takes
milliseconds this is noise; at these toy sizes it is 20-30%.

Shape letters as everywhere: T time, B batch, I input, G gates * H, H hidden, Hr projected hidden;
attention N, L, E (queries), Nk, S, Ev (keys/values), Nm (mask rows).
"""
from __future__ import annotations

import torch

from .rnn import GATES, Saved, Variant, check_cell, check_variant, saved_layout

_LOW = (torch.float16, torch.bfloat16)

# batch_sizes / rows up to this length are read as a Python list (about 1 us); longer ones are
# checked with torch reductions, whose fixed cost (a few us each) is then the smaller one
_LIST_LIMIT = 256
_N_VARIANT = len(Variant._fields)
# rnn_layer.GRAD_ARGS: x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, ln_ih_{weight,bias}, ln_hh_{weight,bias},
# ln_c_{weight,bias}, peephole
_N_GRAD_ARGS = 15


# ---- cold helpers: build the message and raise -------------------------------------------------

def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _raise_shape(name, t, want, letters):
    if t.dim() != len(want):
        raise RuntimeError(f"fastrnn: {name} must be {len(want)}-D {letters}, got shape {_fmt(t.shape)}")
    raise RuntimeError(f"fastrnn: {name} has shape {_fmt(t.shape)}, expected {letters} = {_fmt(want)}")


def _raise_mixed(named, ref_name, ref, dtype=None):
    """Raise for the first tensor in ``named`` [(name, tensor | None)] whose dtype (default: ref's)
    or device differs from ref's."""
    dtype = ref.dtype if dtype is None else dtype
    for name, t in named:
        if t is None:
            continue
        if t.dtype != dtype:
            raise RuntimeError(f"fastrnn: {name} has dtype {t.dtype}, expected {dtype} (the dtype of {ref_name})")
        if t.device != ref.device:
            raise RuntimeError(f"fastrnn: {name} is on {t.device}, expected {ref.device} (the device of {ref_name}): "
                               "all tensors must be on one device")


def _raise_not_tensor(named):
    """Raise TypeError for the first entry of ``named`` [(name, value, optional)] that is not a
    tensor (the passing path finds them as an AttributeError)."""
    for name, t, optional in named:
        if not (isinstance(t, torch.Tensor) or (optional and t is None)):
            raise TypeError(f"fastrnn: {name} must be a tensor{' or None' if optional else ''}, "
                            f"got {type(t).__name__}")


def _uniform(tensors, dtype, device) -> bool:
    """Every tensor (None skipped) has this dtype and device."""
    if device.type == "cpu":  # ``is_cpu`` costs half of building a torch.device to compare
        for t in tensors:
            if t is not None and (t.dtype is not dtype or not t.is_cpu):
                return False
        return True
    for t in tensors:
        if t is not None and (t.dtype is not dtype or t.device != device):
            return False
    return True


def _is_plain(var) -> bool:
    """``var``: the Variant fields (a Variant, or the op's tuple of them); None = plain too."""
    if var is None:
        return True
    for v in var[:-1]:
        if v is not None:
            return False
    return var[-1] is True


def _scalar_name(dtype):
    return {torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
            torch.float32: "Float", torch.float64: "Double", torch.bool: "Bool"}.get(dtype, str(dtype))


def _short(t):
    return str(t.tolist() if t.numel() <= 12 else t[:12].tolist() + ["..."])


# ---- batch_sizes -------------------------------------------------------------------------------

def check_batch_sizes(batch_sizes, T=None, B=None, N=None, name="batch_sizes") -> int:
    """A PackedSequence's batch sizes: 1-D int64 on the CPU, ``T`` entries (when given), every
    entry positive and at most the one before (rows only finish), the first ``B`` (when given)
    and the sum ``N`` (the packed data's rows, when given). Returns the first entry (0 if empty).

    Types as torch: ValueError off the CPU (PackedSequence's own check), RuntimeError otherwise
    (torch's RNN kernels raise "expected scalar type Long" for another dtype)."""
    if not isinstance(batch_sizes, torch.Tensor):
        raise TypeError(f"fastrnn: {name} must be a tensor, got {type(batch_sizes).__name__}")
    if not batch_sizes.is_cpu:
        raise ValueError(f"fastrnn: {name} should always be on CPU (as PackedSequence requires), "
                         f"got {batch_sizes.device}")
    if batch_sizes.dtype != torch.int64:
        raise RuntimeError(f"fastrnn: {name} must be an int64 tensor (expected scalar type Long but found "
                           f"{_scalar_name(batch_sizes.dtype)})")
    if batch_sizes.dim() != 1:
        raise RuntimeError(f"fastrnn: {name} must be 1-D [T], got shape {_fmt(batch_sizes.shape)}")
    n = batch_sizes.shape[0]
    if T is not None and n != T:
        raise RuntimeError(f"fastrnn: {name} has {n} entries, expected one per time step (T = {T})")
    if n == 0:
        if B:
            raise RuntimeError(f"fastrnn: {name} is empty but the batch has {B} rows")
        return 0
    if n <= _LIST_LIMIT:
        sizes = batch_sizes.tolist()
        first, smallest, total = sizes[0], sizes[-1], sum(sizes)
        growing = sizes != sorted(sizes, reverse=True)
        smallest = min(sizes) if growing else smallest
    else:
        first, smallest, total = int(batch_sizes[0]), int(batch_sizes.min()), int(batch_sizes.sum())
        growing = bool((batch_sizes[1:] > batch_sizes[:-1]).any())
    if smallest < 1:
        raise RuntimeError(f"fastrnn: every entry of {name} must be positive, got {smallest} "
                           f"({name}: {_short(batch_sizes)})")
    if growing:
        raise RuntimeError(f"fastrnn: {name} must be non-increasing (a PackedSequence's rows only finish), "
                           f"got {_short(batch_sizes)}")
    if B is not None and first != B:
        raise RuntimeError(f"fastrnn: {name}[0] = {first} must equal the batch size B = {B}")
    if N is not None and total != N:
        raise RuntimeError(f"fastrnn: {name} sum to {total}, but the packed data has {N} rows")
    return first


# ---- the recurrence ------------------------------------------------------------------------------

def _variant(cell, T, B, G, H, Hr, ref_name, ref, var):
    """The variant tensors' combinations (``check_variant``: ValueError, as the reference), shapes,
    dtypes and devices."""
    v = check_variant(cell, var if isinstance(var, Variant) else Variant(*var))
    want = {"ln_hh_weight": ((G,), "[G]"), "ln_hh_bias": ((G,), "[G]"), "ln_c_weight": ((H,), "[H]"),
            "ln_c_bias": ((H,), "[H]"), "peephole": ((3, H), "[3, H]"), "rec_mask": ((B, Hr), "[B, Hr]"),
            "zoneout_h": ((T, B, Hr), "[T, B, Hr]"), "zoneout_c": ((T, B, H), "[T, B, H]"),
            "reset": ((T, B), "[T, B]")}
    named = [(name, getattr(v, name)) for name in want]
    _raise_not_tensor([(name, t, True) for name, t in named])
    for name, t in named:
        if t is not None and t.shape != want[name][0]:
            _raise_shape(name, t, *want[name])
    _raise_mixed(named[:-1], ref_name, ref)
    _raise_mixed(named[-1:], ref_name, ref, torch.bool)
    if not isinstance(v.reset_after, bool):
        raise TypeError(f"fastrnn: reset_after must be a bool, got {v.reset_after!r}")
    return v


def _recurrence(cell, T, B, G, ref_name, ref, w_hh, b_hh, h0, c0, w_hr, batch_sizes, var):
    """What the op and the backend contract share: w_hh [G, Hr], b_hh [G], h0 [B, Hr], c0 [B, H]
    (LSTM only), w_hr [Hr, H] (LSTM only; without it Hr = H), batch_sizes against T and B, the
    variant; dtypes and devices as ``ref``'s. Returns (H, Hr, the variant normalised:
    ``check_variant``, None for the plain cell)."""
    gates = GATES[cell]
    lstm = gates == 4
    shape = w_hh.shape
    if len(shape) != 2:
        _raise_shape("w_hh", w_hh, (G, 0), "[G, Hr]")
    Hr, H = shape[1], G // gates
    if shape[0] != G:
        _raise_shape("w_hh", w_hh, (G, Hr), "[G, Hr]")
    if G == 0 or G % gates or Hr == 0:
        raise RuntimeError(f"fastrnn: w_hh has shape {_fmt(shape)}: the gate width G must be a positive multiple of "
                           f"{gates} ({cell}: G = {gates} * H) and Hr positive")
    if b_hh is not None and b_hh.shape != (G,):
        _raise_shape("b_hh", b_hh, (G,), "[G]")
    if w_hr is not None:
        if not lstm:
            raise RuntimeError(f"fastrnn: w_hr (proj_size) is an LSTM option, not {cell}'s")
        if w_hr.shape != (Hr, H):
            _raise_shape("w_hr", w_hr, (Hr, H), "[Hr, H]")
    elif Hr != H:
        raise RuntimeError(f"fastrnn: w_hh has shape {_fmt(shape)}, expected [G, H] = {_fmt((G, H))} "
                           f"(without w_hr the state has H = G / {gates} = {H} features)")
    if h0.shape != (B, Hr):
        _raise_shape("h0", h0, (B, Hr), "[B, Hr]")
    if lstm:
        if c0 is None:
            raise RuntimeError("fastrnn: LSTM needs c0")
        if c0.shape != (B, H):
            _raise_shape("c0", c0, (B, H), "[B, H]")
    elif c0 is not None:
        raise RuntimeError(f"fastrnn: c0 is an LSTM state; {cell} takes None")
    if batch_sizes is not None:
        check_batch_sizes(batch_sizes, T, B)
    variant = None if _is_plain(var) else _variant(cell, T, B, G, H, Hr, ref_name, ref, var)
    if not _uniform((w_hh, b_hh, h0, c0, w_hr), ref.dtype, ref.device):
        _raise_mixed((("w_hh", w_hh), ("b_hh", b_hh), ("h0", h0), ("c0", c0), ("w_hr", w_hr)), ref_name, ref)
    return H, Hr, variant


def check_layer_args(backend, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes, reverse,
                     ln_ih_weight, ln_ih_bias, *var):
    """The arguments of ``fastrnn::rnn_layer`` / ``rnn_layer_fwd`` (``LAYER_ARGS``, in order; ``var``
    = the Variant fields, ``reset_after`` last): x [T, B, I] floating, w_ih [G, I], w_hh [G, Hr],
    b_ih / b_hh [G], h0 [B, Hr], c0 [B, H] (LSTM only), w_hr [Hr, H] (LSTM only; without it
    Hr = H), batch_sizes (``check_batch_sizes`` with T and B), ln_ih_* [G], the variant tensors
    (``contract.rnn.Variant``), one dtype and one device. Returns ``(T, B, G, H, Hr)``."""
    if cell not in GATES:
        check_cell(cell)
    if not isinstance(backend, str) or not isinstance(reverse, bool) or len(var) != _N_VARIANT:
        raise TypeError(f"fastrnn: backend must be a str, reverse a bool, and {_N_VARIANT} variant arguments "
                        f"follow ln_ih_bias ({', '.join(Variant._fields)}); got {len(var)}")
    try:
        if x.dim() != 3:
            _raise_shape("x", x, (0, 0, 0), "[T, B, I]")
        if not x.dtype.is_floating_point:
            raise RuntimeError(f"fastrnn: x must be a floating-point tensor, got {x.dtype}")
        T, B, I = x.shape
        if w_hh.dim() != 2:
            _raise_shape("w_hh", w_hh, (0, 0), "[G, Hr]")
        G = w_hh.shape[0]
        if w_ih.shape != (G, I):
            _raise_shape("w_ih", w_ih, (G, I), "[G, I]")
        H, Hr, _ = _recurrence(cell, T, B, G, "x", x, w_hh, b_hh, h0, c0, w_hr, batch_sizes, var)
        if b_ih is not None and b_ih.shape != (G,):
            _raise_shape("b_ih", b_ih, (G,), "[G]")
        if ln_ih_weight is not None or ln_ih_bias is not None:
            if ln_ih_weight is None or ln_ih_bias is None:
                raise ValueError("fastrnn: the input layer norm needs both ln_ih_weight and ln_ih_bias")
            for name, t in (("ln_ih_weight", ln_ih_weight), ("ln_ih_bias", ln_ih_bias)):
                if t.shape != (G,):
                    _raise_shape(name, t, (G,), "[G]")
        if not _uniform((w_ih, b_ih, ln_ih_weight, ln_ih_bias), x.dtype, x.device):
            _raise_mixed((("w_ih", w_ih), ("b_ih", b_ih), ("ln_ih_weight", ln_ih_weight),
                          ("ln_ih_bias", ln_ih_bias)), "x", x)
    except AttributeError:  # something that is not a tensor: say which
        _raise_not_tensor((("x", x, False), ("w_ih", w_ih, False), ("w_hh", w_hh, False), ("b_ih", b_ih, True),
                           ("b_hh", b_hh, True), ("h0", h0, False), ("c0", c0, True), ("w_hr", w_hr, True),
                           ("batch_sizes", batch_sizes, True), ("ln_ih_weight", ln_ih_weight, True),
                           ("ln_ih_bias", ln_ih_bias, True)))
        raise
    return T, B, G, H, Hr


def _check_saved(saved, want, device):
    """``saved`` (a list of tensors) against ``want`` (``Saved`` entries), all on ``device``."""
    if not isinstance(saved, (list, tuple)):
        raise TypeError(f"fastrnn: saved must be a list of tensors, got {type(saved).__name__}")
    if len(saved) != len(want):
        raise RuntimeError(f"fastrnn: saved holds {len(saved)} tensors, expected {len(want)} "
                           "(what the forward of the same configuration saves)")
    cpu = device.type == "cpu"
    for k, (t, (name, shape, dtype)) in enumerate(zip(saved, want)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastrnn: saved[{k}] ({name}) must be a tensor, got {type(t).__name__}")
        if t.shape != shape:
            raise RuntimeError(f"fastrnn: saved[{k}] ({name}) has shape {_fmt(t.shape)}, expected {_fmt(shape)}")
        if t.dtype is not dtype:
            raise RuntimeError(f"fastrnn: saved[{k}] ({name}) has dtype {t.dtype}, expected {dtype}")
        if not t.is_cpu if cpu else t.device != device:
            raise RuntimeError(f"fastrnn: saved[{k}] ({name}) is on {t.device}, expected {device}")


def _grads(cell, T, B, H, Hr, ref_name, ref, grad_h_seq, grad_h_T, grad_c_T):
    """grad_h_seq [T, B, Hr], grad_h_T [B, Hr], grad_c_T [B, H] (LSTM; ignored otherwise); None = zero."""
    if grad_h_seq is not None and grad_h_seq.shape != (T, B, Hr):
        _raise_shape("grad_h_seq", grad_h_seq, (T, B, Hr), "[T, B, Hr]")
    if grad_h_T is not None and grad_h_T.shape != (B, Hr):
        _raise_shape("grad_h_T", grad_h_T, (B, Hr), "[B, Hr]")
    if cell != "lstm":
        grad_c_T = None  # every backend ignores it for GRU / RNN
    elif grad_c_T is not None and grad_c_T.shape != (B, H):
        _raise_shape("grad_c_T", grad_c_T, (B, H), "[B, H]")
    if not _uniform((grad_h_seq, grad_h_T, grad_c_T), ref.dtype, ref.device):
        _raise_mixed((("grad_h_seq", grad_h_seq), ("grad_h_T", grad_h_T), ("grad_c_T", grad_c_T)), ref_name, ref)


def check_layer_bwd_args(backend, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes, reverse,
                         ln_ih_weight, ln_ih_bias, *rest, layout=None):
    """The arguments of ``fastrnn::rnn_layer_bwd``: the layer's (``check_layer_args``), then
    grad_h_seq [T, B, Hr], grad_h_T [B, Hr], grad_c_T [B, H] | None, h_seq [T, B, Hr], saved
    (what ``rnn_layer_fwd`` returned: ``layout(...)[1:]`` -- the backend's own ``saved_layout``, else
    ``contract.rnn.saved_layout`` -- then, with ``ln_ih``, ``[T, B, G], [T, B, 1], [T, B, 1]``) and
    ``needs`` (one bool per differentiable argument)."""
    if len(rest) != _N_VARIANT + 6:
        raise TypeError(f"fastrnn: rnn_layer_bwd takes {_N_VARIANT + 6} arguments after ln_ih_bias, got {len(rest)}")
    var, (grad_h_seq, grad_h_T, grad_c_T, h_seq, saved, needs) = rest[:_N_VARIANT], rest[_N_VARIANT:]
    T, B, G, H, Hr = check_layer_args(backend, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, batch_sizes,
                                      reverse, ln_ih_weight, ln_ih_bias, *var)
    try:
        _grads(cell, T, B, H, Hr, "x", x, grad_h_seq, grad_h_T, grad_c_T)
        if h_seq.shape != (T, B, Hr):
            _raise_shape("h_seq", h_seq, (T, B, Hr), "[T, B, Hr]")
        if not _uniform((h_seq,), x.dtype, x.device):
            _raise_mixed([("h_seq", h_seq)], "x", x)
    except AttributeError:
        _raise_not_tensor((("grad_h_seq", grad_h_seq, False), ("grad_h_T", grad_h_T, False),
                           ("grad_c_T", grad_c_T, True), ("h_seq", h_seq, False)))
        raise
    want = (layout or saved_layout)(cell, T, B, H, Hr, x.dtype, w_hr is not None, True,
                                    None if _is_plain(var) else Variant(*var))[1:]
    if ln_ih_weight is not None:  # the op layer's own: native_layer_norm's input, mean and rstd
        want += [Saved("xraw", (T, B, G), x.dtype), Saved("mean", (T, B, 1), x.dtype),
                 Saved("rstd", (T, B, 1), x.dtype)]
    _check_saved(saved, want, x.device)
    if len(needs) != _N_GRAD_ARGS:
        raise RuntimeError(f"fastrnn: needs has {len(needs)} flags, expected {_N_GRAD_ARGS}")
    return T, B, G, H, Hr


def check_rnn_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, variant=None):
    """The recurrence contract's forward arguments (``reference_rnn``): xw [T, B, G], w_hh [G, Hr],
    b_hh [G], h0 [B, Hr], c0 [B, H] (LSTM), w_hr [Hr, H] (LSTM), batch_sizes, the variant; one
    dtype (which dtypes are supported is each backend's own check) and one device.
    Returns the variant normalised (``check_variant``: None for the plain cell), the one form a
    backend works with."""
    if cell not in GATES:
        check_cell(cell)
    try:
        if xw.dim() != 3:
            _raise_shape("xw", xw, (0, 0, 0), "[T, B, G]")
        T, B, G = xw.shape
        # a backend's input projection may leave xw in float32 for bfloat16 / float16 weights
        # (cpp); the recurrence's own tensors then share w_hh's dtype
        ref_name, ref = ("w_hh", w_hh) if xw.dtype == torch.float32 and w_hh.dtype in _LOW else ("xw", xw)
        H, Hr, variant = _recurrence(cell, T, B, G, ref_name, ref, w_hh, b_hh, h0, c0, w_hr, batch_sizes, variant)
        if ref is not xw and xw.device != w_hh.device:
            raise RuntimeError(f"fastrnn: xw is on {xw.device}, expected {w_hh.device} (the device of w_hh)")
    except AttributeError:
        _raise_not_tensor((("xw", xw, False), ("w_hh", w_hh, False), ("b_hh", b_hh, True), ("h0", h0, False),
                           ("c0", c0, True), ("w_hr", w_hr, True), ("batch_sizes", batch_sizes, True)))
        raise
    return variant


def check_rnn_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved,
                       variant=None, layout=None):
    """The recurrence contract's backward arguments: ``saved[0]`` is h_seq [T, B, Hr] and gives T, B;
    w_hh [G, Hr]; grads as ``check_layer_bwd_args`` (each may be None: zero); ``saved`` against
    ``layout`` (the backend's ``saved_layout``, default ``contract.rnn.saved_layout``) in full.
    Returns the variant normalised, as ``check_rnn_forward``."""
    if cell not in GATES:
        check_cell(cell)
    if not isinstance(saved, (list, tuple)) or not saved:
        raise RuntimeError("fastrnn: rnn_backward needs the tensors saved by a training forward (saved is empty)")
    h_seq = saved[0]
    try:
        if h_seq.dim() != 3:
            _raise_shape("saved[0] (h_seq)", h_seq, (0, 0, 0), "[T, B, Hr]")
        T, B, _ = h_seq.shape
        if w_hh.dim() != 2:
            _raise_shape("w_hh", w_hh, (0, 0), "[G, Hr]")
        G = w_hh.shape[0]
        H, Hr, variant = _recurrence(cell, T, B, G, "h_seq", h_seq, w_hh, None, h0, c0, w_hr, batch_sizes,
                                     variant)
        _grads(cell, T, B, H, Hr, "h_seq", h_seq, grad_h_seq, grad_h_T, grad_c_T)
    except AttributeError:
        _raise_not_tensor((("saved[0] (h_seq)", h_seq, False), ("w_hh", w_hh, False), ("w_hr", w_hr, True),
                           ("h0", h0, False), ("c0", c0, True), ("batch_sizes", batch_sizes, True),
                           ("grad_h_seq", grad_h_seq, True), ("grad_h_T", grad_h_T, True),
                           ("grad_c_T", grad_c_T, True)))
        raise
    _check_saved(saved, (layout or saved_layout)(cell, T, B, H, Hr, h_seq.dtype, w_hr is not None, True, variant),
                 h_seq.device)
    return variant


# ---- attention ---------------------------------------------------------------------------------

def _attention(q, k, v, bias, rows, dropout_p, contiguous):
    """q [N, L, E], k [Nk, S, E], v [Nk, S, Ev] (N a multiple of Nk), bias [Nm, L, S] with stride
    0 or 1 along S, rows [N] int64 in [0, Nm); one floating dtype, one device; 0 <= dropout_p < 1."""
    try:
        if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
            for name, t, letters in (("q", q, "[N, L, E]"), ("k", k, "[Nk, S, E]"), ("v", v, "[Nk, S, Ev]")):
                if t.dim() != 3:
                    _raise_shape(name, t, (0, 0, 0), letters)
        N, L, E = q.shape
        Nk, S, _ = k.shape
        Ev = v.shape[2]
        if k.shape[2] != E:
            _raise_shape("k", k, (Nk, S, E), "[Nk, S, E]")
        if v.shape != (Nk, S, Ev):
            _raise_shape("v", v, (Nk, S, Ev), "[Nk, S, Ev]")
        if (N % Nk if Nk else N):
            raise RuntimeError(f"fastrnn: the query rows N = {N} must be a multiple of the key/value rows Nk = {Nk} "
                               "(query row n uses key row n // (N / Nk))")
        if not q.dtype.is_floating_point:
            raise RuntimeError(f"fastrnn: q must be a floating-point tensor, got {q.dtype}")
        if not _uniform((k, v), q.dtype, q.device):
            _raise_mixed((("k", k), ("v", v)), "q", q)
        if contiguous and not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
            name = "q" if not q.is_contiguous() else "k" if not k.is_contiguous() else "v"
            raise RuntimeError(f"fastrnn: {name} must be contiguous (the attention contract's tensors are)")
        if bias is not None or rows is not None:
            if bias is None or rows is None:
                raise RuntimeError("fastrnn: a mask is bias [Nm, L, S] together with rows [N]; got only one of them")
            _mask(q, bias, rows, N, L, S)
    except AttributeError:
        _raise_not_tensor((("q", q, False), ("k", k, False), ("v", v, False), ("bias", bias, True),
                           ("rows", rows, True)))
        raise
    if not (isinstance(dropout_p, (int, float)) and 0 <= dropout_p < 1):
        # the user function maps p >= 1 to zeros and p <= 0 (or NaN) to no dropout (docs/attention.md)
        raise RuntimeError(f"fastrnn: dropout_p must be in [0, 1) here, got {dropout_p!r}")
    return N, L, E, Nk, S, Ev


def _mask(q, bias, rows, N, L, S):
    if bias.dim() != 3:
        _raise_shape("bias", bias, (0, L, S), "[Nm, L, S]")
    Nm = bias.shape[0]
    if bias.shape != (Nm, L, S):
        _raise_shape("bias", bias, (Nm, L, S), "[Nm, L, S]")
    if Nm == 0:
        raise RuntimeError("fastrnn: bias has no rows (Nm = 0); a mask needs at least one")
    if bias.stride(2) not in (0, 1):
        raise RuntimeError(f"fastrnn: bias must have stride 0 or 1 along S (a broadcast view or rows of "
                           f"contiguous keys), got strides {tuple(bias.stride())}")
    if bias.dtype != q.dtype or bias.device != q.device:
        _raise_mixed([("bias", bias)], "q", q)
    if rows.dtype != torch.int64:
        raise RuntimeError(f"fastrnn: rows must be int64, got {rows.dtype}")
    if rows.shape != (N,):
        _raise_shape("rows", rows, (N,), "[N]")
    if rows.device != q.device:
        _raise_mixed([("rows", rows)], "q", q, torch.int64)
    if N:
        if N <= _LIST_LIMIT:
            r = rows.tolist()
            lo, hi = min(r), max(r)
        else:
            lo, hi = (int(m) for m in torch.aminmax(rows))
        if lo < 0 or hi >= Nm:
            raise RuntimeError(f"fastrnn: rows must index the mask's Nm = {Nm} rows (0 <= rows < {Nm}), "
                               f"got values in [{lo}, {hi}]")


def check_sdpa_args(backend, q, k, v, bias, rows, scale, causal, dropout_p, seed):
    """The arguments of ``fastrnn::sdpa`` / ``sdpa_fwd`` (``SDPA_ARGS``): ``_attention``'s shapes,
    a float scale, a bool causal, 0 <= dropout_p < 1, seed None or a one-element integer tensor.
    Returns ``(N, L, E, Nk, S, Ev)``."""
    if not isinstance(backend, str) or not isinstance(causal, bool) or not isinstance(scale, (int, float)):
        raise TypeError("fastrnn: backend must be a str, scale a float and causal a bool")
    if seed is not None and (not isinstance(seed, torch.Tensor) or seed.numel() != 1 or seed.dtype.is_floating_point
                             or seed.dtype == torch.bool):
        raise RuntimeError(f"fastrnn: seed must be a one-element integer tensor, got {seed!r:.60}")
    return _attention(q, k, v, bias, rows, dropout_p, contiguous=False)


def _lse_dtypes(dtype):
    # lse is float32 for float16 / bfloat16 q (triton), else q's dtype
    return (dtype, torch.float32) if dtype in (torch.float16, torch.bfloat16) else (dtype,)


def _attention_grads(N, L, Ev, q, grad_out, out, lse, contiguous):
    try:
        if grad_out.shape != (N, L, Ev):
            _raise_shape("grad_out", grad_out, (N, L, Ev), "[N, L, Ev]")
        if out.shape != (N, L, Ev):
            _raise_shape("out", out, (N, L, Ev), "[N, L, Ev]")
        if lse.shape != (N, L):
            _raise_shape("lse", lse, (N, L), "[N, L]")
        if not _uniform((grad_out, out), q.dtype, q.device):
            _raise_mixed((("grad_out", grad_out), ("out", out)), "q", q)
        if lse.dtype not in _lse_dtypes(q.dtype) or lse.device != q.device:
            _raise_mixed([("lse", lse)], "q", q)
        if contiguous and not (grad_out.is_contiguous() and out.is_contiguous() and lse.is_contiguous()):
            name = "grad_out" if not grad_out.is_contiguous() else "out" if not out.is_contiguous() else "lse"
            raise RuntimeError(f"fastrnn: {name} must be contiguous (the attention contract's tensors are)")
    except AttributeError:
        _raise_not_tensor((("grad_out", grad_out, False), ("out", out, False), ("lse", lse, False)))
        raise


def check_sdpa_bwd_args(backend, q, k, v, bias, rows, scale, causal, dropout_p, seed, grad_out, out, lse,
                        needs):
    """The arguments of ``fastrnn::sdpa_bwd``: ``check_sdpa_args``'s, then grad_out [N, L, Ev],
    out [N, L, Ev], lse [N, L] (float32 for float16 / bfloat16 q, else q's dtype), needs (4 bools)."""
    N, L, E, Nk, S, Ev = check_sdpa_args(backend, q, k, v, bias, rows, scale, causal, dropout_p, seed)
    _attention_grads(N, L, Ev, q, grad_out, out, lse, contiguous=False)
    if len(needs) != 4:
        raise RuntimeError(f"fastrnn: needs has {len(needs)} flags, expected 4 (q, k, v, bias)")
    return N, L, E, Nk, S, Ev


def _mask_parts(mask):
    if mask is None:
        return None, None
    if not isinstance(mask, tuple) or len(mask) != 2:
        raise TypeError(f"fastrnn: mask must be SdpaMask(bias, rows) or None, got {type(mask).__name__}")
    return mask


def check_sdpa_forward(q, k, v, mask, scale, causal, dropout_p, seed):
    """The attention contract's forward arguments (``reference_sdpa``): contiguous q [N, L, E],
    k [Nk, S, E], v [Nk, S, Ev]; mask ``SdpaMask(bias, rows)`` or None; 0 <= dropout_p < 1.
    Returns ``(N, L, E, Nk, S, Ev)``."""
    bias, rows = _mask_parts(mask)
    return _attention(q, k, v, bias, rows, dropout_p, contiguous=True)


def check_sdpa_backward(grad_out, q, k, v, out, lse, mask, scale, causal, dropout_p, seed):
    """The attention contract's backward arguments: ``check_sdpa_forward``'s, then contiguous
    grad_out [N, L, Ev], out [N, L, Ev], lse [N, L]."""
    bias, rows = _mask_parts(mask)
    N, L, E, Nk, S, Ev = _attention(q, k, v, bias, rows, dropout_p, contiguous=True)
    _attention_grads(N, L, Ev, q, grad_out, out, lse, contiguous=True)
    return N, L, E, Nk, S, Ev
