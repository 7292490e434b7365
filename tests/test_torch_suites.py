"""fastrnn against PyTorch's own sample databases (material nobody on this team wrote).

- ``torch.testing._internal.common_modules.module_db``: the ``ModuleInfo`` of nn.LSTM, nn.GRU,
  nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell. Every sample (``module_inputs_func``, with
  ``with_packed_sequence=True`` where the function takes it) is run through torch's module and
  the fastrnn module holding torch's ``state_dict`` (strict); outputs, final states and the
  gradients of the inputs, the states and every parameter must agree. Also as torch's
  TestModule does: non-contiguous inputs, and ``gradgradcheck`` (``supports_gradgrad`` is True
  for these entries on CPU). The samples torch marks as errors (``module_error_inputs_func``)
  must raise the same exception type with a message matching torch's regex; they run in a
  child process, since a missing validation can crash the interpreter.
- ``torch.testing._internal.common_methods_invocations.op_db``: the ``OpInfo`` of
  ``nn.functional.scaled_dot_product_attention``: every sample against
  ``F.scaled_dot_product_attention`` (output and every gradient, the float mask's included).
  Dropout samples: fastrnn's dropout mask is its own counter-based hash, not torch's RNG stream
  (docs/attention.md "Dropout without storing a mask"), so values are compared at
  ``dropout_p=0`` and the dropout call itself is checked against the reference backend with the
  same seed (every backend produces the same bits, by design) and for unbiasedness.

Needs ``expecttest`` (torch.testing._internal imports it); skipped if it is missing.
"""
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fastrnn

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (test extra)")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

PAIRS = {nn.LSTM: fastrnn.LSTM, nn.GRU: fastrnn.GRU, nn.RNN: fastrnn.RNN,
         nn.LSTMCell: fastrnn.LSTMCell, nn.GRUCell: fastrnn.GRUCell, nn.RNNCell: fastrnn.RNNCell}
MODULE_INFOS = {m.name: m for m in module_db if m.module_cls in PAIRS}
SDPA_OP = next(o for o in op_db if o.name == "nn.functional.scaled_dot_product_attention"
               and o.variant_test_name == "")

BACKENDS = fastrnn.available_backends("cpu")
CPU_BACKENDS = [b for b in BACKENDS if b != "triton"]
# The Triton interpreter costs ~0.3-0.5 s per multi-layer bidirectional forward + backward:
# it gets float64 and every TRITON_STRIDE-th sample only (its float64 results are pinned to the
# reference by tests/test_triton.py and the contract tests as well).
TRITON_STRIDE = 5

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def assert_close(actual, expected, msg=""):
    """torch.testing.assert_close with the tolerance of the dtype; the absolute part scales with
    the tensor's largest entry (torch's samples draw from [-9, 9]: float32 rounding of a sum of
    large terms that cancel to ~0 is absolute, not relative, error)."""
    tol = dict(TOL[expected.dtype])
    if expected.numel():
        tol["atol"] *= max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(actual, expected, **tol, msg=(lambda m: f"{msg}: {m}") if msg else None)


def test_database_entries_present():
    """If torch renames or drops these entries, the parametrisations below would silently
    shrink: fail instead."""
    assert sorted(MODULE_INFOS) == sorted(f"nn.{c.__name__}" for c in PAIRS)
    assert SDPA_OP.supports_autograd


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _clone(tree, noncontiguous=False):
    """Fresh leaves with the same values and requires_grad (optionally non-contiguous)."""
    if isinstance(tree, PackedSequence):
        return PackedSequence(_clone(tree.data, noncontiguous), tree.batch_sizes,
                              tree.sorted_indices, tree.unsorted_indices)
    if isinstance(tree, (tuple, list)):
        return type(tree)(_clone(t, noncontiguous) for t in tree)
    if isinstance(tree, torch.Tensor):
        t = tree.detach()
        if noncontiguous and t.numel() > 1:
            # same values, every stride doubled: [..., n] -> [..., 2n][..., ::2]
            t = torch.stack([t, torch.full_like(t, float("nan"))], -1).select(-1, 0)
            assert not t.is_contiguous()
        else:
            t = t.clone()
        return t.requires_grad_(tree.requires_grad)
    return tree


