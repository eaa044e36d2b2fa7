"""Build of the optional compiled kernels (``csrc/`` -> ``grit_kernels._C``); metadata is in pyproject.toml.

* The C++ CPU extension is built when torch is importable in the build environment and a C++
  compiler works. Without them the package installs anyway (the ``torch`` backend is used) and one
  line on stderr says why (``pip install -v`` shows it).
* torch is deliberately *not* a build requirement: under pip's default build isolation it would be
  downloaded into the build environment (a CUDA wheel of several GB). Build against the installed
  torch with ``pip install --no-build-isolation -e .``; an isolated build skips the extension, and
  ``GRIT_KERNELS_JIT=1`` JIT-compiles it from ``csrc/`` at first use instead.
* The CUDA kernels are added when torch has CUDA and nvcc is found, or when
  ``GRIT_KERNELS_BUILD_CUDA=1`` (``0`` disables them). ``GRIT_KERNELS_NO_EXT=1`` skips compiling.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

NAME = "grit_kernels._C"
CPU_SOURCES = ["csrc/grit_cpu.cpp"]
CUDA_SOURCES = ["csrc/grit_cuda.cu"]


def notice(msg: str) -> None:
    print(f"grit-kernels: {msg}; the torch backend will be used", file=sys.stderr)


def extension_build():
    """Return ``(ext_modules, cmdclass)``; empty when the extension cannot or should not be built."""
    if os.environ.get("GRIT_KERNELS_NO_EXT", "0") == "1":
        notice("GRIT_KERNELS_NO_EXT=1, compiled kernels not built")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # build isolation: no torch in the build environment
        notice(
            f"torch not importable in the build environment ({type(exc).__name__}), compiled kernels not built "
            "(use pip install --no-build-isolation, or GRIT_KERNELS_JIT=1 at run time)"
        )
        return [], {}

    want_cuda = os.environ.get("GRIT_KERNELS_BUILD_CUDA")
    with_cuda = want_cuda == "1" or (want_cuda is None and bool(torch.version.cuda) and CUDA_HOME is not None)
    cxx_flags = ["-O3", "-fopenmp"]
    if with_cuda:
        ext = CUDAExtension(
            NAME,
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
        )
    else:
        ext = CppExtension(NAME, CPU_SOURCES, extra_compile_args={"cxx": cxx_flags})

    class OptionalBuildExtension(BuildExtension):
        """Compile failures (no compiler, broken toolchain) leave the package installable without ``_C``."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                notice(f"compiling {NAME} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
                self.extensions = []

        def get_outputs(self):
            return [p for p in super().get_outputs() if os.path.exists(p)]

        def copy_extensions_to_source(self):
            if self.extensions:
                super().copy_extensions_to_source()

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
