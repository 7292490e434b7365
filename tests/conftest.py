"""Test setup. TRITON_INTERPRET must be set before triton is imported anywhere, so that the
triton backend runs on this CPU through the interpreter. FASTRNN_TEST_DEVICE=cuda (read by the
device-aware tests) compiles the kernels for the GPU instead (bench/gpu_check.py)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("FASTRNN_TEST_DEVICE") == "cuda" else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastrnn  # noqa: E402

# CI sets FASTRNN_REQUIRE_BACKENDS=cpp,numba,triton so that a backend that silently failed to
# build or import fails the run instead of dropping out of the parametrisation.
_required = [b for b in os.environ.get("FASTRNN_REQUIRE_BACKENDS", "").split(",") if b]


def rnn_backends():
    """Every backend usable on CPU (including triton under the interpreter)."""
    return fastrnn.available_backends("cpu", "rnn")


def cpu_backends():
    """The CPU backends. Tests that evaluate a model hundreds of times (gradcheck, training runs)
    use these: the Triton interpreter makes them take minutes, and the triton backend's float64
    results are already pinned to the reference at 1e-10 by the contract tests."""
    return [b for b in rnn_backends() if b != "triton"]


def pytest_sessionstart(session):
    missing = {b: fastrnn.backends.unavailable_reason(b, "cpu", "rnn") for b in _required}
    missing = {b: r for b, r in missing.items() if r is not None}
    if missing:
        raise pytest.UsageError(f"required backends unavailable: {missing}")


def pytest_report_header(config):
    status = fastrnn.backend_status("cpu", "rnn")
    return "fastrnn backends (cpu, rnn): " + ", ".join(
        f"{k}={'ok' if v is None else 'unavailable'}" for k, v in status.items())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny problems (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    intra-op threads only add barriers (on a loaded machine ~10 ms
    each, 10x the work). Correctness does not depend on them (tests/test_cpp.py and
    tests/test_numba.py cover the threaded paths)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import numba
        n_numba = numba.get_num_threads()
        numba.set_num_threads(1)
    except ImportError:
        numba = None
    yield
    torch.set_num_threads(n)
    if numba is not None:
        numba.set_num_threads(n_numba)
