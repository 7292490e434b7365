"""The variants of docs/variants.md at the module level: parameters and their initialisation,
options off == torch, every backend == the reference backend (outputs, states, every gradient,
same seed => same masks), an independent per-step implementation written here with F.layer_norm,
float64 gradcheck with the random masks held fixed, eval semantics, reset_mask episodes, cells,
errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn.testing import assert_close

from conftest import cpu_backends, rnn_backends

I, H, T, B = 3, 5, 5, 3
LENGTHS = torch.tensor([3, 5, 2])  # unsorted: exercises sorted_indices
KINDS = {"LSTM": fastrnn.LSTM, "GRU": fastrnn.GRU, "RNN": fastrnn.RNN}
TORCH = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


# ---------------------------------------------------------------------------------------------
# Independent implementation: one step at a time, plain tensor ops, F.layer_norm. Draws the random
# masks in the order functional.rnn documents (layer, direction, rec_mask, zoneout_h, zoneout_c).
# ---------------------------------------------------------------------------------------------

def naive_direction(cell, x, p, sfx, m, h0, c0, reverse, masks, reset):
    """x [T, B, I] -> (h_seq [T, B, Hr], h_T, c_T); p: the module's parameters by name."""
    get = lambda n: p.get(n + sfx)  # noqa: E731
    w_ih, w_hh, b_ih, b_hh, w_hr = (get(n) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"))
    G, Hh = w_hh.shape[0], m.hidden_size
    zero = torch.zeros(G, dtype=x.dtype)
    b_ih = zero if b_ih is None else b_ih
    b_hh = zero if b_hh is None else b_hh
    xw = x @ w_ih.t()
    if m.layer_norm:
        xw = F.layer_norm(xw, (G,), get("layer_norm_ih_weight"), get("layer_norm_ih_bias"), 1e-5)
    xw = xw + b_ih
    rec_mask, zh, zc = masks
    Tn = x.shape[0]
    h, c = h0, c0
    outs = [None] * Tn
    for t in (range(Tn - 1, -1, -1) if reverse else range(Tn)):
        hp, cp = h, c
        if reset is not None:
            # an episode boundary before step t (forward time) is crossed by the reverse
            # direction right before it visits t - 1
            r = reset[t] if not reverse else (reset[t + 1] if t + 1 < Tn else torch.zeros_like(reset[0]))
            hp = torch.where(r.unsqueeze(-1), h0, hp)
            cp = torch.where(r.unsqueeze(-1), c0, cp) if c is not None else None
        h_in = hp * rec_mask if rec_mask is not None else hp
        xt = xw[t]
        if cell == "gru" and not m.reset_after:
            xr, xz, xn = xt.chunk(3, -1)
            a = h_in @ w_hh[:2 * Hh].t() + b_hh[:2 * Hh]
            r_, z_ = torch.sigmoid(xr + a[:, :Hh]), torch.sigmoid(xz + a[:, Hh:])
            n = torch.tanh(xn + (r_ * h_in) @ w_hh[2 * Hh:].t() + b_hh[2 * Hh:])
            h_new = (1 - z_) * n + z_ * hp
        else:
            a = h_in @ w_hh.t()
            if m.layer_norm:
                a = F.layer_norm(a, (G,), get("layer_norm_hh_weight"), get("layer_norm_hh_bias"), 1e-5)
            hw = a + b_hh
            if cell == "lstm":
                xi, xf, xg, xo = xt.chunk(4, -1)
                hi, hf, hg, ho = hw.chunk(4, -1)
                pi, pf, po = get("weight_peephole") if m.peephole else torch.zeros(3, Hh, dtype=x.dtype)
                i = torch.sigmoid(xi + hi + pi * cp)
                f = torch.sigmoid(xf + hf + pf * cp)
                g = torch.tanh(xg + hg)
                c_new = f * cp + i * g
                o = torch.sigmoid(xo + ho + po * c_new)
                cn = F.layer_norm(c_new, (Hh,), get("layer_norm_c_weight"), get("layer_norm_c_bias"), 1e-5) \
                    if m.layer_norm else c_new
                hu = o * torch.tanh(cn)
                h_new = hu @ w_hr.t() if w_hr is not None else hu
                c = zc[t] * cp + (1 - zc[t]) * c_new if zc is not None else c_new
            elif cell == "gru":
                xr, xz, xn = xt.chunk(3, -1)
                hr, hz, hn = hw.chunk(3, -1)
                r_, z_ = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r_ * hn)
                h_new = (1 - z_) * n + z_ * hp
            else:
                h_new = (torch.relu if cell == "rnn_relu" else torch.tanh)(xt + hw)
        h = zh[t] * hp + (1 - zh[t]) * h_new if zh is not None else h_new
        outs[t] = h
    return torch.stack(outs), h, c


