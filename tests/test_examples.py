"""The examples run as a user runs them: each in its own process with ``--smoke`` (a few training
steps on a small model), and must exit 0, log finite losses that go down, write the loss curve
and time the model against its torch twin."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["char_lm", "seq2seq_attention", "forecasting", "attention_decoder"])
def test_example_smoke(name, tmp_path):
    # one thread: on a shared 2-core machine, 2-thread parallel regions that wait for a descheduled
    # thread made these runs 5-10x slower (185 s instead of ~30 s for the three at load 3)
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--smoke", "--threads", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    history = json.loads((tmp_path / "history.json").read_text())
    losses = [loss for _, loss in history["losses"]]
    assert len(losses) == history["args"]["steps"] >= 20
    assert all(math.isfinite(loss) for loss in losses), losses
    # a few steps of Adam on fresh random weights: the mean of the last five logged losses is
    # clearly below the first five (not one lucky batch)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, f"{name}: loss did not go down: first five {losses[:5]}, last five {losses[-5:]}"
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000  # a real plot, not an empty file
    timing = history["timing"]
    assert timing["torch_ms"] > 0 and timing["fastrnn_ms"] > 0 and timing["speedup"] > 0
    assert "time per training step" in proc.stdout
