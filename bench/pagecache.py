"""The worker's shared libraries dropped from the page cache before a benchmark measures its RSS.

A process's RSS counts the pages of the files it maps — its shared libraries — that its page tables
hold, and how many of them a page fault maps depends on how the file's pages came into the page cache.
Seen on Linux 6.18 with ext4: a library just written through buffered writes, as ``pip install`` writes
a wheel's files, is mapped in far larger pieces than the same library read back by the faults
themselves. The worker ran the same code on the same rows both ways:

- in-process, first runs of 480k patients and 727k encounters: peak RSS 347–354 MB, 203 MB of it file
  pages, against 258–266 MB and 116 MB with the libraries read back; the worker's own memory, its
  anonymous pages, was 141–149 MB either way;
- ``python -m bench.clinical --sections rss --rss-sizes 100000``, first run and unchanged re-run of
  100k patients: 332.7 / 351.9 MB against 241.8 / 249.3 MB.

Those library pages are shared and clean: the page cache holds them whether or not the worker maps
them. So the benchmark measures every run in one state, that of a host whose libraries were loaded
from disk, and says how much it dropped and how much stayed (pages a running process maps stay).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import re
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from worker.libc import libc

_MAP_FAILED = ctypes.c_void_p(-1).value
_SHARED_LIBRARY = re.compile(r"\.so(\.[0-9]+)*$")


@dataclass(frozen=True)
class Dropped:
    files: int
    before: int  # bytes of those files in the page cache before
    after: int  # ... and after: pages mapped by a running process stay


def libraries(root: Path | None = None) -> list[Path]:
    """The shared libraries (``*.so``, ``*.so.N``) under ``root``: this interpreter's site-packages,
    from which the benchmark's worker runs, by default."""
    root = root if root is not None else Path(sysconfig.get_paths()["platlib"])
    return sorted(
        path
        for path in root.rglob("*.so*")
        if _SHARED_LIBRARY.search(path.name) and path.is_file() and not path.is_symlink()
    )


def resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (mincore of a mapping that touches nothing)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    c = _memory_calls()
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        address = c.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, descriptor, 0)
        if address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path.name} failed")
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vector = (ctypes.c_ubyte * pages)()
            if c.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path.name} failed")
            return sum(byte & 1 for byte in vector) * mmap.PAGESIZE
        finally:
            c.munmap(address, size)
    finally:
        os.close(descriptor)


@functools.cache
def _memory_calls() -> ctypes.CDLL:
    """The C library with ``mmap``, ``mincore`` and ``munmap`` typed, once."""
    c = libc(use_errno=True)
    c.mmap.restype = ctypes.c_void_p
    c.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    c.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    c.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return c


def drop(paths: Iterable[Path]) -> Dropped:
    """Ask the kernel to drop these files' cached pages (``POSIX_FADV_DONTNEED``, once any still waiting to
    be written are: a just-installed file's may be); what was and what is still cached."""
    files = before = after = 0
    for path in paths:
        before += resident(path)
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
        after += resident(path)
        files += 1
    return Dropped(files, before, after)
