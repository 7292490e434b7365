"""Bad inputs raise at every level, for every CPU backend, and never crash the process.

Levels: modules, ``fastrnn.functional`` / ``scaled_dot_product_attention``, the registered
``torch.ops.fastrnn`` ops, the backend contract functions and the raw C++ extension functions.
Each case is a mistake a user or a caller below the public API can make (wrong batch, wrong
feature size, wrong weight shapes, mixed or integer dtypes, a tensor on another device -- "meta"
stands in for one --, bad batch_sizes, out-of-range mask rows, a mask of the wrong shape or
stride, ...); several of them segfaulted or corrupted the heap before the validation boundary
(fastrnn/contract/checks.py) existed.

The cases run in child processes (one per backend and op family), so that a crash fails a test
instead of killing pytest. The child runs every case, compares what was raised with the expected
exception type and message fragment (and, where nn.LSTM & co. or F.scaled_dot_product_attention
raise for the same mistake, with torch's exception type), and prints one line per case; the
parent asserts that every case passed and that the child exited normally.
"""
from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import fastrnn

HERE = Path(__file__).resolve().parent
RNN_BACKENDS = fastrnn.available_backends("cpu", "rnn")
SDPA_BACKENDS = fastrnn.available_backends("cpu", "sdpa")
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


# ---- the child side ------------------------------------------------------------------------------

class Case:
    """``fn()`` must raise ``exc`` with ``fragment`` in its message; ``torch_fn`` (optional) makes
    the same mistake through torch, whose exception type must then be ``exc`` too. ``exc=None``:
    ``fn()`` must succeed and return True (a comparison done inside ``fn``)."""

    def __init__(self, name, fn, exc, fragment="", torch_fn=None):
        self.name, self.fn, self.exc, self.fragment, self.torch_fn = name, fn, exc, fragment, torch_fn

    def run(self):
        try:
            result = self.fn()
        except Exception as e:  # noqa: BLE001 -- the point is to see what was raised
            got = e
        else:
            if self.exc is None:
                return None if result is True else f"returned {result!r}, expected True"
            return f"raised nothing, expected {self.exc.__name__} with {self.fragment!r}"
        if self.exc is None:
            return f"raised {type(got).__name__}: {got}"
        if type(got) is not self.exc or self.fragment not in str(got):
            return (f"raised {type(got).__name__}: {str(got)[:300]!r}; "
                    f"expected {self.exc.__name__} with {self.fragment!r}")
        if self.torch_fn is not None:
            try:
                self.torch_fn()
            except Exception as e:  # noqa: BLE001
                if type(e) is not self.exc:
                    return f"torch raises {type(e).__name__} for the same mistake, fastrnn {self.exc.__name__}"
            else:
                return "torch raises nothing for this mistake (the case says it does)"
        return None


def _child(family, backend):
    """Run the cases of ``family`` for ``backend`` in this (child) process; one line per case."""
    torch.manual_seed(0)
    cases = CASES[family](backend)
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "duplicate case names"
    for case in cases:
        print(f"start {case.name}", flush=True)
        try:
            problem = case.run()
        except Exception:  # noqa: BLE001 -- a bug in the case itself
            problem = "case error: " + traceback.format_exc().replace("\n", " | ")
        print(f"{'ok' if problem is None else 'FAIL'} {case.name}" + ("" if problem is None else f": {problem}"),
              flush=True)
    print(f"done {len(cases)}", flush=True)


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# ---- recurrence ------------------------------------------------------------------------------------

T, B, I, H, P = 5, 3, 4, 6, 5   # odd sizes; P = proj_size


def _groups(cell, L=1, D=1, proj=0, dtype=torch.float32, I_=I):
    G, Hr = GATES[cell] * H, proj or H
    return [[r(G, I_ if layer == 0 else D * Hr, dtype=dtype), r(G, Hr, dtype=dtype), r(G, dtype=dtype),
             r(G, dtype=dtype), r(Hr, H, dtype=dtype) if proj else None]
            for layer in range(L) for _ in range(D)]


def _functional(backend, cell="lstm", L=1, D=1, proj=0, packed=False, edit=None):
    """A call of fastrnn.functional.rnn with valid arguments, then ``edit(args)`` makes the mistake."""
    Hr = proj or H
    args = dict(x=r(T, B, I), h0=r(L * D, B, Hr), c0=r(L * D, B, H) if cell == "lstm" else None,
                weights=_groups(cell, L, D, proj), batch_sizes=None)
    if packed:
        args["batch_sizes"] = torch.tensor([3, 3, 2, 1, 1])
        args["x"] = r(10, I)
    if edit is not None:
        edit(args)
    return lambda: fastrnn.functional.rnn(cell, args["x"], args["h0"], args["c0"], args["weights"], num_layers=L,
                                          bidirectional=D == 2, batch_sizes=args["batch_sizes"], backend=backend)


def _set(**changes):
    return lambda args: args.update(changes)


def _weight(k, pos, value):
    def edit(args):
        args["weights"][k][pos] = value
    return edit


def _packed(sizes, rows=None, dtype=torch.int64):
    """PackedSequence-style arguments with these batch_sizes (rows: the packed data's rows)."""
    bs = torch.tensor(sizes, dtype=dtype)
    n = rows if rows is not None else int(bs.clamp(min=0).sum())
    first = max(int(bs.flatten()[0]), 1) if bs.numel() else 1
    return _set(batch_sizes=bs, x=r(n, I), h0=r(1, first, H), c0=r(1, first, H))


def _module_pair(kind, backend, **kw):
    from torch import nn
    torch.manual_seed(1)
    ref = getattr(nn, kind)(I, H, **kw)
    fast = getattr(fastrnn, kind)(I, H, backend=backend, **kw)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _packed_seq(sizes, rows=None, dtype=torch.int64):
    from torch.nn.utils.rnn import PackedSequence
    bs = torch.tensor(sizes, dtype=dtype)
    n = rows if rows is not None else int(bs.clamp(min=0).sum())
    return PackedSequence(r(n, I), bs)


