"""float64 gradcheck through the modules for every backend: input, states and every weight."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn

from conftest import cpu_backends

CASES = [
    ("LSTM", dict(num_layers=2, bidirectional=True), False),
    ("LSTM", dict(proj_size=2, bidirectional=True), True),
    ("GRU", dict(num_layers=2, bidirectional=True), True),
    ("RNN", dict(nonlinearity="tanh", bidirectional=True), True),
    ("RNN", dict(nonlinearity="relu", num_layers=2), False),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind,kw,packed", CASES,
                         ids=[f"{k}-{'-'.join(map(str, kw.values()))}{'-packed' if p else ''}" for k, kw, p in CASES])
def test_gradcheck(backend, kind, kw, packed):
    torch.manual_seed(4)
    m = getattr(fastrnn, kind)(3, 3, dtype=torch.float64, backend=backend, **kw)
    D = 2 if m.bidirectional else 1
    Hr = getattr(m, "proj_size", 0) or 3
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(m.num_layers * D, 3, Hr, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(m.num_layers * D, 3, 3, dtype=torch.float64, requires_grad=True)
    params = list(m.parameters())
    lengths = torch.tensor([4, 2, 3])

    def f(x, h0, c0, *weights):
        params = dict(zip([n for n, _ in m.named_parameters()], weights))
        with torch.nn.utils.stateless._reparametrize_module(m, params):
            inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
            out, hidden = m(inp, (h0, c0) if kind == "LSTM" else h0)
            out = out.data if packed else out
            states = hidden if isinstance(hidden, tuple) else (hidden,)
            return (out,) + states

    inputs = (x, h0, c0) + tuple(p.detach().clone().requires_grad_() for p in params)
    if kind != "LSTM":
        c0.requires_grad_(False)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cls", [fastrnn.LSTMCell, fastrnn.GRUCell, fastrnn.RNNCell])
def test_cell_gradcheck(backend, cls):
    torch.manual_seed(5)
    m = cls(3, 4, dtype=torch.float64, backend=backend)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    if cls is fastrnn.LSTMCell:
        assert torch.autograd.gradcheck(lambda x, h, c: m(x, (h, c)), (x, h, c))
    else:
        assert torch.autograd.gradcheck(lambda x, h: m(x, h), (x, h))
