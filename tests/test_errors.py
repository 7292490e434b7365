"""Bad input gets the exception torch would raise; empty batches work; NaN propagates as in torch."""
import pytest
import torch
from torch import nn

import fastrnn

from conftest import rnn_backends


def pair(kind, backend, **kw):
    torch.manual_seed(0)
    ref = getattr(nn, kind)(5, 4, **kw)
    fast = getattr(fastrnn, kind)(5, 4, backend=backend, **kw)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def same_error(ref, fast, *args):
    with pytest.raises(Exception) as e_ref:
        ref(*args)
    with pytest.raises(type(e_ref.value)) as e_fast:
        fast(*args)
    return str(e_ref.value), str(e_fast.value)


BAD_INPUTS = {
    "wrong_features": lambda: (torch.randn(3, 2, 7),),
    "4d_input": lambda: (torch.randn(3, 2, 5, 1),),
    "wrong_h0_batch": lambda: (torch.randn(3, 2, 5), torch.randn(1, 3, 4)),
    "wrong_h0_layers": lambda: (torch.randn(3, 2, 5), torch.randn(2, 2, 4)),
    "3d_state_unbatched": lambda: (torch.randn(3, 5), torch.randn(1, 1, 4)),
    "2d_state_batched": lambda: (torch.randn(3, 2, 5), torch.randn(2, 4)),
    "dtype_mismatch": lambda: (torch.randn(3, 2, 5, dtype=torch.float64),),
}


@pytest.mark.parametrize("backend", rnn_backends())
@pytest.mark.parametrize("kind", ["GRU", "RNN"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_like_torch(backend, kind, case):
    ref, fast = pair(kind, backend)
    msg_ref, msg_fast = same_error(ref, fast, *BAD_INPUTS[case]())
    assert msg_fast == msg_ref


@pytest.mark.parametrize("backend", rnn_backends())
def test_lstm_bad_states(backend):
    ref, fast = pair("LSTM", backend)
    x = torch.randn(3, 2, 5)
    for hx in [(torch.randn(1, 2, 4), torch.randn(1, 3, 4)),   # wrong cell-state batch
               (torch.randn(1, 2, 4), torch.randn(1, 2, 5)),   # wrong cell-state size
               (torch.randn(2, 4), torch.randn(2, 4))]:        # 2-D states for batched input
        msg_ref, msg_fast = same_error(ref, fast, x, hx)
        assert msg_fast == msg_ref
    # state dtype differs from the input: torch fails inside oneDNN with a poor message; ours names it
    with pytest.raises(RuntimeError, match="dtype"):
        fast(x, (torch.randn(1, 2, 4, dtype=torch.float64), torch.randn(1, 2, 4)))


@pytest.mark.parametrize("backend", rnn_backends())
def test_cell_bad_inputs(backend):
    torch.manual_seed(0)
    ref, fast = nn.LSTMCell(5, 4), fastrnn.LSTMCell(5, 4, backend=backend)
    cases = [(torch.randn(3, 7),), (torch.randn(3, 5), (torch.randn(3, 2), torch.randn(3, 4))),
             (torch.randn(3, 5), (torch.randn(4, 4), torch.randn(4, 4))),
             (torch.randn(3, 5), (torch.randn(3, 4), torch.randn(2, 4))), (torch.randn(2, 3, 5),)]
    for args in cases:
        msg_ref, msg_fast = same_error(ref, fast, *args)
        assert msg_fast == msg_ref
    gref, gfast = nn.GRUCell(5, 4), fastrnn.GRUCell(5, 4, backend=backend)
    same_error(gref, gfast, torch.randn(3, 5), torch.randn(3, 4, 1))


@pytest.mark.parametrize("backend", rnn_backends())
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_empty_batch_and_empty_sequence(backend, kind):
    ref, fast = pair(kind, backend, bidirectional=True)
    x = torch.randn(3, 0, 5, requires_grad=True)
    y_ref, _ = ref(x)
    y, h = fast(x)
    assert y.shape == y_ref.shape == (3, 0, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    msg_ref, msg_fast = same_error(ref, fast, torch.randn(0, 2, 5))
    assert "sequence length" in msg_fast


@pytest.mark.parametrize("backend", rnn_backends())
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_nan_propagates_like_torch(backend, kind):
    ref, fast = pair(kind, backend, num_layers=2)
    x = torch.randn(4, 3, 5)
    x[1, 0, 2] = float("nan")     # row 0 goes NaN from step 1 on, other rows stay finite
    y_ref, _ = ref(x)
    y, _ = fast(x)
    assert torch.equal(y.isnan(), y_ref.isnan())
    assert y[0].isfinite().all() and y[1:, 0].isnan().all() and y[:, 1:].isfinite().all()


def test_backend_selection_errors(monkeypatch):
    # an unknown name fails where it is written, not at the first forward
    with pytest.raises(ValueError, match="unknown backend"):
        fastrnn.LSTM(5, 4, backend="no-such-backend")
    m = fastrnn.LSTM(5, 4, backend="torch")
    with pytest.raises(RuntimeError, match="unknown backend"):  # the functional API checks at call time
        fastrnn.functional.rnn("lstm", torch.randn(3, 2, 5), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4),
                               [(m.weight_ih_l0, m.weight_hh_l0, None, None, None)], num_layers=1,
                               bidirectional=False, backend="no-such-backend")
    monkeypatch.setenv("FASTRNN_BACKEND", "no-such-backend")
    with pytest.raises(RuntimeError, match="FASTRNN_BACKEND"):
        fastrnn.GRU(5, 4)(torch.randn(3, 2, 5))
    monkeypatch.setenv("FASTRNN_BACKEND", "torch")
    assert fastrnn.backends.resolve(None, "cpu", "rnn").name == "torch"
