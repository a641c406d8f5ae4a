"""JIT build and load of the compiled GSPN kernels (csrc/), with a clear
fallback to the pure-PyTorch reference.

The extension is built with ninja through ``torch.utils.cpp_extension.load``
the first time a scan runs (or by ``gspn-diffusers build``), into a cache
folder keyed by the torch version, the CUDA version and a hash of the sources
and flags, so a rebuild happens only when one of those changes.

Environment variables:

``GSPN_BACKEND``
    ``auto`` (default): compiled kernels, or the reference with one warning
    when they cannot be built. ``compiled``: fail loudly instead of falling
    back. ``reference``: never build; always use the pure-PyTorch scan.
``GSPN_CACHE_DIR``
    Where builds are kept (default ``$XDG_CACHE_HOME/gspn_diffusers`` or
    ``~/.cache/gspn_diffusers``).
``GSPN_BUILD_VERBOSE``
    ``1`` prints the compiler commands and output.
``GSPN_CUDA_SIM``
    ``1`` builds, instead, a variant in which CPU tensors run the CUDA kernels
    in a CPU simulator (``csrc/sim/``): slow, for testing the CUDA kernels'
    logic on machines without a GPU (CI runs the kernel tests through it).
``GSPN_NATIVE_ARCH``
    ``0`` builds the CPU kernels for the generic target instead of
    ``-march=native`` (the cache key includes this machine's CPU features, so
    a cache folder shared between different machines stays correct).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import library  # noqa: F401  (the op schemas must exist before kernels register)

ENV_BACKEND = "GSPN_BACKEND"
ENV_CACHE_DIR = "GSPN_CACHE_DIR"
ENV_VERBOSE = "GSPN_BUILD_VERBOSE"
ENV_NATIVE = "GSPN_NATIVE_ARCH"
ENV_CUDA_SIM = "GSPN_CUDA_SIM"
BACKEND_MODES = ("auto", "compiled", "reference")

SOURCES_CPU = ("gspn_scan.cpp",)
# One CUDA file per dtype: ninja compiles them in parallel (one file took ~2 min).
SOURCES_CUDA = tuple(f"gspn_scan_cuda{part}.cu" for part in ("", "_float64", "_float32", "_float16", "_bfloat16"))
# The CUDA sources as C++ against the CPU simulator of the CUDA kernels.
SOURCES_CUDA_SIM = ("sim/gspn_scan_cuda_sim.cpp",)
HEADERS = ("gspn_scan.h", "gspn_scan_cuda.cuh", "gspn_cuda_api.cuh", "sim/cuda_sim.h")
# -fno-trapping-math: no code here relies on floating-point traps, and without
# it GCC will not vectorise the branch-free clamps of the gate sigmoid.
CFLAGS = ("-O3", "-fno-trapping-math")
CUDA_CFLAGS = ("-O3", "-lineinfo")


class GSPNBuildWarning(UserWarning):
    """The compiled kernels could not be built; the reference scan is used."""


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """Which implementation serves each device type.

    ``cpu`` and ``cuda`` are ``"compiled"`` or ``"reference"`` (``cuda`` is
    ``"unavailable"`` when torch has no CUDA). ``reason`` says why something
    fell back; ``build_dir`` is where the compiled library lives.
    """

    cpu: str
    cuda: str
    reason: Optional[str] = None
    build_dir: Optional[Path] = None
    cuda_sim: bool = False  # CPU tensors run the CUDA kernels in the simulator

    def for_device(self, device_type: str) -> str:
        """The implementation used for tensors on ``device_type``."""
        return {"cpu": self.cpu, "cuda": self.cuda}.get(device_type, "reference")


class ExtensionBuildError(RuntimeError):
    """Raised instead of falling back when ``GSPN_BACKEND=compiled``."""


_status: Optional[BackendStatus] = None
_lock = threading.Lock()


def csrc_dir() -> Path:
    """The kernel sources: ``csrc/`` of a checkout, else the copy in the wheel."""
    checkout = Path(__file__).resolve().parents[2] / "csrc"
    if (checkout / HEADERS[0]).is_file():
        return checkout
    packaged = Path(__file__).resolve().parents[1] / "_csrc"  # where a wheel puts csrc/
    if (packaged / HEADERS[0]).is_file():
        return packaged
    raise FileNotFoundError(
        f"GSPN kernel sources not found (looked in {checkout} and {packaged}); reinstall gspn-diffusers"
    )


def cache_dir() -> Path:
    """Root folder of the build cache (``GSPN_CACHE_DIR`` overrides it)."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gspn_diffusers"


