"""The one harness of the contract-level tests: build a case, run a backend, compare every output
and gradient with the reference (``fastrnn/backends/reference_rnn.py``).

A case is one layer and one direction: ``make_case`` draws fresh random contract arguments
(never zeros), a ``Variant`` (None for the plain cell: the contract's one plain form), the output
gradients (zero on rows past ``batch_sizes``, as the op layer passes them) and the ``[T, B, 1]``
active mask. ``run`` calls ``rnn_forward`` then ``rnn_backward`` on clones and names every result;
``compare`` checks a backend's results against the reference's with the project's tolerances
(``fastrnn.testing``), inactive rows zero.

Options (``opts``): ln (hidden-product layer norm; LSTM also the cell state), peephole, dropout
(rec_mask), zoneout (0/1 draws as in training), zoneout_p (the probability, as in eval), reset,
before (GRU reset_after=False), nobias (b_hh None).
"""
from __future__ import annotations

import torch

from fastrnn.contract.rnn import GATES, Variant, VariantGrads, by_name, packed_mask, recurrent_inputs, saved_layout
from fastrnn.testing import assert_close

T, B, H, PROJ = 7, 5, 6, 3
BATCH_SIZES = torch.tensor([5, 5, 4, 3, 3, 2, 1])
P_DROP, P_ZONE = 0.3, 0.25
GRAD_NAMES = ("grad_xw", "grad_hw", "grad_h0", "grad_c0", "grad_hproj")


def lengths(batch_sizes=BATCH_SIZES, B=B):
    return (batch_sizes.unsqueeze(1) > torch.arange(B).unsqueeze(0)).sum(0)  # [B] steps per row


def make_case(cell, proj=0, opts=frozenset(), packed=False, reverse=False, dtype=torch.float64, device="cpu"):
    """``(args, variant, grads, active)``: contract arguments by name, the Variant (None when
    ``opts`` holds no variant option), output gradients, the active mask [T, B, 1]."""
    G, Hr = GATES[cell] * H, proj or H
    batch_sizes = BATCH_SIZES.clone()
    r = lambda *s, scale=1.0: torch.randn(*s, dtype=dtype) * scale  # noqa: E731
    args = dict(xw=r(T, B, G), w_hh=r(G, Hr, scale=0.4), b_hh=None if "nobias" in opts else r(G, scale=0.3),
                h0=r(B, Hr), c0=r(B, H) if cell == "lstm" else None,
                w_hr=r(Hr, H, scale=0.4) if proj else None,
                batch_sizes=batch_sizes if packed else None)
    first = None
    if "reset" in opts:  # a reset at a row's first visited step (a no-op that must stay one)
        first = (lengths(batch_sizes, B) - 1) if (reverse and packed) else torch.full((B,), T - 1 if reverse else 0)
    variant = make_variant(cell, opts, T, B, H, Hr, dtype, reset_first=first, device=device)
    active = (packed_mask(batch_sizes, B, "cpu").unsqueeze(-1) if packed
              else torch.ones(T, B, 1, dtype=torch.bool))
    grads = dict(grad_h_seq=r(T, B, Hr) * active, grad_h_T=r(B, Hr), grad_c_T=r(B, H) if cell == "lstm" else None)
    if device != "cpu":
        move = lambda d: {k: x.to(device) if isinstance(x, torch.Tensor) and k != "batch_sizes" else x  # noqa: E731
                          for k, x in d.items()}
        args, grads, active = move(args), move(grads), active.to(device)
    return args, variant, grads, active


