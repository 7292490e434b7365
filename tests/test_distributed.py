"""Data parallelism on CPU: examples/ddp_train.py under torchrun with 2 processes (gloo, loopback
only) ends with the same parameters as 1 process on the whole batch, which is the 2 processes'
batches concatenated (DistributedSampler splits each global batch between them). DDP with the
cpp and the numba backend; FSDP2 (``fully_shard``, parameters sharded) with one backend.

Plain SGD: with Adam, a gradient entry that is ~0 turns rounding-level differences between the
two runs into steps of the learning rate's size (Adam normalises each entry)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastrnn

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
ARGS = ["--smoke", "--optimizer", "sgd", "--lr", "0.5"]
# gloo on the loopback interface only; one thread per process (2 processes share 2 cores)
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
TOL = 1e-6  # float32 sums in another order (local halves, then all-reduce) after 8 steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out: Path, nproc: int, *args: str) -> dict:
    """Run the example (torchrun when nproc > 1); its final state_dict."""
    for attempt in range(2):
        if nproc == 1:
            cmd = [sys.executable, str(EXAMPLE)]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(EXAMPLE)]
        proc = subprocess.run(cmd + ARGS + ["--out", str(out), *args], env=ENV, capture_output=True,
                              text=True, timeout=240)
        # the free port can be taken by another process between free_port() and torchrun's bind
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return torch.load(out / "final.pt")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """backend -> final parameters of the 1-process run on the global batch (computed once)."""
    cache = {}

    def get(backend):
        if backend not in cache:
            cache[backend] = train(tmp_path_factory.mktemp(f"one-{backend}"), 1, "--backend", backend)
        return cache[backend]
    return get


def needs(backend):
    reason = fastrnn.backends.unavailable_reason(backend, "cpu", "rnn")
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_ddp_two_processes_equal_one(backend, one_process, tmp_path):
    needs(backend)
    two = train(tmp_path / "ddp", 2, "--backend", backend)
    assert max_diff(two, one_process(backend)) < TOL


def test_fsdp2_two_processes_equal_one(one_process, tmp_path):
    backend = "cpp" if fastrnn.backends.unavailable_reason("cpp", "cpu", "rnn") is None else "numba"
    needs(backend)
    two = train(tmp_path / "fsdp", 2, "--backend", backend, "--fsdp")
    assert max_diff(two, one_process(backend)) < TOL


def test_comparison_is_not_vacuous(one_process, tmp_path):
    """The runs above agree because they trained on the same data: one process on half the
    global batch ends far from them (and training moved the parameters far beyond TOL)."""
    backend = "cpp" if fastrnn.backends.unavailable_reason("cpp", "cpu", "rnn") is None else "numba"
    needs(backend)
    half = train(tmp_path / "half", 1, "--backend", backend, "--batch", "32")
    assert max_diff(half, one_process(backend)) > 1000 * TOL