def _module_cases(backend):
    cases = []
    for kind in ("LSTM", "GRU"):
        ref, fast = _module_pair(kind, backend)
        ref_b, fast_b = _module_pair(kind, backend, num_layers=2, bidirectional=True)

        def both(make_input, make_hx=None, ref=ref, fast=fast):
            """(fastrnn call, torch call) on the same input (and hx for both when given)."""
            inp = make_input()
            hx = make_hx() if make_hx is not None else None
            return (lambda: fast(inp, hx)), (lambda: ref(inp, hx))

        def hx_for(first, kind=kind):
            h = r(1, first, H)
            return (h, r(1, first, H)) if kind == "LSTM" else h

        # the reported heap corruption (numba) / triton interpreter segfault
        f, t = both(lambda: _packed_seq([1, 200, 200, 200]), lambda: hx_for(1))
        cases.append(Case(f"{kind}/packed_increasing", f, RuntimeError, "non-increasing", t))
        f, t = both(lambda: _packed_seq([3, -1]), lambda: hx_for(3))
        cases.append(Case(f"{kind}/packed_negative", f, RuntimeError, "positive", t))
        f, t = both(lambda: _packed_seq([3, 2, 1], dtype=torch.int32), lambda: hx_for(3))
        cases.append(Case(f"{kind}/packed_int32", f, RuntimeError, "int64", t))
        f, t = both(lambda: _packed_seq([3.0, 2.0, 1.0], dtype=torch.float32), lambda: hx_for(3))
        cases.append(Case(f"{kind}/packed_float", f, RuntimeError, "int64", t))
        f, t = both(lambda: _packed_seq([3, 2, 1], rows=5), lambda: hx_for(3))
        cases.append(Case(f"{kind}/packed_short_data", f, RuntimeError, "sum to 6", t))
        # torch accepts these two (and computes with rows that do not exist); fastrnn refuses
        f, _ = both(lambda: _packed_seq([3, 0, 0]), lambda: hx_for(3))
        cases.append(Case(f"{kind}/packed_zero", f, RuntimeError, "positive"))
        f, _ = both(lambda: _packed_seq([3, 2, 1], rows=7), lambda: hx_for(3))
        cases.append(Case(f"{kind}/packed_long_data", f, RuntimeError, "sum to 6"))
        f, t = both(lambda: r(T, B, I, dtype=torch.float64))
        cases.append(Case(f"{kind}/input_dtype", f, ValueError, "does not match weight dtype", t))
        f, t = both(lambda: torch.randint(0, 3, (T, B, I)))
        cases.append(Case(f"{kind}/input_int", f, ValueError, "does not match weight dtype", t))
        f, t = both(lambda: torch.empty(T, B, I, device="meta"))
        cases.append(Case(f"{kind}/input_meta", f, RuntimeError, "not at the same device", t))
        f, t = both(lambda: r(T, 2, I), lambda: hx_for(B))
        cases.append(Case(f"{kind}/h0_batch", f, RuntimeError, "Expected hidden", t))
        # a parameter replaced by one of the wrong shape: torch's oneDNN LSTM runs on (garbage),
        # torch's GRU raises; fastrnn names the weight
        x = r(T, B, I)
        orig = fast_b.weight_hh_l1
        fast_b.weight_hh_l1 = torch.nn.Parameter(r(orig.shape[0], 2))

        def run_bad(fast_b=fast_b, x=x):
            return fast_b(x)
        cases.append(Case(f"{kind}/param_weight_hh_l1", run_bad, RuntimeError, "w_hh of weight group 2 (layer 1)"))
    return cases


