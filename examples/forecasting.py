"""Time-series forecasting: a multi-layer LSTM reads a variable-length window of a seasonal series
(packed, no padding computed) and forecasts the next ``--horizon`` values.

    python examples/forecasting.py                   # 3-layer LSTM, ~45 s on 2 idle cores
    python examples/forecasting.py --backend numba --layers 2
    python examples/forecasting.py --smoke           # seconds (CI)

The data are synthetic: each series is a daily and a weekly cycle (random amplitudes and phases)
on a slow trend, with noise, sampled hourly. A training example is a window of 48 to ``--max-window`` (168)
hours ending at a random point, and the 24 hours after it. Windows of different lengths go through the
LSTM as one PackedSequence (``enforce_sorted=False``), and the forecast is a linear map of the
last layer's final hidden state, which for a packed batch is each window's own last step. The
report compares the held-out error with the seasonal-naive forecast (the same hours one day
earlier), the baseline a forecaster has to beat.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from _common import parser, progress, save, setup, time_step
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn

DAY = 24  # samples per day (hourly)
MIN_WINDOW = 2 * DAY  # the seasonal-naive baseline needs a day of history


def make_series(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """n synthetic hourly series [n, length]: daily + weekly cycles, a trend, noise."""
    t = torch.arange(length, dtype=torch.float32)

    def rand(*shape):
        return torch.rand(*shape, generator=generator)
    daily = (0.5 + rand(n, 1)) * torch.sin(2 * math.pi * (t / DAY + rand(n, 1)))
    weekly = 0.5 * rand(n, 1) * torch.sin(2 * math.pi * (t / (7 * DAY) + rand(n, 1)))
    trend = (rand(n, 1) - 0.5) * t / length
    return daily + weekly + trend + 0.1 * torch.randn(n, length, generator=generator)


def make_batch(series: torch.Tensor, n: int, horizon: int, max_window: int, generator: torch.Generator):
    """n windows of random length in [MIN_WINDOW, max_window] from random series: padded
    x [n, max_window, 1], lengths [n], targets y [n, horizon]. Each window is centred on its own
    last value (the level moves with the trend; the network then learns the shape)."""
    rows = torch.randint(len(series), (n,), generator=generator)
    lengths = torch.randint(MIN_WINDOW, max_window + 1, (n,), generator=generator)
    ends = torch.randint(max_window, series.shape[1] - horizon + 1, (n,), generator=generator)
    x = torch.zeros(n, max_window, 1)
    y = torch.empty(n, horizon)
    for i, (r, L, e) in enumerate(zip(rows.tolist(), lengths.tolist(), ends.tolist())):
        level = series[r, e - 1]
        x[i, :L, 0] = series[r, e - L: e] - level
        y[i] = series[r, e: e + horizon] - level
    return x, lengths, y


class Forecaster(nn.Module):
    """fastrnn.LSTM over a packed batch of windows -> the next ``horizon`` values.
    forward(x [B, T, 1] padded, lengths [B]) -> [B, horizon]."""

    def __init__(self, hidden: int, layers: int, horizon: int, backend: str | None):
        super().__init__()
        self.lstm = fastrnn.LSTM(1, hidden, layers, batch_first=True, backend=backend)
        self.head = nn.Linear(hidden, horizon)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h [layers, B, H], in the batch's own order
        return self.head(h[-1])


def seasonal_naive(x, lengths, horizon):
    """Forecast = the same hours one day earlier: [B, horizon] (horizon <= DAY)."""
    idx = lengths[:, None] - DAY + torch.arange(horizon)[None, :]
    return x[..., 0].gather(1, idx)


def main(argv=None):
    p = parser("forecasting", __doc__.split("\n\n")[0], steps=500)
    p.add_argument("--hidden", type=int, default=64, help="hidden units per layer")
    p.add_argument("--layers", type=int, default=3, help="stacked LSTM layers")
    p.add_argument("--horizon", type=int, default=DAY, help=f"hours forecast (at most {DAY})")
    p.add_argument("--max-window", type=int, default=7 * DAY,
                   help=f"longest input window in hours (the shortest is {MIN_WINDOW})")
    p.add_argument("--batch", type=int, default=64, help="windows per step")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    args = p.parse_args(argv)
    if not 1 <= args.horizon <= DAY:
        p.error(f"--horizon must be between 1 and {DAY}")
    if args.smoke:
        args.steps, args.hidden, args.layers, args.max_window, args.time_steps = 40, 32, 2, 3 * DAY, 5
    if args.max_window < MIN_WINDOW:
        p.error(f"--max-window must be at least {MIN_WINDOW}")
    backend = setup(args)
    gen = torch.Generator().manual_seed(args.seed)
    series = make_series(64, 60 * DAY, gen)
    held_out = make_batch(make_series(32, 60 * DAY, gen), 256, args.horizon, args.max_window, gen)

    model = Forecaster(args.hidden, args.layers, args.horizon, args.backend)

    def make_optimizer(m):
        return torch.optim.Adam(m.parameters(), lr=args.lr)

    opt = make_optimizer(model)
    losses = []
    bar = progress(args.steps, f"forecasting ({args.layers}-layer LSTM, {backend})")
    for step in bar:
        x, lengths, y = make_batch(series, args.batch, args.horizon, args.max_window, gen)
        loss = F.mse_loss(model(x, lengths), y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append((step, loss.item()))
        bar.set_postfix(mse=f"{loss.item():.4f}")

    x, lengths, y = held_out
    with torch.no_grad():
        mse = F.mse_loss(model(x, lengths), y).item()
    naive = F.mse_loss(seasonal_naive(x, lengths, args.horizon), y).item()
    print(f"final training mse {losses[-1][1]:.4f}; held-out mse {mse:.4f} "
          f"(seasonal-naive forecast: {naive:.4f})")

    batch = make_batch(series, args.batch, args.horizon, args.max_window, gen)

    def train_step(m, o):
        loss = F.mse_loss(m(*batch[:2]), batch[2])
        o.zero_grad()
        loss.backward()
        o.step()

    timing = time_step(model, train_step, make_optimizer, args.time_steps)
    save(args, losses, timing, f"forecasting, {args.layers}-layer LSTM on fastrnn ({backend})",
         held_out_mse=mse, seasonal_naive_mse=naive)


if __name__ == "__main__":
    main()
