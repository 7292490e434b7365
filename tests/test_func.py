"""torch.func through every layer module, cell and attention, as through torch's own modules:
per-sample gradients (``vmap(grad(...))``, what DP-SGD libraries do), ``jacrev`` of outputs with
respect to the input, ``vmap`` of the forward; float64, against torch's modules with the same
weights (per-sample loops on torch's side), on every CPU backend."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import fastrnn
from fastrnn.backends import reference_rnn, reference_sdpa
from fastrnn.testing import assert_close

from conftest import cpu_backends

T, I, H, V = 3, 3, 4, 5  # V: samples (the vmapped dim)
f64 = dict(dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _twin(fast, torch_cls, **kw):
    ref = torch_cls(**kw).double()
    ref.load_state_dict(fast.state_dict())
    return ref


def _loss(module):
    def loss(params, x, y):
        out = functional_call(module, params, (x,))
        out = out[0] if isinstance(out, tuple) else out
        return ((out - y) ** 2 * torch.linspace(0.5, 1.5, out.shape[-1], **f64)).sum()
    return loss


def _per_sample_reference(module, params, xs, ys):
    """torch's module, one sample at a time (nn.LSTM under vmap fails on its own)."""
    grads = [grad(_loss(module))(params, x, y) for x, y in zip(xs, ys)]
    return {k: torch.stack([g[k] for g in grads]) for k in params}


LAYERS = {
    "lstm": (fastrnn.LSTM, nn.LSTM, dict(), (T, 2, I)),
    "lstm-proj-bidir-2layers": (fastrnn.LSTM, nn.LSTM, dict(num_layers=2, bidirectional=True, proj_size=2),
                                (T, 2, I)),
    "gru-batch_first": (fastrnn.GRU, nn.GRU, dict(batch_first=True), (2, T, I)),
    "gru-unbatched": (fastrnn.GRU, nn.GRU, dict(), (T, I)),
    "rnn_relu-bidir": (fastrnn.RNN, nn.RNN, dict(nonlinearity="relu", bidirectional=True), (T, 2, I)),
}


def _layer_case(case, backend):
    fast_cls, torch_cls, kw, shape = LAYERS[case]
    kw = dict(input_size=I, hidden_size=H, **kw)
    fast = fast_cls(**kw, backend=backend).double()
    return fast, _twin(fast, torch_cls, **kw), shape


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(LAYERS))
def test_per_sample_gradients_layers(backend, case):
    fast, ref, shape = _layer_case(case, backend)
    params = {k: v.detach() for k, v in fast.named_parameters()}
    xs = torch.randn(V, *shape, **f64)
    out_shape = ref(xs[0])[0].shape
    ys = torch.randn(V, *out_shape, **f64)
    got = vmap(grad(_loss(fast)), in_dims=(None, 0, 0))(params, xs, ys)
    want = _per_sample_reference(ref, params, xs, ys)
    for k in params:
        assert_close(got[k], want[k], f"{case} per-sample d/d{k}", grad=True)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(LAYERS))
def test_jacrev_and_vmap_forward_layers(backend, case):
    fast, ref, shape = _layer_case(case, backend)
    params = {k: v.detach() for k, v in fast.named_parameters()}
    x = torch.randn(*shape, **f64)

    def outputs(module):
        def f(x):
            out, h = functional_call(module, params, (x,))
            return (out, *h) if isinstance(h, tuple) else (out, h)
        return f
    got, want = jacrev(outputs(fast))(x), jacrev(outputs(ref))(x)
    for n, a, b in zip(["out", "h_n", "c_n"], got, want):
        assert_close(a, b, f"{case} jacobian d{n}/dx", grad=True)
    xs = torch.randn(V, *shape, **f64)
    got = vmap(outputs(fast))(xs)
    want = [torch.stack(o) for o in zip(*[outputs(ref)(x) for x in xs])]
    for n, a, b in zip(["out", "h_n", "c_n"], got, want):
        assert_close(a, b, f"{case} vmap {n}")


