"""Firestore as a thin resource, and the writer the app migration path commits its documents with.

``FirestoreResource(project, emulator_host)`` builds a ``google.cloud.firestore.Client``; with an
emulator host the client uses anonymous credentials and an insecure channel to that host.

``DocumentWriter.commit(writes)`` writes full documents (``set``, never a merge) and deletes, in
order, in requests of at most 500 writes and about 3 MiB (sized with Firestore's storage-size
rules, ``worker.firestore_size``), retrying a request on ABORTED, UNAVAILABLE, DEADLINE_EXCEEDED
and RESOURCE_EXHAUSTED with exponential backoff and jitter. A request that finally fails raises
``PartialCommit``: the first ``committed`` writes are durable, the rest are not (except, when
``in_doubt`` is non-zero, the failed request itself, whose outcome the server never reported).
Against real Firestore a ``RampUpLimiter`` follows the 500/50/5 rule; against the emulator there
is none.

WriteBatch or BulkWriter: ``bench/firestore_writes.py`` wrote the same 20,000 documents (~540
bytes each, shaped like ``files``) into fresh collections of the emulator, limiter off, 7 rounds
alternating which method went first, on a 2-core machine shared with other jobs (load 4-5):

- WriteBatch commits (``DocumentWriter``, 500 writes per request, one request at a time):
  1,063-2,569 docs/s per round; 140,000 documents in 79.1 s overall = 1,770 docs/s;
- BulkWriter (parallel BatchWrite requests of 20, its ramp-up lifted to 1,000,000 ops/s, a
  per-document success callback): 1,448-2,378 docs/s per round; 140,000 in 80.7 s = 1,736 docs/s;
- WriteBatch / BulkWriter: 0.71-1.46x per round, 1.02x overall: the same speed within the noise.

At equal speed the choice is exactness: BulkWriter's callbacks do name every written document,
but they arrive in no particular order across parallel, non-atomic requests, so after a failure
the durable writes are a scattered set, not a prefix; each WriteBatch Commit is atomic and they
go in order, so the writes before the failed request are exactly the durable ones. (BulkWriter
also retries on its own and rate-limits with a fixed policy; here both are explicit.)
``DocumentWriter`` therefore commits WriteBatches: the same atomic Commit requests, which it builds
itself as protobuf messages (``commit_request``, pinned request for request against ``WriteBatch.set``
by a test) and sends through the Firestore API client (``CommitChannel``, the public GAPIC layer of
``google.cloud.firestore``): the client library's proto-plus encoding cost ~430 µs per ~550-byte document
on this 2-core machine, ours ~45 µs (``bench/app.py`` measures the difference as the raw loop's cost).
Reads with a channel (``get_many``) are raw BatchGetDocuments calls on the same channel, read on the calling
thread and decoded from the protobuf messages directly: 15-21 µs a document looked up against 116-153 µs
through the library's snapshots (``bench/app.py``, 36,866 paths, half of them missing, seven runs).

Nothing here logs; exception messages name counts, request numbers and gRPC codes, never
document data or credentials.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

import grpc
from dagster import ConfigurableResource
from google.api_core import exceptions as api_exceptions
from google.api_core.datetime_helpers import DatetimeWithNanoseconds
from google.api_core.gapic_v1 import routing_header
from google.auth.credentials import AnonymousCredentials
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter
from google.cloud.firestore_v1.services.firestore import FirestoreClient as FirestoreApi
from google.cloud.firestore_v1.services.firestore.transports.grpc import FirestoreGrpcTransport
from google.cloud.firestore_v1.types import firestore as firestore_types
from google.protobuf import struct_pb2
from grpc.experimental import ChannelOptions

from worker.firestore_size import document_size, name_size

MAX_WRITES_PER_REQUEST = 500
MAX_BYTES_PER_REQUEST = 3 * 1024 * 1024
GET_CHUNK = 300
PAGE_SIZE = 500
EMULATOR_HOST_VARIABLE = "FIRESTORE_EMULATOR_HOST"
# The writer's gRPC channel reads a server-streaming call (BatchGetDocuments) on the calling thread, not
# handed over message by message from gRPC's channel thread. With the raw call (CommitChannel.batch_get), a
# document looked up costs ~9 µs of this process's CPU instead of 45-55 µs through the API client's wrappers
# and the channel thread (500-document look-ups against the emulator, 2026-12-05); a migration's parent
# look-ups are on its critical path.
STREAMS_ON_THE_CALLING_THREAD = (ChannelOptions.SingleThreadedUnaryStream, 1)
_BATCH_GET = "/google.firestore.v1.Firestore/BatchGetDocuments"

RETRYABLE: tuple[type[Exception], ...] = (
    api_exceptions.Aborted,
    api_exceptions.ServiceUnavailable,
    api_exceptions.DeadlineExceeded,
    api_exceptions.ResourceExhausted,
)
# errors after which the server may have applied the commit without telling us
_MAYBE_APPLIED: tuple[type[Exception], ...] = (
    api_exceptions.ServiceUnavailable,
    api_exceptions.DeadlineExceeded,
    api_exceptions.InternalServerError,
    api_exceptions.Unknown,
    api_exceptions.Cancelled,
)


# --------------------------------------------------------------------------- writes and requests


@dataclass(frozen=True)
class Write:
    """One write: the full document at ``path`` (e.g. ``users/42``), or its deletion when ``data`` is None.

    ``create``: the document must not exist yet (an exists=false precondition): if it does, its whole
    request is refused (``ALREADY_EXISTS``) and nothing of it is written."""

    path: str
    data: Mapping[str, Any] | None
    create: bool = False

    def __post_init__(self) -> None:
        segments = self.path.strip("/").split("/")
        if len(segments) % 2 or not all(segments):
            raise ValueError("a document path has an even number of non-empty segments (collection/id/...)")
        if self.create and self.data is None:
            raise ValueError("a deletion cannot be a create")

    @property
    def is_delete(self) -> bool:
        return self.data is None

    @cached_property
    def size(self) -> int:
        """Bytes this write adds to a request: the document's storage size (a delete: its name)."""
        if self.data is None:
            return name_size(self.path)
        return document_size(self.path, self.data)


