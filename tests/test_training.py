"""A model trained with SGD and truncated BPTT gives the same losses as with torch's layers."""
import pytest
import torch
from torch import nn

import fastrnn

from conftest import cpu_backends


class Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 12, num_layers=2, batch_first=True)
        self.gru = nn.GRU(12, 8, bidirectional=True, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x, state):
        y, state = self.lstm(x, state)
        y, _ = self.gru(y)
        return self.head(y), state


def train(model, steps=30, chunk=5):
    torch.manual_seed(11)
    data = torch.randn(4, steps * chunk, 6)
    # a target the model can learn: depends on this step's input and the previous one
    target = torch.tanh(data[..., :3] + torch.roll(data[..., 3:], 1, dims=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    state, losses = None, []
    for k in range(steps):
        sl = slice(k * chunk, (k + 1) * chunk)
        out, state = model(data[:, sl], state)
        state = tuple(s.detach() for s in state)  # truncated BPTT: carry the state, not the graph
        loss = nn.functional.mse_loss(out, target[:, sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", cpu_backends())
def test_training_losses_match_torch(backend):
    torch.manual_seed(0)
    ref = Seq()
    fast = fastrnn.convert(Seq(), backend=backend)
    fast.load_state_dict(ref.state_dict())
    losses_ref, losses = train(ref), train(fast)
    assert sum(losses_ref[-5:]) < 0.9 * sum(losses_ref[:5])  # it does learn
    for k, (a, b) in enumerate(zip(losses, losses_ref)):
        assert abs(a - b) <= 1e-4 * (1 + abs(b)), f"step {k}: {a} vs {b}"
