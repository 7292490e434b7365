"""Triton-specific checks the shared backend tests do not make: when the backend claims to be
available, autotuning configs, grids with several programs and K loops (the shared tests' sizes
fit one tile), extreme pre-activations, the CUDA-graph cache logic, and (GPU only) low precision."""
import os
import subprocess
import sys

import pytest
import torch

from fastrnn import backends
from fastrnn.contract.rnn import GATES, Variant, packed_mask
from fastrnn.testing import assert_close, assert_low_precision

import contract_harness as harness

needs_triton = pytest.mark.skipif(backends.unavailable_reason("triton", "cpu") is not None
                                  and not torch.cuda.is_available(),
                                  reason="triton backend unavailable (no interpreter, no CUDA)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton():
    return backends.load("triton", "rnn")


# ---------------------------------------------------------------------------------------------
# availability
# ---------------------------------------------------------------------------------------------
def _probe(env_value):
    """Ask a fresh interpreter what the registry says about triton on CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", backends.ENV_VAR)}
    if env_value is not None:
        env["TRITON_INTERPRET"] = env_value
    code = ("import fastrnn\n"
            "print(repr(fastrnn.available_backends('cpu', 'rnn')))\n"
            "print(fastrnn.backends.unavailable_reason('triton', 'cpu', 'rnn'))\n"
            "import torch\n"
            "try:\n"
            "    fastrnn.LSTM(3, 4, backend='triton')(torch.randn(2, 1, 3))\n"
            "    print('ran')\n"
            "except RuntimeError as exc:\n"
            "    print('RuntimeError', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


@pytest.mark.parametrize("env_value", [None, "0"], ids=["unset", "zero"])
def test_cpu_unavailable_without_interpreter(env_value):
    backends_line, reason, run = _probe(env_value)
    assert "triton" not in eval(backends_line)
    assert "TRITON_INTERPRET=1" in reason
    assert run.startswith("RuntimeError") and "TRITON_INTERPRET=1" in run


def test_cpu_available_with_interpreter():
    backends_line, reason, run = _probe("1")
    if "triton-lang/triton#9171" in reason:  # an older Triton's interpreter on NumPy >= 2.4
        assert "triton" not in eval(backends_line)
        assert run.startswith("RuntimeError") and "#9171" in run, run
        return
    assert "triton" in eval(backends_line)
    assert reason == "None"
    assert run == "ran"


def test_never_chosen_automatically_on_cpu(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve(None, "cpu", "rnn").name != "triton"


# ---------------------------------------------------------------------------------------------
# autotuning configs
# ---------------------------------------------------------------------------------------------
@needs_triton
def test_interpreter_uses_one_small_config():
    k = _triton()._kernels()
    if not k.INTERPRETED:
        pytest.skip("kernels compiled for the GPU")
    for kernel in (k.rnn_fwd, k.rnn_gemm, k.rnn_bwd_dh, k.rnn_bwd, k.rnn_bwd_rb):
        assert len(kernel.configs) == 1
        cfg = kernel.configs[0].kwargs
        assert min(cfg.values()) >= 16 and max(cfg.values()) <= 32  # tl.dot needs >= 16


@needs_triton
def test_gpu_configs_and_pruning(monkeypatch):
    monkeypatch.delenv("FASTRNN_TRITON_TILES", raising=False)  # the default lists (gpu_check restricts them)
    k = _triton()._kernels()
    configs = k.configs(interpreted=False)
    assert len(configs) > 4
    for c in configs:
        for v in c.kwargs.values():
            assert v >= 16 and v & (v - 1) == 0, c
    # tiny batch and hidden size: no row block wider than 16, no column block wider than 16
    small = k.prune_configs(configs, dict(B=5, N=12, K=12), NG=4)
    assert small and all(c.kwargs["BLOCK_B"] == 16 and c.kwargs["BLOCK_H"] == 16 for c in small)
    # big problem: register budget respected for LSTM (4 accumulators), more room for RNN
    big4 = k.prune_configs(configs, dict(B=512, N=2048, K=2048), NG=4)
    big1 = k.prune_configs(configs, dict(B=512, N=2048, K=2048), NG=1)
    assert all(4 * c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_H"] <= 64 * 32 * c.num_warps for c in big4)
    assert len(big1) > len(big4)
    assert k.rnn_fwd.keys == ["B", "N", "K", "LN"]
    assert "HAS_PREV" in k.rnn_bwd.keys


def test_kernels_compile_for_sm90_without_gpu():
    """The interpreter accepts code the GPU compiler rejects: compile the main variants of every
    kernel for sm_90 (fp16 and bf16, which the interpreter cannot run) in a fresh process."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from fastrnn._triton.rnn_compile import compile_all; compile_all(['fp16', 'bf16'], quick=True)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bf16: 98 kernels compiled for sm_90" in out.stdout, out.stdout  # 49 distinct launches per dtype


def test_attention_and_decoder_kernels_compile_for_sm90_without_gpu():
    """The same for the attention and decoder kernels, every option on (the attention dropout
    path once compiled in the interpreter only: Triton 3.6 refused its constants on the H200)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from fastrnn._triton.rnn_compile import compile_ops; "
            "compile_ops(['sdpa', 'decoder'], ['fp32', 'bf16'], quick=True)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # sdpa: fwd, bwd_dkdv, bwd_dq per dtype; decoder: fwd and bwd, float32 only
    assert "sdpa bf16: 6 kernels compiled for sm_90" in out.stdout, out.stdout
    assert "decoder fp32: 8 kernels compiled for sm_90" in out.stdout, out.stdout


# ---------------------------------------------------------------------------------------------
# numerics the shared tests do not reach
# ---------------------------------------------------------------------------------------------
def _case(cell, T, B, H, proj, dtype, packed, scale=1.0, device=DEVICE):
    G, Hr = GATES[cell] * H, proj or H
    r = lambda *s, sc=1.0: (torch.randn(*s, dtype=torch.float64) * sc).to(dtype).to(device)
    sizes = None
    if packed:  # descending, the full batch first, rows stopping at several steps
        sizes = torch.sort(torch.randint(1, B + 1, (T,)), descending=True).values
        sizes[0] = B
    args = dict(xw=r(T, B, G, sc=scale), w_hh=r(G, Hr, sc=Hr ** -0.5), b_hh=r(G, sc=0.3),
                h0=r(B, Hr), c0=r(B, H) if cell == "lstm" else None, w_hr=r(Hr, H, sc=0.3) if proj else None,
                batch_sizes=sizes)
    active = (packed_mask(sizes, B, device).unsqueeze(-1) if packed
              else torch.ones(T, B, 1, dtype=torch.bool, device=device))
    grads = dict(grad_h_seq=r(T, B, Hr) * active, grad_h_T=r(B, Hr), grad_c_T=r(B, H) if cell == "lstm" else None)
    return args, grads


def _run(impl, cell, args, grads, reverse, variant=None):
    """tests/contract_harness.run, without the saved tuple."""
    out = harness.run(impl, cell, args, variant, grads, reverse)
    out.pop("saved")
    return out


def _compare(actual, expected, what):
    for name, exp in expected.items():
        assert_close(actual[name], exp, f"{what}/{name}", grad=name.startswith("grad"))


@needs_triton
@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 20), ("gru", 0), ("rnn_relu", 0)],
                         ids=["lstm", "lstm-proj", "gru", "rnn_relu"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_several_programs_and_k_blocks(cell, proj, reverse):
    """B, H, Hr, G larger than one 16-wide tile: a 3 x 3 grid, K loops of several blocks, ragged
    edges in every dimension, packed rows that start (reverse) and stop (forward) mid-grid."""
    args, grads = _case(cell, T=4, B=37, H=35, proj=proj, dtype=torch.float64, packed=True)
    expected = _run(backends.load("torch", "rnn"), cell, args, grads, reverse)
    _compare(_run(_triton(), cell, args, grads, reverse), expected, f"{cell}/reverse={reverse}")


@needs_triton
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_extreme_preactivations_stay_finite(cell):
    """Pre-activations of +-1e4 saturate every gate; the stable sigmoid/tanh must not overflow."""
    args, grads = _case(cell, T=3, B=5, H=6, proj=0, dtype=torch.float32, packed=False, scale=1e4)
    expected = _run(backends.load("torch", "rnn"), cell, args, grads, reverse=False)
    actual = _run(_triton(), cell, args, grads, reverse=False)
    for name, value in actual.items():
        if value is not None:
            assert torch.isfinite(value).all(), f"{cell}/{name} not finite"
    _compare(actual, expected, f"{cell}/saturated")


@needs_triton
def test_unsupported_dtype_is_refused():
    k = _triton()._kernels()
    dtype = torch.bfloat16 if k.INTERPRETED else torch.int32
    args, _ = _case("gru", T=2, B=3, H=4, proj=0, dtype=torch.float32, packed=False)
    args = {n: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for n, v in args.items()}
    with pytest.raises(TypeError, match="supports dtypes"):
        _triton().rnn_forward("gru", **args, reverse=False, training=False)


# ---------------------------------------------------------------------------------------------
# variants (docs/variants.md) on grids the shared variant tests (one 16-wide tile) do not reach
# ---------------------------------------------------------------------------------------------
def _variant(cell, opts, T, B, H, Hr, dtype, device=DEVICE):
    """A Variant with the options in ``opts`` (ln, peephole, dropout, zoneout, reset, before)."""
    return harness.make_variant(cell, opts, T, B, H, Hr, dtype, device=device)


VARIANT_GRIDS = [("lstm", 20, "ln,peephole,dropout,zoneout,reset"), ("lstm", 0, "peephole,zoneout,reset"),
                 ("gru", 0, "ln,dropout,zoneout,reset"), ("gru", 0, "before,dropout,zoneout,reset"),
                 ("rnn_relu", 0, "ln,zoneout,reset")]


@needs_triton
@pytest.mark.parametrize("cell,proj,opts", VARIANT_GRIDS, ids=[f"{c}-{o}{'-proj' if p else ''}"
                                                               for c, p, o in VARIANT_GRIDS])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_variants_several_programs_and_row_tiles(cell, proj, opts, reverse):
    """B = 37, H = 35, Hr = 20: the tile kernels run 3 x 3 grids with K loops; the layer-norm row
    programs walk 3 column chunks of H and 7-9 of G (statistics, norm backward), with ragged ends."""
    T, B, H = 3, 37, 35
    args, grads = _case(cell, T=T, B=B, H=H, proj=proj, dtype=torch.float64, packed=True)
    variant = _variant(cell, opts.split(","), T, B, H, proj or H, torch.float64)
    expected = _run(backends.load("torch", "rnn"), cell, args, grads, reverse, variant)
    actual = _run(_triton(), cell, args, grads, reverse, variant)
    for name, exp in expected.items():
        assert_close(actual[name], exp, f"{cell}/{opts}/reverse={reverse}/{name}",
                     grad=name.startswith(("grad", "vgrad")))


@needs_triton
def test_variant_configs_row_and_tile_mode(monkeypatch):
    """Layer-norm launches (row mode, no tl.dot) get the row configs, the others the tile configs."""
    monkeypatch.delenv("FASTRNN_TRITON_TILES", raising=False)  # the default lists (gpu_check restricts them)
    k = _triton()._kernels()
    configs = k.kernel_configs(interpreted=False)
    rows = k.prune_configs(configs, dict(B=32, N=256, K=256), NG=4, LN=True)
    tiles = k.prune_configs(configs, dict(B=32, N=256, K=256), NG=4, LN=False)
    assert rows and all(c.kwargs["BLOCK_B"] < 16 for c in rows)
    assert tiles and all(c.kwargs["BLOCK_B"] >= 16 for c in tiles)
    assert "LN" in k.rnn_fwd.keys and "LN" in k.rnn_bwd.keys  # never a row config in tile mode
    if k.INTERPRETED:
        assert k.kernel_configs() == [k.INTERPRETER_CONFIG]


@needs_triton
def test_variant_rejects_what_the_reference_rejects():
    args, _ = _case("gru", T=2, B=3, H=4, proj=0, dtype=torch.float32, packed=False)
    bad = Variant(ln_hh_weight=torch.ones(12), ln_hh_bias=torch.zeros(12), reset_after=False)
    with pytest.raises(ValueError):
        _triton().rnn_forward("gru", **args, reverse=False, training=False, variant=bad)


# ---------------------------------------------------------------------------------------------
# CUDA-graph cache: the caching logic, with a stand-in for capture that replays by re-running
# ---------------------------------------------------------------------------------------------
def _copy_into(static, new):
    if isinstance(static, torch.Tensor):
        static.copy_(new)
    elif isinstance(static, tuple):
        for s, n in zip(static, new):
            _copy_into(s, n)


def _fake_capture(calls):
    def capture(fn, static_args):
        calls.append("capture")
        static_out = fn(*static_args)

        def replay():  # a graph replay writes the same static outputs from the static inputs
            calls.append("replay")
            _copy_into(static_out, fn(*static_args))
        return replay, static_out
    return capture


@needs_triton
def test_graph_cache_eager_then_capture_then_replay(monkeypatch):
    tr = _triton()
    monkeypatch.setenv(tr.GRAPH_CACHE_ENV, "2")
    calls = []
    cache = tr._GraphCache(capture=_fake_capture(calls))
    ref = backends.load("torch", "rnn")
    cell = "lstm"
    results = []
    for step in range(4):  # eager, capture + replay, replay, replay
        args, _ = _case(cell, T=3, B=5, H=6, proj=3, dtype=torch.float32, packed=True)
        if step == 0:
            sizes = args["batch_sizes"]
        args["batch_sizes"] = sizes  # same plan every call
        p = tr._plan(cell, 3, 5, 24, 3, torch.float32, torch.device(DEVICE), True, True, sizes, True, True)
        flat = [args[n] for n in ("xw", "w_hh", "b_hh", "h0", "c0", "w_hr")]
        out = cache.run(("fwd", p), lambda *a: tr._forward_launches(p, *a), flat)
        expected = ref.rnn_forward(cell, **{n: (v.clone() if isinstance(v, torch.Tensor) else v)
                                            for n, v in args.items()}, reverse=True, training=True)
        results.append((out, expected))
    assert calls == ["capture", "replay", "replay", "replay"]
    for k, (out, expected) in enumerate(results):  # earlier results not overwritten by later replays
        for name, a, e in zip(("h_seq", "h_T", "c_T"), out[:3], expected[:3]):
            assert_close(a, e, f"call {k}/{name}")
        for j, (a, e) in enumerate(zip(out[3], expected[3])):
            assert_close(a, e, f"call {k}/saved[{j}]")
        assert out[0] is out[3][0], "h_seq and saved[0] should stay one tensor"
    # LRU (limit 2): three more plans, each seen twice, evict the first graph
    first = ("fwd", p)
    for T in (2, 4, 5):
        for _ in range(2):
            args, _ = _case(cell, T=T, B=5, H=6, proj=0, dtype=torch.float32, packed=False)
            p = tr._plan(cell, T, 5, 24, 6, torch.float32, torch.device(DEVICE), True, False, None, False, False)
            cache.run(("fwd", p), lambda *a: tr._forward_launches(p, *a),
                      [args[n] for n in ("xw", "w_hh", "b_hh", "h0", "c0", "w_hr")])
    assert len(cache.graphs) == 2 and first not in cache.graphs and ("fwd", p) in cache.graphs


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 24), ("gru", 0), ("rnn_tanh", 0)])
def test_low_precision_against_torch_rule(cell, proj, dtype):
    """Error against a float64 reference at most 2x that of the reference run in `dtype`."""
    args, grads = _case(cell, T=33, B=40, H=72, proj=proj, dtype=torch.float64, packed=True, device="cuda")
    to = lambda d: ({n: (v.to(d) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                     for n, v in args.items()},
                    {n: (v.to(d) if v is not None else None) for n, v in grads.items()})
    ref = backends.load("torch", "rnn")
    exact = _run(ref, cell, *to(torch.float64), reverse=True)
    lowp = _run(ref, cell, *to(dtype), reverse=True)
    actual = _run(_triton(), cell, *to(dtype), reverse=True)
    for name, e in exact.items():
        if e is not None:
            assert actual[name].dtype == dtype, name
            assert_low_precision(actual[name], lowp[name], e, f"{cell}/{dtype}/{name}")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cell,proj,opts", VARIANT_GRIDS, ids=[f"{c}-{o}{'-proj' if p else ''}"
                                                               for c, p, o in VARIANT_GRIDS])
def test_variants_low_precision_against_torch_rule(cell, proj, opts, dtype):
    """Variants in float16 / bfloat16: RMS error against float64 at most 2x the reference's in
    `dtype`. RMS, not max (docs/architecture.md, low precision): the layer-norm and peephole
    gradients are sums over T * B rows in which rounding is amplified, and on an H200 (12 seeds,
    both LSTM grids) the max ratio reached 2.13x (bf16 peephole) and 4.21x (fp16 ln_hh_weight)
    on single seeds with nothing wrong, while the RMS ratio stayed at 0.33-1.84x (median ~0.65x;
    bench/results/h200/low_precision_seeds.txt, from bench/gpu_lowp_seeds.py)."""
    T, B, H = 17, 40, 72
    args, grads = _case(cell, T=T, B=B, H=H, proj=proj, dtype=torch.float64, packed=True, device="cuda")
    variant = _variant(cell, opts.split(","), T, B, H, proj or H, torch.float64, device="cuda")
    cast = lambda x, d: x.to(d) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
    to = lambda d: ({n: cast(v, d) for n, v in args.items()}, {n: cast(v, d) for n, v in grads.items()},
                    Variant(*(cast(x, d) for x in variant)))
    ref = backends.load("torch", "rnn")

    def run(impl, d):
        a, g, v = to(d)
        return _run(impl, cell, a, g, True, v)
    exact, lowp, actual = run(ref, torch.float64), run(ref, dtype), run(_triton(), dtype)
    for name, e in exact.items():
        if e is not None:
            assert_low_precision(actual[name], lowp[name], e, f"{cell}/{opts}/{dtype}/{name}", rms=True)


@cuda
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_float32_ieee_parity_and_graph_replay(cell):
    """Default fp32 (IEEE dot) matches the reference at the fp32 tolerance; repeated calls (eager,
    then captured, then replayed) give the same answers as eager launches."""
    tr = _triton()
    ref = backends.load("torch", "rnn")
    for _ in range(4):
        args, grads = _case(cell, T=20, B=64, H=96, proj=0, dtype=torch.float32, packed=False, device="cuda")
        _compare(_run(tr, cell, args, grads, reverse=False), _run(ref, cell, args, grads, reverse=False), cell)
    assert any(key[1].cell == cell for key in tr._graphs.graphs)
