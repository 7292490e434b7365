"""Character-level language model: an LSTM (or GRU) trained with truncated backpropagation
through time on Shakespeare's sonnets, then sampling text.

    python examples/char_lm.py                      # LSTM, ~30 s on 2 idle cores
    python examples/char_lm.py --cell gru --backend numba
    python examples/char_lm.py --smoke              # seconds (CI)

The text (examples/data/sonnets.txt, 19 of the 154 sonnets, 1609, public domain, modern
spelling) is split into ``--batch`` parallel streams; each step trains on the next ``--bptt``
characters of every stream and carries the hidden state over to the next window, detached
(truncated BPTT), so that the model sees context longer than one window without backpropagating
through all of it. The last 10% of the text is held out, its loss in bits per character
measured 15 times during the run: 19 sonnets are little text, the model learns words and the
sonnets' shape and then memorises them, and the held-out loss turns up long before the training
loss stops falling. The sample comes from the weights where it was lowest (early stopping).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import parser, progress, save, setup, time_step
from torch import nn

import fastrnn

TEXT = Path(__file__).parent / "data" / "sonnets.txt"


class CharLM(nn.Module):
    """Embedding -> fastrnn.LSTM / GRU -> linear over the characters.

    forward(x [T, B] character ids, state) -> logits [T, B, V], state (the RNN's final state:
    h [layers, B, H], and c for the LSTM)."""

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, cell: str, dropout: float,
                 backend: str | None):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        rnn = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU}[cell]
        self.rnn = rnn(embed, hidden, layers, dropout=dropout if layers > 1 else 0.0, backend=backend)
        self.drop = nn.Dropout(dropout)  # on the RNN's output too (Zaremba et al. 2014): little text
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        y, state = self.rnn(self.embed(x), state)
        return self.head(self.drop(y)), state


def detach(state):
    """Cut the graph at the window boundary (truncated BPTT) but keep the values."""
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def streams(ids: torch.Tensor, B: int) -> torch.Tensor:
    """[N] -> [N // B, B]: column b is the b-th contiguous slice of the text."""
    n = len(ids) // B
    return ids[: n * B].view(B, n).t().contiguous()


def loss_fn(model, data, state=None):
    """Mean cross-entropy of predicting data[1:] from data[:-1]; data [T + 1, B]."""
    logits, state = model(data[:-1], state)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[1:].reshape(-1)), state


@torch.no_grad()
def held_out_bits(model, held_out) -> float:
    """Loss on the held-out text (one stream [N, 1]) in bits per character, in eval mode."""
    model.eval()
    loss = loss_fn(model, held_out)[0].item()
    model.train()
    return loss / math.log(2)


@torch.no_grad()
def sample(model, chars: str, prompt: str, n: int, temperature: float) -> str:
    """Feed the prompt, then draw n characters one at a time (a T = 1 call per character)."""
    model.eval()
    index = {c: i for i, c in enumerate(chars)}
    logits, state = model(torch.tensor([index[c] for c in prompt]).view(-1, 1))
    out = []
    for _ in range(n):
        probs = torch.softmax(logits[-1, 0] / temperature, -1)
        nxt = torch.multinomial(probs, 1)
        out.append(chars[nxt.item()])
        logits, state = model(nxt.view(1, 1), state)
    model.train()
    return prompt + "".join(out)


def main(argv=None):
    p = parser("char_lm", __doc__.split("\n\n")[0], steps=600)
    p.add_argument("--cell", default="lstm", choices=["lstm", "gru"], help="recurrent cell")
    p.add_argument("--hidden", type=int, default=256, help="hidden units per layer")
    p.add_argument("--layers", type=int, default=2, help="stacked RNN layers")
    p.add_argument("--batch", type=int, default=16, help="parallel text streams per step")
    p.add_argument("--bptt", type=int, default=64, help="characters per truncated-BPTT window")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout between layers and before the output")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.hidden, args.layers, args.bptt, args.time_steps = 40, 64, 1, 32, 5
    backend = setup(args)

    text = TEXT.read_text()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(ids))
    train, held_out = streams(ids[:split], args.batch), ids[split:].view(-1, 1)
    print(f"{len(text)} characters, {len(chars)} distinct; {train.shape[1]} streams of {train.shape[0]}")

    model = CharLM(len(chars), 64, args.hidden, args.layers, args.cell, args.dropout, args.backend)

    def make_optimizer(m):
        return torch.optim.Adam(m.parameters(), lr=args.lr)

    opt = make_optimizer(model)
    losses, held, state, pos = [], [], None, 0
    best = (math.inf, 0, None)  # (held-out bits/char, step, weights)
    every = max(1, args.steps // 15)
    bar = progress(args.steps, f"char LM ({args.cell}, {backend})")
    for step in bar:
        if pos + args.bptt + 1 > train.shape[0]:  # end of the text: start the streams over
            pos, state = 0, None
        loss, state = loss_fn(model, train[pos: pos + args.bptt + 1], state)
        state = detach(state)
        pos += args.bptt
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # RNNs: an occasional exploding step
        opt.step()
        losses.append((step, loss.item()))
        if (step + 1) % every == 0 or step + 1 == args.steps:
            # 19 sonnets are little text: the model soon memorises them and the held-out loss
            # rises again; keep the weights where it was lowest (early stopping)
            bits = held_out_bits(model, held_out)
            held.append((step, bits))
            if bits < best[0]:
                best = (bits, step, copy.deepcopy(model.state_dict()))
        bar.set_postfix(loss=f"{loss.item():.3f}", held_out=f"{held[-1][1]:.2f} bits/char" if held else "-")
    print(f"final training loss {losses[-1][1]:.3f}; held-out loss lowest at step {best[1]}: "
          f"{best[0]:.2f} bits/char (at the end: {held[-1][1]:.2f}); sampling from those weights")
    model.load_state_dict(best[2])
    print("---- sample ----\n" + sample(model, chars, "Shall I ", 300 if not args.smoke else 40, 0.8)
          + "\n----------------")

    window = train[: args.bptt + 1]

    def train_step(m, o):
        loss, _ = loss_fn(m, window)
        o.zero_grad()
        loss.backward()
        o.step()

    timing = time_step(model, train_step, make_optimizer, args.time_steps)
    save(args, losses, timing, f"char LM, {args.cell} on fastrnn ({backend})",
         held_out_bits_per_char=held, best_step=best[1])


if __name__ == "__main__":
    main()
