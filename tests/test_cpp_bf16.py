"""The cpp backend's bfloat16 path (fastrnn/backends/cpp_rnn.py): every GEMM in bf16 with float32
accumulation, float32 states and gate math. Checked at the op (``rnn_layer``: the input projection
and the gradient GEMMs included) against a float64 run on the same bf16-rounded values: no less
accurate than the reference backend in bf16, for the outputs and every gradient (how it is measured:
``test_bf16_layer_as_accurate_as_torch``); and at the C++ entry points, which must refuse what the
path does not take."""
import math

import pytest
import torch

import fastrnn
from fastrnn import backends
from fastrnn.contract.rnn import GATES, Variant
from fastrnn.ops.rnn_layer import rnn_layer
from fastrnn.testing import low_precision_errors

import contract_harness as harness

cpp = backends.load("cpp", "rnn")
NATIVE = not isinstance(cpp, str) and torch.bfloat16 in cpp.dtypes
pytestmark = pytest.mark.skipif(not NATIVE, reason="no bf16 GEMM here (cpp not built, or a CPU without "
                                                   "AVX512_BF16 / AMX): bf16 computes in float32")
BF16 = torch.bfloat16
T, B, I, H = 7, 5, 11, 9  # odd sizes: the bf16 GEMMs pad K to even
# batch sizes of a packed sequence per T: T * B >= 16 packs the weights into VNNI panels, fewer rows
# x steps (a small call) reads them in place (csrc/gemm.h, kPackRowSteps)
SIZES = {7: [5, 5, 4, 3, 3, 2, 1], 3: [5, 4, 2]}


def _case(cell, proj, opts, packed, seed, T=T):
    """Contract-sized layer arguments in float64 holding bf16-representable values (so that every
    run sees the same inputs), the variant, ln_ih and the output gradients."""
    torch.manual_seed(seed)
    G, Hr = GATES[cell] * H, proj or H
    r = lambda *s, sc=1.0: (torch.randn(*s, dtype=torch.float64) * sc).to(BF16).double()  # noqa: E731
    sizes = torch.tensor(SIZES[T]) if packed else None
    args = dict(x=r(T, B, I), w_ih=r(G, I, sc=I ** -0.5), w_hh=r(G, Hr, sc=Hr ** -0.5), b_ih=r(G, sc=0.3),
                b_hh=r(G, sc=0.3), h0=r(B, Hr), c0=r(B, H) if cell == "lstm" else None,
                w_hr=r(Hr, H, sc=0.4) if proj else None)
    variant = harness.make_variant(cell, opts, T, B, H, Hr, torch.float64)
    if variant is not None:
        variant = Variant(*(v.to(BF16).double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                            for v in variant))
    ln_ih = (1 + r(G, sc=0.3), r(G, sc=0.2)) if "ln" in opts else None
    grads = (r(T, B, Hr), r(B, Hr), r(B, H) if cell == "lstm" else None)
    return args, sizes, variant, ln_ih, grads


def _run(backend, dtype, cell, case, reverse):
    """Outputs and the gradient of every differentiable input, by name."""
    args, sizes, variant, ln_ih, grads = case
    cast = lambda t: t.to(dtype).requires_grad_() if t is not None and t.is_floating_point() else t  # noqa: E731
    a = {k: cast(v) for k, v in args.items()}
    v = Variant(*(cast(t) if isinstance(t, torch.Tensor) else t for t in variant)) if variant is not None else None
    ln = tuple(cast(t) for t in ln_ih) if ln_ih is not None else None
    h_seq, h_T, c_T = rnn_layer(cell, a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["h0"], a["c0"],
                                a["w_hr"], sizes, reverse, backend, ln_ih=ln, variant=v)
    out = dict(h_seq=h_seq, h_T=h_T, c_T=c_T)
    loss = sum((o.double() * g).sum() for o, g in zip((h_seq, h_T, c_T), grads) if o is not None)
    leaves = {**a, **({f"ln_ih_{k}": t for k, t in enumerate(ln)} if ln else {}),
              **({f"v_{n}": t for n, t in v._asdict().items() if isinstance(t, torch.Tensor) and t.requires_grad}
                 if v is not None else {})}
    leaves = {k: t for k, t in leaves.items() if t is not None and t.requires_grad and not k.startswith("v_rec")
              and not k.startswith("v_zoneout")}
    for k, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()))):
        out[f"grad_{k}"] = g
    return out


