"""Fake kernels promise exactly the real kernels' sizes and strides (every output of rnn_layer_fwd,
rnn_layer_bwd, sdpa_fwd, sdpa_bwd: contiguous), for non-contiguous inputs too, and compiled
backward graphs of a batch_first layer and of attention on transposed views equal eager.

The compile checks run in a child process each: a warm test process (compiled code, caches,
already-resolved backends) can hide a break that a user's first compile meets. The child also
turns off inductor's FX-graph cache, which would otherwise serve a graph compiled against an older
fake kernel."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastrnn.contract.rnn import GATES, Variant

from conftest import cpu_backends

ROOT = Path(__file__).resolve().parent.parent
T, B, I, H = 3, 2, 4, 5
f64 = dict(dtype=torch.float64)


def _noncontig(*shape, perm=None, requires_grad=False):
    """A random tensor of ``shape`` that is a permuted view (``perm`` of the dims, default: the
    first two swapped) -- the layout batch_first and transposed heads give."""
    perm = perm or (1, 0) + tuple(range(2, len(shape)))
    base = torch.randn(*[shape[p] for p in perm], **f64)
    inv = [perm.index(d) for d in range(len(shape))]
    t = base.permute(*inv)
    assert t.shape == shape and (not t.is_contiguous() or min(shape) == 1)
    return t.requires_grad_(requires_grad)


def _layer_args(backend, cell, ln=False, proj=0):
    """rnn_layer's arguments with a transposed x (batch_first), transposed weight views and a
    strided h0."""
    G, Hr = GATES[cell] * H, proj or H
    r = lambda *s: torch.randn(*s, **f64, requires_grad=True)
    x = _noncontig(T, B, I, requires_grad=True)
    w_ih = torch.randn(I, G, **f64).t().requires_grad_()  # a transposed view
    h0 = torch.randn(B, 2 * Hr, **f64)[:, ::2].requires_grad_()  # a strided view
    c0 = r(B, H) if cell == "lstm" else None
    return (backend, cell, x, w_ih, r(G, Hr), r(G), r(G), h0, c0, r(Hr, H) if proj else None, None, False,
            r(G) if ln else None, r(G) if ln else None, *Variant())


def _fake_matches_real(op, args):
    """Every output's size and stride under FakeTensorMode equal the real kernel's, which are
    contiguous (the layout the ops define)."""
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        def fake(a):
            if isinstance(a, torch.Tensor):
                return mode.from_tensor(a)
            if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
                return [mode.from_tensor(t) for t in a]
            return a
        out = op(*[fake(a) for a in args])
    flat = lambda o: [t for x in (o if isinstance(o, (tuple, list)) else [o])
                      for t in (x if isinstance(x, (tuple, list)) else [x])]
    for k, (r, f) in enumerate(zip(flat(real), flat(out), strict=True)):
        assert tuple(r.shape) == tuple(f.shape), f"{op} output {k}: size {tuple(r.shape)} != fake {tuple(f.shape)}"
        assert r.stride() == f.stride(), f"{op} output {k}: stride {r.stride()} != fake {f.stride()}"
        assert r.is_contiguous(), f"{op} output {k} is not contiguous: {r.stride()}"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", ["lstm-proj", "gru-ln"])
def test_rnn_ops_noncontiguous_inputs(backend, case):
    cell, ln, proj = ("lstm", False, 2) if case == "lstm-proj" else ("gru", True, 0)
    args = _layer_args(backend, cell, ln=ln, proj=proj)
    torch.library.opcheck(torch.ops.fastrnn.rnn_layer, args)
    fwd_args = args + (True,)
    torch.library.opcheck(torch.ops.fastrnn.rnn_layer_fwd, fwd_args, test_utils=("test_schema", "test_faketensor"))
    _fake_matches_real(torch.ops.fastrnn.rnn_layer_fwd, fwd_args)
    with torch.no_grad():
        h_seq, h_T, c_T, saved = torch.ops.fastrnn.rnn_layer_fwd(*fwd_args)
    Hr = h_seq.shape[-1]
    grads = (_noncontig(T, B, Hr), torch.randn(Hr, B, **f64).t(),  # non-contiguous output grads
             torch.randn(B, H, **f64) if cell == "lstm" else None)
    needs = [a is not None and isinstance(a, torch.Tensor) and a.requires_grad
             for a in (args[p] for p in (2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 18))]
    bwd_args = args + tuple(g.requires_grad_() if g is not None else g for g in grads) + (h_seq, saved, needs)
    # rnn_layer_bwd is differentiable too (its autograd kernel is the double backward): all of
    # opcheck once (its AOT-dispatch tests are slow), schema and fake kernel otherwise
    torch.library.opcheck(torch.ops.fastrnn.rnn_layer_bwd, bwd_args,
                          **({} if ln else {"test_utils": ("test_schema", "test_faketensor")}))
    _fake_matches_real(torch.ops.fastrnn.rnn_layer_bwd, bwd_args)


def _sdpa_args(backend, mask):
    N, Nk, L, S, E, Ev = 4, 2, 5, 6, 3, 2
    q = _noncontig(N, L, E, requires_grad=True)
    k = _noncontig(Nk, S, E, perm=(1, 2, 0), requires_grad=True)
    v = _noncontig(Nk, S, Ev, requires_grad=True)
    bias = rows = None
    if mask:
        bias = torch.randn(2, L, S, **f64, requires_grad=True)
        rows = torch.tensor([0, 1, 1, 0])
    return (backend, q, k, v, bias, rows, 0.5, False, 0.0, None)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_sdpa_ops_noncontiguous_inputs(backend, mask):
    args = _sdpa_args(backend, mask)
    torch.library.opcheck(torch.ops.fastrnn.sdpa, args)
    torch.library.opcheck(torch.ops.fastrnn.sdpa_fwd, args, test_utils=("test_schema", "test_faketensor"))
    _fake_matches_real(torch.ops.fastrnn.sdpa_fwd, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, lse = torch.ops.fastrnn.sdpa_fwd(*plain)
    bwd_args = args + (_noncontig(*out.shape, requires_grad=True), out, lse, [True, True, True, mask])
    # differentiable too: all of opcheck once, schema and fake kernel otherwise (as above)
    torch.library.opcheck(torch.ops.fastrnn.sdpa_bwd, bwd_args,
                          **({} if mask else {"test_utils": ("test_schema", "test_faketensor")}))
    _fake_matches_real(torch.ops.fastrnn.sdpa_bwd, bwd_args)


# -- torch.compile in a child process -------------------------------------------------------------

CHILD = r'''
import json, sys
import torch
import fastrnn

compiler, backends = sys.argv[1], sys.argv[2].split(",")
results = {}
for backend in backends:
    backend = None if backend == "auto" else backend
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    lstm = fastrnn.LSTM(4, 3, bidirectional=True, batch_first=True, backend=backend)
    proj = torch.nn.Linear(6, 12)

    def model(x):
        # batch_first: the layer sees x.transpose(0, 1) and its input gradient is needed; the
        # Linear before it views that gradient as [B*T, I], which holds only if it is contiguous
        y, (h, c) = lstm(lin(x))
        # attention on a transposed view [1, T, heads, E] -> [1, heads, T, E]: with one batch
        # row, flattening to [heads, T, E] is a (non-contiguous) view, not a copy
        q = proj(y[:1]).view(1, y.shape[1], 4, 3).transpose(1, 2)
        a = fastrnn.scaled_dot_product_attention(q, q.flip(2), q, is_causal=True, backend=backend)
        return a.square().mean() + c.sum()

    params = list(lin.parameters()) + list(lstm.parameters()) + list(proj.parameters())
    x = torch.randn(2, 6, 4, requires_grad=True)
    eager = model(x)
    g_eager = torch.autograd.grad(eager, [x] + params)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    out = compiled(x)
    g_comp = torch.autograd.grad(out, [x] + params)
    results[str(backend)] = max([abs(out.item() - eager.item())] +
                                [(a - b).abs().max().item() for a, b in zip(g_comp, g_eager)])
print("RESULT " + json.dumps(results))
'''


def _run_child(compiler, backends):
    # No FX-graph / AOT-autograd cache: their keys do not cover a custom op's fake kernel, so a
    # graph compiled against an older one would be served (the compiled-kernel cache, keyed by
    # the generated source, stays on). One thread: the problem is tiny.
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0",
               OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, compiler, ",".join(backends)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_compile_backward_matches_eager_aot_eager():
    """Every CPU backend, aot_eager: forward and every gradient equal eager (float32)."""
    results = _run_child("aot_eager", cpu_backends())
    assert sorted(results) == sorted(cpu_backends())
    for case, err in results.items():
        assert err <= 1e-4, f"{case}: compiled differs from eager by {err:.3g}"


def test_compile_backward_matches_eager_inductor():
    """The inductor case: it asserts every fake stride at run time (assert_size_stride)."""
    results = _run_child("inductor", ["auto"])
    for case, err in results.items():
        assert err <= 1e-4, f"{case}: compiled differs from eager by {err:.3g}"
