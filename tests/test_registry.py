"""Backend registry and the modules' drop-in surface: convert, state_dict, isinstance, repr."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastrnn
from fastrnn import backends

from conftest import rnn_backends


def test_available_backends_lists_reference_last_and_only_usable():
    names = fastrnn.available_backends("cpu")
    assert names[-1] == "torch" and "torch" in names
    status = fastrnn.backend_status("cpu")
    assert set(status) == {"cpp", "numba", "triton", "torch"}
    for name, reason in status.items():
        assert (reason is None) == (name in names), (name, reason)
    # auto-selection takes the first usable one in preference order, never the triton interpreter
    auto = fastrnn.backends.resolve(None, "cpu", "rnn").name
    assert auto == [n for n in ("cpp", "numba", "torch") if n in names][0]


def test_import_without_optional_backends():
    """With numba/triton/the extension hidden, fastrnn still imports and runs on the reference,
    and says why the others are unavailable."""
    code = """
import sys, builtins
real_import = builtins.__import__
def blocked(name, globals=None, locals=None, fromlist=(), level=0):
    if name.split('.')[0] in ('numba', 'triton') or '_C_rnn' in (fromlist or ()):
        raise ImportError('blocked for the test: ' + name)
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = blocked
import torch, fastrnn
st = fastrnn.backend_status('cpu')
assert fastrnn.available_backends('cpu') == ['torch'], st
assert 'not built' in st['cpp'] and 'blocked' in st['cpp'], st
y, _ = fastrnn.LSTM(3, 4)(torch.randn(2, 1, 3))
with_reason = fastrnn.backends.unavailable_reason('cpp')
try:
    fastrnn.LSTM(3, 4, backend='cpp')(torch.randn(2, 1, 3))
except RuntimeError as e:
    assert 'not built' in str(e), e
else:
    raise AssertionError('explicit unavailable backend did not raise')
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_modules_are_torch_modules_with_identical_state_dict():
    torch.manual_seed(0)
    ref = nn.LSTM(4, 6, num_layers=2, proj_size=3, bidirectional=True)
    torch.manual_seed(0)
    fast = fastrnn.LSTM(4, 6, num_layers=2, proj_size=3, bidirectional=True)
    # torch's base class, not nn.LSTM itself: dynamo refuses to trace nn.LSTM instances (see modules.py)
    assert isinstance(fast, nn.RNNBase) and not isinstance(fast, nn.LSTM)
    assert list(ref.state_dict()) == list(fast.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), fast.state_dict().values()))
    assert repr(fast) == repr(ref)
    assert "backend='torch'" in repr(fastrnn.GRU(2, 3, backend="torch"))
    fast.flatten_parameters()  # harmless no-op, as on CPU in torch
    with pytest.raises(ValueError):
        fastrnn.GRU(4, 6, proj_size=2)


@pytest.mark.parametrize("backend", rnn_backends())
def test_convert_swaps_modules_and_shares_parameters(backend):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.LSTM(5, 6, batch_first=True)
            self.blocks = nn.Sequential(nn.GRU(6, 4), nn.Linear(4, 4))
            self.cell = nn.RNNCell(4, 4, nonlinearity="relu")

        def forward(self, x):
            y, _ = self.enc(x)
            y, _ = self.blocks[0](y.transpose(0, 1))
            return self.cell(self.blocks[1](y[-1]))

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(2, 7, 5)
    expected = model(x)
    params = {n: p for n, p in model.named_parameters()}
    out = fastrnn.convert(model, backend=backend)
    assert out is model
    assert type(model.enc) is fastrnn.LSTM and type(model.blocks[0]) is fastrnn.GRU
    assert type(model.cell) is fastrnn.RNNCell and model.cell.nonlinearity == "relu"
    assert model.enc.backend == backend
    assert all(p is params[n] for n, p in model.named_parameters())
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    top = fastrnn.convert(nn.GRUCell(3, 3))
    assert type(top) is fastrnn.GRUCell


def test_convert_leaves_user_subclasses_alone():
    class MyLSTM(nn.LSTM):
        pass
    m = nn.Sequential(MyLSTM(3, 3))
    fastrnn.convert(m)
    assert type(m[0]) is MyLSTM


@pytest.mark.parametrize("op", backends.OPS)
@pytest.mark.parametrize("name", sorted(backends.BACKENDS))
def test_backend_modules_conform_to_the_contract(name, op):
    """Every backend module defines what fastrnn.contract.backend's protocol asks, with the
    protocol's parameter names, and its optional members have the right kind."""
    from fastrnn.contract.backend import conforms

    module = backends.load(name, op)
    if isinstance(module, str):
        pytest.skip(module)
    assert conforms(module, op) == []


def test_conforms_reports_what_is_wrong():
    import types

    from fastrnn.contract.backend import conforms

    fake = types.SimpleNamespace(name="x", availability=lambda device_type: None,
                                 rnn_forward=lambda cell, xw: None, dtypes=[torch.float32])
    problems = conforms(fake, "rnn")
    assert any(p.startswith("rnn_forward: parameters") for p in problems)
    assert "rnn_backward: missing" in problems and "dtypes: not a tuple" in problems


def test_backends_never_import_the_op_layer():
    """The contract sits below both layers: no backend module imports fastrnn.ops."""
    import pathlib
    import re

    root = pathlib.Path(backends.__file__).parent
    for path in root.glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+(\.\.ops|fastrnn\.ops)\b", path.read_text(), re.M), path.name
