"""Build script. Metadata lives in pyproject.toml.

The compiled extension ``fsinfo_fast._C`` (csrc/: C++ CPU ops, CUDA ops) is optional. It is built
with torch.utils.cpp_extension when torch is importable at build time (install with
``pip install --no-build-isolation -e .`` after torch); a missing torch, compiler or nvcc, or a
failed compilation, never fails the install: a warning is printed and the pure-Python package is
installed (the compiled backends then report themselves unavailable).

Environment:
    FSINFO_FAST_NO_EXT=1       do not build the extension at all.
    FSINFO_FAST_BUILD_CUDA=1   build the CUDA kernels even without a visible GPU (needs nvcc and a
                               CUDA build of torch); =0 never builds them. Unset: CUDA kernels are
                               built when nvcc, a CUDA torch and a GPU are all present.
    MAX_JOBS, TORCH_CUDA_ARCH_LIST   as for any torch extension.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
EXT_NAME = "fsinfo_fast._C"


def _warn(msg: str) -> None:
    bar = "*" * 78
    print(
        f"\n{bar}\nfsinfo_fast: {msg}\nInstalling the pure-Python package: the compiled "
        f"'cpp'/'cuda' backends will be unavailable (see csrc/README.md).\n{bar}\n",
        file=sys.stderr,
        flush=True,
    )


def _env_flag(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


def _rel(paths) -> list[str]:
    return sorted(str(p.relative_to(ROOT)).replace(os.sep, "/") for p in paths)


def _cuda_wanted(torch, cpp_extension) -> tuple[bool, str]:
    flag = _env_flag("FSINFO_FAST_BUILD_CUDA")
    if flag in ("0", "false", "no", "off"):
        return False, "FSINFO_FAST_BUILD_CUDA=0"
    requested = flag in ("1", "true", "yes", "on")
    home = cpp_extension.CUDA_HOME
    nvcc = shutil.which("nvcc") or (home and os.path.exists(os.path.join(home, "bin", "nvcc")))
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU build")
    if not nvcc or home is None:
        reasons.append("nvcc / CUDA_HOME not found")
    if not requested and not reasons and not torch.cuda.is_available():
        reasons.append("no GPU visible (set FSINFO_FAST_BUILD_CUDA=1 to build anyway)")
    if reasons and requested:
        _warn(
            "FSINFO_FAST_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
            + "; ".join(reasons)
            + ". Building the CPU ops only."
        )
    return not reasons, "; ".join(reasons)


def _extension_setup() -> dict:
    if _env_flag("FSINFO_FAST_NO_EXT") not in ("", "0", "false", "no", "off"):
        print(
            "fsinfo_fast: FSINFO_FAST_NO_EXT set; not building the C++ extension", file=sys.stderr
        )
        return {}
    cpu_sources = _rel(CSRC.glob("*.cpp"))
    if not cpu_sources:
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # build isolation, or no torch yet
        _warn(
            f"torch is not importable at build time ({exc}); the C++ extension is skipped. "
            "Install torch first, then `pip install --no-build-isolation -e .`."
        )
        return {}

    with_cuda, why_not = _cuda_wanted(torch, cpp_extension)
    cxx_flags = ["-O2", "-g0", "-fopenmp-simd"]
    common = dict(include_dirs=[str(CSRC)], define_macros=[])
    if with_cuda:
        sources = (
            cpu_sources + _rel((CSRC / "cuda").glob("*.cpp")) + _rel((CSRC / "cuda").glob("*.cu"))
        )
        common["define_macros"].append(("FSINFO_FAST_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            EXT_NAME,
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O2"]},
            **common,
        )
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to detect the architecture from: build for A100 / H100 (not every arch).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        print(
            "fsinfo_fast: building the C++ extension with CUDA kernels (arch list: "
            f"{os.environ.get('TORCH_CUDA_ARCH_LIST') or 'the visible GPU'})",
            file=sys.stderr,
        )
    else:
        ext = cpp_extension.CppExtension(
            EXT_NAME, cpu_sources, extra_compile_args=cxx_flags, **common
        )
        print(f"fsinfo_fast: building the C++ extension (CPU ops only: {why_not})", file=sys.stderr)

    class TolerantBuildExtension(cpp_extension.BuildExtension):
        """BuildExtension whose failure leaves a working pure-Python install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                _warn(f"building the C++ extension failed: {exc}")

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:
                _warn(f"building {extension.name} failed: {exc}")

        def get_outputs(self):  # only what was actually built (editable installs copy these)
            return [p for p in super().get_outputs() if os.path.exists(p)]

    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": TolerantBuildExtension},
    }


setup(**_extension_setup())
