"""A resident worker's channel, from the Dagster side (worker/resident.py has the other side).

A command whose invocation asks for a resident worker (``env CLINIC_MIGRATE_RESIDENT_SECONDS=N … command``)
runs through the shell the first time, asked to say where the channel is. What it said — a loopback port
on the host and the server's token — is kept per SSH destination and invocation, in memory and in a file
of this user's (mode 0600 in a folder of mode 0700: ``$XDG_CACHE_HOME/clinic-migrate``, else
``~/.cache/clinic-migrate``), since Dagster runs each step in a process of its own. The next commands open
an SSH ``direct-tcpip`` channel to that port on the connection they already have: no login shell, no
client process. Until the spare has said it took a command, nothing of it has run: a channel that cannot
be opened (the host forbids forwarding, the server left), a peer that cannot prove it holds the token, or
a spare that refuses (the worker's installation changed) drops what was kept and the command runs through
the shell, which says where the new channel is.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import paramiko

from worker.resident import (
    CHANNEL_HELLO,
    MAX_CHANNEL_REQUEST_BYTES,
    NONCE_BYTES,
    PID,
    Offer,
    channel_request,
    private_folder,
    proof,
    read_exactly,
    resident_seconds,
)


class Invocation(NamedTuple):
    """A worker command's argv seen as ``env NAME=VALUE … COMMAND ARGS…``."""

    env: dict[str, str]
    command: list[str]  # the words up to the worker's own arguments: what a channel's offer is kept for
    args: list[str]


def resident_invocation(argv: Sequence[str]) -> Invocation | None:
    """``argv``'s variables (set through ``env``, nested or not), its command and arguments, when the
    variables ask for a resident worker; None otherwise (or for ``env`` with options)."""
    env: dict[str, str] = {}
    position = 0
    while position < len(argv) and argv[position] == "env":
        position += 1
        while position < len(argv) and "=" in argv[position] and not argv[position].startswith("-"):
            name, value = argv[position].split("=", 1)
            env[name] = value
            position += 1
    if position >= len(argv) or resident_seconds(env) == 0:  # the worker's own reading of the variable
        return None
    return Invocation(env, list(argv[: position + 1]), list(argv[position + 1 :]))


class Offers:
    """The channels offered, per key: in memory, and in files of this user's (another Dagster process of the
    same deployment finds them there)."""

    def __init__(self) -> None:
        self.known: dict[str, Offer] = {}

    @staticmethod
    def _file(key: str) -> Path | None:
        folder = private_folder(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clinic-migrate")
        return None if folder is None else folder / f"channel-{key}"

    def recall(self, key: str) -> Offer | None:
        if key in self.known:
            return self.known[key]
        path = self._file(key)
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if path is not None and (offer := Offer.parse(path.read_text())) is not None:
                self.known[key] = offer
                return offer
        return None

    def remember(self, key: str, offer: Offer) -> None:
        self.known[key] = offer
        path = self._file(key)
        if path is None:
            return
        written = path.with_name(f".{path.name}.{os.getpid()}")
        with contextlib.suppress(OSError):
            fd = os.open(written, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(offer.said())
            os.replace(written, path)

    def forget(self, key: str) -> None:
        self.known.pop(key, None)
        path = self._file(key)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


OFFERS = Offers()


def offer_key(host: str, port: int, username: str, command: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([host, port, username, list(command)]).encode()).hexdigest()[:24]


def open_channel(
    client: paramiko.SSHClient, offer: Offer, invocation: Invocation, stdin: bytes, timeout: float
) -> tuple[paramiko.Channel, int] | None:
    """A channel to the resident worker whose spare took the command (and its PID), or None: nothing of the
    command ran (no channel, a peer without the token, a spare that refused it)."""
    transport = client.get_transport()
    request = channel_request(invocation.args, invocation.env, stdin)
    if transport is None or len(request) > MAX_CHANNEL_REQUEST_BYTES:
        return None
    try:
        channel = transport.open_channel("direct-tcpip", ("127.0.0.1", offer.port), ("127.0.0.1", 0), timeout=timeout)
    except (paramiko.SSHException, OSError):
        return None
    channel.settimeout(timeout)
    try:
        client_nonce = os.urandom(NONCE_BYTES)
        channel.sendall(CHANNEL_HELLO + client_nonce)
        said = _received(channel, NONCE_BYTES + hashlib.sha256().digest_size)
        server_nonce, shown = said[:NONCE_BYTES], said[NONCE_BYTES:]
        if not hmac.compare_digest(shown, proof(offer.token, b"server", client_nonce, server_nonce)):
            raise ConnectionError("the channel's peer does not hold the token")
        channel.sendall(proof(offer.token, b"client", client_nonce, server_nonce) + request)
        (pid,) = PID.unpack(_received(channel, PID.size))
    except (OSError, paramiko.SSHException):
        channel.close()
        return None
    return channel, pid


def _received(channel: paramiko.Channel, size: int) -> bytes:
    said = read_exactly(channel, size)
    if said is None:
        raise ConnectionError("the channel closed")
    return said
