"""Numba kernels for fastrnn's ``"numba"`` backend (``fastrnn.backends.numba_rnn``,
``fastrnn.backends.numba_sdpa``).

One file per op family, and everything a cached kernel inlines lives in that same file
(``rnn_kernels.py`` for the recurrence): Numba's on-disk cache checks only the timestamp of
the file that defines a cached function, so a helper kept in another file could change
without invalidating the cached kernels that inlined it.

``runtime.py`` is what both families need from the process: the checked on-disk cache
(``runtime.jit``), the threading layer, fork children, concurrent Python threads, OpenBLAS.

This package is imported only when the numba backend is used; ``import fastrnn`` never
imports numba.
"""
