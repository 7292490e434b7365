"""The reference backend (the specification) against torch's own modules, float64: the contract
functions of ``fastrnn/backends/reference_rnn.py`` with the op layer's division of work (input
projection, dW_ih, dW_hh, db, dW_hr formed outside the time loop, as ``tests/contract_harness.py``
forms them) give nn.LSTM / nn.GRU / nn.RNN's outputs, final states and every gradient; forward and
reverse direction (nn's bidirectional layer), padded and packed, with and without a projection.
No fastrnn module or op is involved, so this pins the equations themselves."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastrnn import backends
from fastrnn.testing import assert_close

from contract_harness import weight_grads

T, B, I, H = 6, 4, 5, 7
LENGTHS = torch.tensor([6, 5, 3, 1])

CASES = [("lstm", nn.LSTM, {}), ("lstm", nn.LSTM, {"proj_size": 3}), ("gru", nn.GRU, {}),
         ("rnn_tanh", nn.RNN, {"nonlinearity": "tanh"}), ("rnn_relu", nn.RNN, {"nonlinearity": "relu"})]


def _reference_direction(cell, mod, suffix, x, h0, c0, g_seq, g_hT, g_cT, batch_sizes, reverse):
    """One direction through the reference contract and the op layer's GEMMs: outputs and every
    gradient, named like nn's parameters."""
    ref = backends.load("torch", "rnn")
    p = {n: getattr(mod, f"{n}_l0{suffix}").detach() for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    w_hr = getattr(mod, f"weight_hr_l0{suffix}").detach() if mod.proj_size else None
    xw = x @ p["weight_ih"].t() + p["bias_ih"]
    h_seq, h_T, c_T, saved = ref.rnn_forward(cell, xw, p["weight_hh"], p["bias_hh"], h0, c0, w_hr, batch_sizes,
                                             reverse, True)
    back = ref.rnn_backward(cell, g_seq, g_hT, g_cT, p["weight_hh"], w_hr, h0, c0, batch_sizes, reverse, saved)
    grad_xw, grad_hw, grad_h0, grad_c0, grad_hproj, vgrads = back
    assert vgrads is None
    args = dict(w_hh=p["weight_hh"], w_hr=w_hr, h0=h0, batch_sizes=batch_sizes)
    derived = weight_grads(cell, args, None, dict(h_seq=h_seq, grad_hw=grad_hw, grad_hproj=grad_hproj,
                                                  saved=saved), reverse)
    grads = {f"weight_ih_l0{suffix}": torch.einsum("tbg,tbi->gi", grad_xw, x),
             f"bias_ih_l0{suffix}": grad_xw.sum((0, 1)),
             f"weight_hh_l0{suffix}": derived["grad_w_hh"], f"bias_hh_l0{suffix}": derived["grad_b_hh"],
             "x": torch.einsum("tbg,gi->tbi", grad_xw, p["weight_ih"])}
    if w_hr is not None:
        grads[f"weight_hr_l0{suffix}"] = derived["grad_w_hr"]
    return h_seq, h_T, c_T, grad_h0, grad_c0, grads


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell,cls,kw", CASES, ids=[f"{c}{'-proj' if k.get('proj_size') else ''}"
                                                    for c, _, k in CASES])
def test_reference_matches_torch_modules(cell, cls, kw, packed):
    torch.manual_seed(1)
    mod = cls(I, H, bidirectional=True, dtype=torch.float64, **kw)
    Hr = kw.get("proj_size") or H
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, B, Hr, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, B, H, dtype=torch.float64, requires_grad=True) if cell == "lstm" else None
    active = (torch.arange(T).unsqueeze(1) < LENGTHS.unsqueeze(0)).unsqueeze(-1)  # [T, B, 1]
    g_out = torch.randn(T, B, 2 * Hr, dtype=torch.float64) * (active if packed else 1)
    g_h = torch.randn(2, B, Hr, dtype=torch.float64)
    g_c = torch.randn(2, B, H, dtype=torch.float64) if cell == "lstm" else None

    # torch: outputs and autograd
    inp = pack_padded_sequence(x, LENGTHS) if packed else x
    out, state = mod(inp, (h0, c0) if cell == "lstm" else h0)
    if packed:
        out = pad_packed_sequence(out, total_length=T)[0]
    h_n, c_n = state if cell == "lstm" else (state, None)
    loss = (out * g_out).sum() + (h_n * g_h).sum() + ((c_n * g_c).sum() if cell == "lstm" else 0)
    leaves = [x, h0] + ([c0] if cell == "lstm" else []) + list(mod.parameters())
    names = ["x", "h0"] + (["c0"] if cell == "lstm" else []) + [n for n, _ in mod.named_parameters()]
    auto = dict(zip(names, torch.autograd.grad(loss, leaves)))

    # the reference, one direction at a time
    batch_sizes = pack_padded_sequence(x, LENGTHS).batch_sizes if packed else None
    grads = {"x": 0, "h0": [], "c0": []}
    outs, h_T, c_T = [], [], []
    for d, suffix in enumerate(("", "_reverse")):
        res = _reference_direction(cell, mod, suffix, x.detach(), h0[d].detach(),
                                   c0[d].detach() if cell == "lstm" else None, g_out[..., d * Hr:(d + 1) * Hr],
                                   g_h[d], g_c[d] if cell == "lstm" else None, batch_sizes, bool(d))
        outs.append(res[0])
        h_T.append(res[1])
        c_T.append(res[2])
        grads["h0"].append(res[3])
        grads["c0"].append(res[4])
        for n, g in res[5].items():
            grads[n] = grads[n] + g if n == "x" else g

    assert_close(torch.cat(outs, -1), out.detach(), f"{cell}/output")
    assert_close(torch.stack(h_T), h_n.detach(), f"{cell}/h_n")
    if cell == "lstm":
        assert_close(torch.stack(c_T), c_n.detach(), f"{cell}/c_n")
        assert_close(torch.stack(grads["c0"]), auto["c0"], f"{cell}/grad c0", grad=True)
    assert_close(torch.stack(grads["h0"]), auto["h0"], f"{cell}/grad h0", grad=True)
    for n in names:
        if n not in ("h0", "c0"):
            assert_close(grads[n], auto[n], f"{cell}/grad {n}", grad=True)