def make_variant(cell, opts, T, B, H, Hr, dtype, reset_first=None, device="cpu"):
    """The Variant of ``opts`` (None when it holds no variant option), fresh random values.
    ``reset_first`` [B]: the step each row visits first; rows 0 and B-1 get a reset there."""
    G = GATES[cell] * H
    r = lambda *s, scale=1.0: (torch.randn(*s, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    v = {}
    if "ln" in opts:
        v.update(ln_hh_weight=1 + r(G, scale=0.3), ln_hh_bias=r(G, scale=0.2))
        if cell == "lstm":
            v.update(ln_c_weight=1 + r(H, scale=0.3), ln_c_bias=r(H, scale=0.2))
    if "peephole" in opts:
        v.update(peephole=r(3, H, scale=0.5))
    if "dropout" in opts:
        # draws through float64 comparisons: bernoulli has no float16 / bfloat16 CPU kernel
        v.update(rec_mask=(torch.rand(B, Hr) < 1 - P_DROP).to(dtype) / (1 - P_DROP))
    if "zoneout" in opts or "zoneout_p" in opts:
        def zone(K):
            return ((torch.rand(T, B, K) < P_ZONE).to(dtype) if "zoneout" in opts
                    else torch.full((T, B, K), P_ZONE, dtype=dtype))
        v.update(zoneout_h=zone(Hr))
        if cell == "lstm":
            v.update(zoneout_c=zone(H))
    if "reset" in opts:
        reset = torch.rand(T, B) < 0.3  # also True on inactive entries: those must be ignored
        for b in (0, B - 1) if reset_first is not None else ():
            reset[reset_first[b], b] = True
        v.update(reset=reset)
    if "before" in opts:
        v.update(reset_after=False)
    if not v:
        return None
    return Variant(**{k: x.to(device) if isinstance(x, torch.Tensor) else x for k, x in v.items()})


def clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


def run(impl, cell, args, variant, grads, reverse, training=True):
    """Forward then backward through a backend module on clones; a dict of named results:
    h_seq, h_T, c_T, saved, the GRAD_NAMES and ``vgrad_<field>`` of VariantGrads."""
    a = {k: clone(x) for k, x in args.items()}
    h_seq, h_T, c_T, saved = impl.rnn_forward(cell, a["xw"], a["w_hh"], a["b_hh"], a["h0"], a["c0"], a["w_hr"],
                                              a["batch_sizes"], reverse, training, variant=variant)
    out = dict(h_seq=h_seq, h_T=h_T, c_T=c_T, saved=saved)
    if not training:
        return out
    back = impl.rnn_backward(cell, grads["grad_h_seq"].clone(), grads["grad_h_T"].clone(), clone(grads["grad_c_T"]),
                             args["w_hh"], args["w_hr"], args["h0"], args["c0"], args["batch_sizes"], reverse,
                             tuple(saved), variant=variant)
    assert len(back) == 6, "rnn_backward must return 6 elements"
    out.update(zip(GRAD_NAMES, back[:5]))
    assert (back[4] is None) == (args["w_hr"] is None), "grad_hproj: exactly when there is a projection"
    if variant is None or variant == Variant():
        assert back[5] is None, "plain cell: the sixth element must be None"
    else:
        assert isinstance(back[5], VariantGrads), "rnn_backward must return VariantGrads"
        out.update({f"vgrad_{k}": g for k, g in back[5]._asdict().items()})
    return out


def weight_grads(cell, args, variant, out, reverse):
    """dW_hh, db_hh and dW_hr as the op layer forms them from a backend's results (the
    contract's division of work; checked against autograd in tests/test_variants_contract.py)."""
    G, Hr = args["w_hh"].shape
    Hc = G // GATES[cell]
    h_in = recurrent_inputs(out["h_seq"], args["h0"], args["batch_sizes"], reverse, variant)
    grad_w_hh = torch.einsum("tbg,tbk->gk", out["grad_hw"], h_in)
    layout = saved_layout(cell, *h_in.shape[:2], Hc, Hr, h_in.dtype, args["w_hr"] is not None, True, variant)
    saved = by_name(layout, out["saved"])
    if variant is not None and not variant.reset_after:  # W_hn multiplies r * h_in
        grad_w_hh[2 * Hc:] = torch.einsum("tbg,tbk->gk", out["grad_hw"][..., 2 * Hc:],
                                          saved["gates"][..., :Hc] * h_in)
    ln_hh = variant is not None and variant.ln_hh_weight is not None
    grad_b_hh = out["vgrad_ln_hh_bias"] if ln_hh else out["grad_hw"].sum((0, 1))
    grad_w_hr = (torch.einsum("tbk,tbh->kh", out["grad_hproj"], saved["hu"].to(out["grad_hproj"].dtype))
                 if args["w_hr"] is not None else None)
    return dict(grad_w_hh=grad_w_hh, grad_b_hh=grad_b_hh, grad_w_hr=grad_w_hr)


def compare(actual, expected, active, what, scale=1.0):
    """Every output and gradient of ``expected`` (a ``run`` dict) in ``actual``, with the
    project's tolerance; rows past batch_sizes exactly zero in h_seq, grad_xw, grad_hw, grad_hproj."""
    for name, exp in expected.items():
        if name == "saved":
            continue
        act = actual[name]
        if name in ("h_seq", "grad_xw", "grad_hw", "grad_hproj") and act is not None:
            assert torch.all(act[~active.expand_as(act)] == 0), f"{what}/{name}: inactive rows not zero"
        assert_close(act, exp, f"{what}/{name}", grad=name.startswith(("grad", "vgrad")), scale=scale)
