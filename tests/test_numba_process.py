"""The numba backend in other processes and threads, and with a damaged or unwritable compile
cache (``fastrnn/_numba/runtime.py``). Everything that could crash or hang (fork children,
numba's threading layers, OpenBLAS) runs in a child process with a timeout; cache damage is done
only to temporary cache directories (``NUMBA_CACHE_DIR``), never to the repository's cache."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numba
import pytest

from fastrnn import backends

pytestmark = pytest.mark.skipif(backends.unavailable_reason("numba", "cpu", "rnn") is not None,
                                reason="numba backend unavailable")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(code, env_extra=None, timeout=600, cwd=ROOT):
    """Runs ``code`` in a fresh interpreter; returns (the JSON object it printed last, stderr)."""
    env = dict(os.environ, **(env_extra or {}))
    env.pop("PYTHONWARNINGS", None)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"child failed ({out.returncode}):\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


# --------------------------------------------------------------------------------------------
# fork: DataLoader workers
# --------------------------------------------------------------------------------------------
FORK_CHILD = """
import json, sys
import torch
import fastrnn
from fastrnn.attention import scaled_dot_product_attention
from fastrnn._numba import runtime
from torch.utils.data import DataLoader, Dataset

numba_first = sys.argv[1] == "numba_first"
torch.manual_seed(0)
a = torch.randn(400, 400)
(a @ a).sum()                                        # torch's OpenMP pool is running
torch.nn.LSTM(8, 32)(torch.randn(5, 3, 8))[0].sum().backward()
lstm = fastrnn.LSTM(12, 64, backend="numba", proj_size=40)   # B=16, H=64: a step runs on 2 threads
gru = fastrnn.GRU(12, 48, backend="numba", bidirectional=True)
params = list(lstm.parameters()) + list(gru.parameters())
xs = [torch.randn(9 + 2 * i, 16, 12) for i in range(4)]                      # odd lengths
qkv = [tuple(torch.randn(2, 3, 150 + i, 32) for _ in range(3)) for i in range(4)]   # above SERIAL_WORK


def compute(i):
    x = xs[i].clone().requires_grad_()
    y = lstm(x)[0].sum(-1) + gru(x)[0].sum(-1)
    q, k, v = (t.clone().requires_grad_() for t in qkv[i])
    o = scaled_dot_product_attention(q, k, v, is_causal=True, backend="numba")
    loss = y.square().sum() + (o * torch.linspace(-1, 1, o.shape[-1])).sum()
    grads = torch.autograd.grad(loss, [x, q, k, v] + params)
    rnn = [y.detach(), grads[0]] + list(grads[4:])
    return dict(rnn=rnn, att_out=o.detach(), att_grads=list(grads[1:4]))


class Data(Dataset):
    def __len__(self):
        return len(xs)

    def __getitem__(self, i):
        return dict(compute(i), forked=runtime.forked(), threads=torch.get_num_threads())


if numba_first:
    expected = [compute(i) for i in range(len(xs))]
loader = DataLoader(Data(), batch_size=None, num_workers=2, multiprocessing_context="fork")
got = list(loader)
if not numba_first:  # the parent had not run the numba backend before the fork
    expected = [compute(i) for i in range(len(xs))]
rnn_equal = all(torch.equal(a, b) for e, g in zip(expected, got) for a, b in zip(e["rnn"], g["rnn"]))
out_equal = all(torch.equal(e["att_out"], g["att_out"]) for e, g in zip(expected, got))
# dQ is summed per key chunk, and the chunk count follows the thread count: not bitwise
grad_diff = max(float((a - b).abs().max() / b.abs().max())
                for e, g in zip(expected, got) for a, b in zip(g["att_grads"], e["att_grads"]))
print(json.dumps(dict(rnn_equal=rnn_equal, out_equal=out_equal, grad_diff=grad_diff,
                      forked=[g["forked"] for g in got], worker_threads=[g["threads"] for g in got],
                      parent_forked=runtime.forked(), layer=runtime.threading_layer())))