def _leaves(tree):
    if isinstance(tree, PackedSequence):
        yield from _leaves(tree.data)
    elif isinstance(tree, (tuple, list)):
        for t in tree:
            yield from _leaves(t)
    elif isinstance(tree, torch.Tensor):
        yield tree


def _probe_loss(outputs, seed=1234):
    """A loss with random (but fixed) weights on every output, so that each output and state
    gets its own, non-trivial gradient."""
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for t in outputs:
        w = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
        loss = loss + (t * w).sum()
    return loss


def _module_pair(info, sample, backend, dtype, training):
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    ref = info.module_cls(*args, **kwargs).to(dtype).train(training)
    mod = PAIRS[info.module_cls](*args, **kwargs, backend=backend).to(dtype).train(training)
    mod.load_state_dict(ref.state_dict(), strict=True)
    return ref, mod


def _run_module(module, fwd_args, fwd_kwargs):
    """Forward + backward of the probe loss; returns (outputs, input grads, parameter grads)."""
    outputs = list(_leaves(module(*fwd_args, **fwd_kwargs)))
    inputs = [t for t in _leaves((fwd_args, fwd_kwargs)) if t.requires_grad]
    params = dict(module.named_parameters())
    wrt = inputs + list(params.values())
    grads = torch.autograd.grad(_probe_loss(outputs), wrt, allow_unused=True)
    return ([o.detach() for o in outputs], grads[:len(inputs)],
            dict(zip(params, grads[len(inputs):])))


def _compare_sample(info, sample, backend, dtype, training, noncontiguous=False):
    ref, mod = _module_pair(info, sample, backend, dtype, training)
    fi = sample.forward_input
    runs = []
    for module in (ref, mod):
        args = _clone(fi.args, noncontiguous)
        kwargs = {k: _clone(v, noncontiguous) for k, v in fi.kwargs.items()}
        runs.append(_run_module(module, args, kwargs))
    (out_r, gin_r, gp_r), (out_f, gin_f, gp_f) = runs
    assert len(out_r) == len(out_f), "different number of outputs"
    for k, (a, b) in enumerate(zip(out_f, out_r)):
        assert_close(a, b, f"output {k}")
    for k, (a, b) in enumerate(zip(gin_f, gin_r)):
        assert (a is None) == (b is None), f"input {k}: gradient presence differs"
        if a is not None:
            assert_close(a, b, f"grad of input {k}")
    assert gp_f.keys() == gp_r.keys()
    for name in gp_r:
        a, b = gp_f[name], gp_r[name]
        assert (a is None) == (b is None), f"{name}: gradient presence differs"
        if a is not None:
            assert_close(a, b, f"grad of {name}")


def _samples(info, dtype, training, requires_grad=True):
    kwargs = {}
    if "with_packed_sequence" in inspect.signature(info.module_inputs_func).parameters:
        kwargs["with_packed_sequence"] = True
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad,
                                   training=training, **kwargs)


def _describe(sample):
    fi = sample.forward_input
    shapes = [("packed" + str(tuple(t.data.shape)) if isinstance(t, PackedSequence)
               else tuple(t.shape) if isinstance(t, torch.Tensor)
               else [tuple(s.shape) for s in t]) for t in fi.args]
    return f"{sample.constructor_input.args} {sample.constructor_input.kwargs} inputs {shapes}"


def _run_all(info, backend, dtype, training, noncontiguous=False):
    """Every sample; the failures are collected so that one run reports all of them."""
    samples = _samples(info, dtype, training)
    assert samples, f"{info.name}: torch produced no samples"
    failures, ran = [], 0
    for k, sample in enumerate(samples):
        if backend == "triton" and k % TRITON_STRIDE:
            continue
        ran += 1
        try:
            _compare_sample(info, sample, backend, dtype, training, noncontiguous)
        except Exception as e:  # noqa: BLE001 - reported below, with the sample
            failures.append(f"sample {k}: {_describe(sample)}\n    {type(e).__name__}: "
                            + str(e).strip().replace("\n", "\n    ")[:600])
    assert ran
    assert not failures, (f"{info.name} [{backend}, {dtype}, training={training}]: "
                          f"{len(failures)}/{ran} samples differ from torch\n" + "\n".join(failures))


