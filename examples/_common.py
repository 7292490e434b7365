"""What every example shares: the command line, the progress bar, the torch-vs-fastrnn timing and
the loss plot. Each example is one file that imports this one (run them from anywhere:
``python examples/char_lm.py``; Python puts ``examples/`` on the path).

Every example writes to ``--out``: ``loss.png`` (the loss curve) and ``history.json`` (every
logged loss, the timing, the arguments), which is what ``tests/test_examples.py`` reads.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import torch

import fastrnn
from fastrnn.backends import BACKENDS, plan
from fastrnn.bench import time_interleaved

try:
    from tqdm import tqdm
except ImportError:  # the examples' only dependencies beyond fastrnn; both are in the [bench] extra
    sys.exit("the examples need tqdm and matplotlib: pip install tqdm matplotlib")


def parser(name: str, description: str, steps: int) -> argparse.ArgumentParser:
    """The options every example has; an example adds its own (model sizes, ...)."""
    p = argparse.ArgumentParser(prog=f"python examples/{name}.py", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", default=None, choices=sorted(BACKENDS),
                   help="fastrnn backend for every RNN (None: automatic, cpp > numba > torch)")
    p.add_argument("--steps", type=int, default=steps, help="training steps")
    p.add_argument("--smoke", action="store_true",
                   help="a few steps on a smaller model (seconds; what CI runs)")
    p.add_argument("--out", default=os.path.join("examples", "out", name),
                   help="folder for loss.png and history.json")
    p.add_argument("--time-steps", type=int, default=20,
                   help="training steps timed per model for the torch-vs-fastrnn comparison")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (None: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed for data and weights")
    return p


def setup(args, log: bool = True) -> str:
    """Seed, threads, output folder; returns the backend the RNNs will run on."""
    torch.manual_seed(args.seed)
    if args.threads:
        fastrnn.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    name, _ = plan(args.backend, "cpu", "rnn", torch.float32)  # raises, saying why, if it cannot run
    if log:
        print(f"fastrnn backend: {name}, {torch.get_num_threads()} threads")
        load, cpus = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0, os.cpu_count() or 1
        if load > cpus and torch.get_num_threads() > 1:
            # OpenMP threads spin while they wait for each other at every parallel region, in the
            # place of the thread they wait for when other processes hold the cores: measured at
            # load 3.7 on 2 cores, forecasting.py --smoke took 87 s, 4 s with either fix
            print(f"note: the machine is busy (load average {load:.1f} on {cpus} CPUs): "
                  "OMP_WAIT_POLICY=PASSIVE python ... or --threads 1 is likely much faster here")
    return name


def progress(steps: int, desc: str):
    """A tqdm bar over range(steps); ``bar.set_postfix(loss=...)`` shows the running loss."""
    return tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5)


def time_step(model: torch.nn.Module, step, make_optimizer, rounds: int, twin: torch.nn.Module | None = None) -> dict:
    """Time one training step of ``model`` (fastrnn's modules) against the same model on torch's
    ``nn.LSTM/GRU/RNN`` (``twin``; default ``fastrnn.to_torch`` of a copy: the same weights),
    interleaved round by round in this process so that load on the machine hits both alike.

    ``step(model, optimizer)`` runs one training step on a fixed batch; each model gets its own
    ``make_optimizer(model)``. The models timed are copies: ``model`` itself is unchanged.
    Returns medians in ms, the speedup torch / fastrnn and the spread (max - min) / median.
    """
    models = {"torch": fastrnn.to_torch(copy.deepcopy(model)) if twin is None else twin,
              "fastrnn": copy.deepcopy(model)}
    fns = {}
    for who, m in models.items():
        opt = make_optimizer(m)
        fns[who] = lambda m=m, opt=opt: step(m, opt)
    samples = time_interleaved(fns, rounds)
    out = {f"{who}_ms": statistics.median(s) for who, s in samples.items()}
    out["speedup"] = out["torch_ms"] / out["fastrnn_ms"]
    out["spread"] = max((max(s) - min(s)) / statistics.median(s) for s in samples.values())
    out["threads"] = torch.get_num_threads()
    print(f"time per training step (median of {rounds}, interleaved, {out['threads']} threads): "
          f"torch {out['torch_ms']:.1f} ms, fastrnn {out['fastrnn_ms']:.1f} ms -> {out['speedup']:.2f}x "
          f"(spread {out['spread']:.0%}{'; a loaded machine: take the ratio loosely' if out['spread'] > 0.2 else ''})")
    return out


def save(args, losses: list, timing: dict, title: str, **extra) -> None:
    """loss.png and history.json in ``args.out``. ``losses`` is a list of (step, loss)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps, ys = [s for s, _ in losses], [l for _, l in losses]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, ys, lw=0.8, alpha=0.6, label="per step")
    w = len(ys) // 50  # a running mean over 2% of the run shows the trend through batch noise
    if w > 1:
        c = [0.0]
        for y in ys:
            c.append(c[-1] + y)
        ax.plot(steps[w - 1:], [(c[i + w] - c[i]) / w for i in range(len(ys) - w + 1)], label=f"mean of {w}")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = os.path.join(args.out, "loss.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump({"losses": losses, "timing": timing, "args": vars(args), **extra}, f, indent=1)
    print(f"wrote {png} and history.json")
