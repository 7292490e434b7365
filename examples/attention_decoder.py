"""Attention decoder with input feeding: the date translator of seq2seq_attention.py with its
decoder replaced by ``fastrnn.AttentionDecoder``, a Luong decoder with input feeding whose whole
teacher-forced loop is one fused call; then greedy decoding of held-out dates with ``step``.

    python examples/attention_decoder.py             # GRU, additive attention, under a minute on 2 cores
    python examples/attention_decoder.py --cell lstm --attention general --backend numba
    python examples/attention_decoder.py --smoke     # seconds (CI)

"tuesday, march 5, 1997", "5 mar 1997", "5.3.1997", ... -> "1997-03-05" (the data, vocabularies
and batches are seq2seq_attention.py's). The encoder is a bidirectional fastrnn GRU (or LSTM)
over the characters, run on a PackedSequence; its outputs [S, B, 2H] are the decoder's memory,
padding masked through ``memory_mask``. Every decoder step attends over the memory and its
attentional state tanh(W_c [context; h_t]) feeds both the output layer and, concatenated to the
next target embedding, the next step (input feeding, Luong et al. 2015).

What it shows: with input feeding, step t's input depends on step t-1's attention, so the decoder
cannot be one ``nn.LSTM`` call followed by attention over all steps (as in
seq2seq_attention.py, which has no input feeding); users write a Python loop over
``nn.LSTMCell`` / ``nn.GRUCell`` + attention, several ops per step. Here the teacher-forced loop
is one fused op, forward and backward. The timing at the end compares a training step of this
model against the same model written as users write it without fastrnn: torch's RNN for the
encoder and the plain loop ``fastrnn.testing.LoopAttentionDecoder`` (same weights) for the
decoder. Greedy decoding calls ``step`` once per token on the memory prepared once
(``prepare_memory``).
"""
from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as F
from _common import parser, progress, save, setup, time_step
from seq2seq_attention import BOS, SRC, TGT, TGT_LEN, make_batch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn.backends import plan
from fastrnn.testing import LoopAttentionDecoder

EMBED = 32


class Seq2Seq(nn.Module):
    """Bidirectional encoder, ``fastrnn.AttentionDecoder``, output layer. Shapes: src [B, S],
    src_len [B], tgt_in [B, L] -> logits [B, L, len(TGT)]."""

    def __init__(self, hidden: int, cell: str, attention: str, backend: str | None):
        super().__init__()
        rnn = {"gru": fastrnn.GRU, "lstm": fastrnn.LSTM}[cell]
        self.src_embed = nn.Embedding(len(SRC) + 1, EMBED, padding_idx=0)
        self.tgt_embed = nn.Embedding(len(TGT), EMBED)
        self.encoder = rnn(EMBED, hidden, batch_first=True, bidirectional=True, backend=backend)
        self.bridge = nn.Linear(2 * hidden, hidden)  # final encoder state -> initial decoder state
        # "dot" scores h . m_s and so needs memory_size == hidden_size: project the 2H-wide memory
        self.mem_proj = nn.Linear(2 * hidden, hidden) if attention == "dot" else nn.Identity()
        memory_size = hidden if attention == "dot" else 2 * hidden
        self.decoder = fastrnn.AttentionDecoder(cell, EMBED, hidden, memory_size, attention=attention,
                                                input_feeding=True, backend=backend)
        self.out = nn.Linear(hidden, len(TGT))

    def encode(self, src, src_len):
        """-> memory [S, B, M], its mask [B, S] (True = a real position), the decoder's initial
        state: GRU (h [1, B, H], feed [B, H]), LSTM (h, c, feed)."""
        packed = pack_padded_sequence(self.src_embed(src), src_len, batch_first=True, enforce_sorted=False)
        enc, state = self.encoder(packed)
        enc, _ = pad_packed_sequence(enc, total_length=src.shape[1])  # [S, B, 2H], zeros past each end
        mask = torch.arange(src.shape[1])[None, :] < src_len[:, None]

        def init(s):  # [2, B, H] (forward, reverse) -> [1, B, H]
            return torch.tanh(self.bridge(torch.cat([s[0], s[1]], -1)))[None]
        state = tuple(map(init, state)) if isinstance(state, tuple) else (init(state),)
        feed = state[0].new_zeros(state[0].shape[1:])  # no attentional state before the first step
        return self.mem_proj(enc), mask, (*state, feed)

    def forward(self, src, src_len, tgt_in):
        memory, mask, state = self.encode(src, src_len)
        # time-major [L, B, E]: the whole teacher-forced loop, input feeding included, in one call
        dec, _, _ = self.decoder(self.tgt_embed(tgt_in).transpose(0, 1), memory, mask, state)
        return self.out(dec).transpose(0, 1)

    @torch.no_grad()
    def greedy(self, src, src_len) -> torch.Tensor:
        """Decode TGT_LEN tokens, each step feeding back the most likely one -> [B, TGT_LEN]."""
        memory, mask, state = self.encode(src, src_len)
        prepared = self.decoder.prepare_memory(memory, mask)  # the memory's projection, once
        token, out = torch.full((src.shape[0],), BOS), []
        for _ in range(TGT_LEN):
            dec, _, state = self.decoder.step(self.tgt_embed(token), prepared, state=state)
            token = self.out(dec).argmax(-1)
            out.append(token)
        return torch.stack(out, 1)


