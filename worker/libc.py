"""The C library through ctypes, and the one system call the standard library does not wrap."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from typing import Any

_SYS_OPENAT2 = 437  # the same number on every architecture of the generic table (x86-64, arm64, …)
_O_PATH = getattr(os, "O_PATH", 0o10000000)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08


@functools.cache
def libc(*, use_errno: bool = False) -> ctypes.CDLL:
    """The C library by its glibc name; elsewhere as ``ctypes.util`` finds it (an ``ldconfig`` run and
    ~10 ms of imports, so not on glibc, where every worker command starts here)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=use_errno)
    except OSError:
        from ctypes.util import find_library

        return ctypes.CDLL(find_library("c"), use_errno=use_errno)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_DIRECTORY_BENEATH = _OpenHow(  # an O_PATH descriptor of a directory: no symlink, nothing outside
    _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
)
_HOW_SIZE = ctypes.sizeof(_OpenHow)
_openat2_works = True  # until the kernel (before 5.6) or a seccomp filter says otherwise


def open_directory_beneath(directory: int, path: str) -> int | None:
    """An ``O_PATH`` descriptor of the directory ``path`` under ``directory``, resolved in one ``openat2``
    call that refuses any symlink on the way and anything outside ``directory``; ``None`` whenever that
    call fails, for whatever reason (a symlink, a missing part, an old kernel): the caller then walks
    the path part by part, which tells those cases apart. One system call instead of two per part,
    each of which gives up the GIL and may wait to get it back."""
    global _openat2_works
    if not _openat2_works:
        return None
    try:
        call = _openat2_call()
    except (OSError, AttributeError):
        _openat2_works = False
        return None
    descriptor = call(_SYS_OPENAT2, directory, os.fsencode(path), ctypes.byref(_DIRECTORY_BENEATH), _HOW_SIZE)
    if descriptor >= 0:
        return int(descriptor)
    if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # no openat2 here: walk from now on
        _openat2_works = False
    return None


@functools.cache
def _openat2_call() -> Any:
    """``syscall(2)`` typed for openat2's arguments, so a call converts nothing in Python."""
    call = libc(use_errno=True).syscall
    call.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    call.restype = ctypes.c_long
    return call
