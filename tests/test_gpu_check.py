"""bench/gpu_check.py cannot rot before a GPU comes: its dry run (every stage on this CPU through
the Triton interpreter, tiny sizes, started through bench/gpu_check.sh) writes the report with
every gate passed; with a deliberately broken triton backend (--fault) every test and gate fails;
a stage out of budget is cut, a hung one killed; without CUDA the real run stops at once."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# bench/ is not a package: load the script as a module (its top level imports only the stdlib)
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def check(out, *options, entry="py", timeout=240, **env_extra):
    """Run the check in a child process; (exit status, report, seconds). About 45 s for the whole
    dry run on an idle 2-core machine; the timeout only guards against a hang."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTRNN_BACKEND", gpu_check.TILES_ENV)}  # the script sets these
    env["PYTHON"] = sys.executable  # the shell entry's choice of python
    env.update(env_extra)
    cmd = ([sys.executable, str(REPO / "bench" / "gpu_check.py")] if entry == "py"
           else ["bash", str(REPO / "bench" / "gpu_check.sh")])
    t0 = time.time()
    run = subprocess.run(cmd + [str(out), *options], env=env, capture_output=True, text=True, timeout=timeout)
    report_path = out / "gpu_check.json"
    assert report_path.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    return run.returncode, json.loads(report_path.read_text()), time.time() - t0


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_dry")
    return (out,) + check(out, "--dry-run", entry="sh")


def test_dry_run_passes_and_reports_every_stage(dry):
    out, code, report, _ = dry
    assert code == 0 and report["result"] == "PASSED", json.dumps(report["stages"], indent=1)[-3000:]
    stages = report["stages"]
    assert list(stages) == list(gpu_check.STAGES)
    assert all(s["status"] == "passed" for s in stages.values())
    plan = gpu_check.PLANS["dry"]
    # the tests ran (in both shards) and passed
    t = stages["tests"]
    assert t["gate"] is True and t["passed"] == t["collected"] >= 4 and t["failed"] == 0
    assert len(list(out.glob("tests.*.jsonl"))) == 2
    # every RNN case passed its gate against float64, then was timed
    rnn = stages["rnn"]
    assert rnn["gate"] is True and len(rnn["cases"]) == len(plan["rnn"])
    for c in rnn["cases"]:
        assert c["gate"] is True and c["max_rel_error"] < 1e-5
        assert c["infer_fastrnn_ms"] > 0 and c["train_speedup"] > 0 and c["train_fastrnn_of_matmul"] > 0
    # attention: a gate per (E, causal, dtype), each case timed
    sdpa = stages["sdpa"]
    assert sdpa["gate"] is True
    assert {(g["E"], g["causal"], g["dtype"]) for g in sdpa["gates"]} == {
        (E, causal, d) for _, E, causal in plan["sdpa"] for d in plan["gate_dtypes"]}
    assert all(g["gate"] and g["errors"]["grad_k"]["fastrnn"] > 0 for g in sdpa["gates"])
    assert len(sdpa["cases"]) == len(plan["sdpa"]) and all(c["fwdbwd_fastrnn_tflops"] > 0 for c in sdpa["cases"])
    peak = stages["peak"]
    assert set(peak["matmul_tflops"]) == {"float32", "float16", "bfloat16"} and peak["copy_gbps"] > 0
    assert len(stages["warm"]["cases"]) == stages["warm"]["planned"] and not stages["warm"]["errors"]
    md = (out / "gpu_check.md").read_text()
    assert "Result: **PASSED**" in md and "FAIL" not in md
    assert md.count("| lstm | float32 |") + md.count("| gru | float32 |") == len(plan["rnn"])
    assert "gpu_check: PASSED" in (out / "gpu_check.log").read_text()