"""


@pytest.mark.parametrize("order", ["numba_first", "torch_only_first"])
def test_fork_dataloader_workers_match_parent(order):
    """DataLoader workers started by fork run the numba modules (LSTM with a projection,
    bidirectional GRU) and attention, forward and backward, after the parent ran torch ops and
    (or not) the numba backend: no hang (a fork child of a parent that ran torch ops and had not run numba, before
    the fix), no "fork() called from a process already using GNU OpenMP" kill (one that had),
    and the parent's results (bitwise for the recurrence and attention's output)."""
    res, err = run_child(FORK_CHILD.replace("sys.argv[1]", repr(order)))
    assert res["forked"] == [True] * 4 and not res["parent_forked"], res
    assert res["worker_threads"] == [1] * 4, res   # DataLoader's setting for its workers
    assert res["rnn_equal"] and res["out_equal"], res
    assert res["grad_diff"] < 1e-5, res
    assert "Terminating" not in err, err


FORK_DIRECT = """
import json, multiprocessing
import torch
import fastrnn
from fastrnn._numba import runtime
from fastrnn.backends import numba_sdpa

torch.manual_seed(0)
a = torch.randn(400, 400)
(a @ a).sum()                                        # torch's OpenMP pool is running
lstm = fastrnn.LSTM(12, 64, backend="numba")         # a step of B=16, H=64 runs on 2 threads
x = torch.randn(7, 16, 12)
q, k, v = (torch.randn(2, 150, 32) for _ in range(3))   # above SERIAL_WORK: 2 threads


def compute():
    # small tensors: torch's own ops stay serial (torch is not fork-safe above one thread either)
    with torch.no_grad():
        return [lstm(x)[0], numba_sdpa.sdpa_forward(q, k, v, None, 0.2, False, 0.0, 0)[0]]


def child(conn):
    # numpy, not tensors: sending a tensor copies it into shared memory with torch's own
    # (parallel, so here hanging) copy
    out = [t.numpy() for t in compute()]
    conn.send(dict(out=out, forked=runtime.forked(), threads=torch.get_num_threads()))


def in_fork_child():
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=child, args=(send,), daemon=True)
    p.start()
    got = recv.recv() if recv.poll(240) else None
    p.join(10)
    if p.exitcode is None:  # hung: report it, do not wait for it
        p.kill()
        p.join()
        return got, "hung"
    return got, p.exitcode


before, code_before = in_fork_child()                # the parent has not run the numba backend yet
expected = compute()
after, code_after = in_fork_child()                  # now it has (numba's OpenMP layer started)
ok = [g is not None and all(torch.equal(a, torch.from_numpy(b)) for a, b in zip(expected, g["out"]))
      for g in (before, after)]
print(json.dumps(dict(ok=ok, codes=[code_before, code_after],
                      forked=[g and g["forked"] for g in (before, after)],
                      threads=[g and g["threads"] for g in (before, after)])))
"""


def test_fork_child_keeping_torch_threads_runs_serially():
    """A plain fork child that keeps torch's thread count (2 here) still gets one thread in the
    numba kernels: torch's setting alone would send them into GNU OpenMP's dead pool (hang) or
    numba's fork check (SIGTERM). Before and after the parent ran the backend; results bitwise
    the parent's."""
    res, err = run_child(FORK_DIRECT)
    assert res["codes"] == [0, 0] and res["ok"] == [True, True], (res, err[-2000:])
    assert res["forked"] == [True, True], res
    assert res["threads"] == [res["threads"][0]] * 2 and res["threads"][0] >= 1, res
    assert "Terminating" not in err, err


