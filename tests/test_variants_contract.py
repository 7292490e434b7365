"""Variants (docs/variants.md) at the contract level: one layer, one direction.

1. The reference's hand-written backward equals torch.autograd through the reference's own
   forward (float64), including the derived dW_hh / db_hh the op code forms.
2. Every backend against the reference: outputs, final states, every gradient including
   ``VariantGrads``, inactive rows zero, ``saved`` matching the backend's saved layout;
   float32 and float64, padded and packed, forward and reverse.
3. NaN in ``xw`` propagates like the reference; inference (training=False) saves nothing.
"""

import pytest
import torch

from fastrnn import backends
from fastrnn.contract import rnn as recurrence
from fastrnn.contract.rnn import GATES, Variant, VariantGrads
from fastrnn.testing import assert_close

from conftest import rnn_backends
from contract_harness import GRAD_NAMES, P_ZONE, PROJ, compare, make_case, run, weight_grads

T, B = 7, 5

# (id, cell, proj, options); options as in tests/contract_harness.py
VARIANTS = [
    ("lstm-ln", "lstm", 0, {"ln"}),
    ("lstm-peephole", "lstm", 0, {"peephole"}),
    ("lstm-dropout", "lstm", 0, {"dropout"}),
    ("lstm-zoneout", "lstm", 0, {"zoneout"}),
    ("lstm-zoneout_p", "lstm", 0, {"zoneout_p"}),
    ("lstm-reset", "lstm", 0, {"reset"}),
    ("lstm-all", "lstm", 0, {"ln", "peephole", "dropout", "zoneout", "reset"}),
    ("lstm-all-proj", "lstm", PROJ, {"ln", "peephole", "dropout", "zoneout", "reset"}),
    ("lstm-peephole-zoneout-proj-nobias", "lstm", PROJ, {"peephole", "zoneout", "nobias"}),
    ("gru-ln", "gru", 0, {"ln"}),
    ("gru-dropout", "gru", 0, {"dropout"}),
    ("gru-zoneout", "gru", 0, {"zoneout"}),
    ("gru-reset", "gru", 0, {"reset"}),
    ("gru-before", "gru", 0, {"before"}),
    ("gru-ln-zoneout-reset-dropout", "gru", 0, {"ln", "zoneout", "reset", "dropout"}),
    ("gru-before-zoneout-dropout-reset", "gru", 0, {"before", "zoneout", "dropout", "reset"}),
    ("gru-before-nobias", "gru", 0, {"before", "nobias"}),
    ("rnn_tanh-ln", "rnn_tanh", 0, {"ln"}),
    ("rnn_tanh-zoneout", "rnn_tanh", 0, {"zoneout"}),
    ("rnn_tanh-reset-dropout", "rnn_tanh", 0, {"reset", "dropout"}),
    ("rnn_tanh-ln-zoneout-reset-dropout", "rnn_tanh", 0, {"ln", "zoneout", "reset", "dropout"}),
    ("rnn_relu-ln-zoneout-reset-dropout", "rnn_relu", 0, {"ln", "zoneout", "reset", "dropout"}),
    ("rnn_relu-zoneout_p", "rnn_relu", 0, {"zoneout_p"}),
]
VARIANT_PARAMS = [pytest.param(cell, proj, opts, id=vid) for vid, cell, proj, opts in VARIANTS]
LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]  # (packed, reverse)
LAYOUT_IDS = ["padded-fwd", "packed-fwd", "padded-rev", "packed-rev"]


