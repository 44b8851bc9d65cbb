"""bench/pagecache.py: what it counts as cached and what it drops (on a real file in the page cache)."""

from __future__ import annotations

import mmap
from pathlib import Path

from bench import pagecache


def _written(path: Path, size: int) -> Path:
    with path.open("wb") as out:  # buffered writes: the pages stay in the page cache
        for _ in range(size // 65536):
            out.write(b"\x7fELF" * 16384)
    return path


def test_a_written_library_is_counted_as_cached_and_then_dropped(tmp_path: Path) -> None:
    library = _written(tmp_path / "libdemo.so.1", 4 << 20)
    assert pagecache.resident(library) == 4 << 20
    dropped = pagecache.drop([library])
    assert (dropped.files, dropped.before, dropped.after) == (1, 4 << 20, 0)
    assert pagecache.resident(library) == 0


def test_pages_a_process_maps_stay_and_are_reported(tmp_path: Path) -> None:
    library = _written(tmp_path / "libmapped.so", 1 << 20)
    with library.open("rb") as file, mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        touched = sum(mapped[offset] for offset in range(0, 1 << 20, mmap.PAGESIZE))  # every page mapped
        assert touched
        dropped = pagecache.drop([library])
    assert dropped.before == 1 << 20
    assert dropped.after == 1 << 20


def test_only_shared_libraries_are_picked(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    for name in ("a.so", "libb.so.2600", "libc.so.6.1", "c.py", "d.sock", "e.so.bak", "f.so.2600.txt"):
        _written(tmp_path / "pkg" / name, 65536)
    (tmp_path / "pkg" / "link.so").symlink_to(tmp_path / "pkg" / "a.so")
    assert [p.name for p in pagecache.libraries(tmp_path)] == ["a.so", "libb.so.2600", "libc.so.6.1"]
