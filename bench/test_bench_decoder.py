"""Attention-decoder benchmarks: ``fastrnn.AttentionDecoder`` per backend against the loop users
write (``fastrnn.testing.LoopAttentionDecoder``, eager). Groups "decoder <shape> <mode>". The
compiled loop and the interleaved ratios: bench/decoder_speed.py (bench/results/decoder_cpu.md)."""
import pytest
import torch

import fastrnn
from fastrnn.testing import LoopAttentionDecoder, max_error

BACKENDS = [b for b in fastrnn.available_backends("cpu", "decoder") if b != "triton"]
# (cell, attention, T, S, B, H): H = input size = memory size
SHAPES = {"full": [("lstm", "additive", 50, 50, 32, 256), ("gru", "dot", 50, 50, 32, 256)],
          "quick": [("lstm", "additive", 5, 7, 3, 16), ("gru", "dot", 5, 7, 3, 16)]}


def sid(cell, attention, T, S, B, H):
    return f"{cell}_{attention}_T{T}_S{S}_B{B}_H{H}"


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = SHAPES[metafunc.config.getoption("--bench-grid")]
        metafunc.parametrize("shape", shapes, ids=[sid(*s) for s in shapes])


@pytest.mark.parametrize("who", ["torch_loop"] + BACKENDS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_decoder(benchmark, shape, mode, who):
    cell, attention, T, S, B, H = shape
    torch.manual_seed(0)
    dec = fastrnn.AttentionDecoder(cell, H, H, H, attention=attention, backend=None if who == "torch_loop" else who)
    loop = LoopAttentionDecoder.from_decoder(dec)
    model = loop if who == "torch_loop" else dec
    x, mem = torch.randn(T, B, H), torch.randn(S, B, H)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, S // 2:] = False
    with torch.no_grad():  # correctness gate
        assert max_error(model(x, mem, mask)[0], loop(x, mem, mask)[0]) < 1e-4
    benchmark.group = f"decoder {sid(*shape)} {mode}"
    if mode == "fwd":
        def run():
            with torch.no_grad():
                model(x, mem, mask)
    else:
        def run():
            model(x, mem, mask)[0].sum().backward()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
