"""What a backend module defines: one module per backend and op family,
``fastrnn/backends/<backend>_<op>.py`` (``cpp_rnn``, ``numba_sdpa``, ...), found by the registry
(``fastrnn/backends/__init__.py``). A module is checked structurally against these protocols
(``conforms``; tests/test_registry.py runs it on every backend module).

Must define: ``name``, ``availability`` and the op family's two contract functions. May define:
``dtypes`` (what it computes in; default float32 and float64, others run in float32 and are cast
back by the user-facing functions), ``info()`` (what ``python -m fastrnn info`` prints), and for
the recurrence its own big GEMMs (``linear``, ``mm``, ``mm_tn``: the op layer uses them instead of
torch's when present), ``saved_layout`` (when its saved tensors differ in dtype from the
default layout, ``contract.rnn.saved_layout``) and ``cell_step`` with ``set_create_graph_backward`` (one plain
cell step with its input projection and its own autograd node: the small calls' path,
``fastrnn/ops/small_calls.py``; ``cpp_rnn`` documents them).
"""
from __future__ import annotations

import types
from typing import Protocol

import torch

from .decoder import DecoderGrads, DecoderParams
from .rnn import Saved, Variant, VariantGrads
from .sdpa import SdpaMask


class Backend(Protocol):
    name: str

    def availability(self, device_type: str) -> str | None:
        """None when the backend can run on this device type, else the reason it cannot."""


class RecurrenceBackend(Backend, Protocol):
    """One layer, one direction, the whole sequence (``reference_rnn`` documents every argument)."""

    def rnn_forward(self, cell: str, xw: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None,
                    h0: torch.Tensor, c0: torch.Tensor | None, w_hr: torch.Tensor | None,
                    batch_sizes: torch.Tensor | None, reverse: bool, training: bool,
                    variant: Variant | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple]:
        """-> (h_seq [T, B, Hr], h_T [B, Hr], c_T [B, H] | None, saved (``saved_layout``; empty
        when not training))."""

    def rnn_backward(self, cell: str, grad_h_seq: torch.Tensor, grad_h_T: torch.Tensor,
                     grad_c_T: torch.Tensor | None, w_hh: torch.Tensor, w_hr: torch.Tensor | None,
                     h0: torch.Tensor, c0: torch.Tensor | None, batch_sizes: torch.Tensor | None, reverse: bool,
                     saved: tuple, variant: Variant | None = None) -> tuple:
        """-> (grad_xw [T, B, G], grad_hw [T, B, G], grad_h0 [B, Hr], grad_c0 [B, H] | None,
        grad_hproj [T, B, Hr] | None, VariantGrads | None): always six."""


class AttentionBackend(Backend, Protocol):
    """Flash attention on flattened heads (``reference_sdpa`` documents every argument)."""

    def sdpa_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SdpaMask | None,
                     scale: float, causal: bool, dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (out [N, L, Ev], lse [N, L])."""

    def sdpa_backward(self, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, mask: SdpaMask | None, scale: float, causal: bool,
                      dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (grad_q [N, L, E], grad_k [Nk, S, E], grad_v [Nk, S, Ev])."""


class DecoderBackend(Backend, Protocol):
    """The whole teacher-forced attention decoder (``reference_decoder`` documents every argument)."""

    def decoder_forward(self, cell: str, xw: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor,
                        mask: torch.Tensor | None, params: DecoderParams, h0: torch.Tensor, c0: torch.Tensor | None,
                        feed0: torch.Tensor, drop: torch.Tensor | None, training: bool) -> tuple:
        """-> (out [T, B, H], attn [T, B, S], h_n [L, B, H], c_n [L, B, H] | None, saved (empty when
        not training))."""

    def decoder_backward(self, cell: str, grad_out: torch.Tensor, grad_attn: torch.Tensor, grad_h_n: torch.Tensor,
                         grad_c_n: torch.Tensor | None, xw: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor,
                         mask: torch.Tensor | None, params: DecoderParams, h0: torch.Tensor, c0: torch.Tensor | None,
                         feed0: torch.Tensor, drop: torch.Tensor | None, out: torch.Tensor, attn: torch.Tensor,
                         saved: tuple) -> DecoderGrads:
        """-> ``DecoderGrads``."""


PROTOCOLS = {"rnn": RecurrenceBackend, "sdpa": AttentionBackend, "decoder": DecoderBackend}
# what a module may define beyond its protocol, and how each must look
OPTIONAL = {"dtypes": tuple, "info": callable, "linear": callable, "mm": callable, "mm_tn": callable,
            "saved_layout": callable, "cell_step": callable, "set_create_graph_backward": callable}


def conforms(module: types.ModuleType, op: str) -> list[str]:
    """What ``module`` lacks or gets wrong as a backend of ``op`` (empty when it conforms): each
    required member present (functions with the protocol's parameter names, in order), optional
    members of the right kind."""
    import inspect

    problems = []
    proto = PROTOCOLS[op]
    if not isinstance(getattr(module, "name", None), str):
        problems.append("name: missing or not a str")
    for member in ("availability", *(n for n in vars(proto) if not n.startswith("_") and n != "name")):
        fn = getattr(module, member, None)
        if not callable(fn):
            problems.append(f"{member}: missing")
            continue
        want = [p for p in inspect.signature(getattr(proto, member)).parameters if p != "self"]
        have = list(inspect.signature(fn).parameters)
        if have != want:
            problems.append(f"{member}: parameters {have}, expected {want}")
    for member, kind in OPTIONAL.items():
        if hasattr(module, member):
            value = getattr(module, member)
            if not (callable(value) if kind is callable else isinstance(value, kind)):
                problems.append(f"{member}: not a {getattr(kind, '__name__', kind)}")
    return problems


__all__ = ["AttentionBackend", "Backend", "DecoderBackend", "DecoderGrads", "DecoderParams", "PROTOCOLS",
           "RecurrenceBackend", "Saved", "VariantGrads", "conforms"]
