"""Sequence to sequence with attention: a GRU (or LSTM) encoder-decoder with Luong attention
(fastrnn.Attention) that learns to translate dates written by people into ISO 8601, then
decodes held-out dates greedily.

    python examples/seq2seq_attention.py             # GRU, dot-product attention, ~25 s on 2 idle cores
    python examples/seq2seq_attention.py --cell lstm --score general --backend numba
    python examples/seq2seq_attention.py --smoke     # seconds (CI)

"tuesday, march 5, 1997", "5 mar 1997", "5.3.1997", ... -> "1997-03-05". The encoder is a
bidirectional RNN over the characters, run on a PackedSequence (inputs have different lengths);
the decoder RNN reads the target shifted right (teacher forcing) in one call for the whole
sequence, and every decoder step attends over the encoder states with padding masked
(Luong et al. 2015, global attention; the attentional state tanh(W_c [context; h_t]) feeds the
output layer). Greedy decoding runs the decoder one step at a time (T = 1 calls).
The torch-vs-fastrnn timing swaps the RNNs (``fastrnn.to_torch``); the attention, which has no
torch.nn module of its own, is fastrnn's in both.
"""
from __future__ import annotations

import datetime
import random

import torch
import torch.nn.functional as F
from _common import parser, progress, save, setup, time_step
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn

MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
          "october", "november", "december"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
FORMATS = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{DAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",
    lambda d: f"{d.day}.{d.month}.{d.year}",
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day:02d} {d.year}",
]
SRC = sorted(set("".join(MONTHS + DAYS) + "0123456789 ,./"))
PAD, BOS, EOS = 0, 1, 2
TGT = ["<pad>", "<s>", "</s>"] + list("0123456789-")
TGT_LEN = 10 + 1  # "yyyy-mm-dd" and the end token


def make_batch(n: int, rng: random.Random):
    """n random dates: src [n, S] (padded with 0), src_len [n], tgt [n, TGT_LEN] (ISO + EOS)."""
    first, days = datetime.date(1900, 1, 1).toordinal(), 200 * 365
    dates = [datetime.date.fromordinal(first + rng.randrange(days)) for _ in range(n)]
    texts = [rng.choice(FORMATS)(d) for d in dates]
    src = torch.zeros(n, max(map(len, texts)), dtype=torch.long)
    for i, t in enumerate(texts):
        src[i, : len(t)] = torch.tensor([SRC.index(c) + 1 for c in t])  # 0 is padding
    tgt = torch.tensor([[TGT.index(c) for c in d.isoformat()] + [EOS] for d in dates])
    return src, torch.tensor([len(t) for t in texts]), tgt, texts


