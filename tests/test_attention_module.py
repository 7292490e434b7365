"""fastrnn.Attention (Luong) against the same math in torch ops, and a GRU encoder-decoder with
attention that trains for several SGD steps with the same losses as its nn.GRU + torch twin."""
import math

import pytest
import torch
from torch import nn

import fastrnn
from fastrnn.testing import assert_close

BACKENDS = fastrnn.available_backends("cpu", "sdpa")


class TorchLuong(nn.Module):
    """The specification in plain torch ops (same parameter names as fastrnn.Attention)."""

    def __init__(self, hidden_size, score):
        super().__init__()
        self.score, self.hidden_size = score, hidden_size
        self.weight = nn.Parameter(torch.empty(hidden_size, hidden_size)) if score == "general" else None
        if self.weight is not None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, dec, enc, mask=None, need_weights=False):
        keys = enc @ self.weight.t() if self.weight is not None else enc
        scores = dec @ keys.transpose(-1, -2)
        if self.score == "scaled_dot":
            scores = scores / math.sqrt(self.hidden_size)
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(-2), float("-inf"))
        weights = torch.softmax(scores, -1)
        weights = torch.where(torch.isnan(weights), torch.zeros_like(weights), weights)
        return weights @ enc, weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", fastrnn.Attention.SCORES)
def test_attention_matches_torch_math(backend, score):
    B, L, S, H = 3, 5, 7, 6
    torch.manual_seed(3)
    ref = TorchLuong(H, score).double()
    torch.manual_seed(3)
    fast = fastrnn.Attention(H, score=score, backend=backend).double()
    fast.load_state_dict(ref.state_dict(), strict=True)
    dec = torch.randn(B, L, H, dtype=torch.float64, requires_grad=True)
    enc = torch.randn(B, S, H, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, S) < 0.7
    mask[1] = False  # one sequence with no valid encoder position: zero context, zero weights
    outs = []
    for m in (ref, fast):
        d, e = dec.detach().clone().requires_grad_(), enc.detach().clone().requires_grad_()
        ctx, w = m(d, e, mask, need_weights=True)
        (ctx.pow(2).sum() + (w * torch.arange(S)).sum()).backward()
        outs.append(dict(context=ctx.detach(), weights=w.detach(), grad_dec=d.grad, grad_enc=e.grad,
                         **({"grad_weight": m.weight.grad} if m.weight is not None else {})))
    for name, exp in outs[0].items():
        assert_close(outs[1][name], exp, f"{backend}/{score}/{name}", grad=name.startswith("grad"))
    assert torch.all(outs[1]["context"][1] == 0)


def test_attention_rejects_bad_arguments():
    with pytest.raises(ValueError, match="score"):
        fastrnn.Attention(4, score="concat")
    with pytest.raises(ValueError, match="decoder_states"):
        fastrnn.Attention(4)(torch.randn(2, 3, 5), torch.randn(2, 3, 4))


class Seq2Seq(nn.Module):
    """GRU encoder, GRU decoder (teacher forcing), Luong attention, Luong's attentional layer."""

    def __init__(self, vocab, hidden, gru, attention):
        super().__init__()
        self.src_emb = nn.Embedding(vocab, hidden)
        self.tgt_emb = nn.Embedding(vocab, hidden)
        self.encoder = gru(hidden, hidden, batch_first=True)
        self.decoder = gru(hidden, hidden, batch_first=True)
        self.attention = attention
        self.combine = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, src, src_lengths, tgt_in):
        enc, h = self.encoder(self.src_emb(src))
        dec, _ = self.decoder(self.tgt_emb(tgt_in), h)
        mask = torch.arange(src.shape[1]) < src_lengths.unsqueeze(1)  # [B, S], True = real token
        context, _ = self.attention(dec, enc, mask)
        return self.out(torch.tanh(self.combine(torch.cat([context, dec], -1))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_seq2seq_trains_like_torch(backend):
    V, H, B, S, T, steps = 11, 16, 4, 9, 7, 6
    torch.manual_seed(0)
    ref = Seq2Seq(V, H, nn.GRU, TorchLuong(H, "general"))
    fast = Seq2Seq(V, H, fastrnn.GRU, fastrnn.Attention(H, score="general", backend=backend))
    fast.load_state_dict(ref.state_dict(), strict=True)
    src = torch.randint(1, V, (B, S))
    lengths = torch.tensor([9, 4, 7, 1])
    src = src.masked_fill(torch.arange(S) >= lengths.unsqueeze(1), 0)  # padding id 0
    tgt = torch.randint(1, V, (B, T + 1))
    loss_fn = nn.CrossEntropyLoss()
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ref, fast)]
    losses = {0: [], 1: []}
    for _ in range(steps):
        for idx, (model, opt) in enumerate(zip((ref, fast), opts)):
            opt.zero_grad()
            logits = model(src, lengths, tgt[:, :-1])
            loss = loss_fn(logits.reshape(-1, V), tgt[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            losses[idx].append(loss.item())
    assert losses[0][-1] < losses[0][0] - 0.1, f"the torch twin did not learn: {losses[0]}"
    for step, (a, b) in enumerate(zip(losses[0], losses[1])):
        assert abs(a - b) <= 1e-5 * (1 + abs(a)), f"step {step}: torch loss {a:.7f}, fastrnn {b:.7f}"
    for (name, p1), (_, p2) in zip(ref.named_parameters(), fast.named_parameters()):
        assert_close(p2, p1, f"{backend}/param {name} after {steps} steps", grad=True)
