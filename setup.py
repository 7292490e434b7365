"""Builds the optional C++ extensions in csrc/ against the installed torch.

Install with ``pip install --no-build-isolation -e .`` (torch must already be installed: an
isolated build would compile against a different torch than the one that runs the code).
``FASTRNN_SKIP_CPP_BUILD=1`` skips the extensions, ``FASTRNN_EXTENSIONS=rnn`` (comma list)
builds only those; a failed build only warns, and the ``cpp``
backend then reports itself unavailable with the reason.
"""
import os
import sys

from setuptools import setup

# one extension per op family, so a broken or missing source only disables its own ops
EXTENSIONS = {"fastrnn._C_rnn": "csrc/rnn.cpp", "fastrnn._C_sdpa": "csrc/sdpa.cpp",
              "fastrnn._C_decoder": "csrc/decoder.cpp"}


def _extensions():
    if os.environ.get("FASTRNN_SKIP_CPP_BUILD") == "1":
        print("fastrnn: FASTRNN_SKIP_CPP_BUILD=1, not building the C++ extensions", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        print(f"fastrnn: torch not importable ({exc}); C++ extensions skipped. Install torch first "
              "and use `pip install --no-build-isolation`.", file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """A failed compile becomes a warning: the package works without the cpp backend."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # torch's ninja build raises RuntimeError, not CompileError
                print(f"fastrnn: WARNING: building {ext.name} failed ({exc}); the cpp backend "
                      "will report itself unavailable", file=sys.stderr)

    # -fopenmp: at::parallel_for is an OpenMP template in the headers; torch ships libgomp.so.1,
    # so the extension shares torch's OpenMP runtime (same soname) rather than loading a second.
    cxx = ["-O3", "-fopenmp", "-std=c++20"]
    if torch.backends.mkl.is_available():
        cxx.append("-DFASTRNN_MKL")  # libtorch_cpu exports MKL's (packed) GEMM entry points
    only = [o for o in os.environ.get("FASTRNN_EXTENSIONS", "").split(",") if o]
    exts = [CppExtension(name, [src], extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
                         depends=["csrc/vec_math.h", "csrc/gemm.h"])
            for name, src in EXTENSIONS.items()
            if os.path.exists(src) and (not only or name.rsplit("_", 1)[-1] in only)]
    return exts, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
