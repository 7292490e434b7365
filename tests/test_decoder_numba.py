"""The numba decoder's threaded path (tests/test_decoder_contract.py runs everything on one
thread): two threads, two row blocks, against one thread and one block, LSTM and GRU, with the
additive score (grad_v is the one sum across blocks) and a mask."""
import numba
import pytest
import torch

from fastrnn import backends

import decoder_harness as harness

pytestmark = pytest.mark.skipif(backends.unavailable_reason("numba", "cpu", "decoder") is not None,
                                reason="numba decoder unavailable")


@pytest.fixture
def threads():
    n, n_numba = torch.get_num_threads(), numba.get_num_threads()

    def set_(k):
        torch.set_num_threads(k)
        numba.set_num_threads(min(k, numba.config.NUMBA_NUM_THREADS))
    yield set_
    torch.set_num_threads(n)
    numba.set_num_threads(n_numba)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_two_threads_equal_one(cell, threads, monkeypatch):
    from fastrnn.backends import numba_decoder
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread")
    # big enough to be threaded (SERIAL_WORK), B = 2 * MIN_ROWS + 1: two uneven blocks
    args, grads = harness.make_case(cell, frozenset(("additive", "feed", "mask", "drop")), L=2, T=6,
                                    B=2 * numba_decoder.MIN_ROWS + 1, S=9, M=10, H=48)
    monkeypatch.setattr(numba_decoder, "SERIAL_WORK", 0)
    threads(1)
    one = harness.run("numba", args, grads)
    threads(2)
    two = harness.run("numba", args, grads)
    harness.compare(two, one, torch.float64)
    want = harness.run("torch", args, grads)
    harness.compare(two, want, torch.float64)
