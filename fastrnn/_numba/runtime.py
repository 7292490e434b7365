"""What the numba kernels need from the process: their on-disk cache, numba's threading layer,
``fork``, concurrent Python threads and scipy's OpenBLAS. One place for both op families
(``rnn_kernels``, ``sdpa_kernels``); the backends (``fastrnn.backends.numba_rnn`` /
``numba_sdpa``) call every kernel inside ``kernel_call``.

Cache
-----
``jit(cache=True, ...)`` is ``numba.njit`` with a cache that never makes the backend fail:

- ``FASTRNN_NUMBA_CACHE=0`` (read once, at import) turns it off for every kernel.
- No usable cache directory (read-only install, and no writable ``NUMBA_CACHE_DIR`` or user
  cache): numba's ``cache=True`` raises "cannot cache function" when the kernel module is
  imported. Here: one ``RuntimeWarning``, and the kernels compile in memory.
- A write that fails (disk full, directory turned read-only): one ``RuntimeWarning``, nothing
  more is written in this process, the compiled kernel is used as it is.
- A damaged entry (a process killed while writing, a full disk, bit rot): every payload is stored
  behind its SHA-256, so a truncated or garbled index or data file is detected before pickle or
  LLVM see it (numba's own files fail with ``UnpicklingError`` in every later process, or load
  garbled machine code). The entry's files are deleted and the kernel recompiled; the first such
  entry in a process warns (``RuntimeWarning`` naming the file), all are listed in
  ``rebuilt_entries``. The checked files carry ``.sha256`` in their names, so they never mix with
  files numba writes in its own format.

Where the cache is, and how entries are keyed, is numba's: ``__pycache__`` next to the kernel
file, else ``NUMBA_CACHE_DIR``, else the user cache; keyed on the source file's timestamp, the
signature, the numba version and the host CPU.

Threads and processes
---------------------
- The threading layer: ``omp`` unless the user chose one (``NUMBA_THREADING_LAYER``) or numba's
  threads already started. With GNU OpenMP it is the libgomp that torch loaded, so numba's
  parallel regions run on the same OS threads as torch's intra-op pool instead of a second pool
  competing for the cores; it is thread-safe. (``workqueue`` is not thread-safe and needs a
  lock; ``tbb`` is not installed here.) Caveat, measured (bench/results/numba_fork.md): on a
  machine whose cores are busy with other processes, GNU OpenMP's spinning barriers make a
  2-thread recurrence 15-20x slower than one thread, where ``workqueue`` (sleeping workers)
  only loses a few percent; ``NUMBA_THREADING_LAYER=workqueue`` is the choice there, and works
  with fork and Python threads here.
- ``fork``: GNU OpenMP's thread pool does not survive ``fork`` (a child that opens a parallel
  region on more than one thread waits forever for threads that were not copied), and numba's
  ``omp`` layer kills a child that opens any parallel region ("fork() called from a process
  already using GNU OpenMP"). A fork child (``os.register_at_fork``) therefore runs every
  kernel on its calling thread: ``kernel_call`` gives it one thread and the kernels take their
  serial path, which opens no parallel region at all. This is torch's own rule for DataLoader
  workers (one intra-op thread each). Spawned processes are not affected.
- Thread count of a call: ``min(torch.get_num_threads(), numba.get_num_threads())``, so that
  ``fastrnn.set_num_threads`` / ``torch.set_num_threads`` rule every backend and every Python
  thread alike (numba's own count is per Python thread; torch's is per process).
- Concurrent Python threads: the kernels release the GIL and are reentrant. Under the
  ``workqueue`` layer (a user's choice) calls that open parallel regions are serialised by a
  lock, because that layer aborts the process on concurrent use.
- numba#9387: starting numba's OpenMP layer, or compiling a parallel kernel, resets torch's
  thread count where both share one libgomp; ``kernel_call`` and ``compiling`` restore it.
- scipy's OpenBLAS (the BLAS behind ``np.dot`` in compiled code) is held at one thread while
  any kernel that uses it runs (``serial_blas``): its own pool would fight the ``prange``
  workers. The setting is process-global, so it is reference-counted under a lock: the first
  call in sets it, the last one out restores it.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import os
import pickle
import threading
import warnings

import numba
import torch
from numba.core import caching as _caching

CACHE = os.environ.get("FASTRNN_NUMBA_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")

rebuilt_entries: list[str] = []   # cache files found damaged (and deleted) in this process
_warned: set[str] = set()          # warn-once keys
_state_lock = threading.Lock()     # guards the module state below and the warn-once set


def _warn_once(key: str, message: str) -> None:
    with _state_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# the on-disk cache
# ---------------------------------------------------------------------------------------------
class _Damaged(Exception):
    """A cache file that cannot be what was written."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