def naive_masks(cell, Tn, Bn, Hh, Hr, m, dtype):
    """The documented draws of one layer and direction."""
    rec_mask = zh = zc = None
    p = m.recurrent_dropout
    if m.training and p > 0:
        rec_mask = torch.empty(Bn, Hr, dtype=dtype).bernoulli_(1 - p)
        if p < 1:
            rec_mask = rec_mask / (1 - p)
    q = m.zoneout
    if q > 0:
        shapes = [(Tn, Bn, Hr)] + ([(Tn, Bn, Hh)] if cell == "lstm" else [])
        ds = [torch.empty(s, dtype=dtype).bernoulli_(q) if m.training else torch.full(s, q, dtype=dtype)
              for s in shapes]
        zh, zc = ds[0], (ds[1] if cell == "lstm" else None)
    return rec_mask, zh, zc


def naive_module(m, x, hx, reset=None):
    """A layer module, time-major batched input x [T, B, I] (no batch_first, not packed)."""
    cell = m._cell_name()
    p = dict(m.named_parameters())
    D = 2 if m.bidirectional else 1
    Hr = m.proj_size or m.hidden_size
    h0, c0 = hx if cell == "lstm" else (hx, None)
    h_n, c_n = [], []
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            masks = naive_masks(cell, x.shape[0], x.shape[1], m.hidden_size, Hr, m, x.dtype)
            o, h, c = naive_direction(cell, x, p, f"_l{layer}{'_reverse' if d else ''}", m, h0[k],
                                      c0[k] if c0 is not None else None, d == 1, masks, reset)
            outs.append(o), h_n.append(h), c_n.append(c)
        x = torch.cat(outs, -1)
        if m.training and m.dropout > 0 and layer < m.num_layers - 1:
            x = F.dropout(x, m.dropout)
    hidden = (torch.stack(h_n), torch.stack(c_n)) if cell == "lstm" else torch.stack(h_n)
    return x, hidden


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def make(kind, backend="torch", dtype=torch.float32, seed=1, **kw):
    torch.manual_seed(seed)
    m = KINDS[kind](I, H, dtype=dtype, backend=backend, **kw)
    with torch.no_grad():  # layer norm 1 / 0 would hide gain/bias mistakes: make them non-trivial
        for name, prm in m.named_parameters():
            if name.startswith("layer_norm"):
                prm.add_(0.3 * torch.randn_like(prm))
    return m


def states_for(m, dtype, batched=True):
    D = 2 if m.bidirectional else 1
    lead = (m.num_layers * D, B) if batched else (m.num_layers * D,)
    Hr = getattr(m, "proj_size", 0) or H
    h0 = torch.randn(*lead, Hr, dtype=dtype)
    return (h0, torch.randn(*lead, H, dtype=dtype)) if m.mode == "LSTM" else h0


def run(m, x, hx, form="batched", reset=None, seed=11):
    """Forward + gradients of a random projection of every output; re-seeds before the forward so
    two modules (or two backends) draw the same masks."""
    x = x.detach().clone().requires_grad_()
    leaves = tuple(t.detach().clone().requires_grad_() for t in (hx if isinstance(hx, tuple) else (hx,)))
    hx = leaves if m.mode == "LSTM" else leaves[0]
    inp = pack_padded_sequence(x, LENGTHS, enforce_sorted=False, batch_first=m.batch_first) \
        if form == "packed" else x
    torch.manual_seed(seed)
    out, hidden = m(inp, hx) if reset is None else m(inp, hx, reset_mask=reset)
    if form == "packed":
        out, _ = pad_packed_sequence(out, batch_first=m.batch_first)
    states = hidden if isinstance(hidden, tuple) else (hidden,)
    torch.manual_seed(123)
    loss = (out * torch.randn_like(out)).sum() + sum((s * torch.randn_like(s)).sum() for s in states)
    params = dict(m.named_parameters())
    grads = torch.autograd.grad(loss, [x, *leaves, *params.values()])
    names = ["x"] + [f"hx[{k}]" for k in range(len(leaves))] + list(params)
    return dict(out=out, **{f"state[{k}]": s for k, s in enumerate(states)}), dict(zip(names, grads))


def compare(a, b, what):
    (out_a, grad_a), (out_b, grad_b) = a, b
    for name in out_b:
        assert_close(out_a[name], out_b[name], f"{what}/{name}")
    assert grad_a.keys() == grad_b.keys()
    for name in grad_b:
        assert_close(grad_a[name], grad_b[name], f"{what}/grad {name}", grad=True)


def random_reset(Tn, Bn, batch_first=False, seed=5):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(Tn, Bn, generator=g) < 0.3
    return r.t().contiguous() if batch_first else r


