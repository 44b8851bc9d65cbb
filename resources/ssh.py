"""SSH to the legacy host on paramiko: known_hosts required, unknown keys rejected, keys only.

Commands are argv lists joined with ``shlex.quote`` — a parameter can never become shell
syntax. Every failure is mapped to a §8 category.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import paramiko
from dagster import ConfigurableResource
from pydantic import Field

from resources.errors import Category, MigrationError
from resources.processes import PID_MARKER, ChannelProcess, Process, SSHProcess
from resources.resident import OFFERS, offer_key, open_channel, resident_invocation
from worker.resident import CHANNEL_ENV, Offer

# Starts the command as a child that keeps the session's stdin, prints the child's PID (what a timeout
# terminates and kills), and exits with its status: 128+N when a signal N killed it. OpenSSH reports a
# process killed by a signal as an "exit-signal" request, which paramiko drops (exit status -1,
# indistinguishable from a lost connection); the shell's 128+N travels as a plain exit status.
_WRAPPER = f'exec 3<&0; "$@" <&3 3<&- & pid=$!; exec 3<&-; echo "{PID_MARKER}$pid"; wait "$pid"'
# With a command to check first: ``command -v`` of it in the same session, and exit 127 (COMMAND_NOT_FOUND,
# worker.py) with a category line before anything runs when it is not there. As a command of its own, the
# check cost every worker command a second session: the user's login shell again (0.19 s on this project's
# machines).
_CHECKED = (
    'command -v "$1" >/dev/null 2>&1 || { echo "COMMAND_NOT_FOUND: $1 is not installed" >&2; exit 127; }; shift; '
)


NUDGE_SECONDS = 0.002
FIRST_ANSWER_SECONDS = 1.0  # the RFC has a server answer every global request that asks for an answer


def _first_round_trip(transport: paramiko.Transport) -> None:
    """The connection's first round trip after authentication, made here so that a command's is not the one
    that waits ~40 ms. sshd writes a message of its own then (OpenSSH's host keys), which this end's TCP
    acknowledges only with its next write, or after its delayed-ACK timer (~40 ms on Linux): sshd's answer
    to whatever is asked first waits behind it (Nagle's algorithm at sshd). So a keepalive is asked while
    an SSH ``ignore`` message goes every 2 ms, each carrying TCP's acknowledgement of what has arrived: the
    first request after connecting took 42–45 ms without them, ~1 ms with. A host that has not answered
    within ``FIRST_ANSWER_SECONDS`` is left to the command (paramiko's wait ends with the connection)."""
    asking = threading.Thread(
        target=transport.global_request, args=("keepalive@openssh.com",), name="ssh-first-round-trip", daemon=True
    )
    asking.start()
    deadline = time.monotonic() + FIRST_ANSWER_SECONDS
    with contextlib.suppress(Exception):  # a connection closed meanwhile: the command will say so
        while asking.is_alive() and time.monotonic() < deadline:
            transport.send_ignore(1)
            asking.join(NUDGE_SECONDS)


def quote_argv(argv: Sequence[str]) -> str:
    """One shell word per element, whatever it holds (``; rm -rf /``, ``$(id)``, quotes)."""
    return " ".join(shlex.quote(str(arg)) for arg in argv)


class SSHResource(ConfigurableResource):
    """The legacy host. Host keys come only from ``known_hosts_file``; no agent, no password."""

    host: str
    port: int = 22
    username: str
    key_file: str
    known_hosts_file: str
    connect_timeout_seconds: float = 10.0
    keepalive_seconds: int = 30
    kill_grace_seconds: float = Field(default=5.0, description="SIGTERM → SIGKILL delay on timeout")

    @contextmanager
    def connect(self) -> Iterator[paramiko.SSHClient]:
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(self.known_hosts_file)
        except OSError as problem:
            raise MigrationError(
                Category.SSH_HOST_KEY_ERROR, f"known_hosts file unreadable: {problem.strerror}"
            ) from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                self.host,
                port=self.port,
                sock=self._socket(),
                username=self.username,
                key_filename=self.key_file,
                look_for_keys=False,
                allow_agent=False,
                timeout=self.connect_timeout_seconds,
                banner_timeout=self.connect_timeout_seconds,
                auth_timeout=self.connect_timeout_seconds,
            )
        except paramiko.BadHostKeyException:
            client.close()
            raise MigrationError(
                Category.SSH_HOST_KEY_ERROR, f"host key of {self.host}:{self.port} changed: refusing to connect"
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            raise MigrationError(
                Category.AUTHENTICATION_ERROR, f"key authentication as {self.username} was refused"
            ) from None
        except paramiko.SSHException as problem:
            client.close()
            if "known_hosts" in str(problem):
                raise MigrationError(
                    Category.SSH_HOST_KEY_ERROR, f"{self.host}:{self.port} is not in known_hosts: refusing to connect"
                ) from None
            raise MigrationError(Category.CONNECTION_ERROR, f"SSH negotiation failed: {problem}") from None
        except (TimeoutError, OSError) as problem:
            client.close()
            raise MigrationError(
                Category.CONNECTION_ERROR, f"cannot reach {self.host}:{self.port}: {problem}"
            ) from None
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(self.keepalive_seconds)
            _first_round_trip(transport)
        try:
            yield client
        finally:
            client.close()

    def _socket(self) -> socket.socket:
        """The TCP connection, with Nagle's algorithm off before the handshake: paramiko writes its
        messages in small pieces, and each small write behind an unacknowledged one waited for the
        peer's delayed ACK (~40 ms on Linux; the handshake took 65 ms with it, 25 ms without)."""
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_seconds)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def start(self, client: paramiko.SSHClient, argv: Sequence[str], stdin: bytes, check: str | None = None) -> Process:
        """Start ``argv`` on the host with ``stdin`` fed to it; the PID is reported first. ``check``: a
        command that must be on the host's PATH (or executable) first, else nothing runs and the exit
        status is 127 with a ``COMMAND_NOT_FOUND`` line on stderr. An ``argv`` that asks for a resident worker
        (``env CLINIC_MIGRATE_RESIDENT_SECONDS=N …``) goes through its channel once one was offered for the
        same invocation (resources/resident.py): no login shell, and the worker is there."""
        invocation = resident_invocation(argv)
        if invocation is None:
            return self._through_shell(client, argv, stdin, check)
        key = offer_key(self.host, self.port, self.username, invocation.command)
        offer = OFFERS.recall(key)
        if offer is not None:
            opened = open_channel(client, offer, invocation, stdin, self.connect_timeout_seconds)
            if opened is not None:
                return ChannelProcess(client, *opened)
            OFFERS.forget(key)

        def offered(said: str) -> None:
            if (offer := Offer.parse(said)) is not None:
                OFFERS.remember(key, offer)

        return self._through_shell(client, ["env", f"{CHANNEL_ENV}=1", *argv], stdin, check, offered)

    def _through_shell(
        self,
        client: paramiko.SSHClient,
        argv: Sequence[str],
        stdin: bytes,
        check: str | None,
        on_offer: Callable[[str], None] = lambda _said: None,
    ) -> SSHProcess:
        script, args = (_WRAPPER, list(argv)) if check is None else (_CHECKED + _WRAPPER, [check, *argv])
        return SSHProcess(client, quote_argv(["sh", "-c", script, "worker", *args]), stdin, on_offer)
