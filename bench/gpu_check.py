"""The GPU check: the Triton backend compiled and run on a GPU -- correctness first, then speed
against cuDNN and flash attention -- in one command and a fixed time budget.

    bash bench/gpu_check.sh OUT_DIR                  # on the GPU machine (finds a python, logs, runs this)
    python bench/gpu_check.py OUT_DIR [--budget-s 420] [--stages tests,rnn] [--stage-budget rnn=60]
    python bench/gpu_check.py --dry-run OUT_DIR      # every stage on this CPU: interpreter, tiny sizes

Each stage runs in child processes with its own budget (BUDGET_S, scaled to --budget-s; time a
stage leaves unused passes to the next). A stage out of time starts nothing new and is killed
GRACE_S later; results are appended to OUT/<stage>.jsonl as they come, so a cut or killed stage
keeps what it measured, and OUT/gpu_check.json + .md are rewritten after every stage.

  setup  python, torch (CUDA?), triton, numpy, pytest, the GPU. A missing package gets one pinned
         ``pip install`` (PIP_TIMEOUT_S: a machine without a registry fails fast); no CUDA: exit 3.
  tests  tests/test_triton.py, tests/test_decoder_contract.py and the device-aware triton tests of
         tests/test_attention.py with compiled kernels (TRITON_INTERPRET=0, FASTRNN_TEST_DEVICE=cuda),
         sharded over parallel pytest processes: compiling is CPU work and the tests' kernels are tiny.
  warm   compiles the benchmark cases' kernels in parallel processes at tiny sizes, so the timed
         stages find them in Triton's on-disk cache instead of compiling one by one.
  peak   torch.matmul's rate per dtype and the device's copy bandwidth.
  rnn    bench/gpu_rnn.py's run_case per RNN_CASES: gate against float64, then CUDA-event timing
         of fastrnn (triton) and nn.LSTM / nn.GRU (cuDNN), inference and training.
  sdpa   per SDPA_CASES: gate in every dtype (same compiled kernels as the timed case), then
         forward and forward+backward against F.scaled_dot_product_attention (flash), bf16.

Autotuning is restricted to a few tiles per kernel (FASTRNN_TRITON_TILES, TILES below): every
candidate is compiled for every flag combination and benchmarked per autotuning key.
Exit status: 0 everything ran and passed; 1 a test or gate failed or a stage crashed; 2 passed
but a stage was cut by its budget (or could not run); 3 setup failed (no torch with CUDA, ...).

Only the standard library is imported at the top: the parent must run (and say what is missing)
on a machine where torch is absent or broken. The same module is the tests stage's pytest
plugin (``pytest -p gpu_check``: the ``pytest_*`` hooks at the end).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("tests", "warm", "peak", "rnn", "sdpa")
BUDGET_S = dict(tests=150, warm=40, peak=10, rnn=130, sdpa=90)  # 7 min in all (--budget-s 420)
GRACE_S = 20  # a case started just before its stage's deadline may finish; then the stage is killed
PROBE_TIMEOUT_S = 120  # a first torch import with CUDA on a cold machine can take a minute
PIP_TIMEOUT_S = 90
# The versions this project is tested with (README: torch 2.13.0); only installed when missing.
PINS = {"torch": "torch==2.13.0", "triton": "triton==3.9.0", "numpy": "numpy==2.4.6",
        "pytest": "pytest==9.2.0"}
TILES_ENV = "FASTRNN_TRITON_TILES"  # fastrnn/_triton/rnn_kernels.py
# tests: one tile-mode tile other than the interpreter's 16x16x16 (B=37..40, H=35..72 give ragged
# 2 x 2..3 grids and 2..3 K blocks) and one row-mode tile that walks layer-norm rows in chunks.
# bench: small-batch tiles (many programs) and wide ones for B >= 64, left to the autotuner.
TILES = {"tests": "32x32x32x4,2x32x16x4",
         "bench": "16x16x64x4,16x64x64x4,32x64x32x4,64x64x32x8"}

# RNN cases (cell, dtype, T, B, H; input size = H), most important first, so that a stage cut by
# its budget has measured the core sweep: bf16 at every B and H, then fp32 (IEEE on both sides,
# TF32 off: gpu_rnn's convention), long sequences, fp16.
RNN_CASES = ([(c, "bf16", 100, b, h) for c in ("lstm", "gru") for h in (256, 1024) for b in (1, 8, 64, 256)]
             + [(c, "fp32", 100, b, 1024) for c in ("lstm", "gru") for b in (8, 256)]
             + [(c, "bf16", 500, b, 1024) for c in ("lstm", "gru") for b in (8, 256)]
             + [("lstm", "fp16", 100, 64, 1024)])
# Attention cases (L = S, E, causal) at 16k tokens a batch and model width 2048 (B = 16384 / L,
# H = 2048 / E: FlashAttention's benchmark convention).
SDPA_CASES = [(L, E, causal) for L in (1024, 4096, 16384) for E in (64, 128) for causal in (False, True)]

PLANS = {
    "gpu": dict(device="cuda", rnn=RNN_CASES, sdpa=SDPA_CASES, tokens=16384, width=2048, sdpa_dtype="bf16",
                gate_dtypes=("bf16", "fp16", "fp32"), gate_len=1024, gate_heads=2, rep_ms=100,
                tests=(["tests/test_triton.py", "tests/test_decoder_contract.py"]
                       + [f"tests/test_attention.py::{t}" for t in (
                    "test_matches_torch", "test_huge_logits_finite", "test_empty", "test_low_precision",
                    "test_dropout_matches_reference")], "triton and not sm90")),
    # the interpreter has no bf16 for the recurrence (attention computes it in fp32 and casts back)
    "dry": dict(device="cpu", rnn=[("lstm", "fp32", 3, 1, 8), ("gru", "fp32", 3, 3, 8)],
                sdpa=[(64, 16, False), (64, 16, True)], tokens=64, width=32, sdpa_dtype="bf16",
                gate_dtypes=("bf16", "fp32"), gate_len=64, gate_heads=2, rep_ms=1,
                tests=(["tests/test_triton.py::test_extreme_preactivations_stay_finite",
                        "tests/test_decoder_contract.py::test_backend_matches_reference_float64",
                        "tests/test_attention.py::test_matches_torch[triton-3d-f32]",
                        "tests/test_attention.py::test_low_precision[bf16-triton]"], "triton")),
}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# how the parent talks to the pytest plugin below
LOG_ENV, SHARD_ENV, DEADLINE_ENV, FAULT_ENV = ("FASTRNN_GPU_CHECK_LOG", "FASTRNN_GPU_CHECK_SHARD",
                                               "FASTRNN_GPU_CHECK_DEADLINE", "FASTRNN_GPU_CHECK_FAULT")
CUT_REASON = "gpu_check: stage time budget spent"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder (created)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    ap.add_argument("--budget-s", type=float, default=sum(BUDGET_S.values()),
                    help="total seconds for the stages (default %(default)s); stage budgets scale to it")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma list of %(default)s")
    ap.add_argument("--stage-budget", action="append", default=[], metavar="STAGE=SECONDS",
                    help="override one stage's budget (after scaling)")
    ap.add_argument("--fault", action="store_true",
                    help="self-test: the triton backend's forward outputs come out 1%% too large, so "
                         "every test and gate must fail (tests/test_gpu_check.py)")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # a child process: run one stage
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}; known: {STAGES}")
    for item in args.stage_budget:
        name, _, value = item.partition("=")
        if name not in args.stages or not value.replace(".", "", 1).isdigit():
            ap.error(f"--stage-budget {item}: expected STAGE=SECONDS with STAGE one of {args.stages}")
    return args


# ================================================================================================
# the parent: setup, stage processes, report
# ================================================================================================
PROBE = r"""
import importlib, json, sys
info = {"python": sys.version.split()[0], "executable": sys.executable}
for name in ("torch", "triton", "numpy", "pytest", "numba"):
    try:
        info[name] = importlib.import_module(name).__version__
    except Exception as exc:
        info[name] = None
        info[name + "_error"] = f"{type(exc).__name__}: {exc}"
