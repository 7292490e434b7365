"""pytest-benchmark suite: `pytest bench/ --benchmark-only` (not collected by plain `pytest`,
whose testpaths is tests/). `--bench-grid quick` uses one small shape (CI smoke-runs it with
--benchmark-disable, which runs every benchmark once untimed)."""
import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-grid", default="full", choices=["full", "quick"],
                     help="shape grid for the fastrnn benchmarks")


def pytest_configure(config):
    config.addinivalue_line("markers", "fastrnn_bench: a fastrnn benchmark")


@pytest.fixture(scope="session")
def bench_grid(request):
    return request.config.getoption("--bench-grid")