CELLS = {"lstm": (fastrnn.LSTMCell, nn.LSTMCell), "gru": (fastrnn.GRUCell, nn.GRUCell),
         "rnn_tanh": (fastrnn.RNNCell, nn.RNNCell)}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
def test_cells(backend, cell, batched):
    fast_cls, torch_cls = CELLS[cell]
    fast = fast_cls(I, H, backend=backend).double()
    ref = _twin(fast, torch_cls, input_size=I, hidden_size=H)
    params = {k: v.detach() for k, v in fast.named_parameters()}
    lead = (2,) if batched else ()
    xs, hs, cs = (torch.randn(V, *lead, n, **f64) for n in (I, H, H))

    def loss(module):
        def f(params, x, h, c):
            out = functional_call(module, params, (x, (h, c) if cell == "lstm" else h))
            out = out if isinstance(out, tuple) else (out,)
            return sum((o.sin() * (k + 1)).sum() for k, o in enumerate(out))
        return f
    got = vmap(grad(loss(fast), argnums=(0, 1, 2, 3)), in_dims=(None, 0, 0, 0))(params, xs, hs, cs)
    per = [grad(loss(ref), argnums=(0, 1, 2, 3))(params, x, h, c) for x, h, c in zip(xs, hs, cs)]
    for k in params:
        assert_close(got[0][k], torch.stack([p[0][k] for p in per]), f"{cell} per-sample d/d{k}", grad=True)
    for j, n in enumerate(["x", "h", "c"][:3 if cell == "lstm" else 2], 1):
        assert_close(got[j], torch.stack([p[j] for p in per]), f"{cell} per-sample d/d{n}", grad=True)
    jac = jacrev(lambda x: functional_call(fast, params, (x, (hs[0], cs[0]) if cell == "lstm" else hs[0])))(xs[0])
    jac_ref = jacrev(lambda x: functional_call(ref, params, (x, (hs[0], cs[0]) if cell == "lstm" else hs[0])))(xs[0])
    for a, b in zip(jac if isinstance(jac, tuple) else (jac,), jac_ref if isinstance(jac_ref, tuple) else (jac_ref,)):
        assert_close(a, b, f"{cell} jacobian", grad=True)


@pytest.mark.parametrize("backend", cpu_backends())
def test_variants_per_sample_gradients(backend):
    """Variants have no torch counterpart: vmap(grad) against eager autograd, one sample at a time."""
    torch.manual_seed(3)
    for module in (fastrnn.LSTM(I, H, layer_norm=True, peephole=True, backend=backend),
                   fastrnn.GRU(I, H, reset_after=False, num_layers=2, backend=backend),
                   fastrnn.RNN(I, H, zoneout=0.3, backend=backend).eval()):
        module = module.double()
        params = {k: v.detach() for k, v in module.named_parameters()}
        xs, ys = torch.randn(V, T, 2, I, **f64), torch.randn(V, T, 2, H, **f64)
        got = vmap(grad(_loss(module)), in_dims=(None, 0, 0))(params, xs, ys)
        for i in range(V):
            leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
            want = torch.autograd.grad(_loss(module)(leaves, xs[i], ys[i]), list(leaves.values()))
            for (k, w) in zip(leaves, want):
                assert_close(got[k][i], w, f"{type(module).__name__} sample {i} d/d{k}", grad=True)


