"""Issue 8's baselines: every RNN variant written the way a user writes it without fastrnn.

A plain PyTorch loop over time steps (``F.linear`` for the input projection of all steps at
once, then per step ``F.linear`` / ``F.layer_norm`` / ``torch.sigmoid`` ...), following the
equations of docs/variants.md literally. One layer, one direction, time-major ``[T, B, I]``.

``VariantLoop`` has exactly the parameter names of the fastrnn module built with the same
options (``weight_ih_l0`` ..., ``layer_norm_hh_weight_l0``, ``weight_peephole_l0``), so
``loop.load_state_dict(fast.state_dict())`` gives both the same numbers and the benchmark
compares like with like, gradient by gradient.

Random masks (recurrent dropout, zoneout) are drawn in ``draw_masks`` *outside* the per-step
recurrence, for two reasons: a compiled loop would otherwise use inductor's own RNG stream (its
masks would differ from eager and from fastrnn), and the draws must follow the order
fastrnn.functional documents so that training outputs match fastrnn's. ``recurrence`` (the part
``torch.compile`` compiles, see ``compile_loop``) is deterministic given its inputs.

``CASES`` are the benchmarked variants (the list in issue 8).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import fastrnn

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
CLASSES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
LN_EPS = 1e-5  # docs/variants.md: LN(v) = w (v - mean) / sqrt(var + 1e-5) + b


@dataclass(frozen=True)
class VariantCase:
    """One benchmarked variant: a cell, the module's keyword options, and whether forward gets
    a ``reset_mask`` (random episode boundaries, ``reset_rate`` of the (t, b) entries)."""
    name: str
    cell: str
    options: dict = field(default_factory=dict, hash=False)
    reset: bool = False
    reset_rate: float = 0.05

    @property
    def stochastic(self) -> bool:
        """Whether training draws random masks (so training outputs depend on the RNG order)."""
        return bool(self.options.get("recurrent_dropout", 0) or self.options.get("zoneout", 0))


CASES = [
    VariantCase("lstm_layer_norm", "lstm", {"layer_norm": True}),
    VariantCase("lstm_peephole", "lstm", {"peephole": True}),
    VariantCase("lstm_recurrent_dropout", "lstm", {"recurrent_dropout": 0.25}),
    VariantCase("lstm_zoneout", "lstm", {"zoneout": 0.1}),
    VariantCase("gru_layer_norm", "gru", {"layer_norm": True}),
    VariantCase("gru_reset_before", "gru", {"reset_after": False}),
    VariantCase("gru_zoneout", "gru", {"zoneout": 0.1}),
    VariantCase("rnn_layer_norm", "rnn", {"layer_norm": True}),
    VariantCase("lstm_reset_mask", "lstm", {}, reset=True),
    VariantCase("lstm_all", "lstm", {"layer_norm": True, "peephole": True, "recurrent_dropout": 0.25,
                                     "zoneout": 0.1, "forget_bias": 1.0}, reset=True),
]
CASES_BY_NAME = {c.name: c for c in CASES}


class VariantLoop(nn.Module):
    """One-layer, unidirectional LSTM / GRU / RNN with the docs/variants.md options, as a Python
    loop over time steps.

    forward(x [T, B, I], hx=None, reset_mask=None [T, B] bool) -> (out [T, B, Hr], h_n)
    with h_n = (h [1, B, Hr], c [1, B, H]) for LSTM, h [1, B, H] otherwise (torch's layout).
    """

    def __init__(self, cell, input_size, hidden_size, *, bias=True, proj_size=0, nonlinearity="tanh",
                 layer_norm=False, peephole=False, recurrent_dropout=0.0, zoneout=0.0,
                 reset_after=True, forget_bias=0.0, device=None, dtype=None):
        super().__init__()
        if cell not in GATES:
            raise ValueError(f"cell must be one of {list(GATES)}, got {cell!r}")
        if proj_size and cell != "lstm":
            raise ValueError("proj_size is LSTM only")
        if layer_norm and not reset_after:
            raise ValueError("layer_norm=True with reset_after=False is not defined (docs/variants.md)")
        self.config = dict(cell=cell, input_size=input_size, hidden_size=hidden_size, bias=bias,
                           proj_size=proj_size, nonlinearity=nonlinearity, layer_norm=layer_norm,
                           peephole=peephole, recurrent_dropout=recurrent_dropout, zoneout=zoneout,
                           reset_after=reset_after, forget_bias=forget_bias)
        self.cell, self.input_size, self.hidden_size = cell, input_size, hidden_size
        self.proj_size, self.nonlinearity = proj_size, nonlinearity
        self.layer_norm, self.peephole, self.reset_after = layer_norm, peephole, reset_after
        self.recurrent_dropout, self.zoneout = float(recurrent_dropout), float(zoneout)
        H, Hr, G = hidden_size, proj_size or hidden_size, GATES[cell] * hidden_size
        kw = dict(device=device, dtype=dtype)
        # torch's parameters in torch's order, then the variant's (docs/variants.md)
        self.weight_ih_l0 = nn.Parameter(torch.empty(G, input_size, **kw))
        self.weight_hh_l0 = nn.Parameter(torch.empty(G, Hr, **kw))
        self.bias_ih_l0 = nn.Parameter(torch.empty(G, **kw)) if bias else None
        self.bias_hh_l0 = nn.Parameter(torch.empty(G, **kw)) if bias else None
        self.weight_hr_l0 = nn.Parameter(torch.empty(proj_size, H, **kw)) if proj_size else None
        if layer_norm:
            for side, n in (("ih", G), ("hh", G)) + ((("c", H),) if cell == "lstm" else ()):
                setattr(self, f"layer_norm_{side}_weight_l0", nn.Parameter(torch.ones(n, **kw)))
                setattr(self, f"layer_norm_{side}_bias_l0", nn.Parameter(torch.zeros(n, **kw)))
        if peephole:
            if cell != "lstm":
                raise ValueError("peephole is LSTM only")
            self.weight_peephole_l0 = nn.Parameter(torch.empty(3, H, **kw))
        bound = 1 / math.sqrt(H)
        with torch.no_grad():
            for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_hr_l0",
                         "weight_peephole_l0"):
                p = getattr(self, name, None)
                if p is not None:
                    p.uniform_(-bound, bound)
            if forget_bias and cell == "lstm" and bias:
                self.bias_ih_l0[H:2 * H] += forget_bias

    @classmethod
    def for_case(cls, case: VariantCase, input_size, hidden_size, **kw):
        return cls(case.cell, input_size, hidden_size, **case.options, **kw)

    # -- random masks, drawn eagerly (see the module docstring) --------------------------------
    def draw_masks(self, B, T, like):
        """(rec_mask [B, Hr] | None, zoneout_h [T, B, Hr] | float | None, zoneout_c [T, B, H] |
        float | None) for one sequence. Training: recurrent dropout keeps a unit with probability
        1 - p and scales it by 1 / (1 - p); zoneout draws 1 (keep the previous state) with
        probability p. Eval: no dropout; zoneout uses its expectation p.

        Draw order (must match fastrnn.functional's for training outputs to agree):
        rec_mask, then zoneout_h, then zoneout_c."""
        Hr, H = self.proj_size or self.hidden_size, self.hidden_size
        rec = zh = zc = None
        p, z = self.recurrent_dropout, self.zoneout
        if self.training:
            if p > 0:
                rec = like.new_empty(B, Hr).bernoulli_(1 - p)
                if p < 1:  # p = 1 drops everything: zeros, not 0/0
                    rec = rec / (1 - p)
            if z > 0:
                zh = like.new_empty(T, B, Hr).bernoulli_(z)
                if self.cell == "lstm":
                    zc = like.new_empty(T, B, H).bernoulli_(z)
        elif z > 0:
            zh = z
            zc = z if self.cell == "lstm" else None
        return rec, zh, zc

    def forward(self, x, hx=None, reset_mask=None):
        if x.dim() != 3:
            raise ValueError(f"VariantLoop takes time-major [T, B, I] input, got {x.dim()}-D")
        T, B, _ = x.shape
        Hr, H = self.proj_size or self.hidden_size, self.hidden_size
        if hx is None:
            h0 = x.new_zeros(B, Hr)
            c0 = x.new_zeros(B, H) if self.cell == "lstm" else None
        elif self.cell == "lstm":
            h0, c0 = hx[0][0], hx[1][0]
        else:
            h0, c0 = hx[0], None
        rec, zh, zc = self.draw_masks(B, T, x)
        out, h, c = self.recurrence(x, h0, c0, rec, zh, zc, reset_mask)
        if self.cell == "lstm":
            return out, (h.unsqueeze(0), c.unsqueeze(0))
        return out, h.unsqueeze(0)

    # -- the loop itself -----------------------------------------------------------------------
    def recurrence(self, x, h0, c0, rec_mask, zoneout_h, zoneout_c, reset):
        """x [T, B, I]; h0 [B, Hr]; c0 [B, H] | None; masks as ``draw_masks``; reset [T, B] bool
        | None. Returns (out [T, B, Hr], h_T [B, Hr], c_T [B, H] | None)."""
        G = GATES[self.cell] * self.hidden_size
        xw = F.linear(x, self.weight_ih_l0)                    # all T steps in one GEMM
        if self.layer_norm:
            xw = F.layer_norm(xw, (G,), self.layer_norm_ih_weight_l0, self.layer_norm_ih_bias_l0, LN_EPS)
        if self.bias_ih_l0 is not None:
            xw = xw + self.bias_ih_l0
        h, c = h0, c0
        outs = []
        for t in range(x.shape[0]):
            h_prev, c_prev = h, c
            if reset is not None:                              # episode boundary before step t
                r = reset[t].unsqueeze(-1)
                h_prev = torch.where(r, h0, h_prev)
                if c is not None:
                    c_prev = torch.where(r, c0, c_prev)
            h_in = h_prev * rec_mask if rec_mask is not None else h_prev
            h_new, c_new = self.step(xw[t], h_in, h_prev, c_prev)
            if zoneout_h is not None:
                zh = zoneout_h[t] if torch.is_tensor(zoneout_h) else zoneout_h
                h = zh * h_prev + (1 - zh) * h_new
            else:
                h = h_new
            if c_new is not None:
                if zoneout_c is not None:
                    zc = zoneout_c[t] if torch.is_tensor(zoneout_c) else zoneout_c
                    c = zc * c_prev + (1 - zc) * c_new
                else:
                    c = c_new
            outs.append(h)
        return torch.stack(outs), h, c

    def _hidden_product(self, h_in, w, b, ln):
        """hw = LN(h_in W^T; ln) + b  (layer norm)  or  h_in W^T + b."""
        a = F.linear(h_in, w)
        if ln:
            a = F.layer_norm(a, (w.shape[0],), self.layer_norm_hh_weight_l0, self.layer_norm_hh_bias_l0, LN_EPS)
        return a + b if b is not None else a

    def step(self, xw_t, h_in, h_prev, c_prev):
        """One time step: xw_t [B, G]; h_in, h_prev [B, Hr]; c_prev [B, H] | None ->
        (h_new [B, Hr], c_new [B, H] | None), before zoneout."""
        H = self.hidden_size
        if self.cell == "gru" and not self.reset_after:
            # Keras reset_after=False: the reset gate multiplies h before the n-gate product
            w, b = self.weight_hh_l0, self.bias_hh_l0
            hw_rz = F.linear(h_in, w[:2 * H], b[:2 * H] if b is not None else None)
            x_r, x_z, x_n = xw_t.chunk(3, 1)
            h_r, h_z = hw_rz.chunk(2, 1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + F.linear(r * h_in, w[2 * H:], b[2 * H:] if b is not None else None))
            return (1 - z) * n + z * h_prev, None
        hw = self._hidden_product(h_in, self.weight_hh_l0, self.bias_hh_l0, self.layer_norm)
        if self.cell == "rnn":
            act = torch.relu if self.nonlinearity == "relu" else torch.tanh
            return act(xw_t + hw), None
        if self.cell == "gru":
            x_r, x_z, x_n = xw_t.chunk(3, 1)
            h_r, h_z, h_n = hw.chunk(3, 1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            return (1 - z) * n + z * h_prev, None
        g_i, g_f, g_g, g_o = (xw_t + hw).chunk(4, 1)
        if self.peephole:
            p = self.weight_peephole_l0
            g_i = g_i + p[0] * c_prev
            g_f = g_f + p[1] * c_prev
        i, f, g = torch.sigmoid(g_i), torch.sigmoid(g_f), torch.tanh(g_g)
        c_new = f * c_prev + i * g
        if self.peephole:
            g_o = g_o + self.weight_peephole_l0[2] * c_new
        o = torch.sigmoid(g_o)
        c_out = c_new
        if self.layer_norm:
            c_out = F.layer_norm(c_new, (H,), self.layer_norm_c_weight_l0, self.layer_norm_c_bias_l0, LN_EPS)
        hu = o * torch.tanh(c_out)
        h_new = F.linear(hu, self.weight_hr_l0) if self.weight_hr_l0 is not None else hu
        return h_new, c_new


def compile_loop(loop: VariantLoop, fullgraph=True) -> VariantLoop:
    """Compile ``loop.recurrence`` in place (static shapes): the masks stay eager (drawn by
    ``draw_masks`` with torch's RNG), so compiled and eager loops compute the same function."""
    loop.recurrence = torch.compile(loop.recurrence, dynamic=False, fullgraph=fullgraph)
    return loop


def build(case: VariantCase, input_size, hidden_size, backend, *, dtype=torch.float32, seed=0):
    """The fastrnn module for ``case`` on ``backend`` and an eager ``VariantLoop`` with the same
    parameter values (strict state_dict load: the parameter names must match the docs)."""
    torch.manual_seed(seed)
    fast = getattr(fastrnn, CLASSES[case.cell])(input_size, hidden_size, dtype=dtype, backend=backend,
                                                **case.options)
    loop = VariantLoop.for_case(case, input_size, hidden_size, dtype=dtype)
    loop.load_state_dict(fast.state_dict())
    return fast, loop


def make_inputs(case: VariantCase, T, B, I, *, dtype=torch.float32, seed=1):
    """x [T, B, I] and the reset mask [T, B] bool (None unless the case uses one)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    reset = (torch.rand(T, B, generator=g) < case.reset_rate) if case.reset else None
    return x, reset


def _call(m, x, reset):
    return m(x, reset_mask=reset) if reset is not None else m(x)


def _flat(out):
    y, state = out
    return [y, *(state if isinstance(state, tuple) else (state,))]


def _results(m, x, reset, g, *, training, seed):
    """Outputs, final states and (training) the gradients of the input and of every parameter
    under the output gradient ``g``, by name; ``m`` runs in ``training`` mode from RNG ``seed``."""
    xi = x.detach().clone().requires_grad_(training)
    m.train(training)
    torch.manual_seed(seed)
    with torch.set_grad_enabled(training):
        flat = _flat(_call(m, xi, reset))
    out = dict(zip(("output", "h_n", "c_n"), (t.detach() for t in flat)))
    if training:
        params = dict(m.named_parameters())
        names = sorted(params)
        grads = torch.autograd.grad((flat[0] * g.to(flat[0].dtype)).sum(), [xi] + [params[n] for n in names],
                                    allow_unused=True)
        out.update(zip(["grad_input"] + [f"grad_{n}" for n in names], grads))
    return out


def _errors(a: dict, b: dict):
    from fastrnn.testing import max_error

    if sorted(a) != sorted(b):
        raise AssertionError(f"different results (parameter names?): {sorted(a)} vs {sorted(b)}")
    errs = {}
    for name in a:
        u, v = a[name], b[name]
        if u is None or v is None:
            # an unused parameter on one side and not the other is a real disagreement
            errs[name] = 0.0 if u is None and v is None else float("inf")
        else:
            errs[name] = max_error(u, v)
    return errs


def compare(a: nn.Module, b: nn.Module, x, reset, *, training: bool, seed=1234):
    """Max error (fastrnn.testing.max_error) of ``a`` against ``b``, by name: outputs, final
    states and, when ``training``, the gradients of the input and of every parameter under a
    random output gradient. Both run in ``training`` mode from the same RNG state, so random
    masks agree when both draw them in the same order. Returns ``{name: error}``."""
    g = torch.randn(x.shape[0], x.shape[1], b.proj_size or b.hidden_size, dtype=x.dtype)
    return _errors(_results(a, x, reset, g, training=training, seed=seed),
                   _results(b, x, reset, g, training=training, seed=seed))


def gate(cand: nn.Module, loop: VariantLoop, x, reset, *, seed=1234, in_float64=True, factor=4.0):
    """Training-mode gate of a candidate (a fastrnn module or a compiled loop) against the eager
    loop: outputs, final states, the gradients of the input and of every parameter.

    ``in_float64``: a float64 copy of the candidate must match the float64 loop within
    ``gate_tolerance(float64)``: the same function, up to rounding. Float32 against float32 is not
    a usable test here: with layer norm the gradients at T=100 reach ~1e4 and every float32
    implementation, the loop included, ends O(1) away from float64 in some gradient entries, each
    a different way. Without ``in_float64`` (the compiled loop: a float64 copy would cost a second
    compile) the float32 rule of fastrnn.testing.assert_low_precision decides instead: error
    against the float64 loop at most ``factor`` x the float32 eager loop's own, plus
    ``gate_tolerance(float32)``. Both float32 errors are returned either way, for the report.
    Masks: bernoulli_ draws the same 0/1 values in float32 and float64 from one seed.

    Returns ``{name: (error, float32 candidate error, float32 loop error, ok)}``; ``error`` is the
    float64 one with ``in_float64``, else the float32 candidate error."""
    T, B, _ = x.shape
    K = max(loop.input_size, loop.hidden_size)
    g = torch.randn(T, B, loop.proj_size or loop.hidden_size, dtype=torch.float64)
    loop64 = VariantLoop(**loop.config, dtype=torch.float64)
    loop64.load_state_dict(loop.state_dict())
    truth = _results(loop64, x.double(), reset, g, training=True, seed=seed)
    e_loop = _errors(_results(loop, x, reset, g, training=True, seed=seed), truth)
    e_cand = _errors(_results(cand, x, reset, g, training=True, seed=seed), truth)
    if in_float64:
        e64 = _errors(_results(copy.deepcopy(cand).double(), x.double(), reset, g, training=True, seed=seed), truth)
        tol = gate_tolerance(T, K, torch.float64, training=True)
        return {n: (e64[n], e_cand[n], e_loop[n], e64[n] <= tol) for n in truth}
    tol = gate_tolerance(T, K, x.dtype, training=True)
    return {n: (e_cand[n], e_cand[n], e_loop[n], e_cand[n] <= factor * e_loop[n] + tol) for n in truth}


def gate_tolerance(T, K, dtype, training):
    """Gate tolerance for max_error over T steps of K-long reductions: fastrnn.bench's float32
    rule (1e-5 sqrt(K T), x10 for gradients); float64 the same with 1e-10 and x100 for gradients
    (the layer-norm gradients reach ~1e4 at T=100: rounding grows with them; a wrong formula
    is off by far more)."""
    base = 1e-10 if dtype == torch.float64 else 1e-5
    return base * (K * T) ** 0.5 * ((100 if dtype == torch.float64 else 10) if training else 1)
