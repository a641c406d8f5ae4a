"""Compile every csrc/*.cu with `nvcc -c` (no GPU or CUDA torch needed), so a
kernel that does not compile fails CI. Skips with a message when nvcc is absent.

Uses the include paths and the nvcc flags torch's extension builder uses, for
the Hopper target (sm_90) and a generic one (sm_80). A CPU build of torch ships
the c10/cuda headers but not the one CMake generates for them
(c10/cuda/impl/cuda_cmake_macros.h); a stand-in with the same single define is
put on the include path for this check only.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90")


def nvcc_flags() -> list:
    """torch's extension flags plus ours (as gspn_diffusers.ops.build compiles the kernels)."""
    return list(cpp_extension.COMMON_NVCC_FLAGS) + ["-std=c++20", "-O3", "-DGSPN_WITH_CUDA", "-Xcompiler", "-fPIC"]


def compile_one(nvcc: str, source: Path, flags: list, output: Path = None,
                targets=ARCHS, mode: str = "-c") -> subprocess.CompletedProcess:
    """nvcc of one source (`mode` -c: an object, -cubin: a cubin) into `output`,
    by default a throw-away file."""
    with tempfile.TemporaryDirectory() as tmp:
        includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{ROOT / 'csrc'}"]
        if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in cpp_extension.include_paths()):
            stub = Path(tmp, "stub", "c10", "cuda", "impl", "cuda_cmake_macros.h")
            stub.parent.mkdir(parents=True)
            stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
            includes.append(f"-I{Path(tmp, 'stub')}")
        out = str(output or Path(tmp) / "out.o")
        cmd = [nvcc, mode, str(source), "-o", out, *targets, *flags, *includes]
        return subprocess.run(cmd, capture_output=True, text=True)


def main() -> int:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("check_cuda_compiles: nvcc not found, CUDA sources not compiled")
        return 0
    flags = nvcc_flags()
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    # One nvcc per file on every core: the kernels are split by dtype for this.
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        procs = list(pool.map(lambda source: compile_one(nvcc, source, flags), sources))
    failed = 0
    for source, proc in zip(sources, procs):
        warnings = [line for line in proc.stderr.splitlines() if "warning" in line.lower()]
        status = "ok" if proc.returncode == 0 else "FAILED"
        print(f"nvcc -c {source.relative_to(ROOT)}: {status}" + (f" ({len(warnings)} warnings)" if warnings else ""))
        if warnings and proc.returncode == 0:
            print("\n".join(f"  {line}" for line in warnings))
        if proc.returncode != 0:
            failed += 1
            print(proc.stdout + proc.stderr, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