# -------------------------------------------------------------------------------------------
# 1. The reference's backward is the gradient of the reference's forward
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("packed,reverse", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("cell,proj,opts", VARIANT_PARAMS)
def test_reference_backward_is_autograd(cell, proj, opts, packed, reverse):
    ref = backends.load("torch", "rnn")
    args, variant, grads, _ = make_case(cell, proj, opts, packed, reverse, torch.float64)
    expected = run(ref, cell, args, variant, grads, reverse)

    # autograd through the same forward, on leaf copies of every differentiable input
    leaves = {k: x.clone().requires_grad_() for k, x in args.items()
              if isinstance(x, torch.Tensor) and x.is_floating_point()}
    params = {k: x.clone().requires_grad_() for k, x in variant._asdict().items()
              if k.startswith("ln_") or k == "peephole" if x is not None}
    a = {**args, **leaves}
    h_seq, h_T, c_T, _ = ref.rnn_forward(cell, a["xw"], a["w_hh"], a["b_hh"], a["h0"], a["c0"], a["w_hr"],
                                         a["batch_sizes"], reverse, True, variant=variant._replace(**params))
    loss = (h_seq * grads["grad_h_seq"]).sum() + (h_T * grads["grad_h_T"]).sum()
    if cell == "lstm":
        loss = loss + (c_T * grads["grad_c_T"]).sum()
    names = list(leaves) + list(params)
    auto = dict(zip(names, torch.autograd.grad(loss, [leaves.get(n, params.get(n)) for n in names])))

    for name, exp in (("h_seq", h_seq), ("h_T", h_T), ("c_T", c_T)):
        assert_close(expected[name], None if exp is None else exp.detach(), f"forward/{name}")
    assert_close(expected["grad_xw"], auto["xw"], "grad_xw", grad=True)
    assert_close(expected["grad_h0"], auto["h0"], "grad_h0", grad=True)
    assert_close(expected["grad_c0"], auto.get("c0"), "grad_c0", grad=True)
    for k in params:
        assert_close(expected[f"vgrad_{k}"], auto[k], f"VariantGrads.{k}", grad=True)
    for k in set(VariantGrads._fields) - set(params):
        assert expected[f"vgrad_{k}"] is None, f"VariantGrads.{k} set for an option that is off"

    # what the op code derives: dW_hh = grad_hw^T h_in (GRU reset_after=False: rows 2H:3H from
    # r * h_in); db_hh = sum(grad_hw), or VariantGrads.ln_hh_bias with layer norm; dW_hr from grad_hproj
    derived = weight_grads(cell, args, variant, expected, reverse)
    assert_close(derived["grad_w_hh"], auto["w_hh"], "dW_hh", grad=True)
    assert_close(derived["grad_w_hr"], auto.get("w_hr"), "dW_hr", grad=True)
    if args["b_hh"] is not None:
        assert_close(derived["grad_b_hh"], auto["b_hh"], "db_hh", grad=True)


def test_reference_variant_none_is_plain():
    """variant=None and Variant() (every option off) give the plain results, bit for bit."""
    ref = backends.load("torch", "rnn")
    for cell in ("lstm", "gru", "rnn_relu"):
        args, _, grads, _ = make_case(cell, 0, set(), True, True, torch.float32)
        plain, empty = (run(ref, cell, args, v, grads, True) for v in (None, Variant()))
        for name in ("h_seq", "h_T", "c_T") + GRAD_NAMES:
            assert (plain[name] is None and empty[name] is None) or torch.equal(plain[name], empty[name]), name


@pytest.mark.parametrize("cell,kw", [("gru", dict(reset_after=False, ln_hh_weight=1, ln_hh_bias=1)),
                                     ("lstm", dict(reset_after=False)),
                                     ("gru", dict(peephole=1)),
                                     ("lstm", dict(zoneout_h=1)),
                                     ("lstm", dict(ln_c_weight=1, ln_c_bias=1)),
                                     ("rnn_tanh", dict(ln_hh_weight=1))])
def test_reference_rejects_unsupported_combinations(cell, kw):
    ref = backends.load("torch", "rnn")
    args, _, _, _ = make_case(cell, 0, set(), False, False, torch.float64)
    kw = {k: (v if isinstance(v, bool) else torch.ones(1)) for k, v in kw.items()}
    with pytest.raises(ValueError):
        run(ref, cell, args, Variant(**kw), None, False, training=False)


# -------------------------------------------------------------------------------------------
# 2. Every backend against the reference
# -------------------------------------------------------------------------------------------

def backend_params():
    """Backend x layout x dtype. Triton runs under the interpreter (slow): padded-forward in
    float32 and packed-reverse in float64, which together cover both dtypes, packing and
    reversal (the other pairings run the same kernel code)."""
    out = []
    for backend in rnn_backends():
        for (packed, reverse), lid in zip(LAYOUTS, LAYOUT_IDS):
            for dtype, did in ((torch.float32, "f32"), (torch.float64, "f64")):
                if backend == "triton" and (lid, did) not in (("padded-fwd", "f32"), ("packed-rev", "f64")):
                    continue
                out.append(pytest.param(backend, packed, reverse, dtype, id=f"{backend}-{lid}-{did}"))
    return out


def expected_layout(impl, cell, args, variant, dtype, training):
    layout = getattr(impl, "saved_layout", recurrence.saved_layout)
    Hr = args["h0"].shape[-1]
    H = args["w_hh"].shape[0] // GATES[cell]
    return [(tuple(e.shape), e.dtype) for e in
            layout(cell, T, B, H, Hr, dtype, args["w_hr"] is not None, training, variant)]


@pytest.mark.parametrize("backend,packed,reverse,dtype", backend_params())
@pytest.mark.parametrize("cell,proj,opts", VARIANT_PARAMS)
def test_backend_vs_ref(backend, cell, proj, opts, packed, reverse, dtype):
    args, variant, grads, active = make_case(cell, proj, opts, packed, reverse, dtype)
    expected = run(backends.load("torch", "rnn"), cell, args, variant, grads, reverse)
    impl = backends.load(backend, "rnn")
    actual = run(impl, cell, args, variant, grads, reverse)

    saved = [(tuple(s.shape), s.dtype) for s in actual["saved"]]
    assert saved == expected_layout(impl, cell, args, variant, dtype, True), f"{backend}: saved layout"
    compare(actual, expected, active, f"{backend}/{cell}")


@pytest.mark.parametrize("backend", rnn_backends())
@pytest.mark.parametrize("cell,proj,opts", [p for p in VARIANT_PARAMS if p.id in
                                            ("lstm-all-proj", "gru-ln-zoneout-reset-dropout",
                                             "gru-before-zoneout-dropout-reset", "rnn_relu-zoneout_p")])
def test_inference(backend, cell, proj, opts):
    """training=False: the same outputs, nothing saved (eval: zoneout as the probability)."""
    args, variant, _, _ = make_case(cell, proj, opts, True, True, torch.float32)
    if "zoneout" in opts:  # eval passes p, not draws, and no dropout mask
        variant = variant._replace(zoneout_h=torch.full_like(variant.zoneout_h, P_ZONE), rec_mask=None,
                                   zoneout_c=None if variant.zoneout_c is None
                                   else torch.full_like(variant.zoneout_c, P_ZONE))
    expected = run(backends.load("torch", "rnn"), cell, args, variant, None, True, training=False)
    actual = run(backends.load(backend, "rnn"), cell, args, variant, None, True, training=False)
    for name in ("h_seq", "h_T", "c_T"):
        assert_close(actual[name], expected[name], f"{backend}/{cell}/{name}")
    assert len(actual["saved"]) == 0


# -------------------------------------------------------------------------------------------
# 3. NaN propagates like the reference
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", rnn_backends())
@pytest.mark.parametrize("cell,proj,opts", [p for p in VARIANT_PARAMS if p.id in
                                            ("lstm-all-proj", "gru-ln-zoneout-reset-dropout",
                                             "gru-before-zoneout-dropout-reset",
                                             "rnn_tanh-ln-zoneout-reset-dropout")])
def test_nan_propagates_like_ref(backend, cell, proj, opts):
    """A NaN in one gate of one row: the same NaN pattern (and the same finite values) in the
    outputs, final states and every gradient; rows that never see it stay finite."""
    args, variant, grads, _ = make_case(cell, proj, opts, False, False, torch.float64)
    args["xw"][2, 1, 0] = float("nan")
    expected = run(backends.load("torch", "rnn"), cell, args, variant, grads, False)
    actual = run(backends.load(backend, "rnn"), cell, args, variant, grads, False)
    assert expected["h_seq"][2:, 1].isnan().any() and expected["h_seq"][:, [0, 2, 3, 4]].isfinite().all()
    assert expected["grad_xw"][:, [0, 2, 3, 4]].isfinite().all()
    expected.pop("saved"), actual.pop("saved")
    for name, exp in expected.items():
        assert_close(actual[name], exp, f"{backend}/{cell}/{name}", grad=name.startswith(("grad", "vgrad")))