# ---------------------------------------------------------------------------------------------
# parameters, initialisation, options off
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_options_off_is_torch(kind):
    """Options explicitly off: torch's parameters, RNG consumption and numbers."""
    kw = dict(num_layers=2, bidirectional=True)
    off = dict(layer_norm=False, recurrent_dropout=0.0, zoneout=0.0)
    off.update(dict(peephole=False, forget_bias=0.0) if kind == "LSTM" else {})
    off.update(dict(reset_after=True) if kind == "GRU" else {})
    torch.manual_seed(3)
    ref = TORCH[kind](I, H, **kw)
    after_ref = torch.rand(3)
    torch.manual_seed(3)
    fast = KINDS[kind](I, H, backend="torch", **kw, **off)
    after_fast = torch.rand(3)
    assert torch.equal(after_ref, after_fast), "construction consumed different RNG draws"
    assert list(ref.state_dict()) == list(fast.state_dict())
    for (n, a), b in zip(ref.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), n
    assert repr(ref) == repr(fast).replace(", backend='torch'", "")
    x = torch.randn(T, B, I)
    hx = states_for(ref, torch.float32)
    compare(run(fast, x, hx), run(ref, x, hx), f"{kind} options off")


def test_state_dict_names_shapes_round_trip():
    m = fastrnn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2, layer_norm=True, peephole=True)
    torch_keys = list(nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2).state_dict())
    sd = m.state_dict()
    assert list(sd)[:len(torch_keys)] == torch_keys  # torch's first, in torch's order
    extra = {k: tuple(v.shape) for k, v in list(sd.items())[len(torch_keys):]}
    want = {}
    for layer in range(2):
        for sfx in ("", "_reverse"):
            s = f"_l{layer}{sfx}"
            want.update({f"layer_norm_ih_weight{s}": (4 * H,), f"layer_norm_ih_bias{s}": (4 * H,),
                         f"layer_norm_hh_weight{s}": (4 * H,), f"layer_norm_hh_bias{s}": (4 * H,),
                         f"layer_norm_c_weight{s}": (H,), f"layer_norm_c_bias{s}": (H,),
                         f"weight_peephole{s}": (3, H)})
    assert extra == want and list(extra) == list(want)
    g = fastrnn.GRU(I, H, layer_norm=True, bidirectional=True)
    assert [k for k in g.state_dict() if "layer_norm" in k] == [
        f"layer_norm_{s}_{wb}_l0{d}" for d in ("", "_reverse") for s in ("ih", "hh") for wb in ("weight", "bias")]
    assert all(v.shape == (3 * H,) for k, v in g.state_dict().items() if "layer_norm" in k)
    c = fastrnn.LSTMCell(I, H, layer_norm=True, peephole=True)
    assert list(c.state_dict()) == ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "layer_norm_ih_weight",
                                    "layer_norm_ih_bias", "layer_norm_hh_weight", "layer_norm_hh_bias",
                                    "layer_norm_c_weight", "layer_norm_c_bias", "weight_peephole"]
    # round trip into a fresh module (different seed), strict
    with torch.no_grad():
        for prm in m.parameters():
            prm.add_(torch.randn_like(prm))
    torch.manual_seed(99)
    m2 = fastrnn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2, layer_norm=True, peephole=True)
    m2.load_state_dict(m.state_dict(), strict=True)
    for (n, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    x = torch.randn(T, B, I)
    assert torch.equal(m(x)[0], m2(x)[0])
    # a plain torch state_dict does not load strictly into a module with options (missing keys)
    with pytest.raises(RuntimeError, match="layer_norm_ih_weight_l0"):
        m2.load_state_dict(nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2).state_dict())


def test_init_values_forget_bias_reset_parameters():
    kw = dict(num_layers=2, bidirectional=True)
    torch.manual_seed(4)
    ref = nn.LSTM(I, H, **kw)
    torch.manual_seed(4)
    m = fastrnn.LSTM(I, H, layer_norm=True, peephole=True, forget_bias=1.5, **kw)
    bound = 1 / math.sqrt(H)
    for name, a in ref.named_parameters():  # torch's draws unchanged, forget_bias on bias_ih only
        b = getattr(m, name).detach().clone()
        if name.startswith("bias_ih"):
            b[H:2 * H] -= 1.5
        assert_close(b, a.detach(), name)
        if name.startswith("bias_ih"):
            assert torch.equal(getattr(m, name)[:H], a[:H]) and torch.equal(getattr(m, name)[2 * H:], a[2 * H:])
    for name, prm in m.named_parameters():
        if name.startswith("layer_norm") and "_weight" in name:
            assert torch.equal(prm, torch.ones_like(prm)), name
        elif name.startswith("layer_norm"):
            assert torch.equal(prm, torch.zeros_like(prm)), name
        elif name.startswith("weight_peephole"):
            assert prm.shape == (3, H) and prm.abs().max() <= bound and prm.std() > 0, name
    peep = [p.detach().clone() for n, p in m.named_parameters() if n.startswith("weight_peephole")]
    assert not torch.equal(peep[0], peep[1])  # a fresh draw per layer and direction
    # reset_parameters: torch's parameters exactly as torch re-draws them, then ours, forget_bias
    with torch.no_grad():
        for prm in m.parameters():
            prm.fill_(7.0)
    torch.manual_seed(8)
    ref.reset_parameters()
    torch.manual_seed(8)
    m.reset_parameters()
    for name, a in ref.named_parameters():
        b = getattr(m, name).detach().clone()
        if name.startswith("bias_ih"):
            b[H:2 * H] -= 1.5
        assert_close(b, a.detach(), f"reset {name}")
    for name, prm in m.named_parameters():
        if name.startswith("layer_norm"):
            assert torch.equal(prm, torch.ones_like(prm) if "_weight" in name else torch.zeros_like(prm)), name
        if name.startswith("weight_peephole"):
            assert prm.abs().max() <= bound, name
    # cells: the same rules
    torch.manual_seed(4)
    rc = nn.LSTMCell(I, H)
    torch.manual_seed(4)
    c = fastrnn.LSTMCell(I, H, forget_bias=1.0, peephole=True)
    assert torch.equal(c.weight_ih, rc.weight_ih) and torch.equal(c.bias_hh, rc.bias_hh)
    assert_close(c.bias_ih.detach()[H:2 * H] - 1.0, rc.bias_ih.detach()[H:2 * H], "cell forget_bias")
    assert c.weight_peephole.abs().max() <= bound