class _OffOutput(fastrnn.GRU):
    """fastrnn.GRU with a 1e-6 relative error on its output (the self-test below)."""

    def forward(self, *args, **kwargs):
        out, h = super().forward(*args, **kwargs)
        return out * (1 + 1e-6), h


class _OffGrad(fastrnn.GRU):
    """fastrnn.GRU with a 1e-6 relative error on the gradient of its last parameter only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        list(self.parameters())[-1].register_hook(lambda g: g * (1 + 1e-6))


@pytest.mark.parametrize("wrong", [_OffOutput, _OffGrad])
def test_comparison_detects_small_errors(monkeypatch, wrong):
    """The sample comparison must fail for a module that is wrong by 1e-6 in one place."""
    monkeypatch.setitem(PAIRS, nn.GRU, wrong)
    info = MODULE_INFOS["nn.GRU"]
    sample = next(s for s in _samples(info, torch.float64, True) if s.constructor_input.kwargs["bias"])
    with pytest.raises(AssertionError):
        _compare_sample(info, sample, "torch", torch.float64, True)
    monkeypatch.setitem(PAIRS, nn.GRU, fastrnn.GRU)
    _compare_sample(info, sample, "torch", torch.float64, True)


def _module_params():
    """(module, backend, dtype, training): train mode in float64 and float32; eval mode (no
    saved state, the same kernels otherwise) in float64; triton: train mode, float64."""
    for name in MODULE_INFOS:
        for backend in BACKENDS:
            for dtype in (torch.float64, torch.float32):
                for training in (True, False):
                    if (backend == "triton" or not training) and dtype != torch.float64:
                        continue
                    if backend == "triton" and not training:
                        continue
                    yield pytest.param(name, backend, dtype, training, id=f"{name}-{backend}-{str(dtype)[6:]}-"
                                       + ("train" if training else "eval"))


# ---------------------------------------------------------------------------------------------
# module_db: samples
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,backend,dtype,training", list(_module_params()))
def test_module_db_samples(name, backend, dtype, training):
    """Every sample of torch's ModuleInfo: outputs, states and every gradient equal torch's."""
    info = MODULE_INFOS[name]
    assert dtype in info.dtypes
    _run_all(info, backend, dtype, training)


@pytest.mark.parametrize("name", sorted(MODULE_INFOS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_db_noncontiguous(name, backend):
    """torch's TestModule.test_non_contiguous_tensors: the same samples, every input and state
    a strided view."""
    _run_all(MODULE_INFOS[name], backend, torch.float64, True, noncontiguous=True)


@pytest.mark.parametrize("name", sorted(MODULE_INFOS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_db_gradgrad(name, backend):
    """torch's TestModule.test_gradgrad (``supports_gradgrad=True`` for these entries on CPU):
    ``gradgradcheck`` of the fastrnn module, w.r.t. inputs, states and parameters, on the first
    sample with an explicit state (smallest cost that still covers the state's path)."""
    info = MODULE_INFOS[name]
    assert info.supports_gradgrad
    samples = _samples(info, torch.float64, True)
    sample = next(s for s in samples if len(s.forward_input.args) > 1)
    _, mod = _module_pair(info, sample, backend, torch.float64, True)
    args = _clone(sample.forward_input.args)
    inputs = [t for t in _leaves(args) if t.requires_grad]
    params = list(mod.parameters())
    n_in = len(inputs)

    names = [n for n, _ in mod.named_parameters()]

    def fn(*flat):
        call = _rebuild(args, iter(flat[:n_in]))
        return tuple(_leaves(torch.func.functional_call(mod, dict(zip(names, flat[n_in:])), call)))

    assert torch.autograd.gradgradcheck(fn, tuple(inputs + params), nondet_tol=1e-12, fast_mode=True)


def _rebuild(tree, it):
    if isinstance(tree, (tuple, list)):
        return type(tree)(_rebuild(t, it) for t in tree)
    if isinstance(tree, torch.Tensor) and tree.requires_grad:
        return next(it)
    return tree


# ---------------------------------------------------------------------------------------------
# module_db: error inputs (in a child process: a missing check may crash the interpreter)
# ---------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(r"""
    import json, os, re, sys
    import torch
    import fastrnn
    from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
    sys.path.insert(0, os.environ["FASTRNN_SUITES_DIR"])
    from test_torch_suites import PAIRS
    infos = {m.name: m for m in module_db if m.module_cls in PAIRS}
    for line in sys.stdin:
        case = json.loads(line)
        info = infos[case["module"]]
        dtype = getattr(torch, case["dtype"])
        err = info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                            training=True)[case["index"]]
        mi = err.module_error_input
        print(json.dumps({"start": case}), flush=True)
        result = {"case": case, "expected": err.error_type.__name__, "regex": err.error_regex}
        for who in ("torch", "fastrnn"):
            try:
                kw = dict(mi.constructor_input.kwargs)
                if who == "fastrnn":
                    kw["backend"] = case["backend"]
                cls = info.module_cls if who == "torch" else PAIRS[info.module_cls]
                m = cls(*mi.constructor_input.args, **kw)
                if err.error_on == ModuleErrorEnum.FORWARD_ERROR:
                    m(*mi.forward_input.args, **mi.forward_input.kwargs)
                result[who] = ["ok", ""]
            except Exception as e:
                result[who] = [type(e).__name__, str(e)[:500]]
        print(json.dumps(result), flush=True)
