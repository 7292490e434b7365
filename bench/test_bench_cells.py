"""Cell benchmarks: one step of fastrnn.LSTMCell/GRUCell/RNNCell per backend against torch's
cell, repeated over a short sequence (the Python loop users write). Groups "<cell> <shape> <mode>"."""
import pytest
import torch
from torch import nn

import fastrnn
from fastrnn.testing import max_error

BACKENDS = [b for b in fastrnn.available_backends("cpu", "rnn") if b != "triton"]
CELLS = {"lstmcell": "LSTMCell", "grucell": "GRUCell", "rnncell": "RNNCell"}
SHAPES = {"full": [(20, 32, 256, 256)], "quick": [(5, 4, 32, 32)]}


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = SHAPES[metafunc.config.getoption("--bench-grid")]
        metafunc.parametrize("shape", shapes, ids=[f"T{T}_B{B}_I{I}_H{H}" for T, B, I, H in shapes])


def steps(m, xs, lstm):
    h = xs.new_zeros(xs.shape[1], m.hidden_size)
    state = (h, h) if lstm else h
    for x in xs:
        state = m(x, state)
    return state[0] if lstm else state


@pytest.mark.parametrize("who", ["nn"] + BACKENDS)
@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_cell(benchmark, cell, shape, mode, who):
    T, B, I, H = shape
    torch.manual_seed(0)
    ref = getattr(nn, CELLS[cell])(I, H)
    m = ref if who == "nn" else getattr(fastrnn, CELLS[cell])(I, H, backend=who)
    m.load_state_dict(ref.state_dict())
    xs = torch.randn(T, B, I)
    lstm = cell == "lstmcell"
    with torch.no_grad():
        assert max_error(steps(m, xs, lstm), steps(ref, xs, lstm)) < 1e-4  # correctness gate
    benchmark.group = f"{cell} T{T}_B{B}_I{I}_H{H} {mode}"
    if mode == "infer":
        def run():
            with torch.no_grad():
                steps(m, xs, lstm)
    else:
        xg = xs.clone().requires_grad_()

        def run():
            steps(m, xg, lstm).sum().backward()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