def test_extra_repr_and_convert():
    m = fastrnn.LSTM(I, H, layer_norm=True, peephole=True, recurrent_dropout=0.25, zoneout=0.1,
                     forget_bias=1.0, backend="torch")
    assert repr(m) == ("LSTM(3, 5, layer_norm=True, peephole=True, recurrent_dropout=0.25, zoneout=0.1, "
                       "forget_bias=1.0, backend='torch')")
    assert repr(fastrnn.GRU(I, H, reset_after=False)) == "GRU(3, 5, reset_after=False)"
    assert repr(fastrnn.RNNCell(I, H, zoneout=0.5)) == "RNNCell(3, 5, zoneout=0.5)"
    assert repr(fastrnn.GRU(I, H)) == repr(nn.GRU(I, H))
    # convert: torch modules have none of the attributes; the defaults make them plain modules
    model = nn.Sequential(nn.LSTM(I, H), nn.GRUCell(I, H))
    conv = fastrnn.convert(model, backend="torch")
    assert conv[0].layer_norm is False and conv[0].zoneout == 0.0 and conv[1].reset_after is True
    assert repr(conv[0]) == "LSTM(3, 5, backend='torch')"
    x = torch.randn(T, B, I)
    reset = random_reset(T, B)
    out, _ = conv[0](x, reset_mask=reset)
    torch.manual_seed(1)
    plain = fastrnn.LSTM(I, H, backend="torch")
    plain.load_state_dict(conv[0].state_dict())
    assert torch.equal(out, plain(x, reset_mask=reset)[0])


# ---------------------------------------------------------------------------------------------
# semantics pinned by the independent implementation (reference backend, float64)
# ---------------------------------------------------------------------------------------------

NAIVE_CASES = [
    ("LSTM", dict(layer_norm=True, peephole=True), dict(num_layers=2, bidirectional=True), False, False),
    ("LSTM", dict(layer_norm=True, peephole=True, zoneout=0.3, recurrent_dropout=0.4, forget_bias=1.0),
     dict(bidirectional=True, proj_size=2), True, True),
    ("LSTM", dict(zoneout=0.3, peephole=True), dict(num_layers=2), False, True),  # eval: expectation
    ("GRU", dict(reset_after=False), dict(num_layers=2, bidirectional=True), False, False),
    ("GRU", dict(reset_after=False, recurrent_dropout=0.5, zoneout=0.2), dict(bidirectional=True), True, True),
    ("GRU", dict(layer_norm=True, zoneout=0.4), dict(num_layers=2, dropout=0.3), True, True),
    ("RNN", dict(layer_norm=True, recurrent_dropout=0.3, zoneout=0.25), dict(bidirectional=True), True, True),
    ("RNN", dict(layer_norm=True, zoneout=0.25), dict(nonlinearity="relu"), False, True),
]


@pytest.mark.parametrize("kind,opts,kw,training,reset", NAIVE_CASES,
                         ids=[f"{c[0]}-{'-'.join(c[1])}{'-train' if c[3] else '-eval'}{'-reset' if c[4] else ''}"
                              for c in NAIVE_CASES])
def test_matches_naive_implementation(kind, opts, kw, training, reset):
    dtype = torch.float64
    m = make(kind, dtype=dtype, **kw, **opts).train(training)
    x = torch.randn(T, B, I, dtype=dtype)
    hx = states_for(m, dtype)
    rm = random_reset(T, B) if reset else None
    torch.manual_seed(21)
    out, hidden = m(x, hx, reset_mask=rm)
    torch.manual_seed(21)
    out_n, hidden_n = naive_module(m, x, hx, rm)
    assert_close(out, out_n, "out")
    for k, (a, e) in enumerate(zip(hidden if kind == "LSTM" else (hidden,),
                                   hidden_n if kind == "LSTM" else (hidden_n,))):
        assert_close(a, e, f"state[{k}]")
    # and the same gradients as autograd through the naive implementation
    params = list(m.parameters())
    loss_w = torch.randn_like(out)
    g = torch.autograd.grad((out * loss_w).sum(), params)
    torch.manual_seed(21)
    g_n = torch.autograd.grad((naive_module(m, x, hx, rm)[0] * loss_w).sum(), params)
    for (name, _), a, e in zip(m.named_parameters(), g, g_n):
        assert_close(a, e, f"grad {name}", grad=True)


