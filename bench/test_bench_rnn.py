"""LSTM / GRU / RNN (and cells) benchmarks: every CPU backend against torch's baselines.

Groups are "<op> <shape> <mode>", so pytest-benchmark's table compares, within one group,
fastrnn's backends with nn.LSTM/GRU/RNN and with a Python loop over nn.LSTMCell/GRUCell/RNNCell.
A correctness gate runs before any timing. Ids look like lstm-T100_B32_I256_H256-train-cpp.
``test_rnn_bf16``: the same in bfloat16 (groups "<op> <shape> <mode> bf16"), nn.* in bf16 against
fastrnn's backends (cpp computes in bf16 where the CPU has AVX512_BF16 or AMX, the others in float32:
``python -m fastrnn info``); its gate compares both with float64 (fastrnn.bench's low-precision gate).
"""
import pytest
import torch
from torch import nn

import fastrnn
from fastrnn.bench import FULL_SHAPES, QUICK_SHAPES, RNN_OPS, float64_copy, rnn_gate, shape_id
from fastrnn.testing import max_error

BACKENDS = [b for b in fastrnn.available_backends("cpu", "rnn") if b != "triton"]
CANDIDATES = ["nn", "cell_loop"] + BACKENDS
CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}


class CellLoop(nn.Module):
    """The baseline users write by hand: a Python loop over torch's cell."""

    def __init__(self, op, I, H):
        super().__init__()
        self.op, self.cell = op, CELLS[op](I, H)

    def load_from(self, layer):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(self.cell, name).data.copy_(getattr(layer, f"{name}_l0"))

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.cell.hidden_size)
        state = (h, h) if self.op == "lstm" else h
        outs = []
        for x_t in x:
            state = self.cell(x_t, state)
            outs.append(state[0] if self.op == "lstm" else state)
        return torch.stack(outs), state


def build(op, shape, who, dtype=torch.float32):
    T, B, I, H = shape
    torch.manual_seed(0)
    ref = getattr(nn, RNN_OPS[op])(I, H, dtype=dtype)
    if who == "nn":
        return ref, ref
    if who == "cell_loop":
        m = CellLoop(op, I, H)
        m.load_from(ref)
        return ref, m
    m = getattr(fastrnn, RNN_OPS[op])(I, H, backend=who, dtype=dtype)
    m.load_state_dict(ref.state_dict())
    return ref, m


def cases(grid):
    shapes = QUICK_SHAPES if grid == "quick" else FULL_SHAPES
    return [(op, s) for op in RNN_OPS for s in shapes]


def pytest_generate_tests(metafunc):
    if "op_shape" in metafunc.fixturenames:
        grid = metafunc.config.getoption("--bench-grid")
        metafunc.parametrize("op_shape", cases(grid), ids=[f"{op}-{shape_id(*s)}" for op, s in cases(grid)])


@pytest.mark.parametrize("who", CANDIDATES)
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_rnn(benchmark, op_shape, mode, who):
    op, shape = op_shape
    ref, m = build(op, shape, who)
    x = torch.randn(shape[0], shape[1], shape[2])
    # correctness gate: same output as nn.* before timing anything
    with torch.no_grad():
        err = max_error(m(x)[0], ref(x)[0])
    assert err < 1e-4, f"{who} differs from torch by {err}"
    _time(benchmark, m, x, f"{op} {shape_id(*shape)} {mode}", op=op, shape=shape_id(*shape), mode=mode)


@pytest.mark.parametrize("who", ["nn"] + BACKENDS)
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_rnn_bf16(benchmark, op_shape, mode, who):
    op, shape = op_shape
    ref, m = build(op, shape, who, torch.bfloat16)
    x = torch.randn(shape[0], shape[1], shape[2], dtype=torch.bfloat16)
    if who != "nn":  # within twice torch's own bf16 error of float64, outputs and every gradient
        err, ok = rnn_gate(ref, m, x, mode, float64_copy(ref))
        assert ok, f"{who} bf16: error {err:.3g} against float64, more than twice torch's"
    _time(benchmark, m, x, f"{op} {shape_id(*shape)} {mode} bf16", op=op, shape=shape_id(*shape), mode=mode,
          dtype="bfloat16")


def _time(benchmark, m, x, group, mode, **info):
    benchmark.group = group
    benchmark.extra_info.update(mode=mode, threads=torch.get_num_threads(), **info)
    if mode == "infer":
        def run():
            with torch.no_grad():
                m(x)
    else:
        xg = x.clone().requires_grad_()

        def run():
            y, _ = m(xg)
            y.sum().backward()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