GRID = [("lstm", 0, ""), ("lstm", 5, ""), ("gru", 0, ""), ("rnn_tanh", 0, ""), ("rnn_relu", 0, ""),
        ("lstm", 5, "ln,peephole,dropout,zoneout,reset"), ("gru", 0, "ln,dropout,zoneout,reset"),
        ("gru", 0, "before,dropout,reset"), ("rnn_tanh", 0, "ln,zoneout,reset")]


@pytest.mark.parametrize("cell,proj,opts", GRID, ids=[f"{c}{'-proj' if p else ''}{'-' + o if o else ''}"
                                                      for c, p, o in GRID])
@pytest.mark.parametrize("packed,reverse", [(False, False), (True, True)], ids=["fwd", "packed-rev"])
@pytest.mark.parametrize("steps", [7, 3], ids=["packed-weights", "weights-in-place"])
def test_bf16_layer_as_accurate_as_torch(cell, proj, opts, packed, reverse, steps):
    """Against float64 on the same bf16 values, tensor by tensor (outputs and every gradient): the
    root-mean-square error at most torch's own in bf16 on geometric mean over the tensors of two
    seeds, and never 4x it on one tensor. Not design.md's max-error 2x rule: at these test sizes a
    max is over a handful of values, and torch's is sometimes the luckier -- measured over 60 seeds,
    plain RNN cells miss the 2x max rule on 5-10% of seeds (worst 3.8x, grad_h0), the variant
    combinations (layer norm with dropout and resets, whose errors swing 3x from seed to seed) on
    more, while cpp's RMS error is 0.33-0.65x torch's on geometric mean (worst single tensor 2.85x).
    A bug (a wrong operand, stride or rounding) is off by far more."""
    logs, compared = [], 0
    for seed in range(GRID.index((cell, proj, opts)), 1000, 100):
        case = _case(cell, proj, opts.split(",") if opts else (), packed, seed=seed, T=steps)
        exact = _run("torch", torch.float64, cell, case, reverse)
        lowp = _run("torch", BF16, cell, case, reverse)
        actual = _run("cpp", BF16, cell, case, reverse)
        assert actual.keys() == exact.keys()
        # relu's gradient jumps where a pre-activation is 0: one within rounding of it (-0.0017 in
        # float64, +0.0001 here, measured) passes or stops a whole gradient, whichever side rounds.
        # Such a seed compares the outputs only.
        kink = cell == "rnn_relu" and any(not torch.equal(run["h_seq"] > 0, exact["h_seq"] > 0)
                                          for run in (actual, lowp))
        compared += not kink
        for name, e in exact.items():
            if e is None or (kink and name.startswith("grad_")):
                continue
            assert actual[name].dtype == BF16, (name, actual[name].dtype)
            assert torch.isfinite(actual[name]).all(), name
            ours, theirs = low_precision_errors(actual[name], lowp[name], e, rms=True)
            theirs = max(theirs, 1e-6)
            assert ours <= 4 * theirs, f"seed {seed} {name}: RMS error {ours:.3g} > 4 x torch's {theirs:.3g}"
            logs.append(math.log(ours / theirs))
        if compared == 2:
            break
    assert compared == 2, "fewer than two seeds in ten without a relu kink between the runs"
    if logs:
        mean = math.exp(sum(logs) / len(logs))
        assert mean <= 1.0, f"RMS error {mean:.2f}x torch's on geometric mean over {len(logs)} tensors"


