"""The media host's uploaded files (DESIGN §5 "App", §6 files): read under ``MEDIA_ROOT``, never outside it.

A file's path is legacy data. Before anything is opened it is checked twice:

1. lexically (:func:`worker.app_rules.unsafe_path_problem`, the §6 rule itself): no absolute path,
   no ``..``/``.``/empty part, no NUL — with ``\\`` treated as a separator too,
   so a Windows-style ``a\\..\\b`` cannot slip through;
2. on the host: the path is resolved with every symlink followed (``os.path.realpath`` locally,
   ``SFTPClient.normalize`` — the server's ``realpath`` — over SFTP) and must stay under the resolved root,
   and name a regular file. A symlink (to a file or a directory, at any level) that leads outside the root is
   :class:`UnsafePath`; the target is never opened, not even to look.

Errors carry a short reason and never the path itself: paths are user data.
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
import re
import stat
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, NoReturn, Protocol, cast, runtime_checkable

import paramiko

from resources.errors import Category, MigrationError

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from resources.ssh import SSHResource
from worker.app_rules import unsafe_path_problem
from worker.libc import open_directory_beneath


class MediaError(Exception):
    """A file that cannot be copied, with its §6 quarantine reason; ``detail`` never holds the path."""

    reason: ClassVar[str] = ""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}")


class UnsafePath(MediaError):
    """Absolute, ``..``, or resolving outside ``MEDIA_ROOT``: never opened."""

    reason = "UNSAFE_PATH"


class MissingBlob(MediaError):
    """No regular file at a safe path (missing, a directory, unreadable)."""

    reason = "MISSING_BLOB"


class ChecksumMismatch(MediaError):
    """The content's SHA-256 differs from the recorded one: the file gets no blob."""

    reason = "CHECKSUM_MISMATCH"


@runtime_checkable
class MediaSource(Protocol):
    """Where the uploaded files are: ``open`` streams one file under the root, or raises a :class:`MediaError`."""

    def open(self, relative_path: str) -> AbstractContextManager[BinaryIO]: ...

    def close(self) -> None: ...


def _check_lexically(relative_path: str) -> None:
    problem = unsafe_path_problem(relative_path)
    if problem is not None:
        raise UnsafePath(problem)


def _inside(real: str, root: str) -> bool:
    """``real`` is ``root`` or below it (both already resolved, same separator)."""
    return real == root or real.startswith(root if root.endswith("/") else root + "/")


