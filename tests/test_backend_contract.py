"""Every backend against the reference at the contract level (one layer, one direction), plain
cell: outputs, final states and every gradient, on odd sizes, packed and reverse, float32 and
float64 (harness: tests/contract_harness.py; the variants: tests/test_variants_contract.py)."""
import pytest
import torch

from fastrnn import backends
from fastrnn.testing import assert_close

from conftest import rnn_backends
from contract_harness import PROJ, compare, make_case, run

CASES = [
    pytest.param(cell, proj, id=f"{cell}{'-proj' if proj else ''}")
    for cell, proj in [("lstm", 0), ("lstm", PROJ), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0)]
]


@pytest.mark.parametrize("backend", rnn_backends())
@pytest.mark.parametrize("cell,proj", CASES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_reference(backend, cell, proj, packed, reverse, dtype):
    args, variant, grads, active = make_case(cell, proj, set(), packed, reverse, dtype)
    expected = run(backends.load("torch", "rnn"), cell, args, variant, grads, reverse)
    actual = run(backends.load(backend, "rnn"), cell, args, variant, grads, reverse)
    compare(actual, expected, active, f"{backend}/{cell}")


@pytest.mark.parametrize("backend", rnn_backends())
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_no_bias_and_inference_mode(backend, cell):
    """b_hh=None, and training=False returns the same outputs with nothing saved."""
    args, variant, _, _ = make_case(cell, 0, {"nobias"}, dtype=torch.float32)
    ref = run(backends.load("torch", "rnn"), cell, args, variant, None, False, training=False)
    out = run(backends.load(backend, "rnn"), cell, args, variant, None, False, training=False)
    for name in ("h_seq", "h_T", "c_T"):
        assert_close(out[name], ref[name], f"{backend}/{cell}/{name}")
    assert len(out["saved"]) == 0