if info["torch"]:
    import torch
    info.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                    device_count=torch.cuda.device_count())
print(json.dumps(info))
"""


def probe():
    """What this python has (in a child: a hanging or crashing import must not take us along)."""
    try:
        run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"probe_error": f"importing torch/triton took more than {PROBE_TIMEOUT_S} s"}
    if run.returncode != 0:
        return {"probe_error": run.stderr[-2000:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def pip_install(names):
    """One pinned install attempt, with short network timeouts: None, or why it failed."""
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--timeout", "10",
           "--retries", "1", *(PINS[n] for n in names)]
    print("setup: trying", " ".join(cmd), flush=True)
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"pip install timed out after {PIP_TIMEOUT_S} s (no package registry reachable?)"
    return None if run.returncode == 0 else f"pip install failed (rc {run.returncode}): {run.stderr[-1500:]}"


def _command_output(cmd, timeout=20):
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (subprocess.TimeoutExpired, OSError) as exc:
        return f"{cmd[0]} failed: {exc}"


def setup(dry_run):
    """(environment report, None) or (report, why the check cannot run)."""
    env = dict(host=platform.node(), platform=platform.platform(), cpus=os.cpu_count(),
               nvidia_smi=_command_output(["nvidia-smi", "-L"]),
               git_commit=_command_output(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
               triton_cache=os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache"),
               variables={k: v for k, v in os.environ.items()
                          if k.startswith(("FASTRNN_", "TRITON_", "CUDA_VISIBLE"))})
    info = probe()
    missing = [n for n in ("torch", "triton", "numpy", "pytest") if not info.get(n)]
    if missing and "probe_error" not in info:
        env["pip"] = pip_install(missing) or f"pip install {' '.join(PINS[n] for n in missing)} succeeded"
        info = probe()
    env.update(info)
    if "probe_error" in info:
        return env, f"the python at {sys.executable} could not import torch: {info['probe_error']}"
    for name in ("torch", "triton", "numpy"):
        if not info.get(name):
            return env, (f"{name} is not importable by {sys.executable} ({info.get(name + '_error')}); "
                         f"{env.get('pip')}; run with PYTHON=/path/to/python that has torch with CUDA "
                         "and triton")
    if not dry_run and not info.get("cuda_available"):
        build = f"a CUDA {info['torch_cuda']} build" if info.get("torch_cuda") else "a CPU-only build"
        return env, (f"torch {info['torch']} at {sys.executable} is {build} and sees no GPU "
                     f"(nvidia-smi: {env['nvidia_smi']!r}); the GPU check needs torch with CUDA")
    return env, None


def stage_budgets(args, available):
    """Seconds per requested stage: BUDGET_S scaled to ``available``, then --stage-budget."""
    scale = available / sum(BUDGET_S[s] for s in args.stages)
    budgets = {s: BUDGET_S[s] * scale for s in args.stages}
    for item in args.stage_budget:
        name, _, value = item.partition("=")
        budgets[name] = float(value)
    return budgets


def child_env(plan, tiles, **extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "bench"), env.get("PYTHONPATH")) if p)
    env["TRITON_INTERPRET"] = "1" if plan["device"] == "cpu" else "0"  # before triton is imported
    env["FASTRNN_TEST_DEVICE"] = plan["device"]
    env[TILES_ENV] = tiles
    env.pop("FASTRNN_TRITON_TF32", None)  # fp32 gates and timings are IEEE on both sides
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_children(name, cmds, envs, out, hard_deadline):
    """Run the commands in parallel (own process groups, logs in OUT); kill what is still running at
    ``hard_deadline``. Returns (exit codes, killed)."""
    procs = []
    for i, (cmd, env) in enumerate(zip(cmds, envs)):
        log = open(out / (f"{name}.log" if len(cmds) == 1 else f"{name}.{i}.log"), "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        log.close()
    killed = _wait(procs, hard_deadline)
    if killed:  # the whole process group: pytest's and torch's children too
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, sig)
            _wait(procs, time.time() + 5)
    return [p.wait() for p in procs], killed


def _wait(procs, until):
    """True if some process still runs at ``until``."""
    while any(p.poll() is None for p in procs):
        if time.time() > until:
            return True
        time.sleep(0.1)
    return False


def read_jsonl(paths):
    rows = []
    for path in paths:
        if path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a line cut off by a kill
                    rows.append(json.loads(line))
    return rows


MAX_PROCESSES = 14  # of the GPU machine's 16 cores: 2 left for the parent and the driver's threads


def shards(n_items):
    """Parallel processes for a stage whose work is mostly compiling (CPU)."""
    return max(1, min(n_items, MAX_PROCESSES, (os.cpu_count() or 2) - 2))


def run_stage(stage, args, plan, out, deadline):
    """Run one stage's processes, then summarise what they recorded."""
    t0 = time.time()
    flags = ["--dry-run"] * args.dry_run + ["--fault"] * args.fault
    if stage == "tests":  # pytest processes, each running every n-th test
        paths, select = plan["tests"]
        n = 2 if args.dry_run else shards(MAX_PROCESSES)
        cmds = [[sys.executable, "-m", "pytest", "-p", "gpu_check", "-p", "no:cacheprovider", "-q", "--tb=short",
                 *paths, "-k", select]] * n
        fault = {FAULT_ENV: 1} if args.fault else {}
        envs = [child_env(plan, TILES["tests"], **{LOG_ENV: out / f"tests.{i}.jsonl", SHARD_ENV: f"{i}/{n}",
                                                    DEADLINE_ENV: deadline}, **fault) for i in range(n)]
    else:  # this script with --stage; warm runs its tasks in n parallel processes
        n = 1
        if stage == "warm":
            n = min(2, len(warm_tasks(plan))) if args.dry_run else shards(len(warm_tasks(plan)))
        cmds = [[sys.executable, str(Path(__file__)), str(out), "--stage", stage, "--deadline", str(deadline),
                 "--shard", f"{i}/{n}", *flags] for i in range(n)]
        envs = [child_env(plan, TILES["bench"], TRITON_PRINT_AUTOTUNING=1)] * n
    codes, killed = run_children(stage, cmds, envs, out, deadline + GRACE_S)
    rows = read_jsonl(sorted(out.glob(f"{stage}*.jsonl")))
    summary = SUMMARIES[stage](rows, plan, codes, killed)
    summary.update(wall_s=round(time.time() - t0, 1), budget_s=round(deadline - t0, 1), exit_codes=codes,
                   killed=killed)
    return summary


