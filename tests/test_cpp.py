"""cpp-only paths the tiny shared tests do not reach: several hidden-unit chunks of uneven
width, threads, K-blocked and row-blocked GEMMs, and the big-GEMM entry points."""
import pytest
import torch

from fastrnn import backends
from fastrnn.ops.recurrence import GATES, packed_mask
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