@pytest.mark.parametrize("kind", list(KINDS))
def test_eval_deterministic_and_zero_probabilities_are_plain(kind):
    extra = dict(peephole=True) if kind == "LSTM" else {}
    m = make(kind, layer_norm=True, recurrent_dropout=0.5, zoneout=0.3, **extra).eval()
    x = torch.randn(T, B, I)
    hx = states_for(m, torch.float32)
    a, b = m(x, hx), m(x, hx)
    assert torch.equal(a[0], b[0])
    # eval: recurrent dropout is off (no draws, same numbers as without it)
    torch.manual_seed(1)
    no_rd = make(kind, layer_norm=True, zoneout=0.3, **extra).eval()
    no_rd.load_state_dict(m.state_dict())
    assert torch.equal(no_rd(x, hx)[0], a[0])
    # p = 0 is the plain module, training included (same RNG stream afterwards: nothing drawn)
    torch.manual_seed(2)
    zero = KINDS[kind](I, H, recurrent_dropout=0.0, zoneout=0.0, backend="torch")
    torch.manual_seed(2)
    plain = KINDS[kind](I, H, backend="torch")
    hx = states_for(plain, torch.float32)
    torch.manual_seed(3)
    y0 = zero(x, hx)[0]
    r0 = torch.rand(2)
    torch.manual_seed(3)
    y1 = plain(x, hx)[0]
    assert torch.equal(y0, y1) and torch.equal(r0, torch.rand(2))


def test_training_masks_differ_between_calls_and_seed_reproduces():
    m = make("LSTM", zoneout=0.5, recurrent_dropout=0.5)
    x = torch.randn(T, B, I)
    a, b = m(x)[0], m(x)[0]
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    a = m(x)[0]
    torch.manual_seed(0)
    assert torch.equal(a, m(x)[0])


# ---------------------------------------------------------------------------------------------
# reset_mask: episodes
# ---------------------------------------------------------------------------------------------

def _episodes(col):
    """[T] bool -> list of (start, end) segments split at resets (a reset at 0 splits nothing)."""
    cuts = [0] + [t for t in range(1, len(col)) if col[t]] + [len(col)]
    return list(zip(cuts[:-1], cuts[1:]))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", list(KINDS))
def test_reset_mask_splits_episodes(backend, kind):
    """A reset before step t == running the head and the tail as separate sequences from h0, in
    both directions and every layer (eval: zoneout is the deterministic expectation)."""
    extra = dict(peephole=True) if kind == "LSTM" else {}
    m = make(kind, backend, torch.float64, num_layers=2, bidirectional=True, layer_norm=True,
             zoneout=0.2, **extra).eval()
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = states_for(m, torch.float64)
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[2, 0] = True
    reset[1, 1] = reset[3, 1] = True
    reset[0, 2] = True  # at the first step: no effect
    out, hidden = m(x, hx, reset_mask=reset)
    hidden = hidden if kind == "LSTM" else (hidden,)
    for b in range(B):
        pieces = []
        hb = tuple(s[:, b:b + 1] for s in (hx if kind == "LSTM" else (hx,)))
        for s, e in _episodes(reset[:, b]):
            o, hid = m(x[s:e, b:b + 1], hb if kind == "LSTM" else hb[0])
            pieces.append((o, hid if kind == "LSTM" else (hid,)))
        assert_close(out[:, b:b + 1], torch.cat([o for o, _ in pieces]), f"{kind} row {b} out")
        for k, st in enumerate(hidden):
            assert_close(st[0::2, b:b + 1], pieces[-1][1][k][0::2], f"{kind} row {b} forward state[{k}]")
            assert_close(st[1::2, b:b + 1], pieces[0][1][k][1::2], f"{kind} row {b} reverse state[{k}]")


@pytest.mark.parametrize("backend", cpu_backends())
def test_reset_mask_packed_batch_first_unbatched(backend):
    """Layouts: PackedSequence ([T, B], original order), batch_first ([B, T]), unbatched ([T])
    all equal the per-row runs."""
    m = make("GRU", backend, torch.float64, bidirectional=True, reset_after=False, zoneout=0.3).eval()
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = states_for(m, torch.float64)
    reset = random_reset(T, B, seed=3)
    reset[1, 0] = reset[1, 2] = True
    packed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    out, h_n = m(packed, h0, reset_mask=reset)
    out, _ = pad_packed_sequence(out)
    for b in range(B):
        L = int(LENGTHS[b])
        o, h = m(x[:L, b], h0[:, b], reset_mask=reset[:L, b])  # unbatched
        assert_close(out[:L, b], o, f"packed row {b} out")
        assert_close(h_n[:, b], h, f"packed row {b} h_n")
    mb = make("GRU", backend, torch.float64, bidirectional=True, reset_after=False, zoneout=0.3,
              batch_first=True).eval()
    mb.load_state_dict(m.state_dict())
    o_bf, h_bf = mb(x.transpose(0, 1), h0, reset_mask=reset.t())
    o_tm, h_tm = m(x, h0, reset_mask=reset)
    assert_close(o_bf.transpose(0, 1), o_tm, "batch_first out")
    assert_close(h_bf, h_tm, "batch_first h_n")