def _cuda_buildable() -> tuple[bool, Optional[str]]:
    """Whether CUDA kernels can be built here, and why not."""
    if _cuda_sim():  # the CUDA kernels then compile as C++ for the CPU tensors
        return False, f"{ENV_CUDA_SIM}=1: CPU tensors run the CUDA kernels in the CPU simulator (no CUDA build)"
    if torch.version.cuda is None:
        return False, None
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return False, (
            "torch has CUDA but the CUDA toolkit (nvcc) was not found; CUDA tensors use the "
            "slow reference scan. Fix: install the CUDA toolkit matching torch "
            f"({torch.version.cuda}) and set CUDA_HOME"
        )
    return True, None


def _cuda_sim() -> bool:
    """Whether to build the CUDA-simulator variant (``GSPN_CUDA_SIM=1``)."""
    return os.environ.get(ENV_CUDA_SIM, "0").strip() == "1"


def _sources(with_cuda: bool) -> tuple[str, ...]:
    """The translation units of a build (relative to csrc/)."""
    if _cuda_sim():
        return SOURCES_CPU + SOURCES_CUDA_SIM
    return SOURCES_CPU + (SOURCES_CUDA if with_cuda else ())


def _cpu_flags() -> list[str]:
    """-march=native: the recurrence loops vectorise with the widest units the CPU has."""
    return [] if os.environ.get(ENV_NATIVE, "1") == "0" else ["-march=native"]