def split_writes(
    writes: Sequence[Write], *, max_writes: int = MAX_WRITES_PER_REQUEST, max_bytes: int = MAX_BYTES_PER_REQUEST
) -> list[list[Write]]:
    """Cut ``writes``, in order, into requests of at most ``max_writes`` writes and ``max_bytes`` bytes.

    A write bigger than ``max_bytes`` on its own goes alone in its request.
    """
    if max_writes < 1 or max_bytes < 1:
        raise ValueError("max_writes and max_bytes must be positive")
    requests: list[list[Write]] = []
    current: list[Write] = []
    current_bytes = 0
    for write in writes:
        size = write.size
        if current and (len(current) >= max_writes or current_bytes + size > max_bytes):
            requests.append(current)
            current, current_bytes = [], 0
        current.append(write)
        current_bytes += size
    if current:
        requests.append(current)
    return requests


# --------------------------------------------------------------------------- encoding

_CommitRequestPb: Any = firestore_types.CommitRequest.pb()
_BatchGetRequestPb: Any = firestore_types.BatchGetDocumentsRequest.pb()
_BatchGetResponsePb: Any = firestore_types.BatchGetDocumentsResponse.pb()
_NULL_VALUE = struct_pb2.NULL_VALUE
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)


def _encode_timestamp(target: Any, value: datetime) -> None:
    """A datetime into a ``Timestamp`` message, with the client library's arithmetic (a naive value is UTC;
    microseconds through ``int(seconds * 1e6)``, exactly as ``google.cloud._helpers`` computes them)."""
    if isinstance(value, DatetimeWithNanoseconds):
        target.CopyFrom(value.timestamp_pb())
        return
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    micros = int(((aware - _EPOCH) // _SECOND) * 1e6) + aware.microsecond
    seconds, micros = divmod(micros, 10**6)
    target.seconds = seconds
    target.nanos = micros * 1000


def _encode_value(target: Any, value: Any, database: str) -> None:
    """Fill the ``google.firestore.v1.Value`` message ``target`` with ``value``.

    The same Firestore types as the client library's ``WriteBatch.set`` gives (a test pins it request for
    request), built on the protobuf messages directly instead of through proto-plus wrappers, which cost
    ten times as much per value. Plain JSON values, datetimes, bytes, geo points and document references;
    anything else is a ``TypeError``.
    """
    kind = type(value)
    if kind is str:
        target.string_value = value
    elif kind is int:
        target.integer_value = value
    elif kind is bool:
        target.boolean_value = value
    elif value is None:
        target.null_value = _NULL_VALUE
    elif kind is dict:
        _encode_map(target, value, database)
    elif kind is list or kind is tuple:
        _encode_array(target, value, database)
    elif kind is float:
        target.double_value = value
    else:  # subclasses and the rarer types, in the client library's order
        _encode_other(target, value, database)


def _encode_map(target: Any, value: Mapping[Any, Any], database: str) -> None:
    target.map_value.SetInParent()  # an empty map is a map, not an unset value
    _encode_fields(target.map_value.fields, value, database)


def _encode_fields(fields: Any, value: Mapping[Any, Any], database: str) -> None:
    """A map's entries (a document's fields, or a map value's) into the protobuf map ``fields``."""
    for key, item in value.items():
        if type(key) is not str:
            raise TypeError("Firestore field names and map keys are strings")
        _encode_value(fields[key], item, database)


def _encode_array(target: Any, value: Iterable[Any], database: str) -> None:
    values = target.array_value.values
    target.array_value.SetInParent()
    for item in value:
        _encode_value(values.add(), item, database)


def _encode_other(target: Any, value: Any, database: str) -> None:
    if isinstance(value, bool):
        target.boolean_value = value
    elif isinstance(value, int):
        target.integer_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, datetime):
        _encode_timestamp(target.timestamp_value, value)
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, bytes):
        target.bytes_value = value
    elif isinstance(value, firestore.DocumentReference):
        target.reference_value = f"{database}/documents/{value.path}"
    elif isinstance(value, firestore.GeoPoint):
        target.geo_point_value.CopyFrom(value.to_protobuf())
    elif isinstance(value, list | tuple | set | frozenset):
        _encode_array(target, value, database)
    elif isinstance(value, dict):
        _encode_map(target, value, database)
    else:
        raise TypeError(f"Firestore cannot store a value of type {type(value).__name__}")


