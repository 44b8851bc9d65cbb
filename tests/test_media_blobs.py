"""Media sources (local folder, SFTP through a real sshd) and the blob store (local folder, S3 on moto).

"Never opened" is proved, not assumed: the targets outside MEDIA_ROOT sit in a folder watched with inotify
(which sees opens by any process, sftp-server included), and the main one is a FIFO — opening it for reading
blocks — so a source that followed the symlink would hang (caught by a guard) or leave an open event.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import io
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import paramiko
import psutil
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from demo.sshd import SSHServer
from resources.blobstore import (
    CHUNK_BYTES,
    FIRST_CHUNK_BYTES,
    BlobStore,
    ChecksumMismatch,
    copy_blob,
    hash_source,
    read_ahead,
)
from resources.errors import Category, MigrationError
from resources.media import (
    LARGE_READ,
    PREFETCH_THREAD_SUFFIX,
    SMALL_READ,
    LocalMediaSource,
    MediaError,
    MediaSource,
    MissingBlob,
    SFTPMediaSource,
    UnsafePath,
    read_request_bytes,
)
from resources.ssh import SSHResource
from tests.conftest import unavailable
from tests.ports import free_port
from worker import libc
from worker.app_rules import blob_key, unsafe_path_problem

MiB = 1024 * 1024
SFTP_SERVER_BINARY = "/usr/lib/openssh/sftp-server"
CONTENT = b"contenido del archivo\n" * 1000


# -- lexical checks (pure) -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("../x", "path climbs to a parent folder"),
        ("a/../../x", "path climbs to a parent folder"),
        ("a/..", "path climbs to a parent folder"),
        ("..", "path climbs to a parent folder"),
        ("a\\..\\b", "path climbs to a parent folder"),
        ("a/..\\..\\x", "path climbs to a parent folder"),
        ("/etc/passwd", "path is absolute"),
        ("\\etc\\passwd", "path is absolute"),
        ("\\\\server\\share\\x", "path is absolute"),
        ("C:\\Windows\\x", "path is absolute"),
        ("c:x", "path is absolute"),
        (".", "path has an empty or '.' part"),
        ("./a", "path has an empty or '.' part"),
        ("a/./b", "path has an empty or '.' part"),
        ("a//b", "path has an empty or '.' part"),
        ("a/", "path has an empty or '.' part"),
        ("", "path is empty"),
        ("   ", "path is empty"),
        ("a\x00b", "path contains a NUL character"),
        ("a\udcff", "path is not valid UTF-8 text"),
        ("a/" * 2100 + "b", "path is too long"),
    ],
)
def test_lexically_unsafe_paths(path: str, problem: str) -> None:
    assert unsafe_path_problem(path) == problem


@pytest.mark.parametrize(
    "path", ["a.txt", "uploads/2020/01/scan.png", "..a/b..", "a..b", "a/.hidden", "ñandú/informe final.pdf", "a-b_c"]
)
def test_lexically_safe_paths(path: str) -> None:
    assert unsafe_path_problem(path) is None


def test_lexical_problem_rejects_non_text() -> None:
    assert unsafe_path_problem(b"a.txt") == "path is not text"  # type: ignore[arg-type]


# -- a media tree with traps outside the root ----------------------------------------------------------------


class OpenWatch:
    """inotify IN_OPEN/IN_ACCESS on paths (a folder: also its entries), whoever opens them."""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, *paths: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        for path in paths:
            watch = self._libc.inotify_add_watch(self.fd, str(path).encode(), self.IN_OPEN | self.IN_ACCESS)
            assert watch >= 0, os.strerror(ctypes.get_errno())

    def events(self) -> int:
        count = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return count
            offset = 0
            while offset < len(data):
                _, _, _, name_length = struct.unpack_from("iIII", data, offset)
                offset += 16 + name_length
                count += 1

    def close(self) -> None:
        os.close(self.fd)


class MediaTree:
    def __init__(self, base: Path) -> None:
        self.root = base / "media"
        self.outside = base / "outside"
        (self.root / "docs" / "inner").mkdir(parents=True)
        self.outside.mkdir()
        (self.root / "docs" / "a.txt").write_bytes(CONTENT)
        (self.root / "docs" / "inner" / "b.bin").write_bytes(b"\x00\x01" * 5000)
        (self.root / "empty.txt").write_bytes(b"")
        self.fifo = self.outside / "pipe"
        os.mkfifo(self.fifo)
        (self.outside / "secret.txt").write_bytes(b"outside")
        os.mkfifo(self.root / "inside_pipe")
        # allowed: symlinks that stay inside
        (self.root / "link_inside").symlink_to("docs/a.txt")
        (self.root / "dir_inside").symlink_to(self.root / "docs")
        # traps: every one leads outside (or cannot be resolved) and must never be opened
        (self.root / "escape_file").symlink_to("../outside/pipe")
        (self.root / "escape_absolute").symlink_to(self.fifo)
        (self.root / "escape_dir").symlink_to(self.outside)
        (self.root / "docs" / "deep_escape").symlink_to("../../outside")
        (self.root / "dangling").symlink_to("/nonexistent-dir-for-test/file")
        (self.root / "loop_a").symlink_to("loop_b")
        (self.root / "loop_b").symlink_to("loop_a")
        self.watch = OpenWatch(self.outside, self.fifo, self.root / "inside_pipe")
        # the watch works: an open outside the root is seen
        (self.outside / "secret.txt").read_bytes()
        assert self.watch.events() >= 1

    def expect_never_opened(self, call: Callable[[], object], expected: type[MediaError]) -> MediaError:
        """``call`` raises ``expected`` quickly, and nothing outside the root (nor the FIFO) was opened."""
        outcome: list[BaseException | object] = []

        def run() -> None:
            try:
                outcome.append(call())
            except BaseException as problem:
                outcome.append(problem)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(20)
        if worker.is_alive():  # blocked opening a FIFO: release it, then fail
            for fifo in (self.fifo, self.root / "inside_pipe"):
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(10)
            pytest.fail("the source opened a FIFO it should have refused")
        assert self.watch.events() == 0, "something outside MEDIA_ROOT was opened"
        assert len(outcome) == 1 and isinstance(outcome[0], expected), outcome
        return outcome[0]  # type: ignore[return-value]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[MediaTree]:
    media = MediaTree(tmp_path)
    yield media
    media.watch.close()


# -- sshd (demo/sshd.py: an sftp subsystem, host keys checked against known_hosts) -----------------------------


def ssh_resource(server: SSHServer) -> SSHResource:
    return SSHResource(**server.resource_kwargs())  # type: ignore[arg-type]


@pytest.fixture(params=["local", "local-walk", pytest.param("sftp", marks=pytest.mark.integration)])
def source(request: pytest.FixtureRequest, tree: MediaTree, monkeypatch: pytest.MonkeyPatch) -> Iterator[MediaSource]:
    if request.param.startswith("local"):
        if request.param == "local-walk":  # a kernel without openat2 (before 5.6, or refused by seccomp)
            monkeypatch.setattr(libc, "_openat2_works", False)
        with LocalMediaSource(str(tree.root)) as local:
            yield local
        return
    server: SSHServer = request.getfixturevalue("sshd")
    with SFTPMediaSource(ssh_resource(server), str(tree.root)) as remote:
        yield remote


def read_all(source: MediaSource, relative_path: str) -> bytes:
    with source.open(relative_path) as reader:
        return b"".join(iter(lambda: reader.read(4096), b""))


# -- both sources --------------------------------------------------------------------------------------------


def test_reads_files_under_the_root(source: MediaSource, tree: MediaTree) -> None:
    assert read_all(source, "docs/a.txt") == CONTENT
    assert read_all(source, "docs/inner/b.bin") == b"\x00\x01" * 5000
    assert read_all(source, "empty.txt") == b""
    assert read_all(source, "link_inside") == CONTENT  # a symlink that stays inside is fine
    assert read_all(source, "dir_inside/a.txt") == CONTENT
    assert hash_source(source, "docs/a.txt") == (len(CONTENT), hashlib.sha256(CONTENT).hexdigest())
    assert tree.watch.events() == 0


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("escape_file", "path leaves MEDIA_ROOT through a symlink"),
        ("escape_absolute", "path leaves MEDIA_ROOT through a symlink"),
        ("escape_dir/pipe", "path leaves MEDIA_ROOT through a symlink"),
        ("escape_dir/secret.txt", "path leaves MEDIA_ROOT through a symlink"),
        ("docs/deep_escape/pipe", "path leaves MEDIA_ROOT through a symlink"),
        ("dir_inside/deep_escape/pipe", "path leaves MEDIA_ROOT through a symlink"),
        ("dangling", None),
        ("loop_a", "path goes through a symlink that cannot be resolved safely"),
        ("inside_pipe", "path names a device, FIFO or socket, not a regular file"),
        ("../outside/pipe", "path climbs to a parent folder"),
        ("docs/../../outside/pipe", "path climbs to a parent folder"),
        ("docs\\..\\..\\outside\\pipe", "path climbs to a parent folder"),
        ("ABSOLUTE", "path is absolute"),
    ],
)
def test_unsafe_paths_are_never_opened(source: MediaSource, tree: MediaTree, path: str, detail: str | None) -> None:
    path = str(tree.fifo) if path == "ABSOLUTE" else path
    error = tree.expect_never_opened(lambda: read_all(source, path), UnsafePath)
    assert error.reason == "UNSAFE_PATH"
    if detail is not None:
        assert error.detail == detail
    for fragment in ("outside", "pipe", "escape", "loop", "dangling", str(tree.root)):
        assert fragment not in str(error)


@pytest.mark.parametrize("path", ["docs/missing.txt", "missing/dir/x", "docs/a.txt/x", "docs", "dir_inside"])
def test_missing_files(source: MediaSource, tree: MediaTree, path: str) -> None:
    error = tree.expect_never_opened(lambda: read_all(source, path), MissingBlob)
    assert error.reason == "MISSING_BLOB"
    assert "docs" not in str(error) and "missing" not in str(error).replace("MISSING_BLOB", "")


def test_a_directory_is_opened_beneath_the_root_in_one_call_only_without_symlinks(tree: MediaTree) -> None:
    root = os.open(tree.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = libc.open_directory_beneath(root, "docs/inner")
        assert found is not None, "openat2 is missing here: every local open walks the path part by part"
        assert os.stat("b.bin", dir_fd=found).st_size == 10000
        os.close(found)
        for refused in ("dir_inside", "docs/deep_escape", "escape_dir", "loop_a", "missing/dir", "docs/a.txt", ".."):
            assert libc.open_directory_beneath(root, refused) is None, refused  # the walk tells these apart
    finally:
        os.close(root)
    assert tree.watch.events() == 0


def test_the_source_keeps_serving_after_a_refusal(source: MediaSource, tree: MediaTree) -> None:
    for _ in range(3):
        with pytest.raises(UnsafePath):
            read_all(source, "escape_file")
        with pytest.raises(MissingBlob):
            read_all(source, "docs/missing.txt")
        assert read_all(source, "docs/a.txt") == CONTENT
    assert tree.watch.events() == 0


# Over SFTP the abandoned file's session is dropped; paramiko's prefetch thread may still be sending its READ
# requests and dies with "Socket is closed" — harmless (the session is gone), but reported by pytest.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_caller_that_stops_early_does_not_disturb_the_next_file(source: MediaSource, tree: MediaTree) -> None:
    big = tree.root / "big.bin"
    big.write_bytes(os.urandom(3 * MiB))
    with pytest.raises(RuntimeError), source.open("big.bin") as reader:
        reader.read(1000)
        raise RuntimeError("the store failed")
    assert read_all(source, "docs/a.txt") == CONTENT
    assert read_all(source, "big.bin") == big.read_bytes()


def test_local_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(MigrationError) as caught:
        LocalMediaSource(str(tmp_path / "nope"))
    assert caught.value.category == Category.VALIDATION_ERROR


# -- SFTP specifics ------------------------------------------------------------------------------------------

integration = pytest.mark.integration


@integration
def test_sftp_root_must_be_a_directory(sshd: SSHServer, tmp_path: Path) -> None:
    with pytest.raises(MigrationError) as caught, SFTPMediaSource(ssh_resource(sshd), str(tmp_path / "nope")):
        pass
    assert caught.value.category == Category.VALIDATION_ERROR
    assert "nope" not in str(caught.value)


@integration
def test_sftp_host_key_is_checked(sshd: SSHServer, tmp_path: Path, tree: MediaTree) -> None:
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    ssh = SSHResource(**{**sshd.resource_kwargs(), "known_hosts_file": str(empty)})  # type: ignore[arg-type]
    with pytest.raises(MigrationError) as caught, SFTPMediaSource(ssh, str(tree.root)):
        pass
    assert caught.value.category == Category.SSH_HOST_KEY_ERROR


def accepted_connections(server: SSHServer) -> int:
    return (server.home / "sshd.log").read_text().count("Accepted publickey")


@integration
def test_sftp_reuses_one_connection_for_many_files(sshd: SSHServer, tree: MediaTree) -> None:
    before = accepted_connections(sshd)
    with SFTPMediaSource(ssh_resource(sshd), str(tree.root)) as remote:
        for _ in range(20):
            assert read_all(remote, "docs/a.txt") == CONTENT
            with pytest.raises(UnsafePath):
                read_all(remote, "escape_file")
            with pytest.raises(MissingBlob):
                read_all(remote, "docs/missing.txt")
    time.sleep(0.2)  # sshd logs asynchronously
    assert accepted_connections(sshd) - before == 1


@integration
def test_sftp_server_binary_over_exec(sshd: SSHServer, tree: MediaTree) -> None:
    """For a host without an sftp subsystem: an sftp-server binary over an exec channel; a wrong one fails clearly."""
    with pytest.raises(MigrationError) as caught:
        SFTPMediaSource(ssh_resource(sshd), str(tree.root), sftp_server="/nonexistent/sftp-server").__enter__()
    assert (caught.value.category, caught.value.retryable) == (Category.CONNECTION_ERROR, False)
    if not Path(SFTP_SERVER_BINARY).exists():
        unavailable(f"{SFTP_SERVER_BINARY} (apt-get install openssh-sftp-server)")
    with SFTPMediaSource(ssh_resource(sshd), str(tree.root), sftp_server=SFTP_SERVER_BINARY) as remote:
        assert read_all(remote, "docs/a.txt") == CONTENT
        tree.expect_never_opened(lambda: read_all(remote, "escape_dir/pipe"), UnsafePath)


@integration
@pytest.mark.parametrize("request_bytes", [SMALL_READ, LARGE_READ, None])
def test_sftp_read_sizes(sshd: SSHServer, tree: MediaTree, request_bytes: int | None) -> None:
    data = os.urandom(5 * MiB + 12345)
    (tree.root / "big.bin").write_bytes(data)
    with SFTPMediaSource(ssh_resource(sshd), str(tree.root), request_bytes=request_bytes) as remote:
        for chunk_size in (1, 4096, 100_000, MiB):
            with remote.open("big.bin") as reader:
                assert reader.read(chunk_size) == data[:chunk_size]
                assert reader.read(3 * MiB) == data[chunk_size : chunk_size + 3 * MiB]
                assert reader.read() == data[chunk_size + 3 * MiB :]
        assert hash_source(remote, "big.bin", chunk_size=77_777) == (len(data), hashlib.sha256(data).hexdigest())


def test_read_request_bytes_follow_the_server_version() -> None:
    assert read_request_bytes("SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3") == LARGE_READ
    assert read_request_bytes("SSH-2.0-OpenSSH_10.0") == LARGE_READ
    assert read_request_bytes("SSH-2.0-OpenSSH_8.4p1 Debian-5+deb11u3") == SMALL_READ
    assert read_request_bytes("SSH-2.0-OpenSSH_7.4") == SMALL_READ
    assert read_request_bytes("SSH-2.0-mod_sftp") == SMALL_READ
    assert read_request_bytes("") == SMALL_READ


# -- read-ahead ----------------------------------------------------------------------------------------------


class _FlakyReader(io.RawIOBase):
    def __init__(self, good_chunks: int) -> None:
        super().__init__()
        self.good_chunks, self.reads = good_chunks, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads > self.good_chunks:
            raise OSError("connection dropped")
        return b"x" * (size or 1)


def test_read_ahead_raises_the_readers_error_in_the_consumer() -> None:
    got = []
    with pytest.raises(OSError, match="connection dropped"), read_ahead(_FlakyReader(3), 10) as chunks:  # type: ignore[arg-type]
        got.extend(chunks)
    assert got == [b"x" * 10] * 3


def test_read_ahead_stops_its_thread_when_the_consumer_leaves() -> None:
    reader = _FlakyReader(10**9)
    before = threading.active_count()
    with pytest.raises(RuntimeError), read_ahead(reader, 10, depth=2) as chunks:  # type: ignore[arg-type]
        next(chunks)
        raise RuntimeError("store failed")
    assert threading.active_count() == before
    reads = reader.reads
    time.sleep(0.2)
    assert reader.reads == reads < 10  # stopped, at most depth + 2 reads ahead


# -- blob stores: a local folder and S3 (moto's server on loopback) -----------------------------------------


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[dict[str, Any]]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        unavailable("moto[server] (pip install -e '.[dev]')")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": f"http://{host}:{port}",
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    fs.mkdir("blobs")
    try:
        yield options
    finally:
        server.stop()


@pytest.fixture(params=["local", "file-url", pytest.param("s3", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return BlobStore(str(tmp_path / "blobs"))
    if request.param == "file-url":
        return BlobStore(f"file://{tmp_path}/blobs-url")
    options = request.getfixturevalue("moto_s3")
    return BlobStore(f"s3://blobs/{request.node.name.replace('[', '-').rstrip(']')}", **options)


def leftovers(store: BlobStore) -> list[str]:
    partial = f"{store.root}/.partial"
    store.fs.invalidate_cache()
    return list(store.fs.find(partial)) if store.fs.exists(partial) else []


def chunks_of(data: bytes, size: int = 100_000) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


KEY = "files/7/2b1c4c1e-3b43-4a57-9f9a-0d7c2a1e9b11"


def test_put_stream_verifies_and_stats(store: BlobStore) -> None:
    data = os.urandom(3 * MiB + 17)
    digest = hashlib.sha256(data).hexdigest()
    assert store.stat(KEY) is None and not store.exists(KEY)
    blob = store.put_stream(KEY, chunks_of(data))
    assert (blob.key, blob.size, blob.sha256) == (KEY, len(data), digest)
    assert blob.url == store.url(KEY) and blob.url.split("://")[0] in ("file", "s3")
    assert blob.url.endswith(f"/{KEY}")
    stat = store.stat(KEY)
    assert stat is not None and (stat.size, stat.sha256) == (len(data), None)
    assert store.exists(KEY) and store.sha256(KEY) == digest
    with store.fs.open(f"{store.root}/{KEY}", "rb") as stored:
        assert stored.read() == data
    assert leftovers(store) == []
    # an upper-case recorded hash is the same hash; overwriting is allowed
    again = store.put_stream(
        KEY, chunks_of(data[:1000]), expected_sha256=hashlib.sha256(data[:1000]).hexdigest().upper()
    )
    assert again.size == 1000 and store.sha256(KEY) == again.sha256


def test_checksum_mismatch_leaves_no_object(store: BlobStore) -> None:
    with pytest.raises(ChecksumMismatch) as caught:
        store.put_stream(KEY, chunks_of(b"real content"), expected_sha256=hashlib.sha256(b"other").hexdigest())
    assert caught.value.reason == "CHECKSUM_MISMATCH"
    assert store.stat(KEY) is None and leftovers(store) == []


def test_a_failing_stream_leaves_no_object(store: BlobStore) -> None:
    def failing() -> Iterator[bytes]:
        yield b"x" * MiB
        raise OSError("source connection lost")

    with pytest.raises(OSError, match="source connection lost"):
        store.put_stream(KEY, failing())
    assert store.stat(KEY) is None and leftovers(store) == []


def test_copy_delete_and_missing(store: BlobStore) -> None:
    data = os.urandom(MiB + 5)
    store.put_stream(KEY, [data])
    other = blob_key(7, "9e0c3f9a-8d52-4a8e-b3c1-4b5a6f7e8d90")
    assert other == "files/7/9e0c3f9a-8d52-4a8e-b3c1-4b5a6f7e8d90"
    copied = store.copy(KEY, other)
    assert (copied.key, copied.size) == (other, len(data))
    assert store.sha256(other) == hashlib.sha256(data).hexdigest()
    assert store.delete(KEY) is True
    assert store.delete(KEY) is False
    assert store.stat(KEY) is None and store.exists(other)
    with pytest.raises(MissingBlob):
        store.sha256(KEY)
    with pytest.raises(MissingBlob):
        store.copy(KEY, "files/7/x")
    assert leftovers(store) == []


@pytest.mark.parametrize("key", ["../x", "files/../x", "/files/1/x", "files//x", "files/.partial", "", "files/1/x y"])
def test_unsafe_keys_are_refused(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.url(key)
    with pytest.raises(ValueError):
        store.put_stream(key, [b"x"])


def test_copy_blob_from_a_media_source(source: MediaSource, tree: MediaTree, store: BlobStore) -> None:
    digest = hashlib.sha256(CONTENT).hexdigest()
    result = copy_blob(source, "docs/a.txt", store, KEY, expected_sha256=digest.upper(), chunk_size=1000)
    assert (result.key, result.size, result.sha256, result.url) == (KEY, len(CONTENT), digest, store.url(KEY))
    assert store.sha256(KEY) == digest
    other = "files/7/other"
    with pytest.raises(ChecksumMismatch):
        copy_blob(source, "docs/a.txt", store, other, expected_sha256="0" * 64)
    assert store.stat(other) is None
    nothing = copy_blob(source, "empty.txt", store, "files/7/empty", expected_sha256=None)
    assert (nothing.size, nothing.sha256) == (0, hashlib.sha256(b"").hexdigest())
    tree.expect_never_opened(lambda: copy_blob(source, "escape_dir/pipe", store, "files/7/bad", None), UnsafePath)
    assert store.stat("files/7/bad") is None and leftovers(store) == []


@pytest.mark.parametrize("size", [1, FIRST_CHUNK_BYTES - 1, FIRST_CHUNK_BYTES, FIRST_CHUNK_BYTES + 1,
                                  CHUNK_BYTES, CHUNK_BYTES + FIRST_CHUNK_BYTES, 2 * CHUNK_BYTES + 1])  # fmt: skip
def test_files_on_either_side_of_the_first_read_and_a_chunk_copy_whole(
    source: MediaSource, tree: MediaTree, store: BlobStore, size: int
) -> None:
    """A file is first read in FIRST_CHUNK_BYTES, then in chunks (the copy, and the read-back of the blob)."""
    data = os.urandom(size)
    (tree.root / "sized.bin").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert hash_source(source, "sized.bin") == (size, digest)
    result = copy_blob(source, "sized.bin", store, KEY, expected_sha256=digest)
    assert (result.size, result.sha256) == (size, digest)
    stored = store.stat(KEY)
    assert store.sha256(KEY) == digest and stored is not None and stored.size == size


class _CorruptingFileSystem(MemoryFileSystem):
    """A store that returns different bytes than it was given: the read-back check must catch it."""

    protocol = ("corrupting-test",)

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return str(super()._strip_protocol(path.removeprefix("corrupting-test://")))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        opened = super()._open(path, mode, **kwargs)
        if "r" not in mode:
            return opened
        data = bytearray(opened.read())
        if data:
            data[len(data) // 2] ^= 0xFF
        return io.BytesIO(bytes(data))


def test_the_read_back_catches_a_store_that_changes_bytes() -> None:
    fsspec.register_implementation("corrupting-test", _CorruptingFileSystem, clobber=True)
    store = BlobStore("corrupting-test://bucket/prefix")
    with pytest.raises(MigrationError) as caught:
        store.put_stream(KEY, [b"abc" * 1000])
    assert (caught.value.category, caught.value.retryable) == (Category.CONNECTION_ERROR, True)
    assert store.stat(KEY) is None and leftovers(store) == []


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # as if gcsfs were not installed, whether it is or not
    registry = importlib.import_module("fsspec.registry")
    monkeypatch.setitem(registry.known_implementations, "gs", {"class": "no_such_module.GCS", "err": "x"})
    monkeypatch.delitem(registry._registry, "gs", raising=False)
    with pytest.raises(MigrationError) as caught:
        BlobStore("gs://bucket/prefix")
    assert caught.value.category == Category.VALIDATION_ERROR
    assert "migration-platform[gs]" in str(caught.value) and "bucket" not in str(caught.value)


# -- 200 MB over SFTP: flat memory, and throughput against a plain SFTPClient.get ------------------------------


class PeakRSS:
    def __init__(self) -> None:
        self.process = psutil.Process()
        self.baseline = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def write_large_file(path: Path, size: int) -> str:
    """``size`` bytes of incompressible content, each MiB numbered (no two alike), written a MiB at a time;
    their SHA-256."""
    digest = hashlib.sha256()
    block = os.urandom(MiB)
    with path.open("wb") as out:
        for index in range(size // MiB):
            piece = index.to_bytes(8, "big") + block[8:]
            digest.update(piece)
            out.write(piece)
    return digest.hexdigest()


@integration
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # see the test above
def test_200_mb_over_sftp_with_flat_memory(sshd: SSHServer, tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    size = 200 * MiB
    expected = write_large_file(root / "big.bin", size)
    store = BlobStore(str(tmp_path / "blobs"))
    ssh = ssh_resource(sshd)

    (root / "small.txt").write_bytes(CONTENT)
    # copy_blob first, so the RSS baseline is not inflated by memory the plain get left behind
    with SFTPMediaSource(ssh, str(root)) as remote:
        with PeakRSS() as memory:
            started = time.perf_counter()
            result = copy_blob(remote, "big.bin", store, KEY, expected_sha256=expected)
            copy_seconds = time.perf_counter() - started
        # a read abandoned early must not leave 200 MiB of replies to be buffered by the next request
        with PeakRSS() as abandoned:
            with pytest.raises(RuntimeError), remote.open("big.bin") as reader:
                reader.read(MiB)
                raise RuntimeError("the store failed")
            time.sleep(1)
            assert read_all(remote, "small.txt") == CONTENT

    with ssh.connect() as client, client.open_sftp() as plain:
        started = time.perf_counter()
        plain.get(str(root / "big.bin"), str(tmp_path / "plain.bin"))
        plain_seconds = time.perf_counter() - started
    (tmp_path / "plain.bin").unlink()

    assert (result.size, result.sha256) == (size, expected)
    assert store.sha256(KEY) == expected
    plain_rate, copy_rate = size / MiB / plain_seconds, size / MiB / copy_seconds
    print(
        f"\n200 MiB over SFTP: copy_blob {copy_rate:.1f} MB/s ({copy_seconds:.2f} s, incl. write + read-back), "
        f"plain SFTPClient.get {plain_rate:.1f} MB/s ({plain_seconds:.2f} s); "
        f"ratio {copy_rate / plain_rate:.2f}; peak RSS growth {memory.growth / MiB:.1f} MiB "
        f"(abandoned read: {abandoned.growth / MiB:.1f} MiB)"
    )
    assert memory.growth < 40 * MiB, f"RSS grew by {memory.growth / MiB:.1f} MiB copying 200 MiB"
    assert abandoned.growth < 40 * MiB, f"RSS grew by {abandoned.growth / MiB:.1f} MiB after an abandoned read"


@integration
def test_a_lagging_prefetch_thread_does_not_leave_the_file_in_memory(
    sshd: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paramiko's prefetch race (paramiko#2418): when the reader has taken every reply before paramiko's
    request thread sends the next request, paramiko stops using its prefetch for the rest of the file, and
    the replies to the requests it goes on sending stay in memory until the file is closed. A loaded machine
    does this now and then; here every request thread lags once, for 50 ms after its first request."""
    real_request = paramiko.SFTPClient._async_request
    sent = threading.local()  # requests sent by this prefetch thread
    lagged = threading.Event()

    def lagging(self: paramiko.SFTPClient, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name.endswith(PREFETCH_THREAD_SUFFIX):
            sent.count = getattr(sent, "count", 0) + 1
            if sent.count == 2:
                time.sleep(0.05)
                lagged.set()
        return real_request(self, *args, **kwargs)

    root = tmp_path / "media"
    root.mkdir()
    size = 64 * MiB
    expected = write_large_file(root / "big.bin", size)
    store = BlobStore(str(tmp_path / "blobs"))
    with SFTPMediaSource(ssh_resource(sshd), str(root)) as remote:
        copy_blob(remote, "big.bin", store, "files/1/warm-up", expected_sha256=expected)
        monkeypatch.setattr(paramiko.SFTPClient, "_async_request", lagging)
        with PeakRSS() as memory:
            result = copy_blob(remote, "big.bin", store, KEY, expected_sha256=expected)
    assert lagged.is_set(), "paramiko's prefetch thread was not found by its name: no lag was injected"
    assert (result.size, result.sha256) == (size, expected)
    assert memory.growth < 32 * MiB, f"RSS grew by {memory.growth / MiB:.1f} MiB copying 64 MiB"