# ---------------------------------------------------------------------------------------------
# every backend == the reference backend
# ---------------------------------------------------------------------------------------------

# (kind, options, module kwargs, form, reset, triton too)
BACKEND_CASES = [
    ("LSTM", dict(layer_norm=True), dict(num_layers=2, bidirectional=True), "batched", False, False),
    ("LSTM", dict(peephole=True, forget_bias=1.0), dict(proj_size=2, bidirectional=True), "batched", True, False),
    ("LSTM", dict(layer_norm=True, peephole=True, recurrent_dropout=0.3, zoneout=0.2),
     dict(num_layers=2, bidirectional=True, batch_first=True, proj_size=3), "batched", True, False),
    ("LSTM", dict(layer_norm=True, peephole=True, recurrent_dropout=0.3, zoneout=0.2),
     dict(bidirectional=True), "packed", True, True),
    ("GRU", dict(layer_norm=True, zoneout=0.3), dict(num_layers=2, bidirectional=True), "batched", True, False),
    ("GRU", dict(reset_after=False, recurrent_dropout=0.4), dict(batch_first=True), "batched", True, True),
    ("GRU", dict(reset_after=False, zoneout=0.3), dict(num_layers=2, bidirectional=True), "packed", True, False),
    ("RNN", dict(layer_norm=True, zoneout=0.3), dict(bidirectional=True), "batched", True, False),
    ("RNN", dict(recurrent_dropout=0.5, layer_norm=True),
     dict(nonlinearity="relu", num_layers=2, bidirectional=True), "packed", True, False),
]


def backend_cases():
    for backend in rnn_backends():
        if backend == "torch":
            continue
        for kind, opts, kw, form, reset, triton in BACKEND_CASES:
            if backend == "triton" and not triton:
                continue
            yield pytest.param(backend, kind, opts, kw, form, reset,
                               id=f"{backend}-{kind}-{'-'.join(opts)}-{form}{'-reset' if reset else ''}")


@pytest.mark.parametrize("backend,kind,opts,kw,form,reset", list(backend_cases()))
def test_backend_matches_reference(backend, kind, opts, kw, form, reset):
    ref = make(kind, "torch", **kw, **opts)
    fast = make(kind, backend, **kw, **opts)
    x = torch.randn(B, T, I) if ref.batch_first else torch.randn(T, B, I)
    hx = states_for(ref, torch.float32)
    rm = random_reset(T, B, batch_first=ref.batch_first and form != "packed") if reset else None
    compare(run(fast, x, hx, form, rm), run(ref, x, hx, form, rm), f"{kind}/{backend} training")
    fast.eval(), ref.eval()
    compare(run(fast, x, hx, form, rm), run(ref, x, hx, form, rm), f"{kind}/{backend} eval")


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "torch"])
def test_nan_propagates_like_reference(backend):
    """A NaN in one row's input reaches exactly the entries it reaches in the reference (that
    row, from its step on in the forward direction and up to it in the reverse), nothing else."""
    kw = dict(bidirectional=True, layer_norm=True, peephole=True, zoneout=0.3, recurrent_dropout=0.3)
    ref, fast = make("LSTM", "torch", **kw), make("LSTM", backend, **kw)
    x = torch.randn(T, B, I)
    x[2, 1, 0] = float("nan")
    hx = states_for(ref, torch.float32)
    rm = random_reset(T, B)
    compare(run(fast, x, hx, reset=rm), run(ref, x, hx, reset=rm), f"NaN/{backend}")
    out = run(ref, x, hx, reset=rm)[0]["out"]
    assert out[:, [0, 2]].isfinite().all() and out[2, 1].isnan().all()


# ---------------------------------------------------------------------------------------------
# float64 gradcheck, masks held fixed by re-seeding inside the function
# ---------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    ("LSTM", dict(layer_norm=True, peephole=True, recurrent_dropout=0.3, zoneout=0.3),
     dict(bidirectional=True, proj_size=2), True),
    ("GRU", dict(reset_after=False, recurrent_dropout=0.3, zoneout=0.3), dict(bidirectional=True), True),
    ("GRU", dict(layer_norm=True, zoneout=0.3), dict(), False),
    ("RNN", dict(layer_norm=True, recurrent_dropout=0.3, zoneout=0.3), dict(bidirectional=True), True),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind,opts,kw,packed", GRADCHECK_CASES,
                         ids=[f"{c[0]}-{'-'.join(c[1])}{'-packed' if c[3] else ''}" for c in GRADCHECK_CASES])