def _functional_cases(backend):
    fr = fastrnn.functional
    cases = []
    for cell in CELLS:
        lstm = cell == "lstm"
        G = GATES[cell] * H

        def add(name, exc, fragment, **kw):
            cases.append(Case(f"{cell}/{name}", _functional(backend, cell, **kw), exc, fragment))

        # the reported crashes: state batch 2 for an input batch of 3 (cpp SIGSEGV, numba garbage) and
        # a w_hh with too few columns (numba heap corruption, cpp garbage)
        add("h0_batch", RuntimeError, "Expected hidden" + ("[0]" if lstm else "") + " size (1, 3, 6), got [1, 2, 6]",
            edit=_set(h0=r(1, 2, H)))
        add("h0_features", RuntimeError, "Expected hidden", edit=_set(h0=r(1, B, H + 1)))
        add("h0_2d", RuntimeError, "Expected hidden", edit=_set(h0=r(B, H)))
        add("w_hh_cols", RuntimeError, f"w_hh of weight group 0 (layer 0) has shape [{G}, 2]",
            edit=_weight(0, 1, r(G, 2)))
        # one more row: a gated cell's G is no multiple of its gates; RNN's H grows and w_ih no longer fits
        add("w_hh_rows", RuntimeError, "w_hh of weight group 0" if GATES[cell] > 1 else "w_ih of weight group 0",
            edit=_weight(0, 1, r(G + 1, H)))
        add("w_ih_rows", RuntimeError, "w_ih of weight group 0", edit=_weight(0, 0, r(G - 1, I)))
        add("b_ih_len", RuntimeError, "b_ih of weight group 0", edit=_weight(0, 2, r(G - 1)))
        add("b_hh_len", RuntimeError, "b_hh of weight group 0", edit=_weight(0, 3, r(G + 1)))
        add("b_hh_2d", RuntimeError, "b_hh of weight group 0", edit=_weight(0, 3, r(1, G)))
        add("input_features", RuntimeError, f"input.size(-1) must be equal to input_size. Expected {I}, got {I + 1}",
            edit=_set(x=r(T, B, I + 1)))
        add("input_4d", RuntimeError, "input must have 3 dimensions, got 4", edit=_set(x=r(T, B, I, 1)))
        add("layer1_w_ih", RuntimeError, "w_ih of weight group 1 (layer 1)", L=2, edit=_weight(1, 0, r(G, I)))
        add("bidir_layer1_w_ih", RuntimeError, "w_ih of weight group 3 (layer 1, reverse)", L=2, D=2,
            edit=_weight(3, 0, r(G, H)))
        add("group_count", RuntimeError, "expected 2 weight groups (one per layer and direction), got 1", L=2,
            edit=lambda a: a.update(weights=a["weights"][:1]))
        add("group_size", RuntimeError, "weight group 0 must be", edit=lambda a: a["weights"][0].pop())
        add("h0_dtype", RuntimeError, "dtype", edit=_set(h0=r(1, B, H, dtype=torch.float64)))
        add("weight_dtype", RuntimeError, "dtype", edit=_weight(0, 1, r(G, H, dtype=torch.float64)))
        add("all_int", RuntimeError, "floating-point", edit=lambda a: a.update(
            x=a["x"].long(), h0=a["h0"].long(), c0=a["c0"].long() if lstm else None,
            weights=[[None if w is None else w.long() for w in g] for g in a["weights"]]))
        add("h0_meta", RuntimeError, "Input and hidden tensors are not at the same device",
            edit=_set(h0=torch.empty(1, B, H, device="meta")))
        add("weight_meta", RuntimeError, "Input and parameter tensors are not at the same device",
            edit=_weight(0, 0, torch.empty(G, I, device="meta")))
        add("not_a_tensor", TypeError, "must be a tensor", edit=_weight(0, 1, [[0.0] * H] * G))
        # packed: the reported heap corruption (increasing) and the rest of the class
        add("packed_increasing", RuntimeError, "non-increasing", edit=_packed([1, 2, 3, 3]))
        add("packed_zero", RuntimeError, "positive", edit=_packed([3, 2, 0]))
        add("packed_negative", RuntimeError, "positive", edit=_packed([3, 2, -1]))
        add("packed_sum", RuntimeError, "sum to 9, but the packed data has 8 rows", edit=_packed([3, 3, 2, 1], rows=8))
        add("packed_int32", RuntimeError, "expected scalar type Long but found Int",
            edit=_packed([3, 2, 1], dtype=torch.int32))
        add("packed_float", RuntimeError, "expected scalar type Long but found Float",
            edit=_packed([3.0, 2.0, 1.0], dtype=torch.float32))
        add("packed_2d", RuntimeError, "1-D", edit=_packed([[3, 2, 1]]))
        add("packed_meta", ValueError, "should always be on CPU", edit=lambda a: (
            _packed([3, 2, 1])(a), a.update(batch_sizes=torch.empty(3, dtype=torch.int64, device="meta"))))
        add("packed_empty", RuntimeError, "sequence length", edit=_packed([], rows=0))
        add("packed_h0_batch", RuntimeError, "Expected hidden", packed=True, edit=_set(h0=r(1, 2, H)))
        if lstm:
            add("c0_batch", RuntimeError, "Expected hidden[1] size (1, 3, 6), got [1, 2, 6]", edit=_set(c0=r(1, 2, H)))
            add("c0_missing", RuntimeError, "needs both states", edit=_set(c0=None))
            add("proj_w_hr_shape", RuntimeError, "w_hr of weight group 0", proj=P, edit=_weight(0, 4, r(P, H + 1)))
            add("proj_h0_features", RuntimeError, "Expected hidden[0] size (1, 3, 5)", proj=P,
                edit=_set(h0=r(1, B, H)))
            add("proj_in_one_group_only", RuntimeError, "in every weight group or in none", L=2, proj=P,
                edit=_weight(1, 4, None))
        else:
            add("w_hr_given", RuntimeError, "only LSTM has a projection", edit=_weight(0, 4, r(H, H)))
            add("c0_given", RuntimeError, "c0 must be None", edit=_set(c0=r(1, B, H)))

    # cells: torch's messages where _VF.*_cell has one
    def cell_call(fn, input=None, hx=None, w_ih=None, w_hh=None, b_ih=None, b_hh=None, gates=4):
        G = gates * H
        inp = input if input is not None else r(B, I)
        state = hx if hx is not None else ((r(B, H), r(B, H)) if gates == 4 else r(B, H))
        return lambda: fn(inp, state, w_ih if w_ih is not None else r(G, I), w_hh if w_hh is not None else r(G, H),
                          b_ih if b_ih is not None else r(G), b_hh if b_hh is not None else r(G), backend=backend)

    cases += [
        Case("lstm_cell/weight_hh_rows", cell_call(fr.lstm_cell, w_hh=r(4 * H - 4, H)), RuntimeError,
             f"weight_hh first dim must be 4 * hidden_size = {4 * H}, but got {4 * H - 4}"),
        Case("lstm_cell/weight_ih_rows", cell_call(fr.lstm_cell, w_ih=r(4 * H + 1, I)), RuntimeError,
             "weight_ih first dim must be 4 * hidden_size"),
        Case("lstm_cell/bias_len", cell_call(fr.lstm_cell, b_ih=r(4 * H - 1)), RuntimeError, "bias_ih has shape"),
        Case("lstm_cell/hx_batch", cell_call(fr.lstm_cell, hx=(r(2, H), r(2, H))), RuntimeError,
             "Input batch size 3 doesn't match hidden0 batch size 2"),
        Case("lstm_cell/input_3d", cell_call(fr.lstm_cell, input=r(1, B, I)), RuntimeError, "input must be 2-D"),
        Case("lstm_cell/hx_meta", cell_call(fr.lstm_cell, hx=(r(B, H), torch.empty(B, H, device="meta"))),
             RuntimeError, "cx is on meta"),
        Case("gru_cell/weight_hh_cols", cell_call(fr.gru_cell, w_hh=r(3 * H, H - 1), gates=3), RuntimeError,
             "hidden0 has inconsistent hidden_size"),
        Case("gru_cell/bias_hh_len", cell_call(fr.gru_cell, b_hh=r(3 * H + 2), gates=3), RuntimeError,
             "bias_hh has shape"),
        Case("rnn_cell/int", lambda: fr.rnn_cell(torch.ones(B, I, dtype=torch.long), torch.ones(B, H, dtype=torch.long),
                                                 torch.ones(H, I, dtype=torch.long), torch.ones(H, H, dtype=torch.long),
                                                 backend=backend), RuntimeError, "floating-point"),
    ]
    return cases


LN_FIELDS = ("ln_hh_weight", "ln_hh_bias", "ln_c_weight", "ln_c_bias", "peephole", "rec_mask", "zoneout_h",
             "zoneout_c", "reset")


def _layer_args(backend, cell="lstm", proj=0, packed=False, ln=False, **variant):
    """The argument list of torch.ops.fastrnn.rnn_layer (valid), as a dict in schema order."""
    G, Hr = GATES[cell] * H, proj or H
    args = dict(backend=backend, cell=cell, x=r(T, B, I), w_ih=r(G, I), w_hh=r(G, Hr), b_ih=r(G), b_hh=r(G),
                h0=r(B, Hr), c0=r(B, H) if cell == "lstm" else None, w_hr=r(Hr, H) if proj else None,
                batch_sizes=torch.tensor([3, 3, 2, 1, 1]) if packed else None, reverse=False,
                ln_ih_weight=r(G) if ln else None, ln_ih_bias=r(G) if ln else None)
    for f in LN_FIELDS:
        args[f] = variant.get(f)
    args["reset_after"] = variant.get("reset_after", True)
    return args


def _bwd_args(backend, cell="lstm", proj=0, ln=False, **variant):
    """rnn_layer_bwd's arguments, with ``saved`` of the right shapes (no kernel runs: the checks
    look at shapes only, so every case raises before anything is computed)."""
    from fastrnn.contract.rnn import Variant, saved_layout
    args = _layer_args(backend, cell, proj, ln=ln, **variant)
    G, Hr = GATES[cell] * H, proj or H
    v = Variant(**{f: variant.get(f) for f in LN_FIELDS}, reset_after=variant.get("reset_after", True))
    plain = all(variant.get(f) is None for f in LN_FIELDS) and v.reset_after
    impl = fastrnn.backends.load(backend, "rnn")
    layout = getattr(impl, "saved_layout", saved_layout)
    saved = [r(*s, dtype=d) for _, s, d in layout(cell, T, B, H, Hr, torch.float32, bool(proj), True,
                                                None if plain else v)[1:]]
    if ln:
        saved += [r(T, B, G), r(T, B, 1), r(T, B, 1)]
    args.update(grad_h_seq=r(T, B, Hr), grad_h_T=r(B, Hr), grad_c_T=r(B, H) if cell == "lstm" else None,
                h_seq=r(T, B, Hr), saved=saved, needs=[True] * 15)
    return args