# --------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------
THREADS_CHILD = """
import json, threading
import torch
import fastrnn
from fastrnn.attention import scaled_dot_product_attention
from fastrnn._numba import runtime
from fastrnn.backends import numba_sdpa

torch.manual_seed(0)
with runtime._blas_lock:
    blas = runtime._openblas()
blas.scipy_openblas_set_num_threads(2)      # OpenBLAS's own pool on: what the kernels must switch off
mods = [(fastrnn.LSTM if i % 2 == 0 else fastrnn.GRU)(12, 64, backend="numba") for i in range(8)]
xs = [torch.randn(7 + i, 16, 12) for i in range(8)]
qkv = [tuple(torch.randn(3, 130 + 7 * i, 32) for _ in range(3)) for i in range(8)]


def compute(i):
    x = xs[i].clone().requires_grad_()
    y = mods[i](x)[0]
    q, k, v = (t.clone().requires_grad_() for t in qkv[i])
    o = scaled_dot_product_attention(q, k, v, backend="numba")
    loss = (y * y).sum() + (o * torch.linspace(-1, 1, o.shape[-1])).sum()
    return [y.detach(), o.detach()] + list(torch.autograd.grad(loss, [x, q, k, v] + list(mods[i].parameters())))


expected = [compute(i) for i in range(8)]
reps = 3
got = [[None] * reps for _ in range(8)]
start = threading.Barrier(8)


def work(i):
    start.wait()
    for r in range(reps):
        got[i][r] = compute(i)


threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
equal = all(g is not None and all(torch.equal(a, b) for a, b in zip(expected[i], g))
            for i in range(8) for g in got[i])

# attention forward alone, longer: the calls overlap more, which is where a thread restoring
# OpenBLAS's count under another one's running kernel showed ("may hang" warnings)
big = [tuple(torch.randn(4, 300 + i, 64) for _ in range(3)) for i in range(8)]
expected_att = [numba_sdpa.sdpa_forward(*big[i], None, 0.125, False, 0.0, 0)[0] for i in range(8)]
got_att = [[None] * 6 for _ in range(8)]


def work_att(i):
    start.wait()
    for r in range(6):
        got_att[i][r] = numba_sdpa.sdpa_forward(*big[i], None, 0.125, False, 0.0, 0)[0]


threads = [threading.Thread(target=work_att, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
equal_att = all(g is not None and torch.equal(g, expected_att[i]) for i in range(8) for g in got_att[i])
print(json.dumps(dict(equal=equal, equal_att=equal_att, blas_threads=blas.scipy_openblas_get_num_threads(),
                      layer=runtime.threading_layer())))
"""


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_threads_match_sequential(layer):
    """8 Python threads at once, each running numba LSTM / GRU and attention forward and
    backward three times: bitwise the sequential results, no OpenBLAS "may hang" warning, and
    OpenBLAS's thread count restored afterwards. ``workqueue`` (a user's choice of numba layer)
    aborts the process on concurrent use unless fastrnn serialises the calls."""
    env = {} if layer == "default" else {"NUMBA_THREADING_LAYER": layer}
    res, err = run_child(THREADS_CHILD, env)
    assert res["layer"] == ("omp" if layer == "default" else layer), res
    assert res["equal"] and res["equal_att"], res
    assert res["blas_threads"] == 2, res
    assert "OpenBLAS" not in err and "Terminating" not in err, err[-2000:]


# --------------------------------------------------------------------------------------------
# the on-disk cache
# --------------------------------------------------------------------------------------------
KERNELS = """
from fastrnn._numba.runtime import jit

@jit(cache=True)
def k0(x):
    return x * 2.0 + 0.0

@jit(cache=True)
def k1(x):
    return x * 3.0 + 1.0

@jit(cache=True)
def k2(x):
    return x * 4.0 + 2.0

@jit(cache=True)
def k3(x):
    return x * 5.0 + 3.0

@jit(cache=True)
def k4(x):
    return x * 6.0 + 4.0

KERNELS = [k0, k1, k2, k3, k4]
"""