def commit_request(database: str, writes: Sequence[Write]) -> Any:
    """The ``google.firestore.v1.CommitRequest`` protobuf message of ``writes``: full sets (no merge; a
    create's with the exists=false precondition) and deletes, in order, for the database
    ``projects/{project}/databases/{id}``."""
    request = _CommitRequestPb(database=database)
    prefix = f"{database}/documents/"
    for write in writes:
        message = request.writes.add()
        if write.data is None:
            message.delete = prefix + write.path.strip("/")
            continue
        document = message.update
        document.name = prefix + write.path.strip("/")
        _encode_fields(document.fields, write.data, database)
        if write.create:
            message.current_document.exists = False
    return request


# --------------------------------------------------------------------------- rate limiting


class RampUpLimiter:
    """A token bucket following Firestore's 500/50/5 rule.

    The rate starts at ``initial_rate`` operations per second when the limiter is first used and
    grows by ``growth`` (50 %) every ``step_seconds`` (5 minutes), up to ``max_rate`` if given.
    The bucket holds at most one second of operations. ``reserve(n)`` takes ``n`` tokens and says
    how long to wait before sending them (the bucket may go into debt, so a request larger than
    the bucket still goes, later); ``acquire(n)`` also sleeps that long. Clock and sleep are
    injectable, so the logic is testable without waiting.
    """

    def __init__(
        self,
        *,
        initial_rate: float = 500.0,
        growth: float = 1.5,
        step_seconds: float = 300.0,
        max_rate: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if initial_rate <= 0 or growth < 1 or step_seconds <= 0:
            raise ValueError("initial_rate > 0, growth >= 1 and step_seconds > 0 are required")
        self.initial_rate = initial_rate
        self.growth = growth
        self.step_seconds = step_seconds
        self.max_rate = max_rate
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._started: float | None = None
        self._tokens = 0.0
        self._updated = 0.0

    def rate(self, now: float | None = None) -> float:
        """Operations per second allowed at ``now`` (the clock's current time by default)."""
        now = self._clock() if now is None else now
        if self._started is None:
            return self._capped(self.initial_rate)
        steps = math.floor(max(0.0, now - self._started) / self.step_seconds)
        return self._capped(self.initial_rate * self.growth**steps)

    def _capped(self, rate: float) -> float:
        return min(rate, self.max_rate) if self.max_rate is not None else rate

    def reserve(self, operations: int) -> float:
        """Take ``operations`` tokens; return the seconds to wait before sending them."""
        if operations < 0:
            raise ValueError("operations must be >= 0")
        with self._lock:
            now = self._clock()
            if self._started is None:
                self._started = self._updated = now
                self._tokens = self.rate(now)  # a full bucket at the start
            rate = self.rate(now)
            self._tokens = min(rate, self._tokens + (now - self._updated) * rate)
            self._updated = now
            self._tokens -= operations
            return 0.0 if self._tokens >= 0 else -self._tokens / rate

    def acquire(self, operations: int) -> float:
        """Wait until ``operations`` may be sent; return the seconds waited."""
        wait = self.reserve(operations)
        if wait > 0:
            self._sleep(wait)
        return wait


# --------------------------------------------------------------------------- retries and results


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt ``k`` (from 1) waits ``initial * multiplier**(k-1)``,
    capped at ``maximum``, scaled by a random factor in ``[1 - jitter, 1]`` before retrying."""

    attempts: int = 6
    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if (
            self.attempts < 1
            or self.initial < 0
            or self.maximum < 0
            or self.multiplier < 1
            or not 0 <= self.jitter <= 1
        ):
            raise ValueError("invalid retry policy")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.maximum, self.initial * self.multiplier ** (attempt - 1))
        draw = (rng or random).random()
        return base * (1 - self.jitter * draw)


@dataclass(frozen=True)
class CommitResult:
    writes: int  # writes committed (all of them)
    requests: int  # commit requests that succeeded
    retries: int  # failed attempts that were retried
    bytes: int  # sum of the writes' sizes
    waited: float  # seconds spent in the rate limiter and in backoff


class PartialCommit(Exception):
    """A commit request failed for good: exactly the first ``committed`` writes are durable.

    ``in_doubt`` is the number of writes after those (the failed request, which is atomic) whose
    outcome is unknown because the last error (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN,
    CANCELLED or one raised outside the server) may have come after the server applied them; it
    is 0 when the server refused the request (it is atomic, so none of it was written). Writes
    after the failed request were not attempted.
    """

    def __init__(
        self,
        committed: int,
        cause: BaseException,
        *,
        total: int = 0,
        request: int = 0,
        attempts: int = 0,
        in_doubt: int = 0,
    ) -> None:
        self.committed = committed
        self.cause = cause
        self.total = total
        self.request = request
        self.attempts = attempts
        self.in_doubt = in_doubt
        code = getattr(cause, "grpc_status_code", None)
        reason = type(cause).__name__ + (f" ({code.name})" if code is not None else "")
        super().__init__(
            f"{committed} of {total} writes committed; request {request} failed after {attempts} attempt(s): {reason}"
        )

    @property
    def already_exists(self) -> bool:
        """The request was refused because a document it creates (``Write.create``) exists: none of it
        was written."""
        return isinstance(self.cause, api_exceptions.AlreadyExists)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class StoredDocument:
    id: str
    path: str
    data: dict[str, Any]


def get_many(
    client: firestore.Client,
    paths: Iterable[str],
    *,
    fields: Sequence[str] | None = None,
    chunk_size: int = GET_CHUNK,
) -> dict[str, dict[str, Any] | None]:
    """The documents at ``paths`` (only ``fields`` if given), None for a missing one; in the paths' order."""
    field_paths = list(fields) if fields is not None else None

    def found(chunk: list[str]) -> dict[str, dict[str, Any]]:
        snapshots = client.get_all([client.document(path) for path in chunk], field_paths=field_paths)
        return {snapshot.reference.path: snapshot.to_dict() or {} for snapshot in snapshots if snapshot.exists}

    return _look_up(paths, found, chunk_size)


def _look_up(
    paths: Iterable[str], found: Callable[[list[str]], Mapping[str, dict[str, Any]]], chunk_size: int
) -> dict[str, dict[str, Any] | None]:
    """Each distinct path (slashes trimmed) with its document, or None, in the paths' order: ``found`` gives
    the documents that exist among a chunk of at most ``chunk_size`` paths."""
    wanted = list(dict.fromkeys(path.strip("/") for path in paths))
    documents: dict[str, dict[str, Any] | None] = dict.fromkeys(wanted)
    for start in range(0, len(wanted), chunk_size):
        documents.update(found(wanted[start : start + chunk_size]))
    return documents


class _Unusual(Exception):
    """A stored value the fast decoder leaves to the client library (references, bytes, special maps…)."""


def _decode_value(value: Any) -> Any:
    """A ``google.firestore.v1.Value`` message as the client library decodes it, for the types the app path
    stores (timestamps become ``DatetimeWithNanoseconds``, as the library gives them back)."""
    kind = value.WhichOneof("value_type")
    if kind == "string_value":
        return value.string_value
    if kind == "integer_value":
        return value.integer_value
    if kind == "boolean_value":
        return value.boolean_value
    if kind == "null_value":
        return None
    if kind == "timestamp_value":
        return DatetimeWithNanoseconds.from_timestamp_pb(value.timestamp_value)
    if kind == "double_value":
        return value.double_value
    if kind == "map_value":
        return _decode_fields(value.map_value.fields)
    if kind == "array_value":
        return [_decode_value(item) for item in value.array_value.values]
    raise _Unusual


def _decode_fields(fields: Any) -> dict[str, Any]:
    decoded = {}
    for key, item in fields.items():
        if key.startswith("__"):  # the library reads some such maps as vectors or BSON values
            raise _Unusual
        decoded[key] = _decode_value(item)
    return decoded


def _get_chunk(
    channel: CommitChannel, paths: Sequence[str], fields: Sequence[str] | None, timeout: float
) -> dict[str, dict[str, Any]]:
    """The documents found at ``paths`` (one BatchGetDocuments call, decoded from the protobuf messages
    directly); ``_Unusual`` when a value needs the library's decoder. gRPC errors are raised as the
    ``google.api_core`` exceptions the API client raises."""
    prefix = f"{channel.database}/documents/"
    request = _BatchGetRequestPb(database=channel.database, documents=[prefix + path for path in paths])
    if fields is not None:
        request.mask.field_paths.extend(fields)
    found: dict[str, dict[str, Any]] = {}
    try:
        for message in channel.batch_get(request, timeout=timeout, metadata=channel.batch_get_metadata):
            if message.HasField("found"):
                found[message.found.name.removeprefix(prefix)] = _decode_fields(message.found.fields)
    except grpc.RpcError as error:
        raise api_exceptions.from_grpc_error(error) from None
    return found


def stream_collection(
    client: firestore.Client,
    collection: str,
    shard: str,
    fields: Sequence[str] | None = None,
    *,
    page_size: int = PAGE_SIZE,
    order_by: str = "__name__",
) -> Iterator[StoredDocument]:
    """Every document of ``collection`` whose ``shard`` field equals ``shard``, in document-id order (or
    ``order_by``'s: documents without that field are not in it).

    Read a page of ``page_size`` at a time, each page starting after the last document of the
    previous one (a cursor), so the collection is never loaded at once.
    """
    if page_size < 1:
        raise ValueError("page_size must be positive")
    query = (
        client.collection(collection)
        .where(filter=FieldFilter("shard", "==", shard))
        .order_by(order_by)
        .limit(page_size)
    )
    if fields is not None:
        query = query.select(list(fields))
    last = None
    while True:
        page = query.start_after(last) if last is not None else query
        snapshots = list(page.stream())
        for snapshot in snapshots:
            yield StoredDocument(snapshot.id, snapshot.reference.path, snapshot.to_dict() or {})
        if len(snapshots) < page_size:
            return
        last = snapshots[-1]


def count_shard(client: firestore.Client, collection: str, shard: str) -> int:
    """The number of documents of ``collection`` whose ``shard`` field equals ``shard`` (server-side count)."""
    query = client.collection(collection).where(filter=FieldFilter("shard", "==", shard))
    return int(query.count().get()[0][0].value)


# --------------------------------------------------------------------------- the writer


@dataclass(frozen=True)
class CommitChannel:
    """Where a ``DocumentWriter`` sends its commits: the Firestore API client (the public GAPIC layer under
    ``google.cloud.firestore``) and the database ``projects/{project}/databases/{id}`` it writes to, with the
    request metadata that database needs."""

    api: FirestoreApi
    database: str
    metadata: tuple[tuple[str, str], ...] = ()

    @cached_property
    def batch_get(self) -> grpc.UnaryStreamMultiCallable:
        """BatchGetDocuments on the API client's own channel, protobuf messages in and out (see
        ``STREAMS_ON_THE_CALLING_THREAD``)."""
        return self.api.transport.grpc_channel.unary_stream(
            _BATCH_GET,
            request_serializer=_BatchGetRequestPb.SerializeToString,
            response_deserializer=_BatchGetResponsePb.FromString,
        )

    @cached_property
    def batch_get_metadata(self) -> tuple[tuple[str, str], ...]:
        """The channel's metadata and the routing header the API client adds to a BatchGetDocuments call."""
        return (*self.metadata, routing_header.to_grpc_metadata((("database", self.database),)))


class DocumentWriter:
    """Commits ordered writes to Firestore in bounded, retried, rate-limited requests (see the module doc).

    With a ``channel`` the requests are built as protobuf messages (``commit_request``) and sent with the
    Firestore API client; without one, through the client library's ``WriteBatch`` (the same requests, ten
    times the encoding cost). Reads always go through ``client``.
    """

    def __init__(
        self,
        client: firestore.Client,
        *,
        channel: CommitChannel | None = None,
        max_writes: int = MAX_WRITES_PER_REQUEST,
        max_bytes: int = MAX_BYTES_PER_REQUEST,
        limiter: RampUpLimiter | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if not 1 <= max_writes <= MAX_WRITES_PER_REQUEST:
            raise ValueError(f"max_writes must be between 1 and {MAX_WRITES_PER_REQUEST}")
        self.client = client
        self.channel = channel
        # the database written to, "projects/{project}/databases/{id}": the control DB's records of what a run
        # may have written are kept per database
        self.database = channel.database if channel is not None else database_name(client.project)
        self.max_writes = max_writes
        self.max_bytes = max_bytes
        self.limiter = limiter
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._sleep = sleep
        self._rng = rng or random.Random()

    def plan(self, writes: Sequence[Write]) -> list[list[Write]]:
        """The requests ``commit`` would send for ``writes``."""
        return split_writes(writes, max_writes=self.max_writes, max_bytes=self.max_bytes)

    def commit(self, writes: Sequence[Write]) -> CommitResult:
        """Commit ``writes`` in order; ``PartialCommit`` says how many are durable if a request fails.

        A value Firestore cannot store fails before anything of its request is sent (``in_doubt``
        is then 0).
        """
        total = len(writes)
        try:
            requests = self.plan(writes)
        except Exception as error:  # a value no request can carry: nothing was sent
            raise PartialCommit(0, error, total=total) from error
        committed = retries = size = 0
        waited = 0.0
        for number, request in enumerate(requests, start=1):
            attempt = 0
            encoded: Any = None
            while True:
                attempt += 1
                try:
                    if self.channel is None:
                        batch = self._batch(request)
                    elif encoded is None:
                        encoded = firestore_types.CommitRequest.wrap(commit_request(self.channel.database, request))
                except Exception as error:  # the client cannot encode a value: nothing was sent
                    raise PartialCommit(committed, error, total=total, request=number, attempts=attempt) from error
                try:
                    if self.limiter is not None:
                        waited += self.limiter.acquire(len(request))
                    # retries are ours, not the library's
                    if self.channel is None:
                        batch.commit(retry=None, timeout=self.timeout)
                    else:
                        self.channel.api.commit(
                            request=encoded, retry=None, timeout=self.timeout, metadata=self.channel.metadata
                        )
                    break
                except RETRYABLE as error:
                    if attempt >= self.retry.attempts:
                        in_doubt = len(request) if isinstance(error, _MAYBE_APPLIED) else 0
                        raise PartialCommit(
                            committed, error, total=total, request=number, attempts=attempt, in_doubt=in_doubt
                        ) from error
                    retries += 1
                    delay = self.retry.delay(attempt, self._rng)
                    waited += delay
                    self._sleep(delay)
                except api_exceptions.GoogleAPICallError as error:  # not worth retrying
                    in_doubt = len(request) if isinstance(error, _MAYBE_APPLIED) else 0
                    raise PartialCommit(
                        committed, error, total=total, request=number, attempts=attempt, in_doubt=in_doubt
                    ) from error
                except Exception as error:  # outside the server (e.g. a broken channel): outcome unknown
                    raise PartialCommit(
                        committed, error, total=total, request=number, attempts=attempt, in_doubt=len(request)
                    ) from error
            committed += len(request)
            size += sum(write.size for write in request)
        return CommitResult(writes=committed, requests=len(requests), retries=retries, bytes=size, waited=waited)

    def _batch(self, request: Sequence[Write]) -> firestore.WriteBatch:
        batch = self.client.batch()
        for write in request:
            reference = self.client.document(write.path)
            if write.data is None:
                batch.delete(reference)
            elif write.create:
                batch.create(reference, dict(write.data))
            else:
                batch.set(reference, dict(write.data))  # a full set: no merge
        return batch

    def get_many(
        self, paths: Iterable[str], *, fields: Sequence[str] | None = None
    ) -> dict[str, dict[str, Any] | None]:
        """See ``get_many``; each request retried as a commit is (it only reads)."""
        channel = self.channel
        if channel is None:
            return get_many(self.client, paths, fields=fields)
        paths = list(paths)
        try:
            return _look_up(paths, lambda chunk: self._retried(_get_chunk, channel, chunk, fields), GET_CHUNK)
        except _Unusual:
            return get_many(self.client, paths, fields=fields)

    def _retried(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args, timeout)``, again after a backoff on a retryable error, up to the policy's attempts."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return call(*args, self.timeout)
            except RETRYABLE:
                if attempt >= self.retry.attempts:
                    raise
                self._sleep(self.retry.delay(attempt, self._rng))

    def stream_collection(
        self, collection: str, shard: str, fields: Sequence[str] | None = None, *, page_size: int = PAGE_SIZE
    ) -> Iterator[StoredDocument]:
        """See ``stream_collection``."""
        return stream_collection(self.client, collection, shard, fields, page_size=page_size)

    def count(self, collection: str, shard: str) -> int:
        """How many documents of ``collection`` belong to ``shard``: a count aggregation, no document read."""
        return count_shard(self.client, collection, shard)


# --------------------------------------------------------------------------- the resource

_ENVIRONMENT_LOCK = threading.Lock()


@contextmanager
def _emulator_variable(host: str | None) -> Iterator[None]:
    """``FIRESTORE_EMULATOR_HOST`` set to ``host`` (or unset) while a client is being built.

    The client reads the variable only in its constructor (it then keeps the host and builds an
    insecure channel to it), so the variable is set for that moment, under a lock, and restored
    at once: a process can hold clients for several emulators, or for the emulator and real
    Firestore, and a stray variable cannot send a production client to an emulator.
    """
    with _ENVIRONMENT_LOCK:
        before = os.environ.get(EMULATOR_HOST_VARIABLE)
        if host is None:
            os.environ.pop(EMULATOR_HOST_VARIABLE, None)
        else:
            os.environ[EMULATOR_HOST_VARIABLE] = host
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(EMULATOR_HOST_VARIABLE, None)
            else:
                os.environ[EMULATOR_HOST_VARIABLE] = before


def database_name(project: str) -> str:
    """The resource name of a project's default database, as requests name it."""
    return f"projects/{project}/databases/(default)"


def _firestore_channel(*args: Any, options: Sequence[tuple[str, Any]] = (), **kwargs: Any) -> grpc.Channel:
    """The channel ``FirestoreGrpcTransport`` would make (it calls this with its own arguments), reading
    streams on the calling thread."""
    return FirestoreGrpcTransport.create_channel(*args, options=[*options, STREAMS_ON_THE_CALLING_THREAD], **kwargs)


class FirestoreResource(ConfigurableResource):
    """Firestore (``FIRESTORE_PROJECT``), or the emulator at ``emulator_host`` (``FIRESTORE_EMULATOR_HOST``)."""

    project: str
    emulator_host: str | None = None

    @property
    def is_emulator(self) -> bool:
        return bool(self.emulator_host)

    def client(self) -> firestore.Client:
        """A new client: anonymous credentials and an insecure channel for the emulator, else the
        application default credentials."""
        if self.is_emulator:
            with _emulator_variable(self.emulator_host):
                return firestore.Client(project=self.project, credentials=AnonymousCredentials())
        with _emulator_variable(None):
            return firestore.Client(project=self.project)

    @property
    def database(self) -> str:
        return database_name(self.project)

    def commit_channel(self) -> CommitChannel:
        """The Firestore API client the writer commits with: an insecure channel to the emulator (whose
        requests carry the owner token, as the client library's do), else the default endpoint with the
        application default credentials."""
        metadata = [("google-cloud-resource-prefix", self.database)]
        if self.is_emulator:
            host = str(self.emulator_host)
            limits = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
            channel = grpc.insecure_channel(host, options=[*limits, STREAMS_ON_THE_CALLING_THREAD])
            api = FirestoreApi(transport=FirestoreGrpcTransport(host=host, channel=channel))
            metadata.append(("authorization", "Bearer owner"))
        else:  # the channel the API client would make (its endpoint, credentials and options), and ours
            api = FirestoreApi(transport=FirestoreGrpcTransport(channel=_firestore_channel))
        return CommitChannel(api, self.database, tuple(metadata))

    def writer(self, **options: Any) -> DocumentWriter:
        """A ``DocumentWriter``: no rate limiter for the emulator, the 500/50/5 ramp-up for Firestore."""
        options.setdefault("limiter", None if self.is_emulator else RampUpLimiter())
        if "channel" not in options:
            options["channel"] = self.commit_channel()
        return DocumentWriter(self.client(), **options)


__all__ = [
    "MAX_BYTES_PER_REQUEST",
    "MAX_WRITES_PER_REQUEST",
    "RETRYABLE",
    "CommitChannel",
    "CommitResult",
    "DocumentWriter",
    "FirestoreResource",
    "PartialCommit",
    "RampUpLimiter",
    "RetryPolicy",
    "StoredDocument",
    "Write",
    "commit_request",
    "count_shard",
    "get_many",
    "split_writes",
    "stream_collection",
]