class _Spy:
    """fastrnn._C_rnn with the dtype of every recurrence call's w_hh recorded."""

    def __init__(self, C):
        self.C, self.seen = C, []

    def __getattr__(self, name):
        fn = getattr(self.C, name)
        if not name.startswith("rnn_"):
            return fn

        def call(*a):
            self.seen.append((name, a[4].dtype if "backward" in name else a[2].dtype))
            return fn(*a)
        return call


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_modules_and_autocast_take_the_bf16_kernels(cls, monkeypatch):
    """A bf16 module and a float32 one under autocast (where torch's policy casts the op) reach the
    C++ loops with bf16 weights: no silent float32 detour."""
    spy = _Spy(cpp._C)
    monkeypatch.setattr(cpp, "_C", spy)
    torch.manual_seed(0)
    m = getattr(fastrnn, cls)(6, 8, backend="cpp")
    x = torch.randn(4, 3, 6)
    m.bfloat16()(x.bfloat16().requires_grad_())[0].float().sum().backward()
    assert ("rnn_forward", BF16) in spy.seen and ("rnn_backward", BF16) in spy.seen, spy.seen
    assert all(p.grad.dtype == BF16 for p in m.parameters())
    if cls == "GRU":
        return  # torch's autocast leaves GRU in float32 (fastrnn.precision.AUTOCAST_CPU)
    spy.seen.clear()
    with torch.autocast("cpu", dtype=BF16):
        y = m.float()(x)[0]
    assert y.dtype == BF16 and spy.seen == [("rnn_forward", BF16)], spy.seen


def test_plan_and_info_say_bf16():
    assert backends.plan("cpp", "cpu", "rnn", BF16) == ("cpp", BF16)
    assert backends.plan("cpp", "cpu", "rnn", torch.float16) == ("cpp", torch.float32)  # not native: float32
    assert cpp._C.low_gemm()


def test_c_entry_points_refuse_mixes():
    """The C++ entry points check what the bf16 path relies on (a direct call, not only the op)."""
    C = cpp._C
    G = 4 * H
    xw, w = torch.randn(T, B, G), torch.randn(G, H).bfloat16()
    h0, c0 = torch.randn(B, H).bfloat16(), torch.randn(B, H).bfloat16()
    out = C.rnn_forward(0, xw, w, None, h0, c0, None, None, False, True)
    assert [t.dtype for t in out[:4]] == [BF16] * 4 and out[4].dtype == torch.float32  # h_seq, h, c, saved
    with pytest.raises(RuntimeError, match="CPU Double"):
        C.rnn_forward(0, xw.double(), w, None, h0.double(), c0.double(), None, None, False, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.rnn_forward(0, xw, torch.randn(H, G).bfloat16().t(), None, h0, c0, None, None, False, False)
    with pytest.raises(RuntimeError, match="CPU Float"):
        C.rnn_forward(0, xw, w, None, h0.half(), c0, None, None, False, False)
    saved = list(out[3:])
    saved[1] = saved[1].bfloat16()  # the gates are float32 in a bf16 call's layout
    with pytest.raises(RuntimeError, match="saved\\[1\\]"):
        C.rnn_backward(0, torch.randn(T, B, H).bfloat16(), h0, c0, w, None, h0, c0, None, False, saved)
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        C.linear(torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4).bfloat16(), None)
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        C.mm(torch.randn(3, 4).half(), torch.randn(4, 5).bfloat16())
    with pytest.raises(RuntimeError, match="shape mismatch"):
        C.mm_tn(torch.randn(3, 4), torch.randn(5, 4).bfloat16())


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 3), (40, 33, 17), (300, 64, 520)])
def test_bf16_gemms_accumulate_in_float32(shape):
    """linear / mm / mm_tn with bf16 operands equal a float64 product of the bf16-rounded operands to
    float32 accumulation accuracy (odd K padded, several panels and row blocks, one row)."""
    N, K, M = shape
    C = cpp._C
    x, w, b = torch.randn(N, K).bfloat16(), torch.randn(M, K).bfloat16(), torch.randn(M).bfloat16()
    a = torch.randn(N, M)  # float32: rounded to bf16 by the product
    tol = lambda ref: 1e-5 * (1 + ref.abs().max().item()) * K ** 0.5  # noqa: E731
    for got, ref in [(C.linear(x, w, b), x.double() @ w.double().t() + b.double()),
                     (C.mm(a, w), a.bfloat16().double() @ w.double()),
                     (C.mm_tn(a, x), a.bfloat16().double().t() @ x.double()),
                     (C.mm_tn(x, a), x.double().t() @ a.bfloat16().double())]:
        assert got.dtype == torch.float32
        assert (got.double() - ref).abs().max().item() <= tol(ref)