class LocalMediaSource:
    """Files in a local folder. The resolved path's directory is opened beneath the root in one ``openat2``
    call that follows no symlink (or, where that fails, component by component relative to its parent with
    ``O_NOFOLLOW``), and the file relative to it with ``O_NOFOLLOW``, so a symlink swapped in after the check
    is refused instead of followed. Holds nothing between files: several threads may open files at once
    (``concurrent_opens``)."""

    concurrent_opens: ClassVar[bool] = True

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise MigrationError(Category.VALIDATION_ERROR, "MEDIA_ROOT is not a directory", ours=True)

    def __enter__(self) -> LocalMediaSource:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing is held between files."""

    def resolve(self, relative_path: str) -> str:
        """The real path under the root, or :class:`UnsafePath`. Nothing is opened."""
        _check_lexically(relative_path)
        real = os.path.realpath(os.path.join(self.root, relative_path))
        if not _inside(real, self.root):
            raise UnsafePath("path leaves MEDIA_ROOT through a symlink")
        return real

    @contextmanager
    def open(self, relative_path: str) -> Iterator[BinaryIO]:
        # The common case first: no symlink on the way. The root is real and the lexical rule leaves no
        # '.', '..' or empty part, so the path's real path is the root joined with its parts, which are
        # opened one by one as below. A symlink met on the way (to be followed if it stays under the
        # root) sends the path through the full resolution.
        _check_lexically(relative_path)
        try:
            descriptor = self._open_parts(relative_path.split("/"), on_symlink=_SymlinkMet)
        except _SymlinkMet:
            descriptor = self._open_regular(self.resolve(relative_path))
        with os.fdopen(descriptor, "rb", buffering=0) as reader:
            yield cast(BinaryIO, reader)

    def _open_regular(self, real: str) -> int:
        parts = [] if real == self.root else os.path.relpath(real, self.root).split(os.sep)
        return self._open_parts(parts)

    def _open_parts(self, parts: list[str], on_symlink: type[Exception] | None = None) -> int:
        """Open the regular file at ``parts`` under the root: its directory at once when no symlink is on
        the way (:func:`worker.libc.open_directory_beneath`), else each part relative to its parent with
        ``O_NOFOLLOW``; then the file itself, with ``O_NOFOLLOW``. A symlink part is :class:`UnsafePath`, or
        ``on_symlink`` when given (the caller resolves the path first)."""
        if not parts:
            raise MissingBlob("path names MEDIA_ROOT itself, not a file")
        try:
            root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise MigrationError(Category.VALIDATION_ERROR, "MEDIA_ROOT cannot be opened", ours=True) from None
        directory = root
        try:
            if len(parts) > 1 and (found := open_directory_beneath(root, "/".join(parts[:-1]))) is not None:
                directory = found
            else:
                for part in parts[:-1]:
                    if not stat.S_ISDIR(self._part_status(part, directory, on_symlink).st_mode):
                        raise MissingBlob("a directory in the path is a file")
                    child = self._open_at(part, directory, os.O_RDONLY | os.O_DIRECTORY)
                    if directory != root:
                        os.close(directory)
                    directory = child
            return self._open_file(parts[-1], directory, on_symlink)
        finally:
            if directory != root:
                os.close(directory)
            os.close(root)

    def _open_file(self, name: str, directory: int, on_symlink: type[Exception] | None) -> int:
        info = self._part_status(name, directory, on_symlink)
        if stat.S_ISDIR(info.st_mode):
            raise MissingBlob("path names a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePath("path names a device, FIFO or socket, not a regular file")
        # O_NONBLOCK: should a FIFO be swapped in after the check, opening it cannot hang the run. It is
        # left set: a regular file (checked below, on the descriptor itself) reads the same either way.
        descriptor = self._open_at(name, directory, os.O_RDONLY | os.O_NONBLOCK)
        opened = os.fstat(descriptor)
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino) or not stat.S_ISREG(opened.st_mode):
            os.close(descriptor)
            raise UnsafePath("file was replaced while being opened")
        return descriptor

    @staticmethod
    def _part_status(part: str, directory: int, on_symlink: type[Exception] | None) -> os.stat_result:
        """The part's own status (a symlink not followed): a symlink is ``on_symlink`` or :class:`UnsafePath`."""
        try:
            info = os.stat(part, dir_fd=directory, follow_symlinks=False)
        except OSError as problem:  # its message names the file: never passed on
            raise _local_problem(problem) from None
        if stat.S_ISLNK(info.st_mode):
            if on_symlink is not None:
                raise on_symlink()
            # realpath resolved every symlink it could: one left is a loop, or was swapped in since.
            raise UnsafePath("path goes through a symlink that cannot be resolved safely")
        return info

    @staticmethod
    def _open_at(part: str, directory: int, flags: int) -> int:
        try:
            return os.open(part, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
        except OSError as problem:
            if problem.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePath("path changed to a symlink while being opened") from None
            raise _local_problem(problem) from None


class _SymlinkMet(Exception):
    """A path opened part by part met a symlink: it is resolved before it is opened."""


def _local_problem(problem: OSError) -> MediaError:
    """A local file error as a :class:`MediaError` whose detail has the error's kind, not its file name."""
    if problem.errno == errno.ENOENT:
        return MissingBlob("no such file under MEDIA_ROOT")
    if problem.errno == errno.ENOTDIR:
        return MissingBlob("a directory in the path is a file")
    if problem.errno in (errno.EACCES, errno.EPERM):
        return MissingBlob("file is not reachable (permission denied)")
    if problem.errno == errno.ELOOP:
        return UnsafePath("path goes through a symlink that cannot be resolved safely")
    name = errno.errorcode.get(problem.errno or 0, "unknown error")
    return MissingBlob(f"file cannot be read ({name})")


SMALL_READ = 32 * 1024  # what every SFTP server answers in full (paramiko's default)
LARGE_READ = 128 * 1024  # well under OpenSSH's 255 KiB SFTP_MAX_READ_LENGTH (9.0 and later)
_OPENSSH_VERSION = re.compile(r"OpenSSH_(\d+)\.(\d+)")


def read_request_bytes(server_version: str) -> int:
    """Bytes per SFTP READ for this server (its SSH version string). A server that answers a READ short would
    leave holes in paramiko's prefetch, which then buffers the rest of the file in memory — so large reads
    only for OpenSSH 9.0 and later, whose sftp-server answers up to 255 KiB; 32 KiB for anything else."""
    match = _OPENSSH_VERSION.search(server_version or "")
    if match and (int(match.group(1)), int(match.group(2))) >= (9, 0):
        return LARGE_READ
    return SMALL_READ


class SFTPMediaSource:
    """Files on the media host over SFTP: one SSH connection and one SFTP session for many files.

    Use as a context manager (or call :meth:`close`). Not thread-safe: one file at a time per source (a
    read-ahead thread of the caller's is fine, as long as one thread reads at a time).

    Throughput: each file is read pipelined (paramiko's prefetch, as ``SFTPClient.get`` does, a window of
    ``PREFETCH_WINDOW`` bytes at a time: see :class:`_SFTPReader`), with 128 KiB READs on OpenSSH 9.0+ (see
    :func:`read_request_bytes`; ``request_bytes`` overrides), channel packets that hold a whole reply, and a
    4 MiB SSH window. Memory stays flat whatever the file size: replies are taken off the channel only as the
    caller reads, so at most the SSH window is buffered (plus paramiko's bookkeeping, ~150 bytes per
    outstanding request). A file left before its end (an error in the caller) drops the SFTP session — its
    unread replies would otherwise pile up — and the next file opens a new one on the same SSH connection.

    ``sftp_server``: for a host whose sshd has no ``sftp`` subsystem, the path of an ``sftp-server`` binary on the
    host to run over an exec channel instead (e.g. ``/usr/lib/openssh/sftp-server``); ``None`` uses the subsystem.

    Resolution relies on the server's ``realpath``; between that check and the open, a symlink swapped in by
    someone who can write under MEDIA_ROOT cannot be detected over SFTP v3 (no O_NOFOLLOW, no inode numbers).
    """

    WINDOW_BYTES = 4 * 1024 * 1024
    concurrent_opens: ClassVar[bool] = False  # one SFTP session: one file at a time

    def __init__(
        self,
        ssh: SSHResource,
        root: str,
        *,
        sftp_server: str | None = None,
        request_bytes: int | None = None,
        timeout_seconds: float = 120.0,
    ) -> None:
        self.ssh = ssh
        self.root_setting = root
        self.sftp_server = sftp_server
        self.request_bytes = request_bytes
        self.timeout_seconds = timeout_seconds
        self._request = SMALL_READ
        self._connection: ExitStack | None = None
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._root = ""

    def __enter__(self) -> SFTPMediaSource:
        self._session()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the SFTP session and the SSH connection (a later ``open`` connects again)."""
        self._drop_session()
        connection, self._connection, self._client = self._connection, None, None
        if connection is not None:
            connection.close()

    @property
    def root(self) -> str:
        """MEDIA_ROOT as the server resolves it (connects if needed)."""
        self._session()
        return self._root

    def _drop_session(self) -> None:
        sftp, self._sftp = self._sftp, None
        if sftp is not None:
            sftp.close()

    def _transport(self) -> paramiko.Transport:
        if self._client is not None:
            transport = self._client.get_transport()
            if transport is not None and transport.is_active():
                return transport
            self.close()
        with ExitStack() as stack:
            client = stack.enter_context(self.ssh.connect())
            transport = client.get_transport()
            if transport is None:  # pragma: no cover - connect() yields a connected client
                raise MigrationError(Category.CONNECTION_ERROR, "SSH connection closed", ours=True)
            self._client, self._connection = client, stack.pop_all()
            return transport

    def _session(self) -> paramiko.SFTPClient:
        if self._sftp is not None:
            return self._sftp
        transport = self._transport()
        self._request = self.request_bytes or read_request_bytes(transport.remote_version)
        try:
            sftp = self._open_sftp(transport)
        except (paramiko.SSHException, EOFError, OSError) as problem:
            raise MigrationError(
                Category.CONNECTION_ERROR,
                f"the media host refused an SFTP session ({type(problem).__name__})",
                retryable=False,
                ours=True,
            ) from None
        sftp.get_channel().settimeout(self.timeout_seconds)
        try:
            root = sftp.normalize(self.root_setting)
            is_directory = stat.S_ISDIR(sftp.stat(root).st_mode or 0)
        except OSError:
            is_directory = False
        if not is_directory:
            sftp.close()
            raise MigrationError(
                Category.VALIDATION_ERROR, "MEDIA_ROOT is not a directory on the media host", ours=True
            )
        self._root, self._sftp = root, sftp
        return sftp

    def _open_sftp(self, transport: paramiko.Transport) -> paramiko.SFTPClient:
        # A channel packet holds one whole READ reply: fewer, larger packets through paramiko's Python layers.
        packet = self._request + 1024
        if self.sftp_server is None:
            client = paramiko.SFTPClient.from_transport(
                transport, window_size=self.WINDOW_BYTES, max_packet_size=packet
            )
            if client is None:  # pragma: no cover - paramiko returns None only without a channel
                raise paramiko.SSHException("no SFTP channel")
            return client
        channel = transport.open_session(window_size=self.WINDOW_BYTES, max_packet_size=packet)
        channel.exec_command(self.sftp_server)
        return paramiko.SFTPClient(channel)

    def resolve(self, relative_path: str) -> tuple[str, int]:
        """The real path under the root and the file's size, or a :class:`MediaError`. Nothing is opened."""
        _check_lexically(relative_path)
        sftp = self._session()
        try:
            return self._resolve(sftp, relative_path)
        except MediaError:
            raise
        except (paramiko.SSHException, EOFError, TimeoutError) as problem:
            self._drop_session()
            raise _connection_error(problem) from None
        except OSError as problem:
            raise self._remote_problem(problem) from None

    def _remote_problem(self, problem: OSError) -> MediaError | MigrationError:
        """An SFTP error with no better mapping: the file's problem while the session is alive, else the
        connection's (a dropped connection must not quarantine files as missing)."""
        channel = self._sftp.get_channel() if self._sftp is not None else None
        if channel is None or channel.closed or not channel.get_transport().is_active():
            self._drop_session()
            return _connection_error(problem)
        return MissingBlob(f"the media host cannot read the file ({type(problem).__name__})")

    def _resolve(self, sftp: paramiko.SFTPClient, relative_path: str) -> tuple[str, int]:
        try:
            real = sftp.normalize(posixpath.join(self._root, relative_path))
        except FileNotFoundError:
            self._classify_unresolvable(sftp, relative_path)
        except PermissionError:
            raise MissingBlob("file is not reachable (permission denied)") from None
        if not _inside(real, self._root):
            raise UnsafePath("path leaves MEDIA_ROOT through a symlink")
        if real == self._root:
            raise MissingBlob("path names MEDIA_ROOT itself, not a file")
        try:
            info = sftp.lstat(real)
        except FileNotFoundError:
            raise MissingBlob("no such file under MEDIA_ROOT") from None
        except PermissionError:
            raise MissingBlob("file is not reachable (permission denied)") from None
        mode = info.st_mode or 0
        if stat.S_ISLNK(mode):
            raise UnsafePath("path changed to a symlink while being resolved")
        if stat.S_ISDIR(mode):
            raise MissingBlob("path names a directory, not a file")
        if not stat.S_ISREG(mode):
            raise UnsafePath("path names a device, FIFO or socket, not a regular file")
        return real, int(info.st_size or 0)

    def _classify_unresolvable(self, sftp: paramiko.SFTPClient, relative_path: str) -> NoReturn:
        """``normalize`` failed: a missing component is :class:`MissingBlob`; a symlink that cannot be resolved
        (dangling, a loop) is :class:`UnsafePath` — where it leads cannot be proved to stay under the root."""
        current = self._root
        for part in relative_path.split("/"):
            current = posixpath.join(current, part)
            try:
                mode = sftp.lstat(current).st_mode or 0
            except OSError:
                break
            if stat.S_ISLNK(mode):
                raise UnsafePath("path goes through a symlink that cannot be resolved safely")
        raise MissingBlob("no such file under MEDIA_ROOT")

    @contextmanager
    def open(self, relative_path: str) -> Iterator[BinaryIO]:
        real, size = self.resolve(relative_path)
        sftp = self._session()
        try:
            remote = sftp.open(real, "rb")  # unbuffered: paramiko's read buffer grows by concatenation
        except FileNotFoundError:
            raise MissingBlob("file disappeared while being opened") from None
        except PermissionError:
            raise MissingBlob("file is not readable (permission denied)") from None
        except (paramiko.SSHException, EOFError, TimeoutError) as problem:
            self._drop_session()
            raise _connection_error(problem) from None
        except OSError as problem:
            raise self._remote_problem(problem) from None
        remote.MAX_REQUEST_SIZE = self._request  # instance attribute: what prefetch and read ask per request
        try:
            yield cast(BinaryIO, _SFTPReader(remote, size, self.timeout_seconds))
        except (paramiko.SSHException, EOFError, TimeoutError) as problem:
            self._drop_session()
            raise _connection_error(problem) from None
        finally:
            if self._sftp is sftp:
                self._finish(remote, size)

    def _finish(self, remote: paramiko.SFTPFile, size: int) -> None:
        """Close a file read to its end; a file left early drops the session, as its unread prefetched replies
        would otherwise be buffered by the next request."""
        if remote.tell() < size:
            self._drop_session()
            return
        try:
            remote.close()
        except (paramiko.SSHException, EOFError, OSError):
            self._drop_session()


PREFETCH_WINDOW = 16 * 1024 * 1024  # bytes of a file requested ahead of its reader at most
PREFETCH_THREAD_SUFFIX = "(_prefetch_thread)"  # how CPython names paramiko's prefetch thread: Thread-N (target)


def _request_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.endswith(PREFETCH_THREAD_SUFFIX)}


