"""Comparison helpers shared by the tests and the benchmark's correctness gate.

One tolerance rule for the whole project:
  float64  atol = rtol = 1e-10 (scaled by ``grad_scale`` for long accumulations)
  float32  1e-5 on forward values, 1e-4 on gradients
  float16 / bfloat16: the flash-attention rule -- the error against a float64 reference may be at
  most 2x the error of PyTorch's own computation in that dtype (see ``assert_low_precision``).
"""
from __future__ import annotations

import torch

_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}


def tolerance(dtype: torch.dtype, grad: bool = False) -> float:
    fwd, bwd = _TOL[dtype]
    return bwd if grad else fwd


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference scaled like ``assert_close`` (|a - e| / (1 + |e|)); NaN where NaNs
    disagree in position."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if actual.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.equal(a.isnan(), e.isnan()):
        return float("nan")
    finite = ~e.isnan()
    return ((a - e).abs() / (1 + e.abs()))[finite].max().item() if finite.any() else 0.0


def assert_close(actual, expected, name: str, grad: bool = False, scale: float = 1.0):
    """Compare one named tensor with the dtype's tolerance; the message names what failed."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{name}: one side is None"
        return
    tol = tolerance(expected.dtype, grad) * scale
    err = max_error(actual, expected)
    assert err == err, f"{name}: NaN pattern differs"
    assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.1g} ({expected.dtype})"


def assert_low_precision(actual, expected_lowp, reference_fp64, name: str, factor: float = 2.0,
                         floor: float = 1e-5):
    """Flash-attention rule: |actual - ref| <= factor * |torch_lowp - ref| (+ a small floor)."""
    err = (actual.double() - reference_fp64).abs().max().item()
    base = (expected_lowp.double() - reference_fp64).abs().max().item()
    assert err <= factor * base + floor, f"{name}: error {err:.3g} > {factor} x torch's {base:.3g}"
