"""Backend registry: the one place that knows which backends exist and picks one.

A backend implements each op family in its own module ``fastrnn.backends.<backend>_<op>``
(``reference_rnn``, ``cpp_rnn``, ``numba_sdpa``, ...), so that work on one backend or op never
touches another's file. Each such module defines the op contract of ``docs/architecture.md``
(``rnn_forward`` / ``rnn_backward`` for the recurrence, ``sdpa_forward`` / ``sdpa_backward``
for attention, ``decoder_forward`` / ``decoder_backward`` for the attention
decoder), ``name`` (the backend name), and ``availability(device_type) -> str | None``:
``None`` when it can run on that device type, otherwise the reason why not.

Selection rule (one rule, used by every op):
  explicit ``backend=`` argument  >  ``FASTRNN_BACKEND`` environment variable
  >  the first usable backend in ``PREFERENCE[device_type]``.
An explicit request (argument or environment variable) that cannot be served raises a
``RuntimeError`` that says why; automatic selection falls through to the next backend.
Backend modules are imported lazily, so ``import fastrnn`` needs only torch.
"""
from __future__ import annotations

import importlib
import os
import types
import warnings

import torch

# backend name -> module-name prefix. "torch" is the plain-PyTorch reference (the specification).
BACKENDS = {"cpp": "cpp", "numba": "numba", "triton": "triton", "torch": "reference"}
OPS = ("rnn", "sdpa", "decoder")

# Automatic choice per device type, best first. The Triton interpreter is never chosen
# automatically on CPU (it exists for tests), but it is usable when asked for explicitly.
PREFERENCE = {
    "cuda": ("triton", "torch"),
    "cpu": ("cpp", "numba", "torch"),
}

ENV_VAR = "FASTRNN_BACKEND"

_loaded: dict[tuple[str, str], types.ModuleType | str] = {}


def _device_type(device) -> str:
    if device is None:
        return "cpu"
    if isinstance(device, str):
        return device.split(":")[0]
    return device.type


def check_name(backend: str | None) -> str | None:
    """``backend`` itself if it is None or a known backend name; else ValueError (at construction,
    ``convert`` or CLI parse time, not at the first forward)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"fastrnn: unknown backend {backend!r}; expected None (automatic) or one of "
                         f"{sorted(BACKENDS)}")
    return backend


def load(name: str, op: str) -> types.ModuleType | str:
    """Import backend ``name``'s module for ``op``; the module, or a string saying why not."""
    key = (name, op)
    if key not in _loaded:
        modname = f"fastrnn.backends.{BACKENDS[name]}_{op}"
        try:
            _loaded[key] = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            _loaded[key] = (f"backend {name!r} does not implement op {op!r}" if exc.name == modname
                            else f"import failed: {exc}")
        except Exception as exc:  # an optional dependency missing or broken: report, don't crash
            _loaded[key] = f"import failed: {type(exc).__name__}: {exc}"
    return _loaded[key]


def unavailable_reason(name: str, device="cpu", op: str = "rnn") -> str | None:
    """``None`` if backend ``name`` can run ``op`` on ``device``, else the reason it cannot."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; known backends: {sorted(BACKENDS)}"
    if op not in OPS:
        return f"unknown op {op!r}; known ops: {OPS}"
    mod = load(name, op)
    if isinstance(mod, str):
        return mod
    return mod.availability(_device_type(device))


def backend_status(device="cpu", op: str = "rnn") -> dict[str, str | None]:
    """Every known backend -> ``None`` (usable on ``device``) or the reason it is not."""
    return {name: unavailable_reason(name, device, op) for name in BACKENDS}


def available_backends(device="cpu", op: str = "rnn") -> list[str]:
    """Names of the backends usable on ``device`` (best first for automatic selection)."""
    dtype = _device_type(device)
    # preference order first, then the rest; the reference always last
    order = [n for n in PREFERENCE.get(dtype, ()) if n != "torch"]
    order += [n for n in BACKENDS if n not in order and n != "torch"] + ["torch"]
    return [n for n in order if unavailable_reason(n, dtype, op) is None]


# (requested backend, device type, op) -> the module resolve chose. What a backend can run never
# changes within a process (modules are imported once, availability depends on the device type
# only), and a small call resolves on every step: ~2 us without the memo, ~0.5 with it.
_resolved: dict[tuple[str | None, str, str], types.ModuleType] = {}


def resolve(backend: str | None, device, op: str) -> types.ModuleType:
    """The backend module that runs ``op`` on ``device``, by the selection rule above."""
    requested, source = backend, "backend="
    if requested is None and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR], ENV_VAR
    dtype = _device_type(device)
    key = (requested, dtype, op)
    if key not in _resolved:
        _resolved[key] = _resolve(requested, source, dtype, op)
    return _resolved[key]


def _resolve(requested, source, dtype, op):
    if requested is not None:
        reason = unavailable_reason(requested, dtype, op)
        if reason is not None:
            raise RuntimeError(
                f"fastrnn: backend {requested!r} (from {source}) cannot run {op} on {dtype}: {reason}"
            )
        return load(requested, op)
    preferred = PREFERENCE.get(dtype, ("torch",))
    for name in preferred:
        if unavailable_reason(name, dtype, op) is None:
            if name != preferred[0]:
                _warn_fallback(preferred[0], name, dtype, op)
            return load(name, op)
    raise RuntimeError(f"fastrnn: no backend can run {op} on device type {dtype!r}")


_warned: set[tuple[str, str]] = set()


def _warn_fallback(wanted: str, used: str, device_type: str, op: str) -> None:
    """Once per process and op: the automatic choice could not use the best backend (a failed C++
    build is otherwise invisible after a default ``pip install``)."""
    if (device_type, op) in _warned:
        return
    _warned.add((device_type, op))
    warnings.warn(f"fastrnn: backend {wanted!r} is unavailable for {op} on {device_type} "
                  f"({unavailable_reason(wanted, device_type, op)}); using {used!r} instead. "
                  "`python -m fastrnn info` lists every backend and why it is (not) usable.",
                  RuntimeWarning, stacklevel=3)


# What each backend computes in; other floating dtypes run in float32 and are cast back by the
# user-facing functions (fastrnn.functional, fastrnn.attention).
_DEFAULT_DTYPES = (torch.float32, torch.float64)


def plan(backend: str | None, device, op: str, dtype: torch.dtype) -> tuple[str, torch.dtype]:
    """``(backend name, compute dtype)`` for ``op`` on ``device`` with inputs of ``dtype``, by the
    selection rule (raises as ``resolve``). The compute dtype is ``dtype`` if the backend computes
    in it, else float32.

    torch.compile treats the result as a constant of the traced code (what
    ``torch.compiler.assume_constant_result`` marks; set directly so ``import fastrnn`` does not
    import dynamo): resolving imports backend modules lazily, which dynamo cannot trace, and the
    choice cannot change within a process except through ``FASTRNN_BACKEND``.
    """
    impl = resolve(backend, device, op)
    return impl.name, (dtype if dtype in getattr(impl, "dtypes", _DEFAULT_DTYPES) else torch.float32)


plan._dynamo_marked_constant = True
