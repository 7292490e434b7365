"""Comparison helpers shared by the tests and the benchmark's correctness gate.

One tolerance rule for the whole project:
  float64  atol = rtol = 1e-10 (scaled by ``grad_scale`` for long accumulations)
  float32  1e-5 on forward values, 1e-4 on gradients
  float16 / bfloat16: the flash-attention rule -- the error against a float64 reference may be at
  most 2x the error of PyTorch's own computation in that dtype (see ``assert_low_precision``;
  ``low_precision_errors`` measures both, for the benchmark's gate and the ill-conditioned cases of
  tests/test_cpp_bf16.py, which compare RMS errors).
"""
from __future__ import annotations

import torch
from torch import nn

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


def low_precision_errors(actual, expected_lowp, reference_fp64, rms: bool = False) -> tuple[float, float]:
    """(our error, torch's error) against the float64 reference: the largest absolute difference,
    or with ``rms`` the root-mean-square one (steadier from seed to seed where rounding is
    amplified: layer norm of small-variance vectors)."""
    def err(t):
        d = t.detach().double() - reference_fp64
        return (d.pow(2).mean().sqrt() if rms else d.abs().max()).item() if d.numel() else 0.0
    return err(actual), err(expected_lowp)


def assert_low_precision(actual, expected_lowp, reference_fp64, name: str, factor: float = 2.0,
                         floor: float = 1e-5, rms: bool = False):
    """Flash-attention rule: |actual - ref| <= factor * |torch_lowp - ref| (+ a small floor), on
    the largest difference or, with ``rms``, on the root-mean-square one."""
    err, base = low_precision_errors(actual, expected_lowp, reference_fp64, rms=rms)
    kind = "RMS error" if rms else "error"
    assert err <= factor * base + floor, f"{name}: {kind} {err:.3g} > {factor} x torch's {base:.3g}"


class LoopAttentionDecoder(nn.Module):
    """The attention decoder as users write it without fastrnn: a Python loop over
    ``nn.LSTMCell`` / ``nn.GRUCell`` with the attention in torch ops (one launch per operation per
    step). The specification ``fastrnn.AttentionDecoder`` is tested against (float64, every
    gradient), and the baseline of ``bench/decoder_speed.py`` (eager and under ``torch.compile``).
    ``load_from(decoder)`` copies an ``AttentionDecoder``'s weights. Shapes as ``forward`` of
    ``AttentionDecoder`` (time-major, state LSTM ``(h, c, feed)``, GRU ``(h, feed)``). As users write
    it, a memory row with nothing to attend to gives NaN here (softmax over -inf); the fused
    decoder defines it as zero attention."""

    def __init__(self, cell, input_size, hidden_size, memory_size, attention="additive", input_feeding=True,
                 num_layers=1, dropout=0.0):
        super().__init__()
        H = hidden_size
        self.lstm, self.attention, self.input_feeding = cell == "lstm", attention, input_feeding
        Cell = nn.LSTMCell if self.lstm else nn.GRUCell
        self.cells = nn.ModuleList(Cell((input_size + H * input_feeding) if k == 0 else H, H)
                                   for k in range(num_layers))
        self.drop = nn.Dropout(dropout)
        if attention != "dot":
            self.memory_proj = nn.Linear(memory_size, H, bias=False)
        if attention == "additive":
            self.query_proj = nn.Linear(H, H)
            self.v = nn.Linear(H, 1, bias=False)
        self.out = nn.Linear(memory_size + H, H, bias=False)

    @classmethod
    def from_decoder(cls, dec) -> "LoopAttentionDecoder":
        """The loop twin of an ``AttentionDecoder``: same sizes, options and weights."""
        loop = cls(dec.cell, dec.input_size, dec.hidden_size, dec.memory_size, dec.attention, dec.input_feeding,
                   dec.num_layers, dec.dropout)
        p = dec.output_weight
        return loop.to(device=p.device, dtype=p.dtype).load_from(dec)

    @torch.no_grad()
    def load_from(self, dec) -> "LoopAttentionDecoder":
        for k, cell in enumerate(self.cells):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(dec, f"{name}_l{k}"))
        if self.attention != "dot":
            self.memory_proj.weight.copy_(dec.memory_weight)
        if self.attention == "additive":
            self.query_proj.weight.copy_(dec.query_weight)
            self.query_proj.bias.copy_(dec.query_bias)
            self.v.weight.copy_(dec.score_weight.unsqueeze(0))
        self.out.weight.copy_(dec.output_weight)
        return self

    def forward(self, inputs, memory, memory_mask=None, state=None):
        """inputs [T, B, I], memory [S, B, M], memory_mask [B, S] bool -> (outputs [T, B, H],
        attention [T, B, S], state)."""
        T, B, _ = inputs.shape
        L, H = len(self.cells), self.cells[0].hidden_size
        mem = memory.transpose(0, 1)                                  # [B, S, M]
        keys = mem if self.attention == "dot" else self.memory_proj(mem)
        if state is None:
            zeros = inputs.new_zeros(B, H)
            h, c, feed = [zeros] * L, [zeros] * L, zeros
        elif self.lstm:
            h, c = list(state[0]), list(state[1])
            feed = state[2] if self.input_feeding else inputs.new_zeros(B, H)
        else:
            h = list(state[0] if self.input_feeding else state)
            feed = state[1] if self.input_feeding else inputs.new_zeros(B, H)
        outs, attns = [], []
        for t in range(T):
            x = torch.cat([inputs[t], feed], 1) if self.input_feeding else inputs[t]
            for k, cell in enumerate(self.cells):
                if k > 0:
                    x = self.drop(x)
                if self.lstm:
                    h[k], c[k] = cell(x, (h[k], c[k]))
                else:
                    h[k] = cell(x, h[k])
                x = h[k]
            if self.attention == "additive":
                scores = self.v(torch.tanh(self.query_proj(x).unsqueeze(1) + keys)).squeeze(2)
            else:
                scores = torch.bmm(keys, x.unsqueeze(2)).squeeze(2)
            if memory_mask is not None:
                scores = scores.masked_fill(~memory_mask, float("-inf"))
            a = torch.softmax(scores, dim=1)
            ctx = torch.bmm(a.unsqueeze(1), mem).squeeze(1)
            feed = torch.tanh(self.out(torch.cat([ctx, x], 1)))
            outs.append(feed)
            attns.append(a)
        h_n = torch.stack(h)
        if self.lstm:
            state = (h_n, torch.stack(c), feed) if self.input_feeding else (h_n, torch.stack(c))
        else:
            state = (h_n, feed) if self.input_feeding else h_n
        return torch.stack(outs), torch.stack(attns), state
