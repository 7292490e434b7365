"""The harness of the decoder contract tests: build a case, run a backend's ``decoder_forward``
and ``decoder_backward``, compare every output and gradient by name with the reference
(``fastrnn/backends/reference_decoder.py``).

Options (``opts``): additive (the additive score; else the bilinear one), feed (input feeding),
drop (a dropout mask between layers), mask (a memory mask; row 1 fully masked when
``empty_row``), lstm/gru via ``cell``.
"""
from __future__ import annotations

import torch

from fastrnn import backends
from fastrnn.contract.decoder import GATES, DecoderParams
from fastrnn.testing import assert_close

OUT_NAMES = ("out", "attn", "h_n", "c_n")


def make_case(cell, opts=frozenset(("feed", "mask")), L=2, T=4, B=3, S=5, M=6, H=7, dtype=torch.float64,
              device="cpu", empty_row=True, seed=0):
    """``(args, grads)``: the contract arguments by name (fresh random values, never zeros) and
    the gradients of the four outputs."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell] * H
    r = lambda *s, scale=0.5: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    params = DecoderParams(r(G, H) if "feed" in opts else None, r(L - 1, G, H), r(L - 1, G), r(L, G, H), r(L, G),
                           *((r(H, H), r(H), r(H)) if "additive" in opts else (None, None, None)), r(H, M + H))
    mask = None
    if "mask" in opts:
        mask = torch.rand(B, S, generator=g) > 0.4
        mask[:, 0] = True
        if empty_row and B > 1:
            mask[1] = False  # a row that attends to nothing: zero attention and context
    drop = None
    if "drop" in opts and L > 1:
        drop = ((torch.rand(T, L - 1, B, H, generator=g) > 0.3).to(torch.float64) / 0.7).to(dtype)
    args = dict(cell=cell, xw=r(T, B, G, scale=1.0), keys=r(B, S, H, scale=1.0), memory=r(B, S, M, scale=1.0),
                mask=mask, params=params, h0=r(L, B, H, scale=1.0),
                c0=r(L, B, H, scale=1.0) if cell == "lstm" else None, feed0=r(B, H, scale=1.0), drop=drop)
    grads = dict(grad_out=r(T, B, H, scale=1.0), grad_attn=r(T, B, S, scale=1.0), grad_h_n=r(L, B, H, scale=1.0),
                 grad_c_n=r(L, B, H, scale=1.0) if cell == "lstm" else None)
    if device != "cpu":
        args, grads = to(args, device), to(grads, device)
    return args, grads


def to(d, device):
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, DecoderParams):
            return DecoderParams(*(move(t) for t in x))
        return x
    return {k: move(x) for k, x in d.items()}


def _clone(d):
    return {k: (x.clone() if isinstance(x, torch.Tensor) else
                DecoderParams(*(t if t is None else t.clone() for t in x)) if isinstance(x, DecoderParams) else x)
            for k, x in d.items()}


def run(backend, args, grads):
    """Forward (training) then backward on clones; every result by name."""
    impl = backends.load(backend, "decoder")
    a = _clone(args)
    out, attn, h_n, c_n, saved = impl.decoder_forward(**a, training=True)
    res = dict(zip(OUT_NAMES, (out, attn, h_n, c_n)))
    res.update(zip(("gates", "cells", "hs", "ctx"), saved))
    bwd = impl.decoder_backward(**_clone(grads), **_clone(args), out=out, attn=attn, saved=saved)
    res.update(bwd._asdict())
    # inference returns the same outputs and nothing saved
    inf = impl.decoder_forward(**_clone(args), training=False)
    res.update({f"{k} (inference)": v for k, v in zip(OUT_NAMES, inf[:4])})
    res["saved (inference)"] = inf[4]
    return res


def compare(actual, expected, dtype):
    """Every named result of a backend against the reference's."""
    assert actual["saved (inference)"] == (), "inference must save nothing"
    for name, want in expected.items():
        if name == "saved (inference)":
            continue
        got = actual[name]
        if name == "grad_gh" and expected["c_n"] is not None:
            want = expected["grad_gi"]  # LSTM: one pre-activation gradient
        if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and want.dtype != got.dtype:
            raise AssertionError(f"{name}: dtype {got.dtype}, expected {want.dtype}")
        scale = 10.0 if dtype == torch.float32 else 1.0
        assert_close(got.cpu() if got is not None else None, want, name, grad=name.startswith("grad"), scale=scale)