class Seq2Seq(nn.Module):
    """Bidirectional encoder, decoder with Luong attention. Shapes: src [B, S], src_len [B],
    tgt_in [B, L] -> logits [B, L, len(TGT)]."""

    def __init__(self, hidden: int, cell: str, score: str, backend: str | None):
        super().__init__()
        rnn = {"gru": fastrnn.GRU, "lstm": fastrnn.LSTM}[cell]
        self.src_embed = nn.Embedding(len(SRC) + 1, 32, padding_idx=0)
        self.tgt_embed = nn.Embedding(len(TGT), 32)
        self.encoder = rnn(32, hidden, batch_first=True, bidirectional=True, backend=backend)
        self.enc_proj = nn.Linear(2 * hidden, hidden)  # both directions -> the decoder's size
        self.bridge = nn.Linear(2 * hidden, hidden)  # final encoder state -> initial decoder state
        self.decoder = rnn(32, hidden, batch_first=True, backend=backend)
        self.attention = fastrnn.Attention(hidden, score=score, backend=backend)
        self.combine = nn.Linear(2 * hidden, hidden)  # Luong's W_c
        self.out = nn.Linear(hidden, len(TGT))

    def encode(self, src, src_len):
        """-> encoder states [B, S, H], padding mask [B, S] (True = a real position), the decoder's
        initial state."""
        packed = pack_padded_sequence(self.src_embed(src), src_len, batch_first=True, enforce_sorted=False)
        enc, state = self.encoder(packed)
        enc, _ = pad_packed_sequence(enc, batch_first=True, total_length=src.shape[1])
        mask = torch.arange(src.shape[1])[None, :] < src_len[:, None]

        def init(s):  # [2, B, H] (forward, reverse) -> [1, B, H]
            return torch.tanh(self.bridge(torch.cat([s[0], s[1]], -1)))[None]
        state = tuple(map(init, state)) if isinstance(state, tuple) else init(state)
        return self.enc_proj(enc), mask, state

    def decode(self, tgt_in, enc, mask, state):
        """tgt_in [B, L] -> logits [B, L, len(TGT)], the decoder's state."""
        dec, state = self.decoder(self.tgt_embed(tgt_in), state)
        context, _ = self.attention(dec, enc, encoder_mask=mask)
        return self.out(torch.tanh(self.combine(torch.cat([context, dec], -1)))), state

    def forward(self, src, src_len, tgt_in):
        enc, mask, state = self.encode(src, src_len)
        return self.decode(tgt_in, enc, mask, state)[0]

    @torch.no_grad()
    def greedy(self, src, src_len) -> torch.Tensor:
        """Decode TGT_LEN tokens, each step feeding back the most likely one -> [B, TGT_LEN]."""
        enc, mask, state = self.encode(src, src_len)
        token, out = torch.full((src.shape[0], 1), BOS), []
        for _ in range(TGT_LEN):
            logits, state = self.decode(token, enc, mask, state)
            token = logits.argmax(-1)
            out.append(token)
        return torch.cat(out, 1)


def loss_fn(model, src, src_len, tgt):
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], 1)  # teacher forcing
    logits = model(src, src_len, tgt_in)
    return F.cross_entropy(logits.reshape(-1, len(TGT)), tgt.reshape(-1))


def main(argv=None):
    p = parser("seq2seq_attention", __doc__.split("\n\n")[0], steps=600)
    p.add_argument("--cell", default="gru", choices=["gru", "lstm"], help="encoder and decoder cell")
    p.add_argument("--score", default="dot", choices=list(fastrnn.Attention.SCORES),
                   help="Luong score function")
    p.add_argument("--hidden", type=int, default=128, help="hidden units")
    p.add_argument("--batch", type=int, default=64, help="dates per step")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.hidden, args.time_steps = 40, 32, 5
    backend = setup(args)
    rng = random.Random(args.seed)
    held_out = make_batch(200 if not args.smoke else 50, random.Random(args.seed + 1))

    model = Seq2Seq(args.hidden, args.cell, args.score, args.backend)

    def make_optimizer(m):
        return torch.optim.Adam(m.parameters(), lr=args.lr)

    opt = make_optimizer(model)
    losses = []
    bar = progress(args.steps, f"seq2seq ({args.cell}, {args.score}, {backend})")
    for step in bar:
        src, src_len, tgt, _ = make_batch(args.batch, rng)  # fresh dates every step
        loss = loss_fn(model, src, src_len, tgt)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append((step, loss.item()))
        bar.set_postfix(loss=f"{loss.item():.3f}")

    src, src_len, tgt, texts = held_out
    pred = model.greedy(src, src_len)
    exact = (pred == tgt).all(1).float().mean().item()
    print(f"final training loss {losses[-1][1]:.3f}; greedy decoding of {len(texts)} held-out dates: "
          f"{exact:.0%} exactly right")
    for i in range(5):
        iso = "".join(TGT[t] for t in pred[i].tolist()).split("</s>")[0]
        print(f"  {texts[i]!r:32} -> {iso!r}")

    batch = make_batch(args.batch, rng)

    def train_step(m, o):
        loss = loss_fn(m, *batch[:3])
        o.zero_grad()
        loss.backward()
        o.step()

    timing = time_step(model, train_step, make_optimizer, args.time_steps)
    save(args, losses, timing, f"seq2seq with attention, {args.cell} on fastrnn ({backend})",
         held_out_exact_match=exact)


if __name__ == "__main__":
    main()