USE_KERNELS = """
import json, sys, warnings
import numpy as np
{setup}
sys.path.insert(0, {where!r})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import kern
    x = np.linspace(-1.0, 1.0, 11)
    right = [bool(np.array_equal(k(x), x * (i + 2) + i)) for i, k in enumerate(kern.KERNELS)]
from fastrnn._numba import runtime
print(json.dumps(dict(right=right, warnings=[str(w.message) for w in caught if w.category is RuntimeWarning],
                      rebuilt=runtime.rebuilt_entries,
                      hits=[sum(k.stats.cache_hits.values()) for k in kern.KERNELS],
                      dirs=[k.stats.cache_path for k in kern.KERNELS])))
"""


def _use_kernels(where, cache_dir, setup=""):
    return run_child(USE_KERNELS.format(where=str(where), setup=setup), {"NUMBA_CACHE_DIR": str(cache_dir)},
                     timeout=300)[0]


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _garble(path):
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0x5A for b in data[mid:mid + 16])
    open(path, "wb").write(bytes(data))


def _empty(path):
    open(path, "wb").close()


def test_damaged_cache_entries_are_rebuilt(tmp_path):
    """Five cached kernels, each entry damaged differently (index or data file truncated,
    garbled in the middle, emptied): the next process computes the right results, warns once
    naming a damaged file and that it is rebuilt, lists all five; the process after it loads
    every kernel from the cache without a warning."""
    (tmp_path / "kern.py").write_text(KERNELS)
    cache = tmp_path / "cache"
    first = _use_kernels(tmp_path, cache)
    assert all(first["right"]) and first["warnings"] == [] and first["hits"] == [0] * 5, first
    entries = {}
    for name in os.listdir(first["dirs"][0]):
        for i in range(5):
            if name.startswith(f"kern.k{i}-"):
                kind = "nbi" if name.endswith(".nbi") else "nbc"
                entries.setdefault(i, {})[kind] = os.path.join(first["dirs"][0], name)
    assert sorted(entries) == list(range(5)) and all(len(e) == 2 for e in entries.values()), entries
    damage = [(_truncate, "nbi"), (_truncate, "nbc"), (_garble, "nbc"), (_empty, "nbi"), (_garble, "nbi")]
    damaged = set()
    for i, (how, kind) in enumerate(damage):
        how(entries[i][kind])
        damaged.add(entries[i][kind])

    second = _use_kernels(tmp_path, cache)
    assert all(second["right"]), second
    assert len(second["warnings"]) == 1, second
    message = second["warnings"][0]
    assert "damaged" in message and "rebuilt" in message and any(p in message for p in damaged), message
    assert set(second["rebuilt"]) == damaged, second

    third = _use_kernels(tmp_path, cache)
    assert all(third["right"]) and third["warnings"] == [] and third["rebuilt"] == [], third
    assert third["hits"] == [1] * 5, third


def test_unwritable_cache_compiles_in_memory(tmp_path):
    """No usable cache directory at all (the kernel's __pycache__, NUMBA_CACHE_DIR and the user
    cache all unwritable, as on a read-only install): numba's cache=True fails at import; here
    one warning, and the kernels work. A cache directory whose writes fail (disk full): one
    warning, right results, nothing written."""
    (tmp_path / "kern.py").write_text(KERNELS)
    (tmp_path / "__pycache__").write_text("not a directory")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = run_child(USE_KERNELS.format(where=str(tmp_path), setup=""),
                    {"NUMBA_CACHE_DIR": str(blocker / "numba"), "XDG_CACHE_HOME": str(blocker / "xdg")}, timeout=300)[0]
    assert all(res["right"]) and res["dirs"] == [None] * 5, res
    assert len(res["warnings"]) == 1 and "cannot be cached" in res["warnings"][0], res

    (tmp_path / "__pycache__").unlink()
    full = tmp_path / "full"
    setup = ("import errno, numba.core.caching as c\n"
             "def _full(self, path):\n"
             "    raise OSError(errno.ENOSPC, 'No space left on device', path)\n"
             "c.IndexDataCacheFile._open_for_write = _full")
    res = _use_kernels(tmp_path, full, setup)
    assert all(res["right"]), res
    assert len(res["warnings"]) == 1 and "cannot write" in res["warnings"][0], res
    assert not any(n.endswith((".nbi", ".nbc")) for _, _, names in os.walk(full) for n in names)