def _real_kernel(op):
    """``op``'s real (CompositeExplicitAutograd) kernel, as the dispatcher picks it for CPU tensors."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    return lambda *args: op.default.redispatch(keys, *args)


def _op_call(op, args, **changes):
    a = dict(args, **changes)
    return lambda: op(*a.values())


def _op_cases(backend):
    ops = torch.ops.fastrnn
    cases = []
    base = _layer_args(backend)
    for name, op, extra in (("rnn_layer", ops.rnn_layer, {}), ("rnn_layer_fwd", ops.rnn_layer_fwd,
                                                                 {"training": True})):
        args = dict(base, **extra)

        def add(case, exc, fragment, _name=name, _op=op, _args=args, **changes):
            cases.append(Case(f"{_name}/{case}", _op_call(_op, _args, **changes), exc, fragment))

        # the reported crash: h0 [1, H] for a batch of 3 (cpp: malloc corrupted)
        add("h0_one_row", RuntimeError, "h0 has shape [1, 6], expected [B, Hr] = [3, 6]", h0=r(1, H))
        add("c0_features", RuntimeError, "c0 has shape", c0=r(B, H + 1))
        add("w_hh_cols", RuntimeError, "expected [G, H] = [24, 6]", w_hh=r(4 * H, 2))
        add("w_ih_cols", RuntimeError, "w_ih has shape", w_ih=r(4 * H, I + 1))
        add("b_ih_len", RuntimeError, "b_ih has shape", b_ih=r(4 * H - 1))
        add("b_hh_len", RuntimeError, "b_hh has shape", b_hh=r(4 * H + 1))
        add("x_2d", RuntimeError, "x must be 3-D", x=r(T * B, I))
        add("x_int", RuntimeError, "floating-point", x=torch.ones(T, B, I, dtype=torch.long))
        add("h0_dtype", RuntimeError, "h0 has dtype torch.float64", h0=r(B, H, dtype=torch.float64))
        add("w_hr_shape", RuntimeError, "w_hr has shape", w_hh=r(4 * H, P), h0=r(B, P), w_hr=r(P, H + 1))
        add("unknown_cell", ValueError, "unknown cell", cell="lstm2")
        add("gru_with_c0", RuntimeError, "c0 is an LSTM state", cell="gru", w_ih=r(3 * H, I), w_hh=r(3 * H, H),
            b_ih=r(3 * H), b_hh=r(3 * H))
        add("bs_increasing", RuntimeError, "non-increasing", batch_sizes=torch.tensor([1, 2, 3, 3, 3]))
        add("bs_first", RuntimeError, "batch_sizes[0] = 2 must equal the batch size B = 3",
            batch_sizes=torch.tensor([2, 2, 2, 1, 1]))
        add("bs_length", RuntimeError, "expected one per time step", batch_sizes=torch.tensor([3, 3, 2]))
        add("bs_zero", RuntimeError, "positive", batch_sizes=torch.tensor([3, 3, 2, 1, 0]))
        add("bs_int32", RuntimeError, "int64", batch_sizes=torch.tensor([3, 3, 2, 1, 1], dtype=torch.int32))
        add("ln_ih_shape", RuntimeError, "ln_ih_weight has shape", ln_ih_weight=r(4 * H - 1), ln_ih_bias=r(4 * H))
        add("ln_ih_half", ValueError, "both ln_ih_weight and ln_ih_bias", ln_ih_weight=r(4 * H))
        add("rec_mask_shape", RuntimeError, "rec_mask has shape", rec_mask=r(B + 1, H))
        add("zoneout_shape", RuntimeError, "zoneout_c has shape", zoneout_h=r(T, B, H), zoneout_c=r(T - 1, B, H))
        add("reset_dtype", RuntimeError, "reset has dtype", reset=torch.zeros(T, B))
        add("variant_combo", ValueError, "layer norm", ln_c_weight=r(H), ln_c_bias=r(H))
        # a tensor on another device: with a meta tensor among the arguments the dispatcher runs the
        # fake kernel (shapes only: it returns uninitialised CPU tensors, see the report in
        # checks.py); with a real second device (CUDA + CPU) the CUDA key wins and the real kernel
        # runs, which the redispatch to the CPU key reproduces here
        cases.append(Case(f"{name}/peephole_other_device", _op_call(_real_kernel(op), args,
                                                                    peephole=torch.empty(3, H, device="meta")),
                          RuntimeError, "peephole is on meta"))
        cases.append(Case(f"{name}/h0_other_device", _op_call(_real_kernel(op), args,
                                                              h0=torch.empty(B, H, device="meta")),
                          RuntimeError, "h0 is on meta"))
    # the backward op: the saved list and the gradients
    bwd = _bwd_args(backend)

    def add_bwd(case, exc, fragment, args=bwd, **changes):
        cases.append(Case(f"rnn_layer_bwd/{case}", _op_call(ops.rnn_layer_bwd, args, **changes), exc, fragment))

    add_bwd("saved_missing", RuntimeError, "saved holds 1 tensors, expected 2", saved=bwd["saved"][:1])
    add_bwd("saved_shape", RuntimeError, "saved[1] (c_seq) has shape", saved=[bwd["saved"][0], r(T, B, H + 1)])
    add_bwd("saved_dtype", RuntimeError, "saved[0] (gates) has dtype",
            saved=[bwd["saved"][0].double(), bwd["saved"][1]])
    add_bwd("grad_h_seq", RuntimeError, "grad_h_seq has shape", grad_h_seq=r(T, B - 1, H))
    add_bwd("grad_h_T", RuntimeError, "grad_h_T must be 2-D [B, Hr]", grad_h_T=r(B, H, 1))
    add_bwd("grad_c_T", RuntimeError, "grad_c_T has shape", grad_c_T=r(B + 1, H))
    add_bwd("h_seq", RuntimeError, "h_seq has shape", h_seq=r(T + 1, B, H))
    add_bwd("needs", RuntimeError, "needs has 3 flags", needs=[True] * 3)
    add_bwd("h0_batch", RuntimeError, "h0 has shape", h0=r(B + 2, H))
    ln_bwd = _bwd_args(backend, cell="gru", ln=True, ln_hh_weight=r(3 * H), ln_hh_bias=r(3 * H))
    add_bwd("ln_saved_missing", RuntimeError, "saved holds", args=ln_bwd, saved=ln_bwd["saved"][:-1])
    add_bwd("ln_stat_shape", RuntimeError, "has shape [5, 3]", args=ln_bwd,
            saved=ln_bwd["saved"][:-1] + [r(T, B)])
    return cases


def _contract_rnn_cases(backend):
    from fastrnn.contract.rnn import Variant, saved_layout
    impl = fastrnn.backends.load(backend, "rnn")
    G = 4 * H
    fwd = dict(cell="lstm", xw=r(T, B, G), w_hh=r(G, H), b_hh=r(G), h0=r(B, H), c0=r(B, H), w_hr=None,
               batch_sizes=None, reverse=False, training=True)
    layout = getattr(impl, "saved_layout", saved_layout)
    saved = [r(*s, dtype=d) for _, s, d in layout("lstm", T, B, H, H, torch.float32, False, True)]
    bwd = dict(cell="lstm", grad_h_seq=r(T, B, H), grad_h_T=r(B, H), grad_c_T=r(B, H), w_hh=r(G, H), w_hr=None,
               h0=r(B, H), c0=r(B, H), batch_sizes=None, reverse=False, saved=saved)

    def f(**changes):
        a = dict(fwd, **changes)
        return lambda: impl.rnn_forward(**a)

    def b(**changes):
        a = dict(bwd, **changes)
        return lambda: impl.rnn_backward(**a)

    return [
        Case("rnn_forward/h0_batch", f(h0=r(2, H)), RuntimeError, "h0 has shape [2, 6], expected [B, Hr] = [3, 6]"),
        Case("rnn_forward/w_hh_cols", f(w_hh=r(G, 2)), RuntimeError, "w_hh has shape"),
        Case("rnn_forward/b_hh_len", f(b_hh=r(G - 2)), RuntimeError, "b_hh has shape"),
        Case("rnn_forward/c0_missing", f(c0=None), RuntimeError, "LSTM needs c0"),
        Case("rnn_forward/xw_2d", f(xw=r(T * B, G)), RuntimeError, "xw must be 3-D"),
        Case("rnn_forward/xw_gates", f(xw=r(T, B, G + 1), w_hh=r(G + 1, H)), RuntimeError, "positive multiple of 4"),
        Case("rnn_forward/bs_increasing", f(batch_sizes=torch.tensor([1, 2, 3, 3, 3])), RuntimeError,
             "non-increasing"),
        Case("rnn_forward/bs_too_big", f(batch_sizes=torch.tensor([4, 3, 3, 3, 3])), RuntimeError,
             "must equal the batch size"),
        Case("rnn_forward/bs_meta", f(batch_sizes=torch.empty(T, dtype=torch.int64, device="meta")), ValueError,
             "should always be on CPU"),
        Case("rnn_forward/h0_dtype", f(h0=r(B, H, dtype=torch.float64)), RuntimeError, "dtype"),
        Case("rnn_forward/c0_meta", f(c0=torch.empty(B, H, device="meta")), RuntimeError, "c0 is on meta"),
        Case("rnn_forward/rec_mask_shape", f(variant=Variant(rec_mask=r(B, H + 1))), RuntimeError,
             "rec_mask has shape"),
        Case("rnn_forward/variant_combo", f(variant=Variant(zoneout_h=r(T, B, H))), ValueError, "zoneout"),
        Case("rnn_backward/saved_missing", b(saved=saved[:2]), RuntimeError, "saved holds 2 tensors, expected 3"),
        Case("rnn_backward/saved_shape", b(saved=[saved[0], r(T, B, G - 1), saved[2]]), RuntimeError,
             "saved[1] (gates) has shape"),
        Case("rnn_backward/saved_empty", b(saved=[]), RuntimeError, "saved is empty"),
        Case("rnn_backward/grad_h_T", b(grad_h_T=r(B + 1, H)), RuntimeError, "grad_h_T has shape"),
        Case("rnn_backward/w_hh_rows", b(w_hh=r(G - 4, H)), RuntimeError, "w_hh has shape"),
        Case("rnn_backward/bs_zero", b(batch_sizes=torch.tensor([3, 2, 1, 0, 0])), RuntimeError, "positive"),
    ]


# The reference backend ("torch") is plain torch ops: it cannot index out of bounds, so its contract
# functions carry no launcher checks (its own errors are torch's); the contract cases cover the others.
def _rnn_cases(backend):
    return (_module_cases(backend) + _functional_cases(backend) + _op_cases(backend)
            + (_contract_rnn_cases(backend) if backend != "torch" else []))


# ---- attention ---------------------------------------------------------------------------------------

def _sdpa_user_cases(backend):
    import torch.nn.functional as F
    sdpa = fastrnn.scaled_dot_product_attention
    q, k, v = r(2, 3, 4, 8), r(2, 3, 5, 8), r(2, 3, 5, 6)
    q3, k3, v3 = q[0], k[0], v[0]   # 3-D: torch's math path, where torch checks mask + is_causal

    def matches_torch(fn_fast, fn_torch, grads=()):
        def run():
            out, ref = fn_fast(), fn_torch()
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            if grads:
                g = torch.randn_like(ref)
                got = torch.autograd.grad(out, grads, g)
                want = torch.autograd.grad(ref, grads, g)
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            return bool(torch.isfinite(out).all())
        return run

    e0 = (r(2, 3, 4, 0), r(2, 3, 5, 0), r(2, 3, 5, 6).requires_grad_())
    e00 = (r(2, 4, 0), r(2, 5, 0), r(2, 5, 0))
    mask = torch.rand(4, 5) > 0.3
    return [
        # E = 0: torch returns the mean of v over the keys (all scores are 0), not a ZeroDivisionError
        Case("user/E0", matches_torch(lambda: sdpa(*e0, backend=backend), lambda: F.scaled_dot_product_attention(*e0),
                                      grads=(e0[2],)), None),
        Case("user/E0_Ev0", matches_torch(lambda: sdpa(*e00, backend=backend),
                                          lambda: F.scaled_dot_product_attention(*e00)), None),
        Case("user/E0_masked", matches_torch(lambda: sdpa(*e0, attn_mask=mask, backend=backend),
                                             lambda: F.scaled_dot_product_attention(*e0, attn_mask=mask)), None),
        # NaN and negative dropout_p: no dropout, as torch's math path (3-D inputs here)
        Case("user/dropout_nan", matches_torch(lambda: sdpa(q3, k3, v3, dropout_p=float("nan"), backend=backend),
                                               lambda: F.scaled_dot_product_attention(q3, k3, v3,
                                                                                      dropout_p=float("nan"))), None),
        Case("user/dropout_negative", matches_torch(lambda: sdpa(q3, k3, v3, dropout_p=-0.5, backend=backend),
                                                    lambda: F.scaled_dot_product_attention(q3, k3, v3, dropout_p=-0.5)),
             None),
        Case("user/dropout_inf", lambda: sdpa(q, k, v, dropout_p=float("inf"), backend=backend), RuntimeError,
             "dropout probability has to be between 0 and 1",
             lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=float("inf"))),
        Case("user/bool_mask_and_causal", lambda: sdpa(q3, k3, v3, attn_mask=mask, is_causal=True, backend=backend),
             RuntimeError, "Explicit attn_mask should not be set when is_causal=True",
             lambda: F.scaled_dot_product_attention(q3, k3, v3, attn_mask=mask, is_causal=True)),
        Case("user/float_mask_and_causal",
             lambda: sdpa(q3, k3, v3, attn_mask=mask.float(), is_causal=True, backend=backend), RuntimeError,
             "Explicit attn_mask should not be set when is_causal=True",
             lambda: F.scaled_dot_product_attention(q3, k3, v3, attn_mask=mask.float(), is_causal=True)),
        # torch 2.13 accepts a meta mask with CPU q (and returns uninitialised memory); fastrnn refuses
        Case("user/mask_meta", lambda: sdpa(q, k, v, attn_mask=torch.empty(4, 5, device="meta"), backend=backend),
             RuntimeError, "attn_mask"),
        Case("user/mask_shape", lambda: sdpa(q, k, v, attn_mask=torch.ones(4, 4, dtype=torch.bool), backend=backend),
             RuntimeError, "does not broadcast", lambda: F.scaled_dot_product_attention(
                 q, k, v, attn_mask=torch.ones(4, 4, dtype=torch.bool))),
        Case("user/value_meta", lambda: sdpa(q, k, torch.empty(2, 3, 5, 6, device="meta"), backend=backend),
             RuntimeError, "same device"),
    ]


def _sdpa_op_cases(backend):
    ops = torch.ops.fastrnn
    N, Nk, L, S, E, Ev = 4, 2, 5, 7, 3, 4
    base = dict(backend=backend, q=r(N, L, E), k=r(Nk, S, E), v=r(Nk, S, Ev), bias=r(2, L, S),
                rows=torch.tensor([0, 1, 1, 0]), scale=0.4, causal=False, dropout_p=0.0, seed=None)
    bwd = dict(base, grad_out=r(N, L, Ev), out=r(N, L, Ev), lse=r(N, L), needs=[True, True, True, False])
    cases = []
    for name, op, args in (("sdpa", ops.sdpa, base), ("sdpa_fwd", ops.sdpa_fwd, base), ("sdpa_bwd", ops.sdpa_bwd, bwd)):
        def add(case, exc, fragment, _name=name, _op=op, _args=args, **changes):
            cases.append(Case(f"{_name}/{case}", _op_call(_op, _args, **changes), exc, fragment))

        # the reported crash (cpp and numba SIGSEGV)
        add("rows_out_of_range", RuntimeError, "rows must index the mask's Nm = 2 rows",
            rows=torch.tensor([0, 1, 1000000, 0]))
        add("rows_negative", RuntimeError, "got values in [-1, 1]", rows=torch.tensor([0, 1, -1, 0]))
        add("rows_length", RuntimeError, "rows has shape [3]", rows=torch.tensor([0, 1, 1]))
        add("rows_int32", RuntimeError, "rows must be int64", rows=torch.tensor([0, 1, 1, 0], dtype=torch.int32))
        add("rows_without_bias", RuntimeError, "only one of them", bias=None)
        add("bias_shape", RuntimeError, "bias has shape [2, 5, 6]", bias=r(2, L, S - 1))
        add("bias_2d", RuntimeError, "bias must be 3-D", bias=r(L, S))
        add("bias_stride", RuntimeError, "stride 0 or 1 along S", bias=r(2, S, L).transpose(1, 2))
        add("bias_dtype", RuntimeError, "bias has dtype torch.float64", bias=r(2, L, S, dtype=torch.float64))
        add("N_not_multiple", RuntimeError, "multiple of the key/value rows", q=r(3, L, E),
            rows=torch.tensor([0, 1, 1]))
        add("k_E", RuntimeError, "k has shape", k=r(Nk, S, E + 1))
        add("v_S", RuntimeError, "v has shape", v=r(Nk, S + 1, Ev))
        add("v_dtype", RuntimeError, "v has dtype", v=r(Nk, S, Ev, dtype=torch.float64))
        add("q_int", RuntimeError, "floating-point", q=torch.ones(N, L, E, dtype=torch.long))
        add("q_2d", RuntimeError, "q must be 3-D", q=r(N * L, E))
        add("dropout_one", RuntimeError, "dropout_p must be in [0, 1)", dropout_p=1.0)
        add("dropout_nan", RuntimeError, "dropout_p must be in [0, 1)", dropout_p=float("nan"))
        add("seed_float", RuntimeError, "seed must be a one-element integer tensor", seed=torch.tensor(1.5))
        cases.append(Case(f"{name}/k_other_device", _op_call(_real_kernel(op), args,
                                                             k=torch.empty(Nk, S, E, device="meta")),
                          RuntimeError, "k is on meta"))
    add_b = lambda case, frag, **ch: cases.append(  # noqa: E731
        Case(f"sdpa_bwd/{case}", _op_call(ops.sdpa_bwd, bwd, **ch), RuntimeError, frag))
    add_b("lse_shape", "lse has shape", lse=r(N, L + 1))
    add_b("out_shape", "out has shape", out=r(N, L, Ev + 1))
    add_b("grad_out_dtype", "grad_out has dtype", grad_out=r(N, L, Ev, dtype=torch.float64))
    add_b("needs", "needs has 2 flags", needs=[True, True])
    return cases


def _sdpa_contract_cases(backend):
    from fastrnn.contract.sdpa import SdpaMask
    impl = fastrnn.backends.load(backend, "sdpa")
    N, Nk, L, S, E, Ev = 4, 2, 5, 7, 3, 4
    fwd = dict(q=r(N, L, E), k=r(Nk, S, E), v=r(Nk, S, Ev), mask=SdpaMask(r(2, L, S), torch.tensor([0, 1, 1, 0])),
               scale=0.4, causal=False, dropout_p=0.0, seed=0)
    bwd = dict(fwd, grad_out=r(N, L, Ev), out=r(N, L, Ev), lse=r(N, L))

    def f(**changes):
        a = dict(fwd, **changes)
        return lambda: impl.sdpa_forward(**a)

    def b(**changes):
        a = dict(bwd, **changes)
        return lambda: impl.sdpa_backward(**a)

    return [
        Case("sdpa_forward/rows_out_of_range", f(mask=SdpaMask(r(2, L, S), torch.tensor([0, 1, 99, 0]))),
             RuntimeError, "rows must index"),
        Case("sdpa_backward/rows_out_of_range", b(mask=SdpaMask(r(2, L, S), torch.tensor([0, -3, 1, 0]))),
             RuntimeError, "rows must index"),
        Case("sdpa_forward/q_not_contiguous", f(q=r(N, E, L).transpose(1, 2)), RuntimeError, "q must be contiguous"),
        Case("sdpa_forward/q_expanded", f(q=r(1, L, E).expand(N, L, E)), RuntimeError, "q must be contiguous"),
        Case("sdpa_forward/Nk_zero", f(k=r(0, S, E), v=r(0, S, Ev), mask=None), RuntimeError, "multiple"),
        Case("sdpa_forward/bias_stride", f(mask=SdpaMask(r(2, S, L).transpose(1, 2), torch.tensor([0, 1, 1, 0]))),
             RuntimeError, "stride 0 or 1 along S"),
        Case("sdpa_forward/dropout_one", f(dropout_p=1.0), RuntimeError, "dropout_p"),
        Case("sdpa_forward/v_Nk", f(v=r(Nk + 1, S, Ev)), RuntimeError, "v has shape"),
        Case("sdpa_backward/lse_shape", b(lse=r(N, L - 1)), RuntimeError, "lse has shape"),
        Case("sdpa_backward/out_not_contiguous", b(out=r(N, Ev, L).transpose(1, 2)), RuntimeError,
             "out must be contiguous"),
    ]


def _sdpa_cases(backend):
    return (_sdpa_user_cases(backend) + _sdpa_op_cases(backend)
            + (_sdpa_contract_cases(backend) if backend != "torch" else []))


# ---- the raw C++ extension functions -----------------------------------------------------------------

def _cpp_cases(_backend):
    from fastrnn import _C_rnn, _C_sdpa
    G = 4 * H
    fwd = dict(cell=0, xw=r(T, B, G), w_hh=r(G, H), b_hh=r(G), h0=r(B, H), c0=r(B, H), w_hr=None, batch_sizes=None,
               reverse=False, training=True)
    saved = [r(T, B, H), r(T, B, G), r(T, B, H)]
    bwd = dict(cell=0, grad_h_seq=r(T, B, H), grad_h_T=r(B, H), grad_c_T=r(B, H), w_hh=r(G, H), w_hr=None,
               h0=r(B, H), c0=r(B, H), batch_sizes=None, reverse=False, saved=saved)
    no_variant = dict(ln_w=None, ln_b=None, lnc_w=None, lnc_b=None, peep=None, mask=None, zh=None, zc=None,
                      reset=None, reset_after=True)

    def call(fn, base, **changes):
        a = dict(base, **changes)
        return lambda: fn(*a.values())

    def f(**ch):
        return call(_C_rnn.rnn_forward, fwd, **ch)

    def b(**ch):
        return call(_C_rnn.rnn_backward, bwd, **ch)

    N, Nk, L, S, E, Ev = 4, 2, 5, 7, 3, 4
    sd = dict(q=r(N, L, E), k=r(Nk, S, E), v=r(Nk, S, Ev), bias=r(2, L, S), rows=torch.tensor([0, 1, 1, 0]),
              scale=0.4, causal=False, dropout_p=0.0, seed=0, block_l=64, block_s=64)
    sb = dict(grad_out=r(N, L, Ev), q=sd["q"], k=sd["k"], v=sd["v"], out=r(N, L, Ev), lse=r(N, L), bias=sd["bias"],
              rows=sd["rows"], scale=0.4, causal=False, dropout_p=0.0, seed=0, block_l=64, block_s=64)

    def s(**ch):
        return call(_C_sdpa.sdpa_forward, sd, **ch)

    def sbw(**ch):
        return call(_C_sdpa.sdpa_backward, sb, **ch)

    RE = RuntimeError
    return [
        # the reported crash: h0 of 2 rows for 3 (SIGSEGV)
        Case("rnn_forward/h0_batch", f(h0=r(2, H)), RE, "h0 has shape [2, 6], expected [3, 6]"),
        Case("rnn_forward/cell_code", f(cell=7), RE, "unknown cell code 7"),
        Case("rnn_forward/xw_2d", f(xw=r(T * B, G)), RE, "xw must be 3-D"),
        Case("rnn_forward/xw_G", f(xw=r(T, B, G - 4)), RE, "xw has shape"),
        Case("rnn_forward/w_hh_cols", f(w_hh=r(G, 2)), RE, "without w_hr"),
        Case("rnn_forward/b_hh_len", f(b_hh=r(G - 1)), RE, "b_hh has shape"),
        Case("rnn_forward/c0_missing", f(c0=None), RE, "LSTM needs c0"),
        Case("rnn_forward/c0_batch", f(c0=r(B + 1, H)), RE, "c0 has shape"),
        Case("rnn_forward/w_hr_gru", f(cell=1, xw=r(T, B, 3 * H), w_hh=r(3 * H, P), b_hh=r(3 * H), h0=r(B, P),
                                       w_hr=r(P, H)), RE, "LSTM option"),
        Case("rnn_forward/w_hr_shape", f(w_hh=r(G, P), h0=r(B, P), w_hr=r(P + 1, H)), RE, "w_hr has shape"),
        Case("rnn_forward/bs_increasing", f(batch_sizes=torch.tensor([1, 2, 3, 3, 3])), RE, "non-increasing"),
        Case("rnn_forward/bs_above_B", f(batch_sizes=torch.tensor([9, 3, 3, 3, 3])), RE, "in [0, B = 3]"),
        Case("rnn_forward/bs_negative", f(batch_sizes=torch.tensor([3, 3, -1, -1, -1])), RE, "batch_sizes[2] = -1"),
        Case("rnn_forward/bs_length", f(batch_sizes=torch.tensor([3, 3])), RE, "one entry per time step"),
        Case("rnn_forward/bs_int32", f(batch_sizes=torch.tensor([3, 3, 2, 1, 1], dtype=torch.int32)), RE, "int64"),
        Case("rnn_forward/bs_meta", f(batch_sizes=torch.empty(T, dtype=torch.int64, device="meta")), RE, "CPU"),
        Case("rnn_forward/bs_2d", f(batch_sizes=torch.tensor([[3, 3, 2, 1, 1]])), RE, "1-D"),
        Case("rnn_forward/h0_transposed", f(h0=r(H, B).t()), RE, "contiguous"),
        Case("rnn_forward/xw_meta", f(xw=torch.empty(T, B, G, device="meta")), RE, "CPU"),
        Case("rnn_forward/h0_dtype", f(h0=r(B, H, dtype=torch.float64)), RE, "every tensor must be"),
        Case("rnn_forward/int", f(xw=torch.ones(T, B, G, dtype=torch.long)), RE, "float32 or float64"),
        Case("rnn_backward/saved_empty", b(saved=[]), RE, "saved by a training forward"),
        Case("rnn_backward/saved_count", b(saved=saved[:2]), RE, "saved holds 2 tensors, expected 3"),
        Case("rnn_backward/saved_shape", b(saved=[saved[0], r(T, B, G - 1), saved[2]]), RE, "saved[1] has shape"),
        Case("rnn_backward/saved_dtype", b(saved=[saved[0], saved[1], saved[2].double()]), RE, "saved[2] must be"),
        Case("rnn_backward/saved_strided", b(saved=[saved[0], r(T, G, B).transpose(1, 2), saved[2]]), RE,
             "saved[1] must be a contiguous"),
        Case("rnn_backward/grad_c_T_missing", b(grad_c_T=None), RE, "needs grad_c_T"),
        Case("rnn_backward/grad_h_seq", b(grad_h_seq=r(T, B, H + 1)), RE, "grad_h_seq has shape"),
        Case("rnn_backward/h_seq_T", b(saved=[r(T + 1, B, H), saved[1], saved[2]]), RE, "grad_h_seq has shape"),
        Case("rnn_backward/bs_increasing", b(batch_sizes=torch.tensor([1, 3, 3, 3, 3])), RE, "non-increasing"),
        Case("rnn_forward_variant/zoneout_numel", call(_C_rnn.rnn_forward_variant, dict(
            fwd, **dict(no_variant, zh=r(T, B, H - 1), zc=r(T, B, H)))), RE, "zoneout_h has"),
        Case("rnn_forward_variant/reset_dtype", call(_C_rnn.rnn_forward_variant, dict(
            fwd, **dict(no_variant, reset=torch.zeros(T, B)))), RE, "reset must be"),
        Case("rnn_backward_variant/ln_saved", call(_C_rnn.rnn_backward_variant, dict(
            bwd, **dict(no_variant, ln_w=r(G), ln_b=r(G)))), RE, "saved holds 3 tensors, expected 5"),
        Case("linear/bias", lambda: _C_rnn.linear(r(7, I), r(G, I), r(G - 1)), RE, "linear: b"),
        Case("mm/shapes", lambda: _C_rnn.mm(r(7, I), r(I + 1, G)), RE, "mm: shape"),
        # the reported crash: out-of-range mask rows (SIGSEGV)
        Case("sdpa_forward/rows_out_of_range", s(rows=torch.tensor([0, 1, 1000000, 0])), RE, "out of range"),
        Case("sdpa_forward/rows_negative", s(rows=torch.tensor([0, -1, 1, 0])), RE, "rows[1] = -1"),
        Case("sdpa_forward/rows_meta", s(rows=torch.empty(N, dtype=torch.int64, device="meta")), RE, "rows must be"),
        Case("sdpa_forward/L0", s(q=r(N, 0, E), bias=None, rows=None), RE, "L and S must be positive"),
        Case("sdpa_forward/S0", s(k=r(Nk, 0, E), v=r(Nk, 0, Ev), bias=None, rows=None), RE,
             "L and S must be positive"),
        Case("sdpa_forward/dropout_nan", s(dropout_p=float("nan")), RE, "dropout_p must be in [0, 1)"),
        Case("sdpa_forward/dropout_negative", s(dropout_p=-0.5), RE, "dropout_p must be in [0, 1)"),
        Case("sdpa_forward/bias_empty", s(bias=r(0, L, S)), RE, "Nm >= 1"),
        Case("sdpa_forward/bias_meta", s(bias=torch.empty(2, L, S, device="meta")), RE, "bias must be on the CPU"),
        Case("sdpa_forward/k_meta", s(k=torch.empty(Nk, S, E, device="meta")), RE, "runs on CPU"),
        Case("sdpa_forward/N_multiple", s(k=r(3, S, E), v=r(3, S, Ev)), RE, "multiple of Nk"),
        Case("sdpa_backward/lse_dtype", sbw(lse=r(N, L, dtype=torch.float64)), RE, "q's dtype"),
        Case("sdpa_backward/grad_out_shape", sbw(grad_out=r(N, L, Ev + 1)), RE, "shapes"),
        Case("sdpa_backward/out_meta", sbw(out=torch.empty(N, L, Ev, device="meta")), RE, "must be on the CPU"),
    ]


CASES = {"rnn": _rnn_cases, "sdpa": _sdpa_cases, "cpp_raw": _cpp_cases}


# ---- the parent side ---------------------------------------------------------------------------------

def _run_child(family, backend):
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_bad_inputs as t; "
            f"t._child({family!r}, {backend!r})")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    lines = proc.stdout.splitlines()
    started = [ln[6:] for ln in lines if ln.startswith("start ")]
    failed = [ln for ln in lines if ln.startswith("FAIL ")]
    passed = [ln for ln in lines if ln.startswith("ok ")]
    where = f"{family}/{backend}"
    assert proc.returncode == 0, (f"{where}: the child exited with {proc.returncode} (a crash kills it: negative = "
                                  f"signal) during case {started[-1] if started else '?'}\n{proc.stderr[-3000:]}")
    assert lines and lines[-1].startswith("done "), f"{where}: the child did not finish\n{proc.stderr[-3000:]}"
    n = int(lines[-1].split()[1])
    assert not failed, f"{where}: {len(failed)} of {n} cases failed:\n" + "\n".join(failed)
    assert len(passed) == n > 0, f"{where}: {len(passed)} of {n} cases reported"


@pytest.mark.parametrize("backend", RNN_BACKENDS)
def test_recurrence_bad_inputs(backend):
    """Modules, functional, torch.ops.fastrnn.rnn_layer*, and the backend contract."""
    _run_child("rnn", backend)


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
def test_attention_bad_inputs(backend):
    """scaled_dot_product_attention, torch.ops.fastrnn.sdpa*, and the backend contract."""
    _run_child("sdpa", backend)


@pytest.mark.skipif("cpp" not in RNN_BACKENDS or "cpp" not in SDPA_BACKENDS, reason="C++ extension not built")
def test_cpp_extension_bad_inputs():
    """fastrnn._C_rnn / fastrnn._C_sdpa called directly: TORCH_CHECK, never a crash."""
    _run_child("cpp_raw", "cpp")