class _SFTPReader(io.RawIOBase):
    """A remote file read pipelined, a window at a time.

    ``read(n)`` is one join of prefetched replies (paramiko's own ``read(n)`` for a large ``n`` appends each
    reply to a bytes buffer, copying it again and again: quadratic in n / 32 KiB).

    paramiko sends a prefetch's READ requests from a thread of its own, and takes its prefetch for done
    once every request sent so far is answered. A reader that catches up with a lagging request thread
    (a loaded machine) makes paramiko read the rest of the file one request at a time, while the replies
    to the requests that thread goes on sending stay in memory until the file is closed (paramiko#2418):
    a whole file in memory. So each window of ``PREFETCH_WINDOW`` bytes is prefetched on its own, and read
    only once its requests are all sent (the request thread has ended); the next window is prefetched
    when the reader reaches it. A window's requests fit in any SSH window, so sending them never waits on
    the reader."""

    def __init__(self, remote: paramiko.SFTPFile, size: int, timeout_seconds: float) -> None:
        super().__init__()
        self._remote = remote
        self._size = size
        self._timeout = timeout_seconds
        self._requested = 0  # the end of the windows prefetched so far

    def readable(self) -> bool:
        return True

    def _prefetch_next_window(self) -> None:
        end = min(self._size, self._requested + PREFETCH_WINDOW)
        before = _request_threads()
        self._remote.prefetch(end)  # from the current position to ``end``
        for thread in _request_threads() - before:
            thread.join(self._timeout)
        self._requested = end

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        pieces: list[bytes] = []
        remaining = size
        while remaining > 0:
            position = self._remote.tell()
            if position >= self._requested and self._requested < self._size:
                self._prefetch_next_window()
            # never past the window's end (paramiko would stop prefetching there); past the size the file
            # had when opened (it grew), one request at a time
            ahead = self._requested - position if position < self._requested else self._remote.MAX_REQUEST_SIZE
            piece = self._remote.read(min(remaining, self._remote.MAX_REQUEST_SIZE, ahead))
            if not piece:
                break
            pieces.append(piece)
            remaining -= len(piece)
        return b"".join(pieces)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def tell(self) -> int:
        return int(self._remote.tell())


def _connection_error(problem: BaseException) -> MigrationError:
    if isinstance(problem, TimeoutError):
        return MigrationError(Category.TIMEOUT_ERROR, "the media host stopped answering", ours=True)
    return MigrationError(
        Category.CONNECTION_ERROR, f"lost the SFTP session to the media host ({type(problem).__name__})", ours=True
    )