_DIGEST = 32   # bytes of SHA-256 in front of every payload


class _CheckedFile(_caching.IndexDataCacheFile):
    """numba's index (``.nbi``) and data (``.nbc``) files with each pickled payload behind its
    SHA-256. Layout as numba's: the index is the pickled numba version, then the payload."""

    def _dump(self, obj):
        data = super()._dump(obj)
        return hashlib.sha256(data).digest() + data

    @staticmethod
    def _payload(blob: bytes, path: str):
        data = blob[_DIGEST:]
        if len(blob) < _DIGEST or hashlib.sha256(data).digest() != blob[:_DIGEST]:
            raise _Damaged(path, f"checksum mismatch ({len(blob)} bytes)")
        try:
            return pickle.loads(data)
        except Exception as exc:  # a payload that checks but does not unpickle: still damaged
            raise _Damaged(path, f"{type(exc).__name__}: {exc}") from exc

    def _load_index(self):
        try:
            with open(self._index_path, "rb") as f:
                version = pickle.load(f)
                blob = f.read()
        except FileNotFoundError:
            return {}
        except OSError:
            raise
        except Exception as exc:  # truncated or garbled version header
            raise _Damaged(self._index_path, f"{type(exc).__name__}: {exc}") from exc
        if version != self._version:  # another numba's file: not ours to judge
            return {}
        stamp, overloads = self._payload(blob, self._index_path)
        return overloads if stamp == self._source_stamp else {}

    def _load_data(self, name):
        path = self._data_path(name)
        with open(path, "rb") as f:  # OSError (file gone): numba's load() treats it as a miss
            blob = f.read()
        return self._payload(blob, path)


_save_failed = False   # a write failed in this process: stop trying


class SafeCache(_caching.FunctionCache):
    """numba's per-function cache, on ``_CheckedFile``; loading never raises (a damaged entry is
    deleted and reported, and the kernel compiles), saving never raises (reported once)."""

    def __init__(self, py_func, depends=()):
        super().__init__(py_func)   # RuntimeError when no cache directory is usable
        # numba keys an entry on its own file's stamp only; ``depends`` adds the files whose
        # @njit helpers the kernel inlines, so editing a helper rebuilds the kernel too
        stamp = self._impl.locator.get_source_stamp()
        if depends:
            stamp = (stamp, *((os.stat(f).st_mtime, os.stat(f).st_size) for f in depends))
        self._cache_file = _CheckedFile(self._cache_path, self._impl.filename_base + ".sha256", stamp)

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except OSError:  # unreadable (permissions, I/O): a miss, not a reason to delete anything
            return None
        except Exception as exc:  # damaged, or not rebuildable (e.g. LLVM rejects it): recompile
            self._discard(exc)
            return None

    def save_overload(self, sig, data):
        global _save_failed
        if _save_failed:
            return
        try:
            try:
                super().save_overload(sig, data)
            except _Damaged as exc:  # the index this entry would join is damaged: start it anew
                self._discard(exc)
                super().save_overload(sig, data)
        except Exception as exc:  # OSError: read-only, disk full, ...
            _save_failed = True
            _warn_once("save", f"fastrnn: cannot write numba's kernel cache in {self._cache_path} "
                               f"({type(exc).__name__}: {exc}); the kernels compiled in this process "
                               "stay in memory only")

    def _discard(self, exc: Exception) -> None:
        """Deletes this function's index and data files (the index may be what is damaged, so
        none of them can be trusted) and reports the first damaged entry of the process."""
        f = self._cache_file
        path = exc.path if isinstance(exc, _Damaged) else f._index_path
        why = exc.why if isinstance(exc, _Damaged) else f"{type(exc).__name__}: {exc}"
        prefix = f._data_name_pattern.split("{number:d}")[0]   # data files: <prefix><n>.nbc
        try:
            names = [n for n in os.listdir(self._cache_path) if n.startswith(prefix) and n.endswith(".nbc")]
        except OSError:
            names = []
        for victim in [f._index_path] + [os.path.join(self._cache_path, n) for n in names]:
            with contextlib.suppress(OSError):
                os.remove(victim)
        with _state_lock:
            rebuilt_entries.append(path)
        _warn_once("damaged", f"fastrnn: numba cache entry {path} is damaged ({why}); it is deleted "
                              "and the kernel is being rebuilt (further damaged entries in this "
                              "process are rebuilt without a warning: runtime.rebuilt_entries)")


