"""cpp-only paths the tiny shared tests do not reach: several hidden-unit chunks of uneven
width, threads, K-blocked and row-blocked GEMMs, and the big-GEMM entry points."""
import pytest
import torch

from fastrnn import backends
from fastrnn.contract.rnn import GATES, packed_mask
from fastrnn.testing import assert_close

cpp = backends.load("cpp", "rnn")
pytestmark = pytest.mark.skipif(isinstance(cpp, str) or cpp.availability("cpu") is not None,
                                reason=f"cpp backend unavailable: {cpp if isinstance(cpp, str) else ''}")


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 23), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_threaded_matches_reference(threads, cell, proj, packed, reverse):
    # H = 70: chunks of uneven width; B = 19 rows: big enough for the threaded paths.
    T, B, H = 4, 19, 70
    G, Hr = GATES[cell] * H, proj or H
    xw = torch.randn(T, B, G)
    args = dict(w_hh=torch.randn(G, Hr) * 0.2, b_hh=torch.randn(G) * 0.1, h0=torch.randn(B, Hr),
                c0=torch.randn(B, H) if cell == "lstm" else None,
                w_hr=torch.randn(Hr, H) * 0.2 if proj else None,
                batch_sizes=torch.tensor([19, 15, 15, 4]) if packed else None)
    ref = backends.load("torch", "rnn")
    outs = []
    for impl in (ref, cpp):
        h_seq, h_T, c_T, saved = impl.rnn_forward(cell, xw.clone(), reverse=reverse, training=True, **args)
        torch.manual_seed(3)
        g_seq = torch.randn_like(h_seq)
        if packed:
            g_seq = g_seq * packed_mask(args["batch_sizes"], B, "cpu").unsqueeze(-1)
        back = impl.rnn_backward(cell, g_seq, torch.randn_like(h_T),
                                 torch.randn_like(c_T) if c_T is not None else None,
                                 args["w_hh"], args["w_hr"], args["h0"], args["c0"], args["batch_sizes"],
                                 reverse, saved)
        outs.append((h_seq, h_T, c_T) + tuple(back))
    names = ["h_seq", "h_T", "c_T", "grad_xw", "grad_hw", "grad_h0", "grad_c0", "grad_w_hr"]
    for name, a, e in zip(names, outs[1], outs[0]):
        assert_close(a, e, f"cpp/{cell}/{name}", grad=name.startswith("grad"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M,K,N", [(7, 5, 3), (1, 300, 150), (300, 600, 70), (513, 33, 1030)])
def test_big_gemms_match_torch(threads, dtype, M, K, N):
    a, w, b = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
    scale = K ** 0.5  # GEMM error grows with the length of the reduction
    assert_close(cpp.linear(a, w, b), torch.addmm(b, a, w.t()), "linear", scale=scale)
    assert_close(cpp.linear(a, w, None), a @ w.t(), "linear without bias", scale=scale)
    assert_close(cpp.mm(a, w.t()), a @ w.t(), "mm (non-contiguous right operand)", scale=scale)
    c = torch.randn(M, N, dtype=dtype)
    assert_close(cpp.mm_tn(a, c), a.t() @ c, "mm_tn", scale=M ** 0.5)
    assert_close(cpp.mm_tn(c, a), c.t() @ a, "mm_tn (other side transposed)", scale=M ** 0.5)


def test_long_sequence_stays_finite():
    T, B, H = 10_000, 2, 8
    for cell in ("lstm", "gru", "rnn_tanh"):
        G = GATES[cell] * H
        h_seq, h_T, c_T, _ = cpp.rnn_forward(cell, torch.randn(T, B, G) * 3, torch.randn(G, H), torch.randn(G),
                                             torch.randn(B, H), torch.randn(B, H) if cell == "lstm" else None,
                                             None, None, False, False)
        assert torch.isfinite(h_seq).all() and torch.isfinite(h_T).all(), cell


def test_huge_preactivations_saturate_like_torch():
    """exp is clamped internally: +-1e4 pre-activations must give exactly the saturated values.
    (The recurrent part is switched off on purpose so the activation sees exactly these values.)"""
    x = torch.tensor([[-1e4, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 1e4]])
    H = x.shape[1]
    h_seq, _, _, _ = cpp.rnn_forward("rnn_tanh", x.view(1, 1, H).clone(), torch.zeros(H, H), None,
                                     torch.zeros(1, H), None, None, None, False, False)
    assert_close(h_seq.view(-1), torch.tanh(x.view(-1)), "tanh saturation")


VARIANT_CASES = [  # (cell, proj, Variant fields) at sizes with several uneven chunks and threaded steps
    ("lstm", 0, {"ln", "peephole", "dropout", "zoneout", "reset"}),
    ("lstm", 23, {"ln", "peephole", "dropout", "zoneout", "reset"}),
    ("lstm", 0, {"peephole"}),
    ("lstm", 0, {"zoneout"}),
    ("gru", 0, {"ln", "dropout", "zoneout", "reset"}),
    ("gru", 0, {"before", "dropout", "zoneout", "reset"}),
    ("rnn_tanh", 0, {"ln", "dropout", "zoneout", "reset"}),
    ("rnn_relu", 0, {"zoneout"}),
]


@pytest.mark.parametrize("cell,proj,opts", VARIANT_CASES,
                         ids=[f"{c}{p or ''}-{'-'.join(sorted(o))}" for c, p, o in VARIANT_CASES])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_variants_chunked_threaded_match_reference(threads, cell, proj, opts, packed, reverse):
    """The variant loops where the contract tests' tiny sizes do not go: several hidden-unit
    chunks (the layer norm's row statistics span them), row-parallel passes, threaded GEMMs."""
    from fastrnn.contract.rnn import Variant
    T, B, H = 5, 19, 70
    G, Hr = GATES[cell] * H, proj or H
    bs = torch.tensor([19, 15, 15, 4, 2]) if packed else None
    v = {}
    if "ln" in opts:
        v.update(ln_hh_weight=1 + 0.3 * torch.randn(G), ln_hh_bias=0.2 * torch.randn(G))
        if cell == "lstm":
            v.update(ln_c_weight=1 + 0.3 * torch.randn(H), ln_c_bias=0.2 * torch.randn(H))
    if "peephole" in opts:
        v.update(peephole=0.5 * torch.randn(3, H))
    if "dropout" in opts:
        v.update(rec_mask=torch.bernoulli(torch.full((B, Hr), 0.7)) / 0.7)
    if "zoneout" in opts:
        v.update(zoneout_h=torch.bernoulli(torch.full((T, B, Hr), 0.25)))
        if cell == "lstm":
            v.update(zoneout_c=torch.bernoulli(torch.full((T, B, H), 0.25)))
    if "reset" in opts:
        v.update(reset=torch.rand(T, B) < 0.3)
    if "before" in opts:
        v.update(reset_after=False)
    variant = Variant(**v)
    xw = torch.randn(T, B, G)
    args = dict(w_hh=torch.randn(G, Hr) * 0.2, b_hh=torch.randn(G) * 0.1, h0=torch.randn(B, Hr),
                c0=torch.randn(B, H) if cell == "lstm" else None,
                w_hr=torch.randn(Hr, H) * 0.2 if proj else None, batch_sizes=bs)
    g_seq = torch.randn(T, B, Hr)
    if packed:
        g_seq = g_seq * packed_mask(bs, B, "cpu").unsqueeze(-1)
    g_h, g_c = torch.randn(B, Hr), torch.randn(B, H) if cell == "lstm" else None
    outs = []
    for impl in (backends.load("torch", "rnn"), cpp):
        h_seq, h_T, c_T, saved = impl.rnn_forward(cell, xw.clone(), reverse=reverse, training=True,
                                                  variant=variant, **args)
        back = impl.rnn_backward(cell, g_seq, g_h, g_c, args["w_hh"], args["w_hr"], args["h0"], args["c0"], bs,
                                 reverse, saved, variant=variant)
        outs.append((h_seq, h_T, c_T) + tuple(back[:5]) + tuple(back[5]))
    names = ["h_seq", "h_T", "c_T", "grad_xw", "grad_hw", "grad_h0", "grad_c0", "grad_w_hr",
             "ln_hh_weight", "ln_hh_bias", "ln_c_weight", "ln_c_bias", "peephole", "w_hn"]
    for name, a, e in zip(names, outs[1], outs[0]):
        # the parameter gradients sum over T*B rows
        assert_close(a, e, f"cpp/{cell}/{name}", grad=name not in ("h_seq", "h_T", "c_T"),
                     scale=1.0 if name.startswith(("h_", "c_", "grad_")) else (T * B) ** 0.5)
