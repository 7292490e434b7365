"""C++-specific tests of the attention decoder (csrc/decoder.cpp): the extension's own boundary
checks (a direct call with bad tensors raises, never crashes) and the threaded path (row blocks
per thread) against the one-thread result. Equality with the reference is
tests/test_decoder_contract.py's."""
import pytest
import torch

from fastrnn import backends

import decoder_harness as harness

pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpp", "cpu", "decoder") is not None,
                                reason="fastrnn._C_decoder not built")


def _ext():
    from fastrnn.backends import cpp_decoder
    return cpp_decoder, cpp_decoder._C


def _c_args(cell, opts, **kw):
    """The C++ forward's positional arguments for a harness case, and the case itself."""
    mod, _ = _ext()
    args, grads = harness.make_case(cell, opts, **kw)
    a = args
    return list(mod._args(cell, a["xw"], a["keys"], a["memory"], a["mask"], a["params"], a["h0"], a["c0"],
                          a["feed0"], a["drop"])), args, grads


# positions in the C++ argument list (see cpp_decoder._args)
XW, KEYS, MEMORY, MASK, W_FEED, W_IN, B_IN, W_HH, B_HH, W_Q, B_Q, V, W_C, H0, C0, FEED0, DROP = range(1, 18)


def _bad_cases(args):
    """(what, modified argument list) pairs, each one of which the extension must reject."""
    cases = []

    def put(what, i, t):
        a = list(args)
        a[i] = t
        cases.append((what, a))

    put("xw wrong G", XW, args[XW][:, :, :-1].contiguous())
    put("xw 2-D", XW, args[XW][0])
    put("keys wrong S", KEYS, args[KEYS][:, :-1].contiguous())
    put("memory wrong B", MEMORY, args[MEMORY][:-1].contiguous())
    put("mask wrong S", MASK, args[MASK][:, :-1].contiguous())
    put("mask not bool", MASK, args[MASK].to(args[XW].dtype))
    put("w_hh wrong H", W_HH, args[W_HH][:, :, :-1].contiguous())
    put("b_hh wrong L", B_HH, args[B_HH][:-1].contiguous())
    put("w_in wrong L", W_IN, torch.cat([args[W_IN], args[W_IN]]))
    put("w_c wrong width", W_C, args[W_C][:, :-1].contiguous())
    put("w_c non-contiguous", W_C, torch.empty(args[W_C].shape[::-1], dtype=args[W_C].dtype).t())
    put("keys non-contiguous", KEYS, args[KEYS].transpose(0, 1).contiguous().transpose(0, 1))
    put("xw float16", XW, args[XW].half())
    put("h0 float32", H0, args[H0].float())
    put("c0 missing (LSTM)", C0, None)
    put("feed0 wrong B", FEED0, args[FEED0][:-1].contiguous())
    put("drop wrong T", DROP, args[DROP][:-1].contiguous())
    put("v without w_q", W_Q, None)
    put("w_q wrong shape", W_Q, args[W_Q][:-1].contiguous())
    cases.append(("unknown cell", [7] + list(args[1:])))
    return cases


@pytest.mark.parametrize("which", range(20))
def test_forward_rejects_bad_input(which):
    _, C = _ext()
    args, _, _ = _c_args("lstm", frozenset(("additive", "feed", "mask", "drop")))
    what, bad = _bad_cases(args)[which]
    with pytest.raises(RuntimeError):
        C.decoder_forward(*bad, True)
    C.decoder_forward(*args, True)  # the good arguments still run


def test_backward_rejects_bad_input():
    mod, C = _ext()
    args, case, grads = _c_args("gru", frozenset(("additive", "feed", "mask", "drop")))
    out, attn, h_n, c_n, *saved = C.decoder_forward(*args, True)
    g = [grads["grad_out"], grads["grad_attn"], grads["grad_h_n"], None]
    good = [1, *g, *args[1:], out, attn, saved]
    C.decoder_backward(*good)
    for i, bad in ((1, g[0][:-1].contiguous()), (2, g[1].float()), (3, g[2].transpose(1, 2)),
                   (4, grads["grad_h_n"]),  # grad_c_n given to a GRU
                   (len(good) - 3, out[:, :-1].contiguous()), (len(good) - 1, saved[:3]),
                   (len(good) - 1, [saved[0][..., :-1].contiguous(), *saved[1:]]),
                   (len(good) - 1, [*saved[:2], saved[2].float(), saved[3]])):
        b = list(good)
        b[i] = bad
        with pytest.raises(RuntimeError):
            C.decoder_backward(*b)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("opts", [frozenset(("additive", "feed", "mask")), frozenset(("feed", "mask", "drop"))],
                         ids=["additive", "dot"])
def test_threaded_equals_one_thread(cell, opts):
    """B = 19 rows split into two blocks (uneven) when two threads run; one thread runs them in one.
    ~0.9e7 multiply-adds, above csrc/decoder.cpp's kMinParallelWork (4.2e6) that keeps small calls
    on one task."""
    args, grads = harness.make_case(cell, opts, L=2, T=6, B=19, S=11, M=24, H=64, dtype=torch.float64)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = harness.run("cpp", args, grads)
        torch.set_num_threads(2)
        two = harness.run("cpp", args, grads)
    finally:
        torch.set_num_threads(n)
    for name, want in one.items():
        if isinstance(want, torch.Tensor) and want.numel():
            # not bitwise: grad_v sums per-block partials, and a block's GEMMs may take another
            # micro-kernel for 10 rows than one call takes for 19 (oneDNN and MKL choose by M), whose
            # sums round differently: up to 1.7e-12 of the tensor's scale measured on an AMD EPYC
            # (Zen 5; bitwise equal where the test was written). A race or a wrong block is off by O(scale).
            scale = want.abs().max().item()
            torch.testing.assert_close(two[name], want, rtol=0, atol=1e-10 * scale, msg=name)


def test_w_feed_row_stride():
    """w_feed as the module passes it, a column slice of weight_ih_l0 (row stride I + H), is read in
    place and gives the contiguous result; a column stride other than 1 is refused."""
    _, C = _ext()
    for B in (3, 8):  # T * B below and above kPackRowSteps: read in place, and packed
        args, _, _ = _c_args("lstm", frozenset(("additive", "feed", "mask")), B=B)
        w = args[W_FEED]
        wide = torch.cat([torch.randn(w.shape[0], 5, dtype=w.dtype), w], 1)
        strided = list(args)
        strided[W_FEED] = wide[:, 5:]
        assert not strided[W_FEED].is_contiguous()
        for a, b in zip(C.decoder_forward(*strided, True), C.decoder_forward(*args, True)):
            if a is not None and b is not None:
                assert torch.equal(a, b)
        strided[W_FEED] = torch.empty(w.shape[::-1], dtype=w.dtype).t().copy_(w)  # column stride G
        with pytest.raises(RuntimeError, match="w_feed"):
            C.decoder_forward(*strided, True)
