"""Triton kernels for fastrnn. Import a kernel module only after deciding on ``TRITON_INTERPRET``:
``@triton.jit`` reads it when a kernel is decorated, not when it runs."""