def test_gradcheck(backend, kind, opts, kw, packed):
    dtype = torch.float64
    torch.manual_seed(4)
    m = KINDS[kind](2, 3, dtype=dtype, backend=backend, **kw, **opts).train()
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if name.startswith("layer_norm"):
                prm.add_(0.3 * torch.randn_like(prm))
    D = 2 if m.bidirectional else 1
    Hr = getattr(m, "proj_size", 0) or 3
    Tn, Bn = 4, 3
    x = torch.randn(Tn, Bn, 2, dtype=dtype, requires_grad=True)
    h0 = torch.randn(D, Bn, Hr, dtype=dtype, requires_grad=True)
    c0 = torch.randn(D, Bn, 3, dtype=dtype, requires_grad=kind == "LSTM")
    lengths = torch.tensor([4, 2, 3])
    reset = torch.zeros(Tn, Bn, dtype=torch.bool)
    reset[2, 0] = reset[1, 2] = True
    names = [n for n, _ in m.named_parameters()]

    def f(x, h0, c0, *weights):
        torch.manual_seed(17)  # the same masks at every evaluation: forward and backward agree
        with torch.nn.utils.stateless._reparametrize_module(m, dict(zip(names, weights))):
            inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
            out, hidden = m(inp, (h0, c0) if kind == "LSTM" else h0, reset_mask=reset)
            out = out.data if packed else out
            return (out,) + (hidden if isinstance(hidden, tuple) else (hidden,))

    inputs = (x, h0, c0) + tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    # With layer norm (4G + 2H more parameters per direction) fast_mode: u^T J v for random u, v
    # (a wrong Jacobian entry shows with probability 1) instead of the full Jacobians, which take
    # ~10x longer; the contract tests check every backward entry by entry against the reference.
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=bool(opts.get("layer_norm")))


# ---------------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------------

CELL_CASES = [
    ("LSTMCell", dict(layer_norm=True, peephole=True, zoneout=0.3, forget_bias=1.0)),
    ("GRUCell", dict(reset_after=False, zoneout=0.3)),
    ("GRUCell", dict(layer_norm=True)),
    ("RNNCell", dict(layer_norm=True, zoneout=0.4, nonlinearity="relu")),
]


def _cell_run(c, x, hx, seed=9):
    x = x.clone().requires_grad_()
    hl = tuple(h.clone().requires_grad_() for h in hx)
    torch.manual_seed(seed)
    out = c(x, hl if isinstance(c, nn.LSTMCell) else hl[0])
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(5)
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, [x, *hl, *c.parameters()])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,opts", CELL_CASES, ids=[f"{n}-{'-'.join(o)}" for n, o in CELL_CASES])
def test_cell_matches_naive(name, opts, training):
    dtype = torch.float64
    torch.manual_seed(3)
    c = getattr(fastrnn, name)(I, H, dtype=dtype, backend="torch", **opts).train(training)
    with torch.no_grad():
        for n, prm in c.named_parameters():
            if n.startswith("layer_norm"):
                prm.add_(0.3 * torch.randn_like(prm))
    lstm = name == "LSTMCell"
    x = torch.randn(B, I, dtype=dtype)
    hx = (torch.randn(B, H, dtype=dtype), torch.randn(B, H, dtype=dtype)) if lstm else (torch.randn(B, H, dtype=dtype),)
    torch.manual_seed(9)
    out = c(x, hx if lstm else hx[0])
    outs = out if lstm else (out,)
    torch.manual_seed(9)
    masks = naive_masks(c._cell_name(), 1, B, H, H, c, dtype)
    _, h, cc = naive_direction(c._cell_name(), x.unsqueeze(0), dict(c.named_parameters()), "", c, hx[0],
                               hx[1] if lstm else None, False, masks, None)
    assert_close(outs[0], h, f"{name} h")
    if lstm:
        assert_close(outs[1], cc, f"{name} c")


def cell_backend_cases():
    for backend in rnn_backends():
        if backend == "torch":
            continue
        for name, opts in CELL_CASES if backend != "triton" else CELL_CASES[:2]:
            yield pytest.param(backend, name, opts, id=f"{backend}-{name}-{'-'.join(opts)}")


@pytest.mark.parametrize("backend,name,opts", list(cell_backend_cases()))
def test_cell_backend_matches_reference(backend, name, opts):
    cls = getattr(fastrnn, name)
    torch.manual_seed(3)
    ref = cls(I, H, backend="torch", **opts)
    torch.manual_seed(3)
    fast = cls(I, H, backend=backend, **opts)
    x = torch.randn(B, I)
    hx = (torch.randn(B, H), torch.randn(B, H)) if name == "LSTMCell" else (torch.randn(B, H),)
    for training in (True, False):
        ref.train(training), fast.train(training)
        (o_f, g_f), (o_r, g_r) = _cell_run(fast, x, hx), _cell_run(ref, x, hx)
        for k, (a, e) in enumerate(zip(o_f, o_r)):
            assert_close(a, e, f"{name}/{backend}/out[{k}] training={training}")
        for k, (a, e) in enumerate(zip(g_f, g_r)):
            assert_close(a, e, f"{name}/{backend}/grad[{k}] training={training}", grad=True)


