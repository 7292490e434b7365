"""Every backend against the reference at the contract level (one layer, one direction):
outputs, final states and every gradient, on odd sizes, packed and reverse, float32 and float64."""
import pytest
import torch

from conftest import rnn_backends
from fastrnn import backends
from fastrnn.ops.recurrence import GATES, packed_mask
from fastrnn.testing import assert_close

T, B, H, PROJ = 7, 5, 6, 3
BATCH_SIZES = torch.tensor([5, 5, 4, 3, 3, 2, 1])

CASES = [
    pytest.param(cell, proj, id=f"{cell}{'-proj' if proj else ''}")
    for cell, proj in [("lstm", 0), ("lstm", PROJ), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0)]
]


def make_case(cell, proj, packed, bias, dtype):
    G, Hr = GATES[cell] * H, proj or H
    r = lambda *s, scale=1.0: (torch.randn(*s, dtype=dtype) * scale)
    case = dict(
        xw=r(T, B, G), w_hh=r(G, Hr, scale=0.4), b_hh=r(G, scale=0.3) if bias else None,
        h0=r(B, Hr), c0=r(B, H) if cell == "lstm" else None,
        w_hr=r(Hr, H, scale=0.4) if proj else None,
        batch_sizes=BATCH_SIZES.clone() if packed else None)
    active = packed_mask(BATCH_SIZES, B, "cpu").unsqueeze(-1) if packed else torch.ones(T, B, 1, dtype=torch.bool)
    grads = dict(grad_h_seq=r(T, B, Hr) * active, grad_h_T=r(B, Hr),
                 grad_c_T=r(B, H) if cell == "lstm" else None)
    return case, grads, active


def run(impl, cell, case, grads, reverse):
    args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    h_seq, h_T, c_T, saved = impl.rnn_forward(cell, args["xw"], args["w_hh"], args["b_hh"], args["h0"],
                                              args["c0"], args["w_hr"], args["batch_sizes"], reverse, True)
    back = impl.rnn_backward(cell, grads["grad_h_seq"].clone(), grads["grad_h_T"].clone(),
                             None if grads["grad_c_T"] is None else grads["grad_c_T"].clone(),
                             case["w_hh"], case["w_hr"], case["h0"], case["c0"], case["batch_sizes"],
                             reverse, saved)
    return dict(h_seq=h_seq, h_T=h_T, c_T=c_T, grad_xw=back[0], grad_hw=back[1], grad_h0=back[2],
                grad_c0=back[3], grad_w_hr=back[4])


@pytest.mark.parametrize("backend", rnn_backends())
@pytest.mark.parametrize("cell,proj", CASES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_reference(backend, cell, proj, packed, reverse, dtype):
    case, grads, active = make_case(cell, proj, packed, bias=True, dtype=dtype)
    expected = run(backends.load("torch", "rnn"), cell, case, grads, reverse)
    actual = run(backends.load(backend, "rnn"), cell, case, grads, reverse)
    for name, exp in expected.items():
        act = actual[name]
        if name in ("h_seq", "grad_xw", "grad_hw"):  # rows past batch_sizes must be zero
            act, exp = act * active, exp * active
            assert torch.all(actual[name][~active.expand_as(actual[name])] == 0), f"{name}: inactive rows not zero"
        assert_close(act, exp, f"{backend}/{cell}/{name}", grad=name.startswith("grad"))


@pytest.mark.parametrize("backend", rnn_backends())
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_no_bias_and_inference_mode(backend, cell):
    """b_hh=None, and training=False returns the same outputs with nothing saved."""
    case, _, _ = make_case(cell, 0, packed=False, bias=False, dtype=torch.float32)
    ref = backends.load("torch", "rnn").rnn_forward(cell, **{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                                             for k, v in case.items()}, reverse=False, training=False)
    out = backends.load(backend, "rnn").rnn_forward(cell, **{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                                             for k, v in case.items()}, reverse=False, training=False)
    for name, a, e in zip(("h_seq", "h_T", "c_T"), out[:3], ref[:3]):
        assert_close(a, e, f"{backend}/{cell}/{name}")
    assert out[3] == () or len(out[3]) == 0