def _status(gate, complete, crashed):
    if crashed:
        return "crashed"
    if gate is False:
        return "failed"
    return "passed" if complete else "cut"


def summarize_tests(rows, plan, codes, killed):
    outcome = {}
    for r in rows:
        if "nodeid" in r:  # a failure in any phase makes the test failed
            if outcome.get(r["nodeid"], {}).get("outcome") != "failed":
                outcome[r["nodeid"]] = r
    collected = sum(r["collected"] for r in rows if "collected" in r)
    count = lambda o, cut=False: sum(1 for r in outcome.values() if r["outcome"] == o  # noqa: E731
                                     and (r.get("message") == CUT_REASON) == cut)
    failures = [dict(nodeid=r["nodeid"], when=r["when"], message=r["message"]) for r in outcome.values()
                if r["outcome"] == "failed"]
    crashed = any(c not in (0, 1, 5) for c in codes) and not killed  # 1: tests failed, 5: empty shard
    s = dict(collected=collected, passed=count("passed"), failed=len(failures), skipped=count("skipped"),
             cut=count("skipped", cut=True), not_reported=collected - len(outcome), failures=failures)
    s["gate"] = not failures and s["passed"] > 0 and not crashed
    complete = s["cut"] == 0 and s["not_reported"] == 0 and not killed
    s["status"] = _status(s["gate"], complete, crashed)
    return s