def test_functional_cell_rec_mask():
    """A cell never draws a recurrent-dropout mask; functional.*_cell takes the caller's."""
    dtype = torch.float64
    torch.manual_seed(3)
    c = fastrnn.GRUCell(I, H, dtype=dtype, backend="torch", reset_after=False)
    x, h = torch.randn(B, I, dtype=dtype), torch.randn(B, H, dtype=dtype)
    mask = torch.empty(B, H, dtype=dtype).bernoulli_(0.5) * 2
    got = fastrnn.functional.gru_cell(x, h, c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh, backend="torch",
                                      reset_after=False, rec_mask=mask)
    _, want, _ = naive_direction("gru", x.unsqueeze(0), dict(c.named_parameters()), "", c, h, None, False,
                                 (mask, None, None), None)
    assert_close(got, want, "gru_cell rec_mask")


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build,exc,match", [
    (lambda: fastrnn.GRU(I, H, peephole=True), TypeError, "peephole=True applies to LSTM only"),
    (lambda: fastrnn.RNNCell(I, H, peephole=True), TypeError, "peephole=True applies to LSTM only"),
    (lambda: fastrnn.LSTM(I, H, reset_after=False), TypeError, "reset_after applies to GRU only"),
    (lambda: fastrnn.GRU(I, H, forget_bias=1.0), TypeError, "forget_bias applies to LSTM only"),
    (lambda: fastrnn.GRU(I, H, layer_norm=True, reset_after=False), ValueError,
     "layer_norm=True with reset_after=False"),
    (lambda: fastrnn.GRUCell(I, H, layer_norm=True, reset_after=False), ValueError, "reset_after=False"),
    (lambda: fastrnn.LSTM(I, H, zoneout=1.5), ValueError, "zoneout should be a number in range"),
    (lambda: fastrnn.LSTM(I, H, zoneout=-0.1), ValueError, "zoneout"),
    (lambda: fastrnn.GRU(I, H, recurrent_dropout=2), ValueError, "recurrent_dropout"),
    (lambda: fastrnn.GRU(I, H, recurrent_dropout=True), ValueError, "recurrent_dropout"),
    (lambda: fastrnn.LSTM(I, H, bias=False, forget_bias=1.0), ValueError, "forget_bias needs bias=True"),
    (lambda: fastrnn.LSTMCell(I, H, bias=False, forget_bias=1.0), ValueError, "forget_bias needs bias=True"),
    (lambda: fastrnn.LSTMCell(I, H, recurrent_dropout=0.2), TypeError, "one mask per sequence"),
    (lambda: fastrnn.GRU(I, H, reset_after="no"), TypeError, "reset_after must be a bool"),
])
def test_option_errors(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_reset_mask_errors():
    m = fastrnn.LSTM(I, H, backend="torch")
    x = torch.randn(T, B, I)
    with pytest.raises(TypeError, match="reset_mask must be a bool tensor, got torch.float32"):
        m(x, reset_mask=torch.zeros(T, B))
    with pytest.raises(ValueError, match=r"expected \[T, B\] = \(5, 3\)"):
        m(x, reset_mask=torch.zeros(B, T, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[T\] \(unbatched input\)"):
        m(x[:, 0], reset_mask=torch.zeros(T, 1, dtype=torch.bool))
    mb = fastrnn.GRU(I, H, batch_first=True, backend="torch")
    with pytest.raises(ValueError, match=r"\[B, T\] \(batch_first\) = \(3, 5\)"):
        mb(x.transpose(0, 1), reset_mask=torch.zeros(T, B, dtype=torch.bool))
    packed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    with pytest.raises(ValueError, match="padded layout of the packed batch"):
        m(packed, reset_mask=torch.zeros(T + 1, B, dtype=torch.bool))
    with pytest.raises(TypeError, match="reset_mask"):
        fastrnn.LSTMCell(I, H)(x[0], reset_mask=torch.zeros(B, dtype=torch.bool))


def test_functional_errors():
    m = fastrnn.GRU(I, H)
    x = torch.randn(T, B, I)
    h0 = torch.zeros(1, B, H)
    with pytest.raises(TypeError, match="peephole=True applies to LSTM only"):
        fastrnn.functional.rnn("gru", x, h0, None, m._weight_groups(), num_layers=1, bidirectional=False,
                               peephole=[torch.zeros(3, H)])
    with pytest.raises(ValueError, match="layer_norm_hh_weight of group 0 has shape"):
        fastrnn.functional.rnn("gru", x, h0, None, m._weight_groups(), num_layers=1, bidirectional=False,
                               layer_norm=[(torch.ones(3 * H), torch.zeros(3 * H), torch.ones(H), torch.zeros(3 * H))])
    with pytest.raises(RuntimeError, match="dtype"):
        fastrnn.functional.rnn("gru", x, h0, None, m._weight_groups(), num_layers=1, bidirectional=False,
                               layer_norm=[(torch.ones(3 * H, dtype=torch.float64),) + (torch.zeros(3 * H),) * 3])
