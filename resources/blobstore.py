"""The blob store (``BLOB_STORE_URL``, DESIGN §5 "App"): where file contents land, verified before they count.

A local folder (a path or ``file://``) by default; ``s3://bucket/prefix`` and ``gs://bucket/prefix`` through
fsspec's s3fs/gcsfs (the ``s3``/``gs`` extras, imported only when such a URL is used). A blob is written to a
temporary key under ``.partial/`` while its SHA-256 is computed, read back from the store and hashed again, and
moved to its key (``files/{user_id}/{file_id}``) only when both hashes agree — so a key only ever holds
complete, verified content.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
import posixpath
import queue
import re
import stat as stat_module
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import fsspec
from fsspec.implementations.local import LocalFileSystem

from resources.errors import Category, MigrationError
from resources.media import ChecksumMismatch, MediaSource, MissingBlob

CHUNK_BYTES = 1024 * 1024
# A file's first read: most media files are far smaller than a chunk, and a 1 MiB read buffer is mapped and
# unmapped for each (past malloc's mmap threshold), ~21 µs a file against ~6.5 µs for a 64 KiB one (3,000
# files of 3 KB on tmpfs, 2026-12-05); a copy reads each file twice (the source, then the blob it wrote).
FIRST_CHUNK_BYTES = 64 * 1024
# Object stores: multipart upload parts and read-ahead ranges (S3's minimum part is 5 MiB). Bounds memory.
BLOCK_BYTES = 8 * 1024 * 1024
PARTIAL_PREFIX = ".partial"
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs"}
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")


@dataclass(frozen=True)
class Blob:
    key: str
    url: str
    size: int
    sha256: str | None = None  # lower-case hex; None when not computed (``stat``)


@dataclass(frozen=True)
class CopyResult:
    key: str
    url: str
    size: int
    sha256: str


@functools.lru_cache(maxsize=4096)  # a file's key is checked by every step of its copy
def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError("blob key must be relative '/'-separated names of letters, digits, '.', '_' and '-'")
    return key


def _normalize_sha256(value: str) -> str:
    return value.strip().lower()


class BlobStore:
    """A folder or bucket prefix on fsspec. ``storage_options`` go to the filesystem (e.g. ``endpoint_url``,
    ``key``/``secret`` for s3fs); they are never logged or put in errors."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
        try:
            fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except ImportError:
            extra = _EXTRAS.get(protocol)
            hint = f"install the '{extra}' extra (pip install 'migration-platform[{extra}]')" if extra else ""
            raise MigrationError(
                Category.VALIDATION_ERROR,
                f"BLOB_STORE_URL uses {protocol}:// but its fsspec driver is not installed"
                + (f": {hint}" if hint else ""),
                ours=True,
            ) from None
        except ValueError:
            raise MigrationError(
                Category.VALIDATION_ERROR, f"BLOB_STORE_URL uses an unknown scheme ({protocol}://)", ours=True
            ) from None
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = str(root).rstrip("/")
        self.local = isinstance(fs, LocalFileSystem)
        self._folders: set[str] = set()  # local folders known to exist (bounded by the users' count)
        self._prefix, self._serial = uuid.uuid4().hex, itertools.count()
        if self.local:
            self.fs.makedirs(self.root, exist_ok=True)

    # -- paths -------------------------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return f"{self.root}/{_check_key(key)}"

    def url(self, key: str) -> str:
        """The blob's address with its scheme (``file:///…``, ``s3://bucket/…``), as stored in ``blob_url``."""
        if self.local:  # what LocalFileSystem.unstrip_protocol gives for the (already stripped) root's paths
            return f"file://{self._path(key)}"
        return str(self.fs.unstrip_protocol(self._path(key)))

    def _temporary(self) -> str:
        """A new name under ``.partial/``: this store's random prefix and a serial number (no system call)."""
        return f"{self.root}/{PARTIAL_PREFIX}/{self._prefix}-{next(self._serial)}"

    def _prepare_parent(self, path: str) -> None:
        if self.local:  # object stores have no directories
            parent = posixpath.dirname(path)
            if parent not in self._folders:  # made (or found) once per store: a mkdir per blob costs a syscall
                os.makedirs(parent, exist_ok=True)
                self._folders.add(parent)

    # -- reading -----------------------------------------------------------------------------------------------

    def _open_read(self, path: str) -> BinaryIO:
        return self.fs.open(path, "rb", block_size=BLOCK_BYTES, cache_type="readahead")  # type: ignore[no-any-return]

    def _hash_path(self, path: str) -> tuple[int, str]:
        digest, size = hashlib.sha256(), 0
        if self.local:  # the descriptor itself: no buffer layer's fstat/ioctl/seek (each gives up the GIL)
            descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                wanted = FIRST_CHUNK_BYTES
                while chunk := os.read(descriptor, wanted):
                    digest.update(chunk)
                    size += len(chunk)
                    if len(chunk) < wanted:  # a regular file's short read is its end
                        break
                    wanted = CHUNK_BYTES
            finally:
                os.close(descriptor)
            return size, digest.hexdigest()
        with self._open_read(path) as reader:
            while chunk := reader.read(CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    def stat(self, key: str) -> Blob | None:
        """Size of the blob at ``key`` (no hash: that needs a full read, see :meth:`sha256`), or ``None``."""
        path = self._path(key)
        if self.local:
            try:
                status = os.stat(path)
            except FileNotFoundError:
                return None
            return None if stat_module.S_ISDIR(status.st_mode) else Blob(key, self.url(key), status.st_size)
        self.fs.invalidate_cache(path)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        return Blob(key, self.url(key), int(info["size"]))

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def sha256(self, key: str) -> str:
        """SHA-256 of the stored bytes, read in chunks; :class:`MissingBlob` when there is no blob."""
        try:
            return self._hash_path(self._path(key))[1]
        except FileNotFoundError:
            raise MissingBlob("no blob at this key") from None

    # -- writing -----------------------------------------------------------------------------------------------

    def put_stream(self, key: str, chunks: Iterable[bytes], *, expected_sha256: str | None = None) -> Blob:
        """Stream ``chunks`` into the blob at ``key``, verified: written to a temporary key while hashed, read
        back and hashed again, and moved into place only when both agree. With ``expected_sha256`` (any case)
        a different content raises :class:`ChecksumMismatch` and nothing is written at ``key``; a blob an earlier
        run left there stays as it was. On any failure the temporary object is removed."""
        size, digest = self._put_verified(key, chunks, expected_sha256)
        return Blob(key, self.url(key), size, digest)

    def _put_verified(self, key: str, chunks: Iterable[bytes], expected_sha256: str | None) -> tuple[int, str]:
        path = self._path(key)
        temporary = self._temporary()
        self._prepare_parent(temporary)
        try:
            size, digest = self._write(temporary, chunks)
            if expected_sha256 is not None and _normalize_sha256(expected_sha256) != digest:
                raise ChecksumMismatch("content SHA-256 differs from the recorded one")
            stored_size, stored_digest = self._hash_path(temporary)
            if (stored_size, stored_digest) != (size, digest):
                raise MigrationError(
                    Category.CONNECTION_ERROR,
                    "the blob store returned different bytes than were written",
                    retryable=True,
                    ours=True,
                )
            self._prepare_parent(path)
            self._move(temporary, path)
        except BaseException:
            self._remove_quietly(temporary)
            raise
        moved = self.stat(key)
        if moved is None or moved.size != size:
            raise MigrationError(
                Category.CONNECTION_ERROR, "the blob store lost a blob while moving it into place", ours=True
            )
        return size, digest

    def _move(self, source: str, target: str) -> None:
        if self.local:
            try:
                os.replace(source, target)  # a rename: atomic, and it replaces what was there
            except FileNotFoundError:  # the target's folder went away since it was made: make it again
                self._folders.discard(posixpath.dirname(target))
                self._prepare_parent(target)
                os.replace(source, target)
        else:
            self.fs.mv(source, target)

    def _open_write(self, path: str) -> BinaryIO:
        return self.fs.open(path, "wb", block_size=BLOCK_BYTES)  # type: ignore[no-any-return]

    def _create_local(self, path: str) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return os.open(path, flags, 0o666)
        except FileNotFoundError:  # its folder went away since it was made: make it again
            self._folders.discard(posixpath.dirname(path))
            self._prepare_parent(path)
            return os.open(path, flags, 0o666)

    def _write(self, path: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        digest, size = hashlib.sha256(), 0
        if self.local:  # straight to the descriptor: a small blob is one open, one write and one close
            descriptor = self._create_local(path)
            try:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(descriptor, view) :]
            finally:
                os.close(descriptor)
            return size, digest.hexdigest()
        with self._open_write(path) as writer:
            for chunk in chunks:
                if not chunk:
                    continue
                digest.update(chunk)
                writer.write(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    def _remove_quietly(self, path: str) -> None:
        # The failure being handled matters more than a leftover, which lives under .partial/ anyway.
        with contextlib.suppress(Exception):
            self.fs.rm_file(path)

    def delete(self, key: str) -> bool:
        """Remove the blob at ``key``; ``False`` when there was none."""
        path = self._path(key)
        if self.stat(key) is None:
            return False
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        self.fs.invalidate_cache(path)
        return True

    def copy(self, src_key: str, dst_key: str) -> Blob:
        """Copy a blob inside the store: server-side on object stores (where it is atomic); locally through a
        temporary file renamed into place, so ``dst_key`` never holds a partial copy."""
        source, target = self._path(src_key), self._path(dst_key)
        if self.stat(src_key) is None:
            raise MissingBlob("no blob at the source key")
        if self.local:
            temporary = self._temporary()
            self._prepare_parent(temporary)
            try:
                self.fs.copy(source, temporary)
                self._prepare_parent(target)
                self._move(temporary, target)
            except BaseException:
                self._remove_quietly(temporary)
                raise
        else:
            self.fs.copy(source, target)
        copied = self.stat(dst_key)
        if copied is None:
            raise MigrationError(Category.CONNECTION_ERROR, "the blob store did not keep a copied blob", ours=True)
        return copied


_END = object()


@dataclass(frozen=True)
class _Failed:
    problem: BaseException


@contextmanager
def read_ahead(reader: BinaryIO, chunk_size: int = CHUNK_BYTES, depth: int = 4) -> Iterator[Iterator[bytes]]:
    """The chunks of ``reader``, read by a thread at most ``depth`` chunks ahead of the consumer.

    Reading (paramiko's Python code, holding the GIL) then overlaps hashing and writing (C code that releases
    it); memory stays at ``depth`` × ``chunk_size``. A read error is raised in the consumer; leaving the block
    stops the thread and waits for it, so the reader is never used by two threads at once. A file that
    fits in its first chunk is read without a thread.
    """
    first = reader.read(min(chunk_size, FIRST_CHUNK_BYTES))
    if len(first) < min(chunk_size, FIRST_CHUNK_BYTES):  # a short read is the end (both readers fill a read
        yield iter([first] if first else [])  # up to EOF): a small file needs no thread
        return
    pending: queue.Queue[object] = queue.Queue(maxsize=depth)
    pending.put(first)
    stop = threading.Event()

    def offer(item: object) -> None:
        while not stop.is_set():
            try:
                pending.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def pump() -> None:
        try:
            while not stop.is_set():
                chunk = reader.read(chunk_size)
                offer(chunk or _END)
                if not chunk:
                    return
        except BaseException as problem:
            offer(_Failed(problem))

    def chunks() -> Iterator[bytes]:
        while (item := pending.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.problem
            yield cast(bytes, item)

    thread = threading.Thread(target=pump, name="blob-read-ahead", daemon=True)
    thread.start()
    try:
        yield chunks()
    finally:
        stop.set()
        thread.join()


def hash_source(source: MediaSource, relative_path: str, chunk_size: int = CHUNK_BYTES) -> tuple[int, str]:
    """Size and SHA-256 of a media file, read once in chunks; writes nothing."""
    digest, size = hashlib.sha256(), 0
    with source.open(relative_path) as reader, read_ahead(reader, chunk_size) as chunks:
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def copy_blob(
    source: MediaSource,
    relative_path: str,
    store: BlobStore,
    key: str,
    expected_sha256: str | None,
    chunk_size: int = CHUNK_BYTES,
) -> CopyResult:
    """Stream one media file into the store at ``key``, verified (see :meth:`BlobStore.put_stream`).

    Raises :class:`UnsafePath` / :class:`MissingBlob` before anything is read or written, and
    :class:`ChecksumMismatch` (nothing left at ``key``) when ``expected_sha256`` is given and differs.
    """
    with source.open(relative_path) as reader, read_ahead(reader, chunk_size) as chunks:
        size, digest = store._put_verified(key, chunks, expected_sha256)
    return CopyResult(key, store.url(key), size, digest)