""")

_ERROR_RESULTS = {}


def _run_child(script, cases, env_extra=None, timeout=240):
    """Run ``cases`` (JSON lines on stdin) in child processes. A crash (signal or nonzero exit)
    is recorded for the case that was running, and the rest go to a fresh child.
    Returns ({case key: result}, [crash descriptions])."""
    env = dict(os.environ, TRITON_INTERPRET="1", **(env_extra or {}))
    results, crashes, todo = {}, [], list(cases)
    while todo:
        proc = subprocess.run([sys.executable, "-c", script], input="".join(
            json.dumps(c) + "\n" for c in todo), capture_output=True, text=True, env=env,
            timeout=timeout)
        started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if "start" in rec:
                started = rec["start"]
            else:
                results[json.dumps(rec["case"], sort_keys=True)] = rec
                started = None
        done = {json.dumps(c, sort_keys=True) for c in todo} & set(results)
        if proc.returncode == 0 and started is None:
            missing = [c for c in todo if json.dumps(c, sort_keys=True) not in results]
            assert not missing, f"child finished without results for {missing}\n{proc.stderr[-3000:]}"
            break
        if started is None:  # died before the first case: nothing to attribute it to
            raise AssertionError(f"child failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
        key = json.dumps(started, sort_keys=True)
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        crashes.append(f"{started}: child died ({how}): {proc.stderr.strip()[-800:]}")
        results[key] = {"case": started, "crash": how}
        todo = [c for c in todo if json.dumps(c, sort_keys=True) not in done | {key}]
    return results, crashes


def _error_results():
    """All error samples of all modules, dtypes and backends: one child process in all (torch's
    test databases take ~3 s to import)."""
    if not _ERROR_RESULTS:
        cases = []
        for name, info in sorted(MODULE_INFOS.items()):
            if info.module_error_inputs_func is None:
                continue
            for dtype in (torch.float64, torch.float32):
                n = len(info.module_error_inputs_func(info, device="cpu", dtype=dtype,
                                                      requires_grad=True, training=True))
                cases += [{"module": name, "dtype": str(dtype)[6:], "index": k, "backend": b}
                          for k in range(n) for b in BACKENDS]
        results, crashes = _run_child(
            _CHILD, cases, {"FASTRNN_SUITES_DIR": os.path.dirname(os.path.abspath(__file__))})
        _ERROR_RESULTS.update(cases=cases, results=results, crashes=crashes)
    return _ERROR_RESULTS


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_db_error_inputs(backend):
    """Every error sample: the child survives, torch raises what its database says (sanity),
    and fastrnn raises the same exception type with a message matching torch's regex."""
    every = _error_results()
    cases = [c for c in every["cases"] if c["backend"] == backend]
    results = every["results"]
    assert len(cases) >= 20, "torch's error databases shrank?"
    problems = [c for c in every["crashes"] if f"'backend': '{backend}'" in c]
    for case in cases:
        rec = results[json.dumps(case, sort_keys=True)]
        if "crash" in rec:
            continue
        exp, regex = rec["expected"], rec["regex"]
        t_type, t_msg = rec["torch"]
        assert t_type == exp and re.search(regex, t_msg), f"torch itself: {rec}"
        f_type, f_msg = rec["fastrnn"]
        if f_type != exp or not re.search(regex, f_msg):
            problems.append(f"{case['module']} {case['dtype']} #{case['index']}: expected {exp} "
                            f"/{regex}/, fastrnn: {f_type}: {f_msg}")
    assert not problems, f"{len(problems)}/{len(cases)} error samples:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# op_db: scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------