def loss_fn(model, src, src_len, tgt):
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], 1)  # teacher forcing
    logits = model(src, src_len, tgt_in)
    return F.cross_entropy(logits.reshape(-1, len(TGT)), tgt.reshape(-1))


def plain_twin(model: Seq2Seq) -> Seq2Seq:
    """The same model (same weights) as written without fastrnn: torch's RNN for the encoder, a
    Python loop over nn.GRUCell / nn.LSTMCell + attention for the decoder."""
    twin = fastrnn.to_torch(copy.deepcopy(model))
    d = model.decoder
    twin.decoder = LoopAttentionDecoder.from_decoder(d)
    return twin


def main(argv=None):
    p = parser("attention_decoder", __doc__.split("\n\n")[0], steps=300)
    p.add_argument("--cell", default="gru", choices=["gru", "lstm"], help="encoder and decoder cell")
    p.add_argument("--attention", default="additive", choices=["additive", "general", "dot"],
                   help="score function (dot projects the memory to the decoder's width first)")
    p.add_argument("--hidden", type=int, default=128, help="hidden units")
    p.add_argument("--batch", type=int, default=64, help="dates per step")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.hidden, args.time_steps = 40, 32, 5
    backend = setup(args)
    dec_backend, _ = plan(args.backend, "cpu", "decoder", torch.float32)  # the decoder's op may differ
    if dec_backend != backend:
        print(f"AttentionDecoder backend: {dec_backend}")
    rng = random.Random(args.seed)
    held_out = make_batch(200 if not args.smoke else 50, random.Random(args.seed + 1))

    model = Seq2Seq(args.hidden, args.cell, args.attention, args.backend)

    def make_optimizer(m):
        return torch.optim.Adam(m.parameters(), lr=args.lr)

    opt = make_optimizer(model)
    losses = []
    bar = progress(args.steps, f"attention decoder ({args.cell}, {args.attention}, {dec_backend})")
    for step in bar:
        src, src_len, tgt, _ = make_batch(args.batch, rng)  # fresh dates every step
        loss = loss_fn(model, src, src_len, tgt)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append((step, loss.item()))
        bar.set_postfix(loss=f"{loss.item():.3f}")

    model.eval()
    src, src_len, tgt, texts = held_out
    pred = model.greedy(src, src_len)
    exact = (pred == tgt).all(1).float().mean().item()
    print(f"final training loss {losses[-1][1]:.3f}; greedy decoding (step) of {len(texts)} held-out "
          f"dates: {exact:.0%} exactly right")
    for i in range(5):
        iso = "".join(TGT[t] for t in pred[i].tolist()).split("</s>")[0]
        print(f"  {texts[i]!r:32} -> {iso!r}")

    batch = make_batch(args.batch, rng)
    with torch.no_grad():  # the baseline computes the same function: the same logits
        tgt_in = torch.cat([torch.full_like(batch[2][:, :1], BOS), batch[2][:, :-1]], 1)
        diff = (model(*batch[:2], tgt_in) - plain_twin(model)(*batch[:2], tgt_in)).abs().max().item()
    print(f"fused decoder vs the plain loop, same weights: logits differ by at most {diff:.1e}")
    model.train()

    def train_step(m, o):
        loss = loss_fn(m, *batch[:3])
        o.zero_grad()
        loss.backward()
        o.step()

    timing = time_step(model, train_step, make_optimizer, args.time_steps, twin=plain_twin(model))
    save(args, losses, timing, f"attention decoder, {args.cell} {args.attention} on fastrnn ({dec_backend})",
         held_out_exact_match=exact, twin_loss_diff=diff)


if __name__ == "__main__":
    main()
