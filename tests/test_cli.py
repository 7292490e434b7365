"""The command-line paths: bench writes its files and gates correctness, info and profile run,
and the profiler trace carries fastrnn's kernel names."""
import json

import pytest

from fastrnn.__main__ import main


def test_bench_quick_writes_results(tmp_path, capsys):
    rc = main(["bench", "--quick", "--ops", "gru", "--backends", "torch", "--modes", "infer", "train",
               "--rounds", "1", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["machine"]["torch"] and data["machine"]["cpu"] is not None
    assert {(r["mode"], r["backend"]) for r in data["results"]} == {("infer", "torch"), ("train", "torch")}
    assert all(r["gate_ok"] and r["speedup"] > 0 and r["max_error"] < 1e-4 for r in data["results"])
    assert "| gru |" in (tmp_path / "bench.md").read_text()
    out = capsys.readouterr().out
    assert "speedup" in out and "T20_B4_I32_H32" in out


def test_info_lists_backends_and_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("cpp", "numba", "triton", "torch"):
        assert f"  {name}" in out
    assert "backends for rnn on cpu" in out and "torch_threads" in out


def test_profile_trace_names_fastrnn_kernels(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main(["profile", "--op", "gru", "--backend", "torch", "-T", "4", "-B", "2", "-I", "3", "-H", "5",
                 "--iters", "1", "--trace", str(trace)]) == 0
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert "fastrnn::gru_layer_fwd[torch]" in names and "fastrnn::gru_layer_bwd[torch]" in names
    assert "fastrnn::gru_layer_fwd[torch]" in capsys.readouterr().out


def test_bench_sdpa_quick(tmp_path):
    assert main(["bench", "--quick", "--ops", "sdpa", "--backends", "torch", "--modes", "train",
                 "--rounds", "1", "--no-progress", "--out", str(tmp_path)]) == 0
    (r,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert r["op"] == "sdpa" and r["gate_ok"] and r["extra"]["gflops_per_s"] > 0


@pytest.mark.parametrize("argv", [["info"], ["bench", "--quick", "--ops", "rnn", "--backends", "cpp", "--modes",
                                             "infer", "--no-progress"]])
def test_commands_run_as_python_dash_m(tmp_path, argv):
    """The real entry point in a fresh process (the package's __init__ defers its imports when run
    by ``python -m``, so a command that imports fastrnn must still find everything)."""
    import subprocess
    import sys

    if argv[0] == "bench":
        argv = argv + ["--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "fastrnn", *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if argv[0] == "bench":
        assert (tmp_path / "bench.json").exists()
