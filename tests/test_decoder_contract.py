"""Every decoder backend against the reference (``fastrnn/backends/reference_decoder.py``):
outputs, attention, final states, saved tensors and every gradient by name, float64 and
float32, LSTM and GRU, both score forms, with and without input feeding, dropout and a memory
mask (with a row that attends to nothing)."""
import os

import pytest
import torch

from fastrnn import backends

import decoder_harness as harness

pytestmark = pytest.mark.usefixtures("one_thread")

# FASTRNN_TEST_DEVICE=cuda runs the triton cases on the GPU (bench/gpu_check.py), the reference on the CPU
DEVICE = os.environ.get("FASTRNN_TEST_DEVICE", "cpu")
_DEVICES = {"cpp": "cpu", "numba": "cpu", "triton": DEVICE}
BACKENDS = [b for b, d in _DEVICES.items() if backends.unavailable_reason(b, d, "decoder") is None]
OPTS = [frozenset(o) for o in (("feed", "mask"), ("additive", "feed", "mask", "drop"), ("additive",), ("drop",),
                               ("feed",))]


def _expected(cell, opts, **kw):
    args, grads = harness.make_case(cell, opts, **kw)
    return args, grads, harness.run("torch", args, grads)


def _run(backend, args, grads):
    device = _DEVICES[backend]
    return harness.run(backend, harness.to(args, device), harness.to(grads, device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("opts", OPTS, ids=lambda o: "-".join(sorted(o)) or "plain")
def test_backend_matches_reference_float64(backend, cell, opts):
    args, grads, want = _expected(cell, opts)
    harness.compare(_run(backend, args, grads), want, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("L,T,B,S,M,H", [(1, 1, 1, 1, 1, 1), (3, 5, 4, 9, 3, 5), (1, 3, 2, 17, 11, 13)])
def test_backend_sizes_float32(backend, cell, L, T, B, S, M, H):
    opts = frozenset(("additive", "feed", "mask", "drop")) if H % 2 else frozenset(("feed", "mask"))
    args, grads, want = _expected(cell, opts, L=L, T=T, B=B, S=S, M=M, H=H, dtype=torch.float32)
    harness.compare(_run(backend, args, grads), want, torch.float32)


def _strided(t):
    """The same values as a non-contiguous view (what the module passes: memory transposed from
    [S, B, M], w_feed a column slice of weight_ih_l0)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() > 1 else t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_backend_takes_strided_inputs(backend, cell):
    """The contract accepts any strides; every output and gradient is still the reference's."""
    args, grads, want = _expected(cell, frozenset(("additive", "feed", "mask", "drop")))
    args = dict(args, xw=_strided(args["xw"]), keys=_strided(args["keys"]), memory=_strided(args["memory"]),
                h0=_strided(args["h0"]), params=args["params"]._replace(w_feed=_strided(args["params"].w_feed),
                                                                        w_c=_strided(args["params"].w_c)))
    assert not args["memory"].is_contiguous() and not args["params"].w_feed.is_contiguous()
    grads = {k: _strided(g) if g is not None else None for k, g in grads.items()}
    harness.compare(_run(backend, args, grads), want, torch.float64)
