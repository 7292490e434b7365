"""pytest-benchmark suite: ``pytest bench/ --benchmark-only`` (not collected by plain ``pytest``,
whose testpaths is tests/).

Grids: ``--bench-grid quick`` (the default: small shapes, every candidate, minutes) and
``--bench-grid full`` (the issue-sized shapes, and the variant loops under torch.compile, each of
which compiles for minutes: the time measured for both is in bench/results/bench_time_cpu.md).
CI smoke-runs the quick grid with --benchmark-disable (every benchmark once, untimed, gates on).

Each benchmark's statistics are appended to ``--bench-live`` (JSON lines) the moment it
completes, so a long run can be followed (``tail -f bench/out/live.jsonl``) and an interrupted
one keeps what it measured; pytest-benchmark's own ``--benchmark-json`` is written only at the end.
"""
import json
import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-grid", default="quick", choices=["quick", "full"],
                     help="shape grid for the fastrnn benchmarks: quick (default) or full "
                          "(see bench/results/bench_time_cpu.md for how long each takes)")
    parser.addoption("--bench-live", default=os.path.join("bench", "out", "live.jsonl"),
                     help="append each benchmark's statistics here as it completes ('' = off)")


def pytest_configure(config):
    config.addinivalue_line("markers", "fastrnn_bench: a fastrnn benchmark")
    path = config.getoption("--bench-live", None)
    if path and not config.getoption("benchmark_disable", False):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "w").close()  # this run's results only


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    path = item.config.getoption("--bench-live")
    bm = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(bm, "stats", None)  # None: --benchmark-disable, or failed before timing
    if not path or stats is None:
        return
    s = stats.stats
    row = {"test": item.nodeid, "group": bm.group, "median_ms": s.median * 1e3, "min_ms": s.min * 1e3,
           "max_ms": s.max * 1e3, "rounds": s.rounds,
           "spread": (s.max - s.min) / s.median if s.median else 0.0, "extra_info": bm.extra_info}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


@pytest.fixture(scope="session")
def bench_grid(request):
    return request.config.getoption("--bench-grid")