def _sdpa_samples(dtype):
    return list(SDPA_OP.sample_inputs("cpu", dtype, requires_grad=True))


def _sdpa_run(fn, sample, **override):
    q, k, v = _clone([sample.input, *sample.args])
    kwargs = {key: _clone(val) for key, val in sample.kwargs.items()}
    kwargs.update(override)
    leaves = [q, k, v] + [t for t in kwargs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fn(q, k, v, **kwargs)
    grads = torch.autograd.grad(_probe_loss([out]), leaves)
    return out.detach(), grads


def _sdpa_params():
    for backend in BACKENDS:
        for dtype in (torch.float64, torch.float32):
            if backend == "triton" and dtype != torch.float64:
                continue
            yield pytest.param(backend, dtype, id=f"{backend}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend,dtype", list(_sdpa_params()))
def test_sdpa_op_db_samples(backend, dtype):
    """Every sample of torch's OpInfo: output and gradients (q, k, v and a float mask) equal
    torch's. Dropout samples run with ``dropout_p=0`` here (documented difference of the dropout
    RNG; the dropout itself is covered by the next two tests)."""
    samples = _sdpa_samples(dtype)
    assert len(samples) >= 20
    failures = []
    for k, s in enumerate(samples):
        if backend == "triton" and k % 3:
            continue
        override = {"dropout_p": 0.0} if s.kwargs.get("dropout_p", 0) > 0 else {}
        try:
            out_r, g_r = _sdpa_run(F.scaled_dot_product_attention, s, **override)
            out_f, g_f = _sdpa_run(lambda *a, **kw: fastrnn.scaled_dot_product_attention(
                *a, **kw, backend=backend), s, **override)
            assert_close(out_f, out_r, "output")
            for name, a, b in zip(["q", "k", "v", "mask"], g_f, g_r):
                assert_close(a, b, f"grad {name}")
        except Exception as e:  # noqa: BLE001
            failures.append(f"sample {k}: q{tuple(s.input.shape)} k{tuple(s.args[0].shape)} "
                            f"{ {a: b for a, b in s.kwargs.items() if not isinstance(b, torch.Tensor)} }"
                            f" mask={'attn_mask' in s.kwargs}\n    {type(e).__name__}: {str(e)[:500]}")
    assert not failures, f"{len(failures)} samples differ:\n" + "\n".join(failures)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_sdpa_op_db_dropout_samples_match_reference(backend):
    """The dropout samples (p=0.5): shape and dtype as torch's; forward and every gradient
    equal the reference backend's for the same seed (docs/attention.md: every backend produces
    the same bits)."""
    samples = [s for s in _sdpa_samples(torch.float64) if s.kwargs.get("dropout_p", 0) > 0]
    assert samples
    if backend == "triton":
        samples = samples[::4]
    for s in samples:
        ref_shape = F.scaled_dot_product_attention(s.input, *s.args, **s.kwargs).shape
        runs = []
        for b in (backend, "torch"):
            torch.manual_seed(7)
            runs.append(_sdpa_run(lambda *a, **kw: fastrnn.scaled_dot_product_attention(
                *a, **kw, backend=b), s))
        (out_b, g_b), (out_t, g_t) = runs
        assert out_b.shape == ref_shape and out_b.dtype == torch.float64
        assert_close(out_b, out_t, "output")
        for name, a, b in zip("qkv", g_b, g_t):
            assert_close(a, b, f"grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sdpa_op_db_dropout_unbiased(backend):
    """Statistics of a dropout sample: the mean of many dropout draws converges to torch's
    no-dropout output (inverted dropout is unbiased), and a draw is not the no-dropout output."""
    s = next(s for s in _sdpa_samples(torch.float64)
             if s.kwargs.get("dropout_p", 0) > 0 and not s.kwargs.get("is_causal"))
    q, k, v = (t.detach() for t in [s.input, *s.args])
    p = s.kwargs["dropout_p"]
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.manual_seed(3)
    draws = torch.stack([fastrnn.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
                         for _ in range(400)])
    assert not torch.allclose(draws[0], expected)
    mean, sem = draws.mean(0), draws.std(0) / 400 ** 0.5
    z = (mean - expected).abs() / sem.clamp_min(1e-12)
    # a handful of ~100 elements may sit beyond 3 sigma by chance; none beyond 6
    assert z.max() < 6 and (z > 3).float().mean() < 0.05, (z.max(), (z > 3).float().mean())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sdpa_op_db_gradgrad(backend):
    """gradgradcheck on the OpInfo's dropout-free samples of each shape kind (3-D, 4-D,
    broadcast q, float mask, causal). torch's OpInfo skips TestBwdGradients.test_fn_gradgrad on
    CPU because torch's own flash kernel has no double backward ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); fastrnn's
    ops are twice differentiable, and gradgradcheck compares with numerical derivatives, so no
    torch result is needed."""
    picked, seen = [], set()
    for s in _sdpa_samples(torch.float64):
        kind = (s.input.dim(), s.args[0].dim(), "attn_mask" in s.kwargs, s.kwargs.get("is_causal"))
        if s.kwargs.get("dropout_p", 0) == 0 and kind not in seen:
            seen.add(kind)
            picked.append(s)
    assert len(picked) >= 6
    for s in picked:
        kw = {k: v for k, v in s.kwargs.items() if not isinstance(v, torch.Tensor)}
        mask = s.kwargs.get("attn_mask")
        # small slices of the samples (gradgradcheck's cost grows with every input element)
        q, k, v = (t.detach()[..., :2, :3, :].clone().requires_grad_() for t in (s.input, *s.args))
        args = (q, k, v) + ((mask.detach()[..., :3, :3].clone().requires_grad_(),) if mask is not None else ())

        def call(fn):
            return lambda q, k, v, *m: fn(q, k, v, **kw, **({"attn_mask": m[0]} if m else {}))

        assert torch.autograd.gradgradcheck(call(lambda *a, **k: fastrnn.scaled_dot_product_attention(
            *a, **k, backend=backend)), args, fast_mode=True), (backend, kw, mask is not None)


def test_sdpa_op_db_error_inputs():
    """torch 2.13's OpInfo defines no error inputs for SDPA (``error_inputs_func`` is None); if
    a later torch adds some, they run here. fastrnn's own error cases are in tests/test_fuzz.py
    and tests/test_attention.py."""
    if SDPA_OP.error_inputs_func is None:
        pytest.skip("this torch's OpInfo has no error_inputs for scaled_dot_product_attention")
    problems = []
    for backend in BACKENDS:
        for e in SDPA_OP.error_inputs("cpu"):
            si = e.sample_input
            with pytest.raises(e.error_type, match=e.error_regex):
                F.scaled_dot_product_attention(si.input, *si.args, **si.kwargs)
            try:
                fastrnn.scaled_dot_product_attention(si.input, *si.args, **si.kwargs, backend=backend)
                problems.append(f"{backend}: no error for {si}")
            except Exception as ex:  # noqa: BLE001
                if not isinstance(ex, e.error_type):
                    problems.append(f"{backend}: {type(ex).__name__} instead of {e.error_type.__name__}")
    assert not problems, "\n".join(problems)