def test_broken_backend_fails_every_test_and_gate(tmp_path):
    code, report, _ = check(tmp_path, "--dry-run", "--fault", "--stages", "tests,rnn,sdpa")
    assert code == 1 and report["result"] == "FAILED"
    stages = report["stages"]
    t = stages["tests"]
    assert t["gate"] is False and t["status"] == "failed"
    assert t["failed"] == t["collected"] > 0 and t["passed"] == 0, t["failures"]
    assert stages["rnn"]["gate"] is False
    assert all(c["gate"] is False and c["error"].startswith("gate:") for c in stages["rnn"]["cases"])
    sdpa = stages["sdpa"]
    assert sdpa["gate"] is False and sdpa["gates"] and not any(g["gate"] for g in sdpa["gates"])
    assert all("out:" in g["error"] for g in sdpa["gates"])  # the fault is in the output
    assert all(c["error"] == "not timed: the gate failed" for c in sdpa["cases"])
    assert "FAIL" in (tmp_path / "gpu_check.md").read_text()


def test_stage_out_of_budget_is_cut_not_the_run(tmp_path):
    code, report, _ = check(tmp_path, "--dry-run", "--stages", "peak", "--stage-budget", "peak=0")
    assert code == 2 and report["result"] == "INCOMPLETE"
    peak = report["stages"]["peak"]
    assert peak["status"] == "cut" and peak["cases"] == [] and peak["not_run"] == peak["planned"] > 0


def test_hung_stage_is_killed(tmp_path):
    cmd = [sys.executable, "-c", "import time; time.sleep(120)"]
    t0 = time.time()
    codes, killed = gpu_check.run_children("hang", [cmd], [dict(os.environ)], tmp_path, time.time() + 1)
    assert killed and codes[0] != 0 and time.time() - t0 < 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_the_real_run_stops_at_once(tmp_path):
    code, report, _ = check(tmp_path, timeout=200)
    assert code == 3 and report["result"] == "SETUP FAILED"
    assert "sees no GPU" in report["setup_error"] and "needs torch with CUDA" in report["setup_error"]
    assert report["stages"] == {}


def test_missing_torch_one_failed_install_then_a_clear_message(tmp_path):
    """A python without torch (simulated: a torch that fails to import) gets one pinned pip install
    (no index, no wheels, no config here, so it cannot fetch anything; pip may still find the real
    torch's metadata and call it satisfied), then a message saying what is missing and what to do."""
    fake = tmp_path / "fake_site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("simulated: no torch here")')
    (tmp_path / "no_wheels").mkdir()
    code, report, _ = check(tmp_path / "out", timeout=200, PYTHONPATH=str(fake.parent), PIP_NO_INDEX="1",
                            PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS=str(tmp_path / "no_wheels"))
    assert code == 3 and report["result"] == "SETUP FAILED"
    assert report["environment"]["torch"] is None and "simulated" in report["environment"]["torch_error"]
    assert report["environment"]["pip"].startswith(("pip install failed", "pip install torch==2.13.0 succeeded"))
    assert "torch is not importable" in report["setup_error"] and "simulated" in report["setup_error"]
    assert report["environment"]["pip"] in report["setup_error"] and "PYTHON=" in report["setup_error"]


def test_tile_list_from_the_environment(monkeypatch):
    """FASTRNN_TRITON_TILES replaces the autotuning candidates, each kind separately."""
    kernels = pytest.importorskip("fastrnn._triton.rnn_kernels")
    tiles_default, rows_default = [(16, 16, 64, 4)], [(1, 128, 16, 4)]
    monkeypatch.delenv(kernels.TILES_ENV, raising=False)
    assert kernels.env_tiles(False, tiles_default) == tiles_default
    monkeypatch.setenv(kernels.TILES_ENV, "32x64x32x8, 2x32x16x4,64x64x32x8")
    assert kernels.env_tiles(False, tiles_default) == [(32, 64, 32, 8), (64, 64, 32, 8)]
    assert kernels.env_tiles(True, rows_default) == [(2, 32, 16, 4)]
    monkeypatch.setenv(kernels.TILES_ENV, "32x64x32x8")  # no row tile given: the default rows stay
    assert kernels.env_tiles(True, rows_default) == rows_default
    for bad in ("32x64x32", "32x48x32x4", "32x8x32x4", "axbxcxd"):
        monkeypatch.setenv(kernels.TILES_ENV, bad)
        with pytest.raises(ValueError, match=kernels.TILES_ENV):
            kernels.env_tiles(False, tiles_default)
