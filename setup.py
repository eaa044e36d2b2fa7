"""Build of the optional compiled kernels (``csrc/`` -> ``grit_kernels._C``); metadata is in pyproject.toml.

* The C++ CPU extension is built when torch is importable in the build environment and a C++
  compiler works. Without them the package installs anyway (the ``torch`` backend is used) and one
  line on stderr says why (``pip install -v`` shows it).
* torch is deliberately *not* a build requirement: under pip's default build isolation it would be
  downloaded into the build environment (a CUDA wheel of several GB). Instead the build uses the
  torch already installed for the interpreter pip runs (found with ``python -I``; or
  ``pip install --no-build-isolation -e .``). Where torch is not installed yet (``pip install torch -e .``
  in a fresh venv installs both in one go) the extension is skipped; reinstall, or set
  ``GRIT_KERNELS_JIT=1`` to JIT-compile ``csrc/`` at first use.
* The CUDA kernels are added when torch has CUDA and nvcc is found, or when
  ``GRIT_KERNELS_BUILD_CUDA=1`` (``0`` disables them). ``GRIT_KERNELS_NO_EXT=1`` skips compiling.
"""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools import setup

NAME = "grit_kernels._C"
CPU_SOURCES = ["csrc/grit_cpu.cpp"]
CUDA_SOURCES = ["csrc/grit_cuda.cu"]


def notice(msg: str) -> None:
    print(f"grit-kernels: {msg}; the torch backend will be used", file=sys.stderr)


def use_installed_torch() -> None:
    """Under pip's build isolation, build against the torch already installed for this interpreter.

    pip runs the build with the target interpreter but hides its site-packages; ``python -I`` (no
    PYTHONPATH, so no isolation overlay) finds them. Their path is *appended* to ``sys.path``, so the
    build environment's own setuptools stays first. Nothing is downloaded: without an installed torch
    the extension is skipped.
    """
    if os.environ.get("GRIT_KERNELS_NO_EXT", "0") == "1":
        return
    try:
        import torch  # noqa: F401

        return
    except ImportError:
        pass
    if "torch" in sys.modules:  # imported and refused (tests simulate a build env without torch)
        return
    probe = "import importlib.util as u, os; s = u.find_spec('torch'); print(os.path.dirname(os.path.dirname(s.origin)) if s else '')"
    try:
        found = subprocess.run(
            [sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return
    site = found.stdout.strip()
    if found.returncode == 0 and site and site not in sys.path:
        sys.path.append(site)


def extension_build():
    """Return ``(ext_modules, cmdclass)``; empty when the extension cannot or should not be built."""
    if os.environ.get("GRIT_KERNELS_NO_EXT", "0") == "1":
        notice("GRIT_KERNELS_NO_EXT=1, compiled kernels not built")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001 -- build isolation: no (working) torch in the build environment
        notice(
            f"torch not importable in the build environment ({type(exc).__name__}) nor installed in the target "
            "one, compiled kernels not built (install torch first, or use pip install --no-build-isolation, "
            "or GRIT_KERNELS_JIT=1 at run time)"
        )
        return [], {}

    want_cuda = os.environ.get("GRIT_KERNELS_BUILD_CUDA")
    with_cuda = want_cuda == "1" or (want_cuda is None and bool(torch.version.cuda) and CUDA_HOME is not None)
    cxx_flags = ["-O3", "-fopenmp"]
    if with_cuda:
        ext = CUDAExtension(
            NAME,
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        )
    else:
        ext = CppExtension(NAME, CPU_SOURCES, extra_compile_args={"cxx": cxx_flags})

    class OptionalBuildExtension(BuildExtension):
        """Compile failures (no compiler, broken toolchain) leave the package installable without ``_C``."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 -- any compiler failure leaves an installable package
                notice(f"compiling {NAME} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
                self.extensions = []

        def get_outputs(self):
            return [p for p in super().get_outputs() if os.path.exists(p)]

        def copy_extensions_to_source(self):
            if self.extensions:
                super().copy_extensions_to_source()

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


use_installed_torch()
ext_modules, cmdclass = extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
