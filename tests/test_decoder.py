"""``fastrnn.AttentionDecoder`` as users meet it: the reference equal to a plain loop over
``nn.LSTMCell`` / ``nn.GRUCell`` written as users write it (float64, every gradient), every
backend through the module, ``step`` and ``prepare_memory``, batch_first / unbatched, states,
masks, dropout, dtypes, gradcheck and gradgradcheck, opcheck, torch.compile (in a child process),
the profiler, and bad inputs. The kernels themselves are pinned to the reference by
tests/test_decoder_contract.py."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastrnn
from fastrnn.testing import LoopAttentionDecoder, assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

I, H, M, S, T, B = 5, 6, 4, 7, 4, 3
BACKENDS = [b for b in fastrnn.available_backends("cpu", "decoder") if b != "triton"]
ALL_BACKENDS = fastrnn.available_backends("cpu", "decoder")


def make(cell="lstm", attention="additive", feeding=True, L=1, backend="torch", dtype=torch.float64, M=M, H=H,
         **kw):
    torch.manual_seed(0)
    return fastrnn.AttentionDecoder(cell, I, H, M, attention=attention, input_feeding=feeding, num_layers=L,
                                    backend=backend, dtype=dtype, **kw)


def data(dtype=torch.float64, M=M, mask=True, B=B):
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    mem = torch.randn(S, B, M, dtype=dtype, requires_grad=True)
    m = None
    if mask:
        m = torch.rand(B, S) > 0.4
        m[:, 0] = True
    return x, mem, m


def random_state(dec, B=B, dtype=torch.float64):
    L = dec.num_layers
    h, c, f = (torch.randn(L, B, dec.hidden_size, dtype=dtype), torch.randn(L, B, dec.hidden_size, dtype=dtype),
               torch.randn(B, dec.hidden_size, dtype=dtype))
    if dec.cell == "lstm":
        return (h, c, f) if dec.input_feeding else (h, c)
    return (h, f) if dec.input_feeding else h


def _flat(state):
    return [state] if isinstance(state, torch.Tensor) else list(state)


CONFIGS = [("lstm", "additive", True, 1), ("lstm", "dot", True, 2), ("lstm", "general", False, 1),
           ("gru", "additive", True, 2), ("gru", "dot", False, 1), ("gru", "general", True, 1)]


@pytest.mark.parametrize("cell,attention,feeding,L", CONFIGS)
def test_reference_equals_the_cell_loop(cell, attention, feeding, L):
    """The specification against the loop users write: outputs, attention, final state, and the
    gradient of every parameter, the inputs, the memory and the initial state (float64)."""
    M_ = H if attention == "dot" else M
    dec = make(cell, attention, feeding, L, M=M_)
    loop = LoopAttentionDecoder(cell, I, H, M_, attention, feeding, L).double().load_from(dec)
    x, mem, mask = data(M=M_)
    state = [s.requires_grad_() for s in _flat(random_state(dec))]
    st = state[0] if len(state) == 1 else tuple(state)
    got = dec(x, mem, mask, st)
    want = loop(x, mem, mask, st)
    outs_got = [got[0], got[1], *_flat(got[2])]
    outs_want = [want[0], want[1], *_flat(want[2])]
    for k, (a, b) in enumerate(zip(outs_got, outs_want)):
        assert_close(a, b, f"output {k}")
    weights = [torch.randn_like(o) for o in outs_want]
    loss = lambda outs: sum((o * w).sum() for o, w in zip(outs, weights))  # noqa: E731
    leaves_got = [x, mem, *state, *dec.parameters()]
    names = ["x", "memory", *(f"state {k}" for k in range(len(state))), *(n for n, _ in dec.named_parameters())]
    g_got = torch.autograd.grad(loss(outs_got), leaves_got)
    g_want = torch.autograd.grad(loss(outs_want), [x, mem, *state, *loop.parameters()])
    by_name = dict(zip(names[:2 + len(state)], g_want[:2 + len(state)]))
    loop_params = dict(loop.named_parameters())
    for k, cellmod in enumerate(loop.cells):
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            by_name[f"{n}_l{k}"] = g_want[2 + len(state) + list(loop_params).index(f"cells.{k}.{n}")]
    extra = {"memory_weight": "memory_proj.weight", "query_weight": "query_proj.weight",
             "query_bias": "query_proj.bias", "score_weight": "v.weight", "output_weight": "out.weight"}
    for n, ln in extra.items():
        if ln in loop_params:
            by_name[n] = g_want[2 + len(state) + list(loop_params).index(ln)].reshape(getattr(dec, n).shape)
    for n, g in zip(names, g_got):
        assert_close(g, by_name[n], f"grad {n}", grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_every_backend_through_the_module(backend, cell):
    """Every CPU backend gives the reference's outputs and gradients through the module, float32,
    two layers with dropout in training (the same mask: drawn by the module from the same seed)."""
    results = {}
    for b in ("torch", backend):
        dec = make(cell, "additive", True, 2, backend=b, dtype=torch.float32, dropout=0.3)
        x, mem, mask = (t.detach().requires_grad_() if t is not None and t.is_floating_point() else t
                        for t in data(torch.float32))
        torch.manual_seed(5)
        out, attn, state = dec(x, mem, mask)
        (out.square().sum() + attn.sum() * 0.5 + sum(s.sum() for s in state)).backward()
        results[b] = [out, attn, *state, x.grad, mem.grad, *(p.grad for p in dec.parameters())]
    for k, (a, e) in enumerate(zip(results[backend], results["torch"])):
        assert_close(a, e, f"result {k}", grad=k >= 5, scale=10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_step_loop_equals_forward(backend, cell):
    """Greedy decoding's form: T ``step`` calls with a prepared memory give ``forward``'s outputs,
    attention, state, and (free-running training steps through it) gradients. A one-step call
    takes its own path in the module (layer 0's whole input projection as one GEMM)."""
    dec = make(cell, "general", True, 2, backend=backend)
    x, mem, mask = data()
    out, attn, state = dec(x, mem, mask)
    want = torch.autograd.grad(out.square().sum() + attn.sum(), [x, mem, *dec.parameters()])
    prepared = dec.prepare_memory(mem, mask)
    st, loss = None, 0
    for t in range(T):
        o, a, st = dec.step(x[t], prepared, state=st)
        assert_close(o, out[t], f"step {t} output")
        assert_close(a, attn[t], f"step {t} attention")
        loss = loss + o.square().sum() + a.sum()
    for k, (a, b) in enumerate(zip(_flat(st), _flat(state))):
        assert_close(a, b, f"state {k}")
    got = torch.autograd.grad(loss, [x, mem, *dec.parameters()])
    for name, g, w in zip(["x", "memory", *(n for n, _ in dec.named_parameters())], got, want):
        assert_close(g, w, f"step-loop grad {name}", grad=True)


def test_batch_first_and_unbatched():
    dec = make("gru", "dot", True, 1, M=H)
    x, mem, mask = data(M=H)
    out, attn, state = dec(x, mem, mask)
    bf = dec(x.transpose(0, 1), mem.transpose(0, 1), mask, batch_first=True)
    assert_close(bf[0], out.transpose(0, 1), "batch_first output")
    assert_close(bf[1], attn.transpose(0, 1), "batch_first attention")
    one = dec(x[:, 1], mem[:, 1], mask[1])
    assert one[0].shape == (T, H) and one[1].shape == (T, S) and one[2][0].shape == (1, H)
    assert_close(one[0], out[:, 1], "unbatched output")
    assert_close(one[1], attn[:, 1], "unbatched attention")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_row_with_nothing_to_attend(backend):
    """A memory row fully masked out: zero attention and context, finite outputs and gradients
    (torch's softmax would give NaN)."""
    dec = make("lstm", "additive", True, 1, backend=backend, dtype=torch.float32)
    x, mem, mask = data(torch.float32)
    mask[1] = False
    out, attn, _ = dec(x, mem, mask)
    assert torch.equal(attn[:, 1], torch.zeros_like(attn[:, 1]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(mem.grad).all() and torch.isfinite(x.grad).all()
    assert torch.equal(mem.grad[:, 1], torch.zeros_like(mem.grad[:, 1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    dec = make("lstm", "additive", True, 2, backend=backend)
    x, mem, mask = data(B=2)
    h = torch.randn(2, 2, H, dtype=torch.float64, requires_grad=True)
    params = list(dec.parameters())

    def f(x, mem, h, *ps):
        with torch.nn.utils.stateless._reparametrize_module(dec, dict(zip([n for n, _ in dec.named_parameters()], ps))):
            out, attn, (h_n, c_n, feed) = dec(x, mem, mask, (h, h * 0.5, h[0]))
        return out, attn, h_n, c_n

    assert torch.autograd.gradcheck(f, (x, mem, h, *params))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradgradcheck(cell):
    """Double backward: the backward op's own backward (the reference's equations differentiated)."""
    backend = BACKENDS[0]
    dec = make(cell, "additive", True, 1, backend=backend)
    x, mem, mask = data(B=2)
    w = dec.output_weight

    def f(x, mem, w):
        with torch.nn.utils.stateless._reparametrize_module(dec, {"output_weight": w}):
            out, attn, _ = dec(x, mem, mask)
        return out, attn

    assert torch.autograd.gradgradcheck(f, (x, mem, w.detach().clone().requires_grad_()))


def test_no_grad_and_inference_mode_save_nothing():
    dec = make("gru", "additive", True, 2, backend=BACKENDS[0], dtype=torch.float32)
    x, mem, mask = data(torch.float32)
    with torch.no_grad():
        out, attn, _ = dec(x, mem, mask)
    with torch.inference_mode():
        out2, attn2, _ = dec(x, mem, mask)
    assert not out.requires_grad and torch.equal(out, out2) and torch.equal(attn, attn2)


def test_low_precision_computes_in_float32():
    dec = make("lstm", "general", True, 1, dtype=torch.float32, backend=BACKENDS[0])
    x, mem, mask = data(torch.float32)
    out32, attn32, _ = dec(x, mem, mask)
    out16, attn16, state = dec.bfloat16()(x.bfloat16(), mem.bfloat16(), mask)
    assert out16.dtype == attn16.dtype == state[0].dtype == torch.bfloat16
    assert (out16.float() - out32).abs().max() < 0.05
    dec.float()
    plain = dec(x, mem, mask)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac, _, _ = dec(x, mem, mask)
    assert out_ac.dtype == torch.float32 and torch.equal(out_ac, plain)


def test_dropout_only_in_training():
    dec = make("lstm", "dot", True, 3, M=H, dropout=0.5)
    x, mem, mask = data(M=H)
    dec.eval()
    a, b = dec(x, mem, mask)[0], dec(x, mem, mask)[0]
    assert torch.equal(a, b)
    dec.train()
    torch.manual_seed(1)
    c = dec(x, mem, mask)[0]
    torch.manual_seed(2)
    d = dec(x, mem, mask)[0]
    assert not torch.equal(c, a) and not torch.equal(c, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dec = make("lstm", "additive", True, 2, backend=backend)
    x, mem, mask = data()
    captured = {}
    from fastrnn.ops import decoder as ops
    real = ops._decoder_autograd

    def spy(*args):
        captured["args"] = args
        return real(*args)
    ops._decoder_autograd = spy
    try:
        dec(x, mem, mask)
    finally:
        ops._decoder_autograd = real
    # fresh leaves: opcheck runs the op and its backward several times
    args = [a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
            for a in captured["args"]]
    torch.library.opcheck(torch.ops.fastrnn.decoder, args)
    # the forward op on its own (what a compiled training graph calls)
    torch.library.opcheck(torch.ops.fastrnn.decoder_fwd, tuple(args) + (True,),
                          test_utils=("test_schema", "test_faketensor"))


def test_profiler_names_the_kernels():
    dec = make("gru", "additive", True, 1, backend=BACKENDS[0], dtype=torch.float32)
    x, mem, mask = data(torch.float32)
    with torch.profiler.profile() as prof:
        dec(x, mem, mask)[0].sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert f"fastrnn::decoder_fwd[{BACKENDS[0]}]" in names and f"fastrnn::decoder_bwd[{BACKENDS[0]}]" in names


COMPILE_CHILD = textwrap.dedent("""
    import sys, torch, fastrnn
    from fastrnn.testing import assert_close
    backend = sys.argv[1]
    torch.manual_seed(0)
    dec = fastrnn.AttentionDecoder("lstm", 5, 6, 4, attention="additive", num_layers=2, backend=backend)
    x, mem = torch.randn(4, 3, 5), torch.randn(7, 3, 4)
    mask = torch.rand(3, 7) > 0.3
    mask[:, 0] = True
    def run(model):
        out, attn, (h, c, f) = model(x, mem, mask)
        loss = out.square().sum() + attn.sum() + h.sum()
        loss.backward()
        grads = [p.grad.clone() for p in dec.parameters()]
        dec.zero_grad()
        return out, grads
    eager_out, eager_grads = run(dec)
    compiled = torch.compile(dec, fullgraph=True, backend="aot_eager")
    out, grads = run(compiled)
    assert_close(out, eager_out, "compiled output")
    for k, (a, b) in enumerate(zip(grads, eager_grads)):
        assert_close(a, b, f"compiled grad {k}", grad=True)
    print("ok")
""")


def test_compile_fullgraph_in_a_fresh_process():
    """fullgraph=True (any graph break raises), AOT autograd through the fake kernels, numbers
    equal to eager; in a child process, as a user's first call would be."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", COMPILE_CHILD, BACKENDS[0]], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# ---- bad inputs ---------------------------------------------------------------------------------

def test_constructor_rejects():
    with pytest.raises(ValueError, match="cell"):
        fastrnn.AttentionDecoder("rnn", 2, 3, 4)
    with pytest.raises(ValueError, match="attention"):
        fastrnn.AttentionDecoder("lstm", 2, 3, 4, attention="bahdanau")
    with pytest.raises(ValueError, match="memory_size == hidden_size"):
        fastrnn.AttentionDecoder("lstm", 2, 3, 4, attention="dot")
    with pytest.raises(ValueError, match="hidden_size"):
        fastrnn.AttentionDecoder("lstm", 2, 0, 4)
    with pytest.raises(ValueError, match="dropout"):
        fastrnn.AttentionDecoder("lstm", 2, 3, 4, dropout=1.5)
    with pytest.raises(ValueError, match="unknown backend"):
        fastrnn.AttentionDecoder("lstm", 2, 3, 4, backend="cuda")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_rejects(backend):
    dec = make("lstm", "additive", True, 2, backend=backend, dtype=torch.float32)
    x, mem, mask = data(torch.float32)
    cases = [
        (lambda: dec(x[..., :3], mem, mask), RuntimeError, "input_size"),
        (lambda: dec(x, mem[:, :2], mask[:2]), RuntimeError, "batch"),
        (lambda: dec(x, mem[..., :2], mask), RuntimeError, "memory_size"),
        (lambda: dec(x, mem, mask.int()), RuntimeError, "bool"),
        (lambda: dec(x, mem, mask[:, :3]), RuntimeError, r"\[B, S\]"),
        (lambda: dec(x, mem, mask, (torch.zeros(2, 3, H),) * 2), ValueError, "state"),
        (lambda: dec(x, mem, mask, (torch.zeros(1, 3, H), torch.zeros(2, 3, H), torch.zeros(3, H))), RuntimeError,
         "state h"),
        (lambda: dec(x[:0], mem, mask), RuntimeError, "T >= 1"),
        (lambda: dec(x, mem[:0], mask[:, :0]), RuntimeError, "S >= 1"),
        (lambda: dec(x.long(), mem, mask), RuntimeError, "floating"),
        (lambda: dec(x, mem.double(), mask), RuntimeError, "prepared"),
        (lambda: dec(x[0], mem, mask), ValueError, "unbatched"),
        (lambda: dec(x, "memory", mask), TypeError, "memory"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_op_rejects_bad_contract_arguments(backend):
    """The registered op checks its arguments itself (a direct ``torch.ops.fastrnn.decoder`` call)."""
    dec = make("gru", "dot", True, 1, backend=backend, dtype=torch.float32, M=H)
    x, mem, mask = data(torch.float32, M=H)
    captured = {}
    from fastrnn.ops import decoder as ops
    real = ops._decoder_autograd
    ops._decoder_autograd = lambda *a: captured.setdefault("args", a) and real(*a)
    try:
        dec(x.detach(), mem.detach(), mask)
    finally:
        ops._decoder_autograd = real
    args = list(captured["args"])
    names = ops.NAMES
    for name, bad, match in (("keys", args[names.index("keys")][:, :2], "keys"),
                             ("w_hh", args[names.index("w_hh")].double(), "dtype"),
                             ("h0", args[names.index("h0")][:, :1], "h0"),
                             ("mask", args[names.index("mask")].float(), "mask"),
                             ("cell", "rnn", "cell")):
        a = list(args)
        a[names.index(name)] = bad
        with pytest.raises((RuntimeError, ValueError), match=match):
            torch.ops.fastrnn.decoder(*a)


WORKERS_CHILD = textwrap.dedent("""
    import sys, threading, torch, fastrnn
    from torch.utils.data import DataLoader, Dataset
    backends = sys.argv[1].split(",")
    torch.manual_seed(0)
    # B=24, H=48: above the cpp and numba thresholds that keep small calls on one thread
    decs = {b: fastrnn.AttentionDecoder("gru", 16, 48, 40, attention="additive", num_layers=2, backend=b)
            for b in backends}
    for d in decs.values():
        d.load_state_dict(next(iter(decs.values())).state_dict())
    xs = [torch.randn(6 + i, 24, 16) for i in range(3)]
    mem = torch.randn(11, 24, 40)

    def compute(b, i):
        x = xs[i].clone().requires_grad_()
        out, attn, (h, f) = decs[b](x, mem)
        (out.square().sum() + attn.sum() + h.sum()).backward()
        return out.detach(), x.grad

    class Data(Dataset):
        def __len__(self):
            return len(backends) * len(xs)
        def __getitem__(self, k):
            return compute(backends[k // len(xs)], k % len(xs))

    expected = [compute(b, i) for b in backends for i in range(len(xs))]
    forked = list(DataLoader(Data(), batch_size=None, num_workers=2, multiprocessing_context="fork"))
    threaded = [None] * len(expected)
    def work(k):
        with torch.no_grad():
            threaded[k] = decs[backends[k // len(xs)]](xs[k % len(xs)], mem)[0]
    ts = [threading.Thread(target=work, args=(k,)) for k in range(len(expected))]
    [t.start() for t in ts]
    [t.join() for t in ts]
    for k, (e, f, t) in enumerate(zip(expected, forked, threaded)):
        assert torch.allclose(e[0], f[0], atol=1e-6) and torch.allclose(e[1], f[1], atol=1e-5), f"fork {k}"
        assert torch.allclose(e[0], t, atol=1e-6), f"thread {k}"
    print("ok")
""")


def test_fork_workers_and_python_threads():
    """DataLoader workers forked after the parent ran the kernels (torch's and numba's thread pools
    started), and several Python threads calling at once: the parent's results, no hang."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", WORKERS_CHILD, ",".join(BACKENDS)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("attention", ["additive", "dot"])
def test_nan_and_inf_stay_in_their_row(backend, attention):
    """Rows are independent: a NaN input or an inf memory entry poisons its own batch row (as the
    reference's equations do) and no other; every backend gives the reference's NaN pattern."""
    x, mem, _ = data(torch.float32, M=H)
    x, mem = x.detach(), mem.detach()
    x[1, 1, 2] = float("nan")
    mem[3, 2, 0] = float("inf")
    got = make("lstm", attention, True, 1, backend=backend, dtype=torch.float32, M=H)(x, mem)
    want = make("lstm", attention, True, 1, backend="torch", dtype=torch.float32, M=H)(x, mem)
    for name, g, w in (("output", got[0], want[0]), ("attention", got[1], want[1])):
        assert torch.equal(g.isnan(), w.isnan()), name
        assert not g[:, 0].isnan().any(), f"{name}: row 0 must stay finite"


def test_torch_func_vmap_and_per_sample_grads():
    """torch.func over the op (its vmap rule runs one op call per sample): vmap equals a loop,
    func.grad equals autograd, per-sample gradients by vmap(grad)."""
    dec = make("lstm", "additive", True, 1, backend=BACKENDS[0])
    x = torch.randn(3, T, 2, I, dtype=torch.float64)
    mem = torch.randn(S, 2, M, dtype=torch.float64)
    f = lambda xx: dec(xx, mem)[0]  # noqa: E731
    assert_close(torch.func.vmap(f)(x), torch.stack([f(xx) for xx in x]), "vmap")
    params = {n: p.detach() for n, p in dec.named_parameters()}

    def loss(p, xx):
        return torch.func.functional_call(dec, p, (xx, mem))[0].square().sum()
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for k in range(3):
        want = torch.autograd.grad(loss(dict(dec.named_parameters()), x[k]), list(dec.parameters()))
        for (n, g), w in zip(per_sample.items(), want):
            assert_close(g[k], w, f"per-sample grad {n} [{k}]", grad=True)


def test_fastrnn_bench_decoder_rows(tmp_path, capsys):
    """``python -m fastrnn bench --ops decoder``: gate, then the loop against the fused decoder."""
    from fastrnn.__main__ import main
    assert main(["bench", "--quick", "--ops", "decoder", "--backends", BACKENDS[0], "--rounds", "2",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("decoder ")]
    assert len(rows) == 2 and all(line.endswith("ok") for line in rows), out
