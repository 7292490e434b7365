"""First contact: what a new user pastes and types must work as written.

- Every ```python block in README.md and docs/*.md runs, each in its own process (a fresh
  interpreter, as when pasted), from an empty folder. The snippets are self-contained: a block
  that needs a name defines it.
- ``python -m fastrnn``: the parser builds from the standard library alone (fastrnn/__main__.py
  imports torch only in the command that runs), every option says what it does and its default,
  and a wrong argument is answered in one line, not a traceback.
"""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets():
    """(file, first line number, code) of every ```python block."""
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            yield path.relative_to(ROOT).as_posix(), text[: m.start()].count("\n") + 1, m.group(1)


SNIPPETS = list(snippets())


def test_snippets_are_found():
    """The extraction itself: the README's and the attention page's blocks are all there."""
    files = [f for f, _, _ in SNIPPETS]
    assert files.count("README.md") >= 2 and "docs/attention.md" in files


@pytest.mark.parametrize("path,line,code", SNIPPETS, ids=[f"{f}:{n}" for f, n, _ in SNIPPETS])
def test_snippet_runs(path, line, code, tmp_path):
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{path}:{line} failed:\n{code}\n---\n{proc.stderr[-3000:]}"


# ---- python -m fastrnn ----------------------------------------------------------------------

def _main_module():
    """fastrnn/__main__.py loaded on its own, without running fastrnn/__init__.py (which imports
    torch), to see what building the parser itself needs."""
    spec = importlib.util.spec_from_file_location("fastrnn_cli", ROOT / "fastrnn" / "__main__.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parser_builds_without_torch():
    code = ("import sys, importlib.util as u\n"
            f"spec = u.spec_from_file_location('cli', {str(ROOT / 'fastrnn' / '__main__.py')!r})\n"
            "m = u.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "p = m.build_parser(); p.format_help()\n"
            "for cmd in ('bench', 'info', 'profile'):\n"
            "    try: p.parse_args([cmd, '--help'])\n"
            "    except SystemExit: pass\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'fastrnn', 'numpy')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["bench", "--bogus"], ["profile", "--help"]])
def test_cli_help_and_usage_errors_import_no_torch(argv):
    """The real ``python -m fastrnn ...`` (the package's __init__ runs too): --help and a wrong
    option answer without importing torch (what makes them take seconds on a loaded machine);
    a wrong option is one line on stderr and exit 2."""
    proc = subprocess.run([sys.executable, "-m", "fastrnn", *argv], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    bogus = "--bogus" in argv
    assert proc.returncode == (2 if bogus else 0), proc.stderr
    if bogus:
        assert len(proc.stderr.strip().splitlines()) == 1 and "--help" in proc.stderr
    probe = subprocess.run([sys.executable, "-X", "importtime", "-m", "fastrnn", *argv], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
    imported = {line.split("|")[-1].strip() for line in probe.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "numpy" not in imported, "the CLI's parser imported torch"


def test_static_backend_names_match_the_registry():
    from fastrnn import backends
    assert _main_module().BACKEND_NAMES == tuple(sorted(backends.BACKENDS))


def test_every_option_has_help_and_default():
    import argparse
    parser = _main_module().build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        options = [a for a in p._actions if not isinstance(a, argparse._HelpAction)]
        for action in options:
            assert action.help, f"{name} {action.option_strings}: no help text"
        # the formatter appends "(default: ...)" to each option's help: one per option
        assert p.format_help().count("(default:") == len(options), name


@pytest.mark.parametrize("argv,needle", [
    (["bench", "--rounds", "0"], "--rounds: must be at least 1"),
    (["bench", "--ops", "lstmm"], "invalid choice: 'lstmm'"),
    (["bench", "--quick", "--full"], "not allowed with"),
    (["profile", "--device", "nosuchdevice"], "--device 'nosuchdevice'"),
])
def test_wrong_argument_is_one_line(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "fastrnn", *argv], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


# ---- python -m fastrnn bench: the quick start's first command ---------------------------------

def test_bench_grids():
    from fastrnn import bench
    ops, modes = ("lstm", "gru", "rnn", "sdpa"), ("infer", "train")
    default, full = bench.cases(ops, modes, "default"), bench.cases(ops, modes, "full")
    assert len(default) == 8 and len({(op, shape) for op, shape, _ in default}) == 4  # one shape per op
    assert set(default) < set(full) and len(full) == 24


def test_noise_warning():
    from fastrnn import bench

    def result(spread, torch_spread):
        return bench.Result("gru", "s", "infer", "cpp", 1.0, 1.0, 1.0, 0.0, True, 7, spread, 1.0,
                            torch_spread=torch_spread)
    quiet = [result(0.05, 0.1), result(0.1, 0.02), result(0.5, 0.1)]
    assert bench.median_noise(quiet) == 0.1 and bench.noise_warning(quiet) is None
    noisy = [result(0.05, 0.3), result(0.4, 0.02), result(0.5, 0.1)]  # the ratio's noise: either side
    warning = bench.noise_warning(noisy, {"load_average": 6.5, "logical_cpus": 2})
    assert warning is not None and "40%" in warning and "load average 6.5 on 2 CPUs" in warning


def test_bench_compiles_first_and_prints_spread(tmp_path, capsys):
    from fastrnn import backends
    from fastrnn.__main__ import main
    if backends.unavailable_reason("numba", "cpu", "rnn") is not None:
        pytest.skip("numba unavailable")
    assert main(["bench", "--quick", "--ops", "gru", "--backends", "numba", "--modes", "infer",
                 "--rounds", "2", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "compiling numba kernels (first run only" in err and "numba: ready in" in err
    assert err.index("numba: ready in") < err.index("T20_B4_I32_H32")  # compiled before timing
    header = next(line for line in out.splitlines() if line.startswith("op "))
    assert header.split()[-4:] == ["spread", "max", "err", "gate"]