def _cases_summary(rows, planned, codes, killed, gated=True):
    cases = [r for r in rows if r.get("kind") == "case"]
    done = any(r.get("kind") == "done" for r in rows)
    crashed = any(codes) and not killed
    gates = [r["gate"] for r in rows if "gate" in r]
    gate = (all(gates) and bool(gates)) if gated else None
    s = dict(cases=cases, planned=planned, not_run=planned - len(cases), errors=[r for r in rows if "error" in r])
    s.update(gate=gate, status=_status(gate, done and not killed, crashed))
    return s


def summarize_warm(rows, plan, codes, killed):
    return _cases_summary(rows, len(warm_tasks(plan)), codes, killed, gated=False)


def summarize_peak(rows, plan, codes, killed):
    s = _cases_summary(rows, 1 + len(DTYPES), codes, killed, gated=False)
    s["matmul_tflops"] = {r["dtype"]: r["tflops"] for r in s["cases"] if r["what"] == "matmul"}
    s["copy_gbps"] = next((r["gbps"] for r in s["cases"] if r["what"] == "copy"), None)
    return s


def summarize_rnn(rows, plan, codes, killed):
    s = _cases_summary(rows, len(plan["rnn"]), codes, killed)
    s["notes"] = [r["note"] for r in rows if r.get("kind") == "note"]
    return s


def summarize_sdpa(rows, plan, codes, killed):
    s = _cases_summary(rows, len(plan["sdpa"]), codes, killed)
    s["gates"] = [r for r in rows if r.get("kind") == "gate"]
    return s


SUMMARIES = dict(tests=summarize_tests, warm=summarize_warm, peak=summarize_peak, rnn=summarize_rnn,
                 sdpa=summarize_sdpa)


def verdict(report):
    """(exit status, word) of the whole run."""
    if report.get("setup_error"):
        return 3, "SETUP FAILED"
    statuses = [s["status"] for s in report["stages"].values()]
    if any(st in ("failed", "crashed") for st in statuses):
        return 1, "FAILED"
    if any(st != "passed" for st in statuses) or set(report["stages"]) != set(report["stages_requested"]):
        return 2, "INCOMPLETE"
    return 0, "PASSED"


def main(argv=None):
    args = parse_args(argv)
    if args.stage:
        return run_child(args)
    t0 = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for path in out.glob("*.jsonl"):  # a previous run's results (peak rates are read back from here)
        if path.name.split(".")[0] in STAGES:
            path.unlink()
    plan = PLANS["dry" if args.dry_run else "gpu"]
    report = dict(schema=1, dry_run=args.dry_run, fault=args.fault, started=_now(), argv=sys.argv[1:],
                  budget_s=args.budget_s, stages_requested=args.stages, stages={})
    print(f"gpu_check: {'DRY RUN (CPU, Triton interpreter) ' if args.dry_run else ''}-> {out}", flush=True)
    report["environment"], problem = setup(args.dry_run)
    print("setup:", json.dumps({k: v for k, v in report["environment"].items() if k != "variables"}), flush=True)
    if problem:
        report["setup_error"] = problem
        print(f"SETUP FAILED: {problem}", flush=True)
    else:
        budgets = stage_budgets(args, max(0.0, args.budget_s - (time.time() - t0)))
        fixed = {item.partition("=")[0] for item in args.stage_budget}  # exact: no time handed on to them
        end, slack = t0 + args.budget_s, 0.0
        for stage in args.stages:
            if stage == "tests" and not report["environment"].get("pytest"):
                report["stages"][stage] = dict(status="skipped", gate=None, reason="pytest is not installed")
                continue
            deadline = min(time.time() + budgets[stage] + (0 if stage in fixed else slack), end)
            print(f"stage {stage}: budget {deadline - time.time():.0f} s ...", flush=True)
            report["stages"][stage] = run_stage(stage, args, plan, out, deadline)
            # what a stage leaves unused goes to the next
            slack = max(0.0, deadline - time.time()) + (slack if stage in fixed else 0)
            print(f"stage {stage}: {one_line(stage, report['stages'][stage])}", flush=True)
            write_report(out, report, t0)
    code, word = verdict(report)
    report.update(result=word, exit_status=code)
    write_report(out, report, t0)
    print(f"gpu_check: {word} in {time.time() - t0:.0f} s; report: {out / 'gpu_check.md'}", flush=True)
    return code


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def one_line(stage, s):
    if stage == "tests":
        return (f"{s['status']}: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped, "
                f"{s['cut'] + s['not_reported']} not run, {s['wall_s']} s")
    return f"{s['status']}: {len(s['cases'])}/{s['planned']} done, {len(s['errors'])} errors, {s['wall_s']} s"


# -- report -----------------------------------------------------------------------------------------
def write_report(out, report, t0):
    report["wall_s"] = round(time.time() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))


