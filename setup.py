"""Builds the compiled extension ``reasonrl._C`` from csrc/. Everything else lives in pyproject.toml.

No network, no git, no nvidia-smi. Environment variables:

* ``MAX_JOBS``: parallel compile jobs (default: derived from cores and memory).
* ``DEBUG=1``: ``-O0 -g`` instead of ``-O3``.
* ``REASONRL_CPU_ISAS``: comma list of ISA variants to build on x86-64 (default ``avx2,avx512``).

The extension holds the CPU kernels only (on GPUs the ops run the Triton kernels of kernels/). The row
kernels are compiled once per ISA (csrc/cpu/isa/row_kernels_<isa>.cpp; the ISA is the file name's suffix)
with that ISA's flags and the CPU_CAPABILITY macros, exactly as ATen builds its own kernels, so
at::vec::Vectorized becomes real SIMD code; the extension picks a variant at run time
(at::get_cpu_capability(), row_kernels() in csrc/cpu/cpu_utils.h). The per-ISA objects are
compiled here, before torch's (ninja) build of the extension, and linked in as extra objects, because
setuptools has no per-source compiler flags.
"""

from __future__ import annotations

import glob
import os
import platform
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"
OPT_FLAGS = ["-O0", "-g"] if DEBUG else ["-O3"]

# Flags per ISA variant, as in ATen's CMake (cmake/Codegen.cmake): the macros select the Vectorized
# implementation, the -m flags let the compiler emit the instructions.
ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
}


def max_jobs() -> int:
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    cores = os.cpu_count() or 1
    try:  # about 2 GiB of memory per compile job of torch headers
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        return max(1, min(cores, int(mem_gib // 2)))
    except (ValueError, OSError, AttributeError):
        return cores


def cpu_isas() -> list[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []  # aarch64 and others: the default variant (NEON/SVE come through ATen's own headers)
    wanted = os.environ.get("REASONRL_CPU_ISAS", "avx2,avx512")
    return [isa for isa in (s.strip() for s in wanted.split(",")) if isa in ISA_FLAGS and isa != "default"]


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension plus the per-ISA CPU objects, compiled first with their own flags."""

    def build_extensions(self) -> None:
        for ext in self.extensions:
            ext.extra_objects = list(ext.extra_objects or []) + self._build_isa_objects(ext)
        super().build_extensions()

    def _build_isa_objects(self, ext) -> list[str]:
        cxx = shlex.split(os.environ.get("CXX", "c++"))
        includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{os.path.join(ROOT, 'csrc')}"]
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
        common = ["-std=c++20", "-fPIC", "-fvisibility=hidden", abi, *OPT_FLAGS, *includes]
        out_dir = os.path.join(self.build_temp, "isa")
        os.makedirs(out_dir, exist_ok=True)
        jobs = []
        for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "isa", "*.cpp"))):
            isa = os.path.splitext(os.path.basename(src))[0].rsplit("_", 1)[1]
            if isa != "default" and isa not in cpu_isas():
                continue
            obj = os.path.join(out_dir, os.path.basename(src)[:-4] + ".o")
            jobs.append([*cxx, *common, *ISA_FLAGS[isa], "-c", src, "-o", obj])
        # Rebuild only when a source or header under csrc/cpu changed (editable re-installs stay fast).
        newest_input = max(os.path.getmtime(p)
                           for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "**", "*"), recursive=True))

        def compile_one(cmd: list[str]) -> str:
            obj = cmd[-1]
            if os.path.exists(obj) and os.path.getmtime(obj) > newest_input and not DEBUG:
                return obj
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            return obj

        with ThreadPoolExecutor(max_workers=max_jobs()) as pool:
            return list(pool.map(compile_one, jobs))


def extension():
    isas = cpu_isas()
    define_macros = [(f"REASONRL_HAVE_{isa.upper()}", "1") for isa in isas]
    cxx_flags = ["-std=c++20", "-fopenmp", *OPT_FLAGS]
    sources = [os.path.join("csrc", "reasonrl.cpp")] + sorted(
        p for p in glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    )
    print(f"reasonrl: CPU ISA variants: default{''.join(',' + i for i in isas)}")
    return cpp_extension.CppExtension(
        name="reasonrl._C",
        sources=sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


os.environ.setdefault("MAX_JOBS", str(max_jobs()))
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
