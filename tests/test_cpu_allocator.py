"""keep_freed_cpu_memory: large CPU buffers stay in the heap instead of mmap."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# In a child process: the tuning is process-wide.
PROBE = textwrap.dedent("""
    import ctypes
    from gspn_diffusers.cpu_allocator import keep_freed_cpu_memory

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc.mallinfo2.restype = MallInfo2

    def mmapped_after_malloc():
        block = libc.malloc(16 << 20)
        mapped = libc.mallinfo2().hblkhd
        libc.free(block)
        return mapped

    before = mmapped_after_malloc()
    applied = keep_freed_cpu_memory()
    print(before >= 16 << 20, applied, mmapped_after_malloc() < 16 << 20)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_large_buffers_leave_mmap_once_tuned():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "True", "True"]
