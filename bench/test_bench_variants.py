"""Issue 8's variant benchmark as pytest-benchmark entries: training (forward + backward) of every
variant in ``variant_loops.CASES`` with fastrnn's CPU backends, against the same variant written
as a plain PyTorch loop over time steps (``loop``) and that loop under torch.compile
(``compiled``, full grid only: compiling a 100-step loop takes minutes).

Groups are "variant <case> <shape> train"; ids look like lstm_all-T100_B32_I256_H256-cpp.
Before anything is timed, a gate checks the candidate against the reference: a fastrnn backend
against the eager loop, the loops against fastrnn's reference backend ("torch"): outputs, final
states, and the gradients of the input and every parameter, in training mode with the same random
masks. `python bench/variants_speed.py` is the same comparison with ratios, in one report.
"""
import os
import sys

import pytest
import torch

import fastrnn
from fastrnn.bench import FULL_SHAPES, QUICK_SHAPES, shape_id

sys.path.insert(0, os.path.dirname(__file__))
from variant_loops import CASES, VariantLoop, build, compare, compile_loop, gate, gate_tolerance, make_inputs  # noqa: E402

BACKENDS = [b for b in fastrnn.available_backends("cpu", "rnn") if b not in ("torch", "triton")]
FULL_SHAPE = next(s for s in FULL_SHAPES if s == (100, 32, 256, 256))  # issue 8's target shape


def pytest_generate_tests(metafunc):
    if "who" in metafunc.fixturenames:
        grid = metafunc.config.getoption("--bench-grid")
        shape = QUICK_SHAPES[0] if grid == "quick" else FULL_SHAPE
        whos = ["loop"] + (["compiled"] if grid == "full" else []) + BACKENDS
        params = [(c, shape, w) for c in CASES for w in whos]
        metafunc.parametrize("case,shape,who", params,
                             ids=[f"{c.name}-{shape_id(*s)}-{w}" for c, s, w in params])


def candidate(case, shape, who):
    """(module to time, eager loop it is gated against). The eager loop itself is gated against
    fastrnn's reference backend ("torch"), in float64 (see variant_loops.gate)."""
    T, B, I, H = shape
    fast, loop = build(case, I, H, "torch" if who in ("loop", "compiled") else who)
    if who == "loop":
        return loop, loop
    if who == "compiled":
        torch._dynamo.reset()  # one compiled loop at a time: no recompile limit across cases
        comp = VariantLoop(**loop.config)
        comp.load_state_dict(loop.state_dict())
        return compile_loop(comp), loop
    return fast, loop


@pytest.mark.fastrnn_bench
def test_variant(benchmark, case, shape, who):
    T, B, I, H = shape
    m, loop = candidate(case, shape, who)
    x, reset = make_inputs(case, T, B, I)
    # the loop's own gate: fastrnn's reference backend must agree with it
    res = gate(build(case, I, H, "torch")[0] if who == "loop" else m, loop, x, reset, in_float64=who != "compiled")
    bad = {n: v for n, v in res.items() if not v[3]}
    assert not bad, f"{case.name}/{who}: gate failed (error, float32 error, loop's float32 error): {bad}"
    worst = max(res, key=lambda n: res[n][0])
    benchmark.group = f"variant {case.name} {shape_id(*shape)} train"
    benchmark.extra_info.update(case=case.name, shape=shape_id(*shape), mode="train", who=who,
                                max_error=res[worst][0], threads=torch.get_num_threads())
    m.train()
    xg = x.clone().requires_grad_()

    def run():
        y, _ = m(xg, reset_mask=reset) if reset is not None else m(xg)
        y.sum().backward()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)


def test_loop_gate_is_not_vacuous():
    """The training gate really compares random masks: a loop drawing different masks (another
    seed) must disagree with fastrnn, so agreement in test_variant means equal draws."""
    case = next(c for c in CASES if c.name == "lstm_all")
    T, B, I, H = QUICK_SHAPES[0]
    fast, loop = build(case, I, H, "torch")
    x, reset = make_inputs(case, T, B, I)
    assert isinstance(loop, VariantLoop)
    same = compare(fast, loop, x, reset, training=True)
    assert max(same.values()) <= gate_tolerance(T, max(I, H), x.dtype, True)
    torch.manual_seed(0)
    fast.train()
    y1, _ = fast(x, reset_mask=reset)
    torch.manual_seed(1)
    loop.train()
    y2, _ = loop(x, reset_mask=reset)
    assert (y1 - y2).abs().max() > 1e-3