def _dispatchers(module):
    return [v for v in vars(module).values() if isinstance(v, numba.core.registry.CPUDispatcher)]


def test_every_kernel_uses_the_checked_cache():
    """The recurrence's and attention's kernels are all cached the same way (runtime.jit), so
    everything the tests above show holds for both."""
    from fastrnn._numba import rnn_kernels, runtime, sdpa_kernels
    if not runtime.CACHE:
        pytest.skip("FASTRNN_NUMBA_CACHE=0")
    for module, kernels in ((rnn_kernels, ("rnn_forward", "rnn_backward", "gemm", "rnn_forward_var")),
                            (sdpa_kernels, ("sdpa_forward", "sdpa_backward"))):
        cached = {d.py_func.__name__ for d in _dispatchers(module) if isinstance(d._cache, runtime.SafeCache)}
        assert set(kernels) <= cached, (module.__name__, cached)
        plain = [d.py_func.__name__ for d in _dispatchers(module)
                 if type(d._cache) is not runtime.SafeCache and d._cache.cache_path is not None]
        assert plain == [], plain   # no kernel left on numba's own (unchecked) cache


def test_cache_off_applies_to_attention_too():
    """FASTRNN_NUMBA_CACHE=0: no kernel of either op family has an on-disk cache."""
    res, _ = run_child("""
        import json, numba
        from fastrnn._numba import rnn_kernels, sdpa_kernels
        print(json.dumps({m.__name__: sorted({v.py_func.__name__ for v in vars(m).values()
                                              if isinstance(v, numba.core.registry.CPUDispatcher)
                                              and v.stats.cache_path is not None})
                          for m in (rnn_kernels, sdpa_kernels)}))
    """, {"FASTRNN_NUMBA_CACHE": "0"}, timeout=300)
    assert res == {"fastrnn._numba.rnn_kernels": [], "fastrnn._numba.sdpa_kernels": []}, res


def test_attention_on_a_read_only_install(tmp_path):
    """A copy of the package whose kernel directory cannot hold a cache, with no other cache
    directory usable: attention (which failed to import: "cannot cache function
    'sdpa_forward'") compiles in memory, warns once, and matches torch."""
    shutil.copytree(os.path.join(ROOT, "fastrnn"), tmp_path / "fastrnn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "fastrnn" / "_numba" / "__pycache__").write_text("not a directory")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res, _ = run_child("""
        import json, warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastrnn
            from fastrnn.backends import numba_sdpa
            torch.manual_seed(0)
            q, k, v = torch.randn(2, 37, 16), torch.randn(2, 45, 16), torch.randn(2, 45, 16)
            out, _ = numba_sdpa.sdpa_forward(q, k, v, None, 0.25, False, 0.0, 0)
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.25)
        print(json.dumps(dict(where=fastrnn.__file__, err=float((out.double() - ref).abs().max()),
                              warnings=[str(w.message) for w in caught if w.category is RuntimeWarning],
                              cache=numba_sdpa._k().sdpa_forward.stats.cache_path)))
    """, {"NUMBA_CACHE_DIR": str(blocker / "numba"), "XDG_CACHE_HOME": str(blocker / "xdg"),
          "PYTHONPATH": str(tmp_path)}, cwd=str(tmp_path), timeout=600)
    assert res["where"].startswith(str(tmp_path)), res
    assert res["err"] < 1e-5 and res["cache"] is None, res
    assert len(res["warnings"]) == 1 and "cannot be cached" in res["warnings"][0], res
