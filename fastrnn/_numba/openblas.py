"""Thread control of the BLAS that the numba kernels call: scipy's bundled OpenBLAS.

The kernels call ``scipy.linalg.cython_blas``, which is scipy's own copy of OpenBLAS with its
own thread pool (separate from torch's OpenMP / MKL threads and from numba's pool). Its thread
count is set through the library's C API; there is no Python API for it. Plain ctypes, no numba.
"""
from __future__ import annotations

import ctypes
import glob
import os

_lib: ctypes.CDLL | None | bool = None  # None: not looked up yet; False: not found


def _library():
    global _lib
    if _lib is None:
        _lib = False
        try:
            import scipy
            import scipy.linalg.cython_blas  # noqa: F401  (loads the library)
        except ImportError:
            return None
        libdir = os.path.dirname(scipy.__file__) + ".libs"  # auditwheel's bundled-library folder
        for path in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*"))):
            try:
                lib = ctypes.CDLL(path)  # already loaded by scipy: the same handle
                lib.scipy_openblas_get_num_threads.restype = ctypes.c_int
                lib.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
                lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
            except (OSError, AttributeError):
                continue
            _lib = lib
            break
    return _lib or None


def get_num_threads() -> int | None:
    """Threads of scipy's OpenBLAS, or None if it cannot be found (another BLAS build)."""
    lib = _library()
    return None if lib is None else int(lib.scipy_openblas_get_num_threads())


def set_num_threads(n: int) -> bool:
    """Set scipy's OpenBLAS thread count; False if the library cannot be found."""
    lib = _library()
    if lib is None:
        return False
    lib.scipy_openblas_set_num_threads(int(n))
    return True


def corename() -> str | None:
    """The kernel family OpenBLAS picked for this CPU (e.g. 'Haswell', 'SkylakeX')."""
    lib = _library()
    return None if lib is None else lib.scipy_openblas_get_corename().decode()
