"""Numba kernels for fastrnn's ``"numba"`` backend (see ``fastrnn.backends.numba_rnn``).

Everything that Numba compiles lives in one file, ``rnn_kernels.py``: Numba's on-disk cache
checks only the timestamp of the file that defines a cached function, so a helper kept in a
second file could change without invalidating the cached kernels that inlined it.

This package is imported only when the numba backend is used; ``import fastrnn`` never
imports numba.
"""