def jit(*, cache: bool = False, depends=(), **options):
    """``numba.njit(**options)``; with ``cache`` (and ``FASTRNN_NUMBA_CACHE`` not 0) the
    dispatcher keeps its compiled code in a ``SafeCache``, rebuilt when its own file or one of
    ``depends`` (paths of the modules whose helpers it calls) changes."""
    def wrap(func):
        dispatcher = numba.njit(**options)(func)
        if cache and CACHE:
            try:
                dispatcher._cache = SafeCache(dispatcher.py_func, depends)   # what enable_caching() sets
            except Exception as exc:  # no usable cache directory
                _warn_once("nocache", f"fastrnn: numba kernels cannot be cached ({exc}); they are "
                                      "compiled in memory in each process (set NUMBA_CACHE_DIR to a "
                                      "writable directory to keep them)")
        return dispatcher
    return wrap


def cache_dir(dispatcher) -> str | None:
    return dispatcher.stats.cache_path


@contextlib.contextmanager
def compiling(dispatcher):
    """Around compiling (or loading) kernels: an exclusive file lock next to the cache, so that
    of several processes starting at once one compiles and writes while the others wait and then
    load its result; and torch's thread count kept (numba#9387)."""
    path = cache_dir(dispatcher)
    f = None
    with _torch_threads_kept():
        try:
            import fcntl
            if path:
                os.makedirs(path, exist_ok=True)   # numba creates it only when it first saves
                f = open(os.path.join(path, "fastrnn-compile.lock"), "a")
        except (ImportError, OSError):  # no fcntl (Windows) or a read-only cache: compile unlocked
            f = None
        if f is None:
            yield
            return
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


_first_calls = set()   # (kernel, key) already called once in this process
_NO_LOCK = contextlib.nullcontext()


def first_call(kernel, key):
    """The context for a call of ``kernel``: ``compiling(kernel)`` on its first call with ``key``
    (the backends pass the dtype) in this process, else nothing. A later signature of the same
    key compiles unlocked (at worst two processes compile it both), and so does a concurrent
    first call in another thread (numba's own lock serialises it): no harm either way."""
    if (kernel, key) in _first_calls:
        return _NO_LOCK
    _first_calls.add((kernel, key))
    return compiling(kernel)


# ---------------------------------------------------------------------------------------------
# threading layer, fork, thread counts
# ---------------------------------------------------------------------------------------------
_forked = False          # this process is a fork child of one that imported this module
_layer: str | None = None


def _choose_layer() -> None:
    """``omp`` unless the user chose a layer or numba's threads already run (see the module
    docstring); must run before numba starts its threads."""
    from numba.np.ufunc import parallel
    if parallel._is_initialized or str(numba.config.THREADING_LAYER).lower() != "default":
        return
    try:
        from numba.np.ufunc import omppool  # noqa: F401
    except ImportError:  # e.g. macOS without an OpenMP runtime: numba's own choice
        return
    numba.config.THREADING_LAYER = "omp"


def _after_fork_in_child() -> None:
    global _forked, _blas_users, _blas_saved, _state_lock, _wq_lock, _blas_lock
    _forked = True
    # locks another thread held at the fork stay held in the child: new ones
    _state_lock, _wq_lock, _blas_lock = threading.Lock(), threading.Lock(), threading.Lock()
    _blas_users, _blas_saved = 0, None   # calls in flight in the parent do not exist here


def forked() -> bool:
    return _forked