def _table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _f(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _last_line(text, n=160):
    """The line of an error message that says what happened, fit for a table cell: the first of
    pytest's "E" lines that names an error (the root of a chain: a compiler's CompilationError
    ends with a source caret, which says nothing), else the last line."""
    lines = (text or "").strip().splitlines()
    named = [ln for ln in lines if ln.startswith("E ") and ("Error" in ln or "Exception" in ln or "assert" in ln)]
    line = named[:1] or lines[-1:] or [""]
    return line[0][:n].replace("|", "/")


def _failure_text(text, errors=80, tail=15):
    """What a failed test's report keeps: pytest's "E" lines of every exception in the chain
    (the first says why: run 2 on the H200 kept only the last 15 lines of a chained Triton
    compile error, which showed where but not why), then the last lines."""
    lines = text.strip().splitlines()
    e_lines = [ln for ln in lines if ln.startswith("E ")][:errors]
    return "\n".join(e_lines + ["---"] + lines[-tail:]) if e_lines else "\n".join(lines[-tail:])


def markdown(r):
    env = r.get("environment", {})
    md = ["# fastrnn GPU check", ""]
    if r["dry_run"]:
        md += ["**Dry run**: CPU, Triton interpreter, tiny sizes. It checks the script, not the GPU: "
               "timings mean nothing.", ""]
    md += [f"Result: **{r.get('result', 'RUNNING')}** (wall {r.get('wall_s')} s of a {r['budget_s']:.0f} s stage "
           f"budget; started {r['started']}).", "",
           f"Machine: {env.get('gpu', 'no GPU')} (capability {env.get('capability')}, {env.get('sms')} SMs, "
           f"{env.get('memory_gib')} GiB), {env.get('cpus')} CPUs; python {env.get('python')}, torch "
           f"{env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}), triton "
           f"{env.get('triton')}; commit {env.get('git_commit')}.", ""]
    if r.get("setup_error"):
        return "\n".join(md + [f"Setup failed: {r['setup_error']}", ""])
    st = r["stages"]
    md += ["## Stages", ""] + _table(
        ["stage", "status", "gate", "wall s", "budget s", "detail"],
        [(name, s["status"], s.get("gate"), s.get("wall_s", "-"), s.get("budget_s", "-"),
          one_line(name, s) if "wall_s" in s else s.get("reason", "")) for name, s in st.items()]) + [""]
    if "tests" in st and "failures" in st["tests"]:
        t = st["tests"]
        md += ["## Tests (compiled kernels against the reference)", "",
               f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped, {t['cut']} cut by the budget, "
               f"{t['not_reported']} not reported (killed), of {t['collected']} collected.", ""]
        md += [f"* `{f['nodeid']}` ({f['when']}): {_last_line(f['message'])}" for f in t["failures"]] + [""]
    peak = st.get("peak", {})
    if peak.get("cases"):
        md += ["## Device peak", ""] + _table(["measure", "rate"], [
            *((f"torch.matmul {d}", f"{_f(v, '.1f')} TFLOP/s") for d, v in peak["matmul_tflops"].items()),
            ("copy (read + write)", f"{_f(peak['copy_gbps'], '.0f')} GB/s")]) + [""]
    if st.get("rnn", {}).get("cases"):
        md += ["## RNN: fastrnn (triton) against nn.LSTM / nn.GRU (cuDNN)", "",
               "speedup = torch ms / fastrnn ms (> 1: fastrnn faster); % peak = achieved FLOP/s of torch / "
               "fastrnn over torch.matmul's rate in that dtype (FLOPs as bench/gpu_rnn.py: forward "
               "2*T*B*G*(I+H), training 3x). Gate: output and every gradient against float64, fastrnn's "
               "error at most 2x torch's in the same dtype.", ""]
        md += _table(["cell", "dtype", "T", "B", "H", "gate (max rel err)"]
                     + [f"{m} {col}" for m in ("infer", "train") for col in ("torch ms", "fastrnn ms", "speedup",
                                                                              "% peak t/f")],
                     [[c["cell"], c["dtype"], c["T"], c["B"], c["H"]] + _timed_cells(c, ("infer", "train"))
                      for c in st["rnn"]["cases"]])
        md += [""] + [f"* {n}" for n in st["rnn"]["notes"]] + [""]
    if st.get("sdpa", {}).get("gates") or st.get("sdpa", {}).get("cases"):
        s = st["sdpa"]
        md += ["## Attention: fastrnn (triton) against F.scaled_dot_product_attention (flash)", "",
               "Gates at (B=1, H=2, L=S=gate length): output and q/k/v gradients against float64; fp32 at "
               "the project tolerance, fp16/bf16 at most 2x the error of torch's flash kernel.", ""]
        md += _table(["E", "causal", "dtype", "gate", "max error fastrnn / torch (out, dq, dk, dv)"], [
            (g["E"], g["causal"], g["dtype"], "ok" if g["gate"] else f"FAIL: {_last_line(g.get('error'))}",
             ", ".join(f"{e['fastrnn']:.1e}/{_f(e['torch'], '.1e')}" for e in g.get("errors", {}).values()))
            for g in s["gates"]]) + [""]
        md += ["speedup = torch ms / fastrnn ms; FLOPs: forward 4*B*H*L*S*E (half when causal), "
               "backward 2.5x forward; % peak = achieved FLOP/s of torch / fastrnn over torch.matmul's rate "
               "in that dtype. Gate: the gates above for this (E, causal).", ""]
        md += _table(["L", "E", "causal", "B", "H", "dtype", "gate"]
                     + [f"{m} {col}" for m in ("fwd", "fwd+bwd") for col in ("torch ms", "fastrnn ms", "speedup",
                                                                              "% peak t/f")],
                     [[c["L"], c["E"], c["causal"], c["B"], c["H"], c["dtype"]] + _timed_cells(c, ("fwd", "fwdbwd"))
                      for c in s["cases"]]) + [""]
    return "\n".join(md)


def _timed_cells(c, modes):
    """The gate cell and, per mode, torch ms, fastrnn ms, speedup, % of the matmul rate (torch / fastrnn)."""
    if not c.get("gate"):
        return [f"FAIL: {_last_line(c.get('error'))}"] + [""] * (4 * len(modes))
    cells = [f"ok ({c['max_rel_error']:.1e})" if "max_rel_error" in c else "ok"]
    for m in modes:
        cells += [f"{c[f'{m}_torch_ms']:.3f}", f"{c[f'{m}_fastrnn_ms']:.3f}", f"**{c[f'{m}_speedup']:.2f}**",
                  f"{100 * c[f'{m}_torch_of_matmul']:.0f} / {100 * c[f'{m}_fastrnn_of_matmul']:.0f}"]
    return cells


# ================================================================================================
# the children: one stage each (torch is imported here, not in the parent)
# ================================================================================================
class Recorder:
    """Appends one JSON line per result, flushed at once: a killed stage keeps what it wrote."""

    def __init__(self, path):
        self.path = path

    def __call__(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


def run_child(args):
    plan = PLANS["dry" if args.dry_run else "gpu"]
    index, count = (int(v) for v in args.shard.split("/"))
    name = f"{args.stage}.jsonl" if count == 1 else f"{args.stage}.{index}.jsonl"
    record = Recorder(Path(args.out) / name)
    if args.fault:
        inject_fault()
    {"warm": stage_warm, "peak": stage_peak, "rnn": stage_rnn, "sdpa": stage_sdpa}[args.stage](
        plan, record, args.deadline, index, count)
    return 0


def inject_fault():
    """--fault: the triton backend's forward outputs come out 1% too large (the recurrence's h_seq,
    attention's out, the decoder's out), so every comparison with the reference must fail;
    tests/test_gpu_check.py uses it to prove that the gates can fail."""
    from fastrnn.backends import triton_decoder, triton_rnn, triton_sdpa
    rnn_forward, sdpa_forward = triton_rnn.rnn_forward, triton_sdpa.sdpa_forward
    decoder_forward = triton_decoder.decoder_forward

    def bad_decoder_forward(*a, **kw):
        out, *rest = decoder_forward(*a, **kw)
        return out * 1.01, *rest
    triton_decoder.decoder_forward = bad_decoder_forward

    def bad_rnn_forward(*a, **kw):
        h_seq, h_T, c_T, saved = rnn_forward(*a, **kw)
        return h_seq * 1.01, h_T, c_T, saved

    def bad_sdpa_forward(*a, **kw):
        out, lse = sdpa_forward(*a, **kw)
        return out * 1.01, lse
    triton_rnn.rnn_forward, triton_sdpa.sdpa_forward = bad_rnn_forward, bad_sdpa_forward


def _dtype(name):
    import torch
    return getattr(torch, DTYPES[name])


def _case_error(record, exc, **row):
    """A failed gate (AssertionError) or a crash of one case: recorded, the stage goes on."""
    kind = "gate" if isinstance(exc, AssertionError) else type(exc).__name__
    record(**row, gate=False, error=f"{kind}: {exc}", traceback=traceback.format_exc()[-3000:])


def warm_tasks(plan):
    """One task per set of compiled kernels the timed stages need: RNN (cell, dtype, B) -- H only
    changes the autotuning key, not what is compiled -- and attention (E, causal, dtype)."""
    rnn = {}
    for cell, dtype, _, B, H in plan["rnn"]:
        rnn[(cell, dtype, B)] = max(H, rnn.get((cell, dtype, B), 0))
    sdpa = {(E, causal) for _, E, causal in plan["sdpa"]}
    dtypes = sorted(set(plan["gate_dtypes"]) | {plan["sdpa_dtype"]})
    return ([("rnn", cell, dtype, B, H) for (cell, dtype, B), H in rnn.items()]
            + [("sdpa", E, causal, dtype) for E, causal in sorted(sdpa) for dtype in dtypes])


def stage_warm(plan, record, deadline, index, count):
    import torch

    import fastrnn
    device = plan["device"]
    for task in warm_tasks(plan)[index::count]:
        if time.time() > deadline:
            break
        t0 = time.time()
        try:
            if task[0] == "rnn":  # inference (TRAINING=False kernels) and training, 2 steps
                _, cell, dtype, B, H = task
                m = getattr(fastrnn, cell.upper())(H, H, backend="triton").to(device, _dtype(dtype))
                x = torch.randn(2, B, H, device=device, dtype=_dtype(dtype))
                with torch.no_grad():
                    m(x)
                out, _ = m(x.requires_grad_())
                out.backward(torch.randn_like(out))
            else:
                _, E, causal, dtype = task
                q, k, v = (torch.randn(1, plan["gate_heads"], plan["gate_len"], E, device=device,
                                       dtype=_dtype(dtype), requires_grad=True) for _ in range(3))
                out = fastrnn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="triton")
                out.backward(torch.randn_like(out))
            if device == "cuda":
                torch.cuda.synchronize()
            record(kind="case", task=task, seconds=round(time.time() - t0, 2))
        except Exception as exc:
            _case_error(record, exc, kind="case", task=task)
    record(kind="done")


def _gpu_rnn(plan):
    """bench/gpu_rnn.py, set up for this run (it reads its options from the module's ``args``)."""
    import gpu_rnn
    gpu_rnn.args = gpu_rnn.parse_args(["--device", plan["device"], "--rep-ms", str(plan["rep_ms"])])
    return gpu_rnn


def stage_peak(plan, record, deadline, index, count):
    import torch
    gpu_rnn = _gpu_rnn(plan)
    device = plan["device"]
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 rate the IEEE kernels are held to
    for name in DTYPES.values():
        if time.time() > deadline:
            return
        rate = gpu_rnn.matmul_rate(getattr(torch, name), device, plan["rep_ms"])
        record(kind="case", what="matmul", dtype=name, tflops=rate / 1e12)
    n = 1 << (28 if device == "cuda" else 21)  # 1 GiB / 8 MiB of float32
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    ms = gpu_rnn.bench_ms(lambda: b.copy_(a), device, plan["rep_ms"])
    record(kind="case", what="copy", gbps=2 * a.numel() * a.element_size() / (ms * 1e-3) / 1e9)
    record(kind="done")


def peak_rates(out_dir, gpu_rnn, plan, dtypes):
    """torch.matmul FLOP/s per dtype name: the peak stage's, measured here if it did not run."""
    import torch
    rates = {r["dtype"]: r["tflops"] * 1e12 for r in read_jsonl([Path(out_dir) / "peak.jsonl"])
             if r.get("what") == "matmul"}
    for d in dtypes:
        if d not in rates:
            rates[d] = gpu_rnn.matmul_rate(getattr(torch, d), plan["device"], plan["rep_ms"])
    return rates


def stage_rnn(plan, record, deadline, index, count):
    import torch
    from torch import nn
    gpu_rnn = _gpu_rnn(plan)
    device = plan["device"]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cases = list(plan["rnn"])
    for name in sorted({c[1] for c in cases}):  # cuDNN runs bf16 RNNs only from 9.13 (pytorch #164411)
        try:
            nn.LSTM(16, 16).to(device, _dtype(name))(torch.randn(2, 1, 16, device=device, dtype=_dtype(name)))
        except RuntimeError as exc:
            record(kind="note", note=f"nn.LSTM cannot run {name} here ({_last_line(str(exc))}): "
                                     "its cases run in fp16")
            cases = [(c, "fp16" if d == name else d, T, B, H) for c, d, T, B, H in cases]
    rates = peak_rates(record.path.parent, gpu_rnn, plan, {DTYPES[c[1]] for c in cases})
    for i, (cell, dtype, T, B, H) in enumerate(cases):
        if time.time() > deadline:
            record(kind="cut", not_run=cases[i:])
            return
        try:
            row = gpu_rnn.run_case(cell, _dtype(dtype), T, B, H, H, device, rates)
            record(kind="case", gate=True, **row)
        except Exception as exc:
            _case_error(record, exc, kind="case", cell=cell, dtype=DTYPES[dtype], T=T, B=B, H=H)
    record(kind="done")


def _sdpa_gate(plan, E, causal, dtype):
    """fastrnn's output and q/k/v gradients in ``dtype`` against float64 at (1, gate_heads,
    gate_len, E): the same E, causal and dtype as the timed cases, so the same compiled kernels.
    fp32 at the project tolerance, fp16 / bf16 at most 2x torch's flash error. The float64
    reference starts from the inputs rounded to ``dtype`` (as gpu_rnn's gate does), so the errors
    compared are the kernels' own, not the rounding both share. Returns the errors;
    AssertionError names every tensor that failed."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fastrnn
    from fastrnn.testing import assert_close, assert_low_precision
    device, low = plan["device"], _dtype(dtype)
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(1, plan["gate_heads"], plan["gate_len"], E, device=device).to(low).double()
                  for _ in range(4))

    def run(fn, d, flash=False):
        leaves = [t.to(d).requires_grad_() for t in (q, k, v)]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash else contextlib.nullcontext():
            out = fn(*leaves, is_causal=causal)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, g.to(d)))

    exact = run(F.scaled_dot_product_attention, torch.float64)
    fast = run(lambda *a, **kw: fastrnn.scaled_dot_product_attention(*a, backend="triton", **kw), low)
    torch_low = None if low == torch.float32 else run(F.scaled_dot_product_attention, low, flash=True)
    errors, failed = {}, []
    for i, name in enumerate(("out", "grad_q", "grad_k", "grad_v")):
        err = lambda t: (t.double() - exact[i]).abs().max().item()  # noqa: E731
        errors[name] = dict(fastrnn=err(fast[i]), torch=None if torch_low is None else err(torch_low[i]))
        try:
            if torch_low is None:
                assert_close(fast[i], exact[i].to(low), name, grad=name != "out")
            else:
                assert_low_precision(fast[i], torch_low[i], exact[i], name)
        except AssertionError as exc:
            failed.append(str(exc))
    if failed:
        raise AssertionError("; ".join(failed))
    return errors


def stage_sdpa(plan, record, deadline, index, count):
    import bench_attention
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    gpu_rnn = _gpu_rnn(plan)
    dtype = _dtype(plan["sdpa_dtype"])
    torch.backends.cuda.matmul.allow_tf32 = False
    rate = peak_rates(record.path.parent, gpu_rnn, plan, [DTYPES[plan["sdpa_dtype"]]])[DTYPES[plan["sdpa_dtype"]]]
    gates = {}
    for i, (L, E, causal) in enumerate(plan["sdpa"]):
        if time.time() > deadline:
            record(kind="cut", not_run=plan["sdpa"][i:])
            return
        if (E, causal) not in gates:  # once per compiled kernel set, in every dtype
            gates[(E, causal)] = True
            for name in plan["gate_dtypes"]:
                where = dict(kind="gate", E=E, causal=causal, dtype=name, L=plan["gate_len"])
                try:
                    record(**where, gate=True, errors=_sdpa_gate(plan, E, causal, name))
                except Exception as exc:
                    gates[(E, causal)] = False
                    _case_error(record, exc, **where)
        B, H = plan["tokens"] // L, plan["width"] // E
        row = dict(kind="case", L=L, S=L, E=E, causal=causal, B=B, H=H, dtype=plan["sdpa_dtype"])
        if not gates[(E, causal)]:
            record(**row, error="not timed: the gate failed")
            continue
        try:
            row.update(gate=True, **_time_sdpa(plan, bench_attention, gpu_rnn, B, H, L, E, causal, dtype, rate,
                                               lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)))
            record(**row)
        except Exception as exc:
            _case_error(record, exc, **row)
    record(kind="done")


def _time_sdpa(plan, bench_attention, gpu_rnn, B, H, L, E, causal, dtype, rate, flash):
    """Forward (no grad) and forward+backward times of torch's flash kernel and fastrnn's."""
    import torch
    device = plan["device"]
    torch.manual_seed(1)
    q, k, v, g = (torch.randn(B, H, L, E, device=device, dtype=dtype) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    res = {}
    for impl, backend, ctx in (("torch", "torch", flash), ("fastrnn", "triton", contextlib.nullcontext)):
        fn = bench_attention.attention(backend)

        def fwd():
            with torch.no_grad():
                fn(q, k, v, is_causal=causal)

        def fwdbwd():
            torch.autograd.grad(fn(*leaves, is_causal=causal), leaves, g)
        with ctx():
            for kind, go in (("fwd", fwd), ("fwdbwd", fwdbwd)):
                res[f"{kind}_{impl}_ms"] = gpu_rnn.bench_ms(go, device, plan["rep_ms"])
    for kind in ("fwd", "fwdbwd"):
        flops = bench_attention.flops((B, H, L, L, E, causal), kind)
        res[f"{kind}_speedup"] = res[f"{kind}_torch_ms"] / res[f"{kind}_fastrnn_ms"]
        for impl in ("torch", "fastrnn"):
            achieved = flops / (res[f"{kind}_{impl}_ms"] * 1e-3)
            res[f"{kind}_{impl}_tflops"] = achieved / 1e12
            res[f"{kind}_{impl}_of_matmul"] = achieved / rate
    return res


# ================================================================================================
# pytest plugin of the tests stage (``pytest -p gpu_check``; inert without LOG_ENV)
# ================================================================================================
def _log(**row):
    with open(os.environ[LOG_ENV], "a") as f:
        f.write(json.dumps(row) + "\n")


def pytest_configure(config):
    if os.environ.get(LOG_ENV) and os.environ.get(FAULT_ENV):
        inject_fault()


def pytest_collection_finish(session):
    """Keep this shard's share of the tests selected (here, not in pytest_collection_modifyitems,
    which may run before -k): every n-th, since neighbours tend to compile the same kernels."""
    if not os.environ.get(LOG_ENV):
        return
    index, count = (int(v) for v in os.environ.get(SHARD_ENV, "0/1").split("/"))
    keep = session.items[index::count]
    session.config.hook.pytest_deselected(items=[it for it in session.items if it not in keep])
    session.items[:] = keep
    _log(collected=len(keep))


def pytest_runtest_setup(item):
    if os.environ.get(LOG_ENV) and time.time() > float(os.environ[DEADLINE_ENV]):
        import pytest
        pytest.skip(CUT_REASON)


def pytest_runtest_logreport(report):
    if not os.environ.get(LOG_ENV) or (report.passed and report.when != "call"):
        return
    if report.skipped and isinstance(report.longrepr, tuple):
        message = report.longrepr[2].removeprefix("Skipped: ")
    else:
        message = None if report.passed else _failure_text(report.longreprtext)
    _log(nodeid=report.nodeid, when=report.when, outcome=report.outcome, seconds=round(report.duration, 2),
         message=message)


if __name__ == "__main__":
    sys.exit(main())