def _openmp_flags() -> list[str]:
    """-fopenmp where torch threads with OpenMP: ``at::parallel_for`` is inline
    ATen code whose ``#pragma omp parallel`` is ignored without it, and the CPU
    kernels then run on one thread whatever ``torch.get_num_threads()`` says.
    The extension links the ``libgomp.so.1`` torch has already loaded."""
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its instruction-set flags."""
    signature = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                signature += line
    except OSError:
        signature += platform.processor()
    return signature


def _build_key(src: Path, with_cuda: bool, openmp: list[str]) -> str:
    digest = hashlib.sha256()
    # The simulator's unit #includes the CUDA sources, so they count for it too.
    names = HEADERS + _sources(with_cuda) + (SOURCES_CUDA if _cuda_sim() else ())
    for name in names:
        digest.update(name.encode())
        digest.update((src / name).read_bytes())
    # Paths too: ninja rebuilds when the command line (include and source paths)
    # changes, so two environments sharing one cache must not share a folder.
    digest.update(repr((CFLAGS, _cpu_flags(), openmp, CUDA_CFLAGS, with_cuda, _cuda_sim(), os.environ.get("TORCH_CUDA_ARCH_LIST"),
                        str(src), str(Path(torch.__file__).parent), sys.executable)).encode())
    if _cpu_flags():
        digest.update(_cpu_signature().encode())
    return digest.hexdigest()[:16]


def _check_toolchain() -> None:
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise ExtensionBuildError(
            f"no C++ compiler: '{compiler}' is not on PATH. Fix: install one (e.g. `apt install g++`) "
            "or point the CXX environment variable at it"
        )
    if not is_ninja_available():
        raise ExtensionBuildError("ninja is not installed. Fix: `pip install ninja`")


# Written into the build folder of a build that failed with OpenMP flags, so
# later processes go straight to the build without them.
OPENMP_FAILED_MARKER = "openmp-build-failed"


def _build_and_load(verbose: bool) -> BackendStatus:
    _check_toolchain()
    openmp = _openmp_flags()
    if not openmp:
        return _compile(openmp, verbose)
    try:
        return _compile(openmp, verbose)
    except ExtensionBuildError as exc:
        try:
            status = _compile([], verbose)
        except ExtensionBuildError:
            raise exc from None
        (_build_dir(openmp) / OPENMP_FAILED_MARKER).write_text(str(exc))
        # Typically clang without its OpenMP runtime: the kernels still work.
        warnings.warn(
            "gspn-diffusers: the GSPN kernels built only without -fopenmp, so the CPU kernels run on one "
            f"thread. Fix: build with g++ (CXX=g++) or install the compiler's OpenMP runtime (e.g. libomp-dev). "
            f"The failed build: {str(exc).splitlines()[0]}",
            GSPNBuildWarning,
            stacklevel=4,
        )
        return status


def _build_dir(openmp: list[str]) -> Path:
    """<cache>/<torch and CUDA version>/<hash of sources and flags>."""
    with_cuda, _ = _cuda_buildable()
    tag = f"torch{torch.__version__}" + (f"-cuda{torch.version.cuda}" if with_cuda else "")
    tag += "-cudasim" if _cuda_sim() else ""
    return cache_dir() / tag.replace("+", "_") / _build_key(csrc_dir(), with_cuda, openmp)


def _compile(openmp: list[str], verbose: bool) -> BackendStatus:
    from torch.utils import cpp_extension

    src = csrc_dir()
    with_cuda, cuda_reason = _cuda_buildable()
    build_dir = _build_dir(openmp)
    key = build_dir.name
    build_dir.mkdir(parents=True, exist_ok=True)
    if openmp and (build_dir / OPENMP_FAILED_MARKER).exists():
        raise ExtensionBuildError(f"building with {' '.join(openmp)} failed before in {build_dir}")
    sim = _cuda_sim()
    sources = [str(src / name) for name in _sources(with_cuda)]
    cflags = list(CFLAGS) + _cpu_flags() + openmp + (["-DGSPN_WITH_CUDA"] if with_cuda or sim else [])
    # The CUDA sources' launch lambdas capture types of their anonymous
    # namespace; included into another file, GCC warns about each of them.
    cflags += ["-DGSPN_CUDA_SIM", "-Wno-subobject-linkage"] if sim else []
    try:
        cpp_extension.load(
            name=f"gspn_kernels_{'sim_' if sim else ''}{key}",
            sources=sources,
            extra_cflags=cflags,
            extra_cuda_cflags=list(CUDA_CFLAGS),
            extra_ldflags=list(openmp),  # torch appends its own flags to this list in place
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # the compiler's output is in the message
        raise ExtensionBuildError(f"building the GSPN kernels failed in {build_dir}:\n{exc}") from exc
    if torch.version.cuda is None:
        cuda = "unavailable"
    else:
        cuda = "compiled" if with_cuda else "reference"
    return BackendStatus(cpu="compiled", cuda=cuda, reason=cuda_reason, build_dir=build_dir, cuda_sim=sim)


def load_backend(force: bool = False) -> BackendStatus:
    """Build (if needed) and load the compiled kernels; return what serves each device.

    Called automatically by the first scan. In ``auto`` mode a failed build
    warns once (:class:`GSPNBuildWarning`) and the reference is used.
    """
    global _status
    with _lock:
        if _status is not None and not force:
            return _status
        mode = os.environ.get(ENV_BACKEND, "auto").strip().lower()
        if mode not in BACKEND_MODES:
            raise ValueError(f"{ENV_BACKEND}={mode!r} is not one of {BACKEND_MODES}")
        no_cuda = "unavailable" if torch.version.cuda is None else "reference"
        if mode == "reference":
            _status = BackendStatus(cpu="reference", cuda=no_cuda, reason=f"{ENV_BACKEND}=reference")
            return _status
        try:
            _status = _build_and_load(verbose=os.environ.get(ENV_VERBOSE, "0") == "1")
        except (ExtensionBuildError, FileNotFoundError, OSError) as exc:
            if mode == "compiled":
                raise ExtensionBuildError(f"{exc}\n({ENV_BACKEND}=compiled forbids the reference fallback)") from exc
            warnings.warn(
                f"gspn-diffusers: compiled GSPN kernels unavailable, using the pure-PyTorch reference "
                f"scan (correct but much slower). Cause: {exc}\nSet {ENV_BACKEND}=reference to silence "
                "this warning.",
                GSPNBuildWarning,
                stacklevel=3,
            )
            _status = BackendStatus(cpu="reference", cuda=no_cuda, reason=str(exc))
        if _status.reason and _status.cuda == "reference" and torch.cuda.is_available():
            warnings.warn(f"gspn-diffusers: {_status.reason}", GSPNBuildWarning, stacklevel=3)
        return _status


@torch.compiler.assume_constant_result
def uses_compiled_kernels(device_type: str) -> bool:
    """True when scans of tensors on ``device_type`` run the compiled kernels.

    A constant for torch.compile, so choosing the backend never breaks a graph.
    """
    return load_backend().for_device(device_type) == "compiled"