def test_vmap_folds_per_sample_tensors_into_one_kernel_call(monkeypatch):
    """vmap over x (and the input gradient only) runs ONE kernel call per layer for all samples
    (the samples become batch rows); asking for weight gradients loops (sums over rows would mix
    samples)."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = reference_rnn.rnn_forward, reference_rnn.rnn_backward

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped
    monkeypatch.setattr(reference_rnn, "rnn_forward", count("fwd", fwd))
    monkeypatch.setattr(reference_rnn, "rnn_backward", count("bwd", bwd))
    model = fastrnn.LSTM(I, H, backend="torch").double()
    ref = _twin(model, nn.LSTM, input_size=I, hidden_size=H)
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs = torch.randn(V, T, 2, I, **f64)
    out = vmap(lambda x: functional_call(model, params, (x,))[0])(xs)
    assert calls == {"fwd": 1, "bwd": 0}
    assert_close(out, torch.stack([ref(x)[0] for x in xs]), "folded forward")
    gx = vmap(grad(lambda x: functional_call(model, params, (x,))[0].sin().sum()))(xs)
    assert calls == {"fwd": 2, "bwd": 1}
    want = torch.stack([torch.func.grad(lambda x: ref(x)[0].sin().sum())(x) for x in xs])
    assert_close(gx, want, "folded input gradient", grad=True)
    vmap(grad(_loss(model)), in_dims=(None, 0, 0))(params, xs, torch.randn(V, T, 2, H, **f64))
    assert calls == {"fwd": 3, "bwd": 1 + V}


# -- attention -----------------------------------------------------------------------------------

def _fast_sdpa(backend):
    return lambda *a, **k: fastrnn.scaled_dot_product_attention(*a, backend=backend, **k)


SDPA_CASES = {
    "plain": dict(),
    "causal-gqa": dict(is_causal=True, enable_gqa=True),
    "float_mask_per_sample": dict(mask="per_sample"),
    "bool_mask_shared": dict(mask="shared_bool"),
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_attention_per_sample_gradients_and_jacrev(backend, case):
    torch.manual_seed(4)
    kw = dict(SDPA_CASES[case])
    mask = kw.pop("mask", None)
    Hk = 2 if kw.get("enable_gqa") else 4
    qs = torch.randn(V, 4, 5, 3, **f64)
    ks, vs = torch.randn(V, Hk, 6, 3, **f64), torch.randn(V, Hk, 6, 2, **f64)
    ms = None
    if mask == "per_sample":
        ms = torch.randn(V, 5, 6, **f64)
    elif mask == "shared_bool":
        kw["attn_mask"] = torch.rand(5, 6) < 0.7

    def loss(fn):
        def f(q, k, v, *m):
            extra = {"attn_mask": m[0]} if m else {}
            return (fn(q, k, v, **kw, **extra) ** 2).sum()
        return f
    args = (qs, ks, vs) + ((ms,) if ms is not None else ())
    argnums = tuple(range(len(args)))
    got = vmap(grad(loss(_fast_sdpa(backend)), argnums=argnums))(*args)
    for i in range(V):
        want = grad(loss(F.scaled_dot_product_attention), argnums=argnums)(*(a[i] for a in args))
        for n, a, b in zip(["q", "k", "v", "mask"], got, want):
            assert_close(a[i], b, f"{case} sample {i} d/d{n}", grad=True)
    extra = {} if ms is None else {"attn_mask": ms[0]}
    jac = jacrev(lambda q, k, v: _fast_sdpa(backend)(q, k, v, **kw, **extra), argnums=(0, 1, 2))(qs[0], ks[0], vs[0])
    jac_ref = jacrev(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw, **extra),
                     argnums=(0, 1, 2))(qs[0], ks[0], vs[0])
    for n, a, b in zip("qkv", jac, jac_ref):
        assert_close(a, b, f"{case} jacobian d out/d{n}", grad=True)
    out = vmap(lambda *a: _fast_sdpa(backend)(*a[:3], **kw, **({"attn_mask": a[3]} if len(a) > 3 else {})))(*args)
    want = torch.stack([F.scaled_dot_product_attention(*(a[i] for a in args[:3]), **kw,
                                                       **({"attn_mask": ms[i]} if ms is not None else {}))
                        for i in range(V)])
    assert_close(out, want, f"{case} vmap forward")


def test_attention_vmap_folds(monkeypatch):
    """Without dropout the samples become rows of one kernel call; a shared float mask whose
    gradient is asked for is given per sample."""
    calls = []
    real = reference_sdpa.sdpa_forward
    monkeypatch.setattr(reference_sdpa, "sdpa_forward", lambda *a: calls.append(1) or real(*a))
    qs = torch.randn(V, 2, 5, 3, **f64)
    mask = torch.randn(5, 6, **f64)
    k, v = torch.randn(2, 6, 3, **f64), torch.randn(2, 6, 2, **f64)

    def f(q, m):
        return (fastrnn.scaled_dot_product_attention(q, k, v, attn_mask=m, backend="torch") ** 2).sum()
    g_q, g_m = vmap(grad(f, argnums=(0, 1)), in_dims=(0, None))(qs, mask)
    assert len(calls) == 1
    for i in range(V):
        want = grad(lambda q, m: (F.scaled_dot_product_attention(q, k, v, attn_mask=m) ** 2).sum(),
                    argnums=(0, 1))(qs[i], mask)
        assert_close(g_q[i], want[0], f"sample {i} d/dq", grad=True)
        assert_close(g_m[i], want[1], f"sample {i} d/dmask (shared mask, per-sample gradient)", grad=True)


@pytest.mark.parametrize("backend", cpu_backends())
def test_attention_dropout_under_vmap(backend):
    """Dropout under vmap (randomness="same": one seed for every sample) equals the op run on
    each sample with that seed: the per-sample loop keeps each sample's row indices (the mask
    hashes them)."""
    qs = torch.randn(V, 2, 5, 3, **f64)
    k, v = torch.randn(2, 6, 3, **f64), torch.randn(2, 6, 2, **f64)

    def f(q):
        return fastrnn.scaled_dot_product_attention(q, k, v, dropout_p=0.4, backend=backend)
    torch.manual_seed(5)
    got = vmap(f, randomness="same")(qs)
    for i in range(V):
        torch.manual_seed(5)
        assert_close(got[i], f(qs[i]), f"dropout sample {i}")
    torch.manual_seed(5)
    g = vmap(grad(lambda q: f(q).sin().sum()), randomness="same")(qs)
    for i in range(V):
        torch.manual_seed(5)
        q = qs[i].clone().requires_grad_()
        assert_close(g[i], torch.autograd.grad(f(q).sin().sum(), q)[0], f"dropout sample {i} d/dq", grad=True)


@pytest.mark.parametrize("backend", cpu_backends())
def test_nested_transforms_hessian_and_per_sample_penalty(backend):
    """Reverse over reverse (``jacrev(jacrev)``, a Hessian) and per-sample gradient penalties
    (``vmap(grad(|grad|^2))``): the double backward runs inside torch.func's transforms."""
    torch.manual_seed(6)
    fast = fastrnn.LSTM(2, 2, backend=backend).double()
    ref = _twin(fast, nn.LSTM, input_size=2, hidden_size=2)
    x = torch.randn(3, 2, **f64)
    hessian = lambda m: jacrev(jacrev(lambda x: m(x)[0].sin().sum()))(x)
    assert_close(hessian(fast), hessian(ref), "LSTM Hessian d2/dx2", grad=True)
    q, k, v = torch.randn(3, 2, **f64), torch.randn(4, 2, **f64), torch.randn(4, 2, **f64)
    h_sdpa = lambda fn: jacrev(jacrev(lambda q: fn(q, k, v, is_causal=True).sin().sum()))(q)
    assert_close(h_sdpa(_fast_sdpa(backend)), h_sdpa(F.scaled_dot_product_attention), "SDPA Hessian", grad=True)
    params = {n: p.detach() for n, p in fast.named_parameters()}
    xs = torch.randn(V, 3, 2, **f64)

    def penalty(m):
        def f(p, x):
            return grad(lambda x: functional_call(m, p, (x,))[0].sin().sum())(x).square().sum()
        return f
    got = vmap(grad(penalty(fast)), in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        want = grad(penalty(ref))(params, x)
        for n in params:
            assert_close(got[n][i], want[n], f"sample {i} d(penalty)/d{n}", grad=True)