def threading_layer() -> str:
    """numba's threading layer, starting numba's threads if needed (torch's count kept)."""
    global _layer
    if _layer is None:
        with _torch_threads_kept():
            numba.get_num_threads()   # starts the layer
        from numba.np.ufunc import parallel
        _layer = parallel.threading_layer()
    return _layer


@contextlib.contextmanager
def _torch_threads_kept():
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:  # numba#9387
            torch.set_num_threads(n)


_wq_lock = threading.Lock()
_numba_threads = None   # numba's own get_num_threads once its layer runs (numba.get_num_threads()
                        # takes two locks per call to check that it does: ~1 us of a small call)


class kernel_call:
    """``with kernel_call(limit) as nth:`` around one kernel call; ``nth`` is the number of
    threads it may use (1: the kernel must take its serial path and open no parallel region).
    ``limit`` caps it (a small problem). numba's count for this Python thread is set to ``nth``
    for the call (``prange`` uses it) and restored; torch's is restored if numba changed it.
    (A class, not a generator context manager: this runs on every call, small ones included.)"""

    __slots__ = ("limit", "n_torch", "lock", "before")

    def __init__(self, limit: int | None = None):
        self.limit = limit

    def __enter__(self) -> int:
        global _numba_threads
        self.n_torch = n = torch.get_num_threads()
        self.lock = self.before = None
        if _forked:
            return 1
        layer = _layer or threading_layer()
        if _numba_threads is None:
            from numba.np.ufunc import parallel
            _numba_threads = getattr(parallel, "_get_num_threads", None) or numba.get_num_threads
        n = min(n, _numba_threads())
        if self.limit is not None:
            n = max(1, min(n, self.limit))
        if n > 1:
            if layer == "workqueue":
                _wq_lock.acquire()
                self.lock = _wq_lock
            before = _numba_threads()
            if before != n:
                numba.set_num_threads(n)
                self.before = before
        return n

    def __exit__(self, *exc) -> bool:
        if self.before is not None:
            numba.set_num_threads(self.before)
        if self.lock is not None:
            self.lock.release()
        if torch.get_num_threads() != self.n_torch:  # numba#9387
            torch.set_num_threads(self.n_torch)
        return False


# ---------------------------------------------------------------------------------------------
# scipy's OpenBLAS: one thread while kernels that call np.dot run
# ---------------------------------------------------------------------------------------------
_blas_lock = threading.Lock()
_blas_lib = None          # None: not looked up yet; False: not found
_blas_users = 0           # kernel calls in flight that need OpenBLAS on one thread
_blas_saved = None        # OpenBLAS's thread count before the first of them


def _openblas():
    """scipy's OpenBLAS (the BLAS behind numba's np.dot), or None. Call with _blas_lock held."""
    global _blas_lib
    if _blas_lib is None:
        _blas_lib = False
        try:
            import scipy
            import scipy.linalg.cython_blas  # noqa: F401  (loads the library)
        except ImportError:
            return None
        libdir = os.path.dirname(scipy.__file__) + ".libs"
        for path in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*"))):
            try:
                lib = ctypes.CDLL(path)  # already loaded: the same handle
                lib.scipy_openblas_get_num_threads.restype = ctypes.c_int
                lib.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
            except (OSError, AttributeError):
                continue
            _blas_lib = lib
            break
    return _blas_lib or None


class serial_blas:
    """``with serial_blas():`` OpenBLAS on one thread for the duration (reference-counted
    across Python threads: the first call in sets it, the last one out restores it)."""

    __slots__ = ("lib",)

    def __enter__(self):
        global _blas_users, _blas_saved
        with _blas_lock:
            self.lib = lib = _openblas()
            if lib is not None:
                if _blas_users == 0:
                    n = lib.scipy_openblas_get_num_threads()
                    if n != 1:
                        lib.scipy_openblas_set_num_threads(1)
                        _blas_saved = n
                _blas_users += 1
        return self

    def __exit__(self, *exc) -> bool:
        global _blas_users, _blas_saved
        if self.lib is not None:
            with _blas_lock:
                _blas_users -= 1
                if _blas_users == 0 and _blas_saved is not None:
                    self.lib.scipy_openblas_set_num_threads(_blas_saved)
                    _blas_saved = None
        return False


_choose_layer()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
