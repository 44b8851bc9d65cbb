"""Firestore: document sizes, request splitting, the 500/50/5 limiter (pure), and the writer and
readers against Google's Cloud Firestore emulator (integration; never skipped under CI=true)."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import google.auth
import grpc
import pytest
from google.api_core import exceptions as api_exceptions
from google.api_core.datetime_helpers import DatetimeWithNanoseconds
from google.auth.credentials import AnonymousCredentials
from google.cloud.firestore import GeoPoint
from google.cloud.firestore_v1.query import Query
from google.cloud.firestore_v1.services.firestore import FirestoreClient as FirestoreApi
from google.cloud.firestore_v1.types.firestore import CommitRequest

from resources.firestore import (
    MAX_BYTES_PER_REQUEST,
    MAX_WRITES_PER_REQUEST,
    DocumentWriter,
    FirestoreResource,
    PartialCommit,
    RampUpLimiter,
    RetryPolicy,
    Write,
    get_many,
    split_writes,
)
from worker.firestore_size import MAX_DOCUMENT_BYTES, document_size, name_size, value_size

KIB = 1024


# --------------------------------------------------------------------------- document_size (pure)


def test_document_size_matches_firestores_documented_example() -> None:
    # https://cloud.google.com/firestore/docs/storage-size: this task document is 147 bytes
    data = {"type": "Personal", "done": False, "priority": 1, "description": "Learn Cloud Firestore"}
    assert name_size("users/jeff/tasks/my_task_id") == 6 + 5 + 6 + 11 + 16
    assert document_size("users/jeff/tasks/my_task_id", data) == 147


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (None, 1),
        (True, 1),
        (False, 1),
        (0, 8),
        (2**63 - 1, 8),
        (1.5, 8),
        ("", 1),
        ("abc", 4),
        ("ñandú", 8),  # 7 UTF-8 bytes + 1
        ("日本", 7),
        (b"\x00\x01\x02", 3),
        (datetime(2024, 1, 1, tzinfo=UTC), 8),
        ([], 0),
        ([1, "ab", None, True], 8 + 3 + 1 + 1),
        ({}, 0),
        ({"k": "v", "n": 1}, (2 + 2) + (2 + 8)),
        ({"m": {"deep": [1, {"x": False}]}}, 2 + (5 + (8 + (2 + 1)))),
    ],
)
def test_value_sizes(value: Any, size: int) -> None:
    assert value_size(value) == size


def test_document_size_adds_name_and_overhead() -> None:
    assert document_size("files/7", {}) == (6 + 2 + 16) + 32
    assert document_size("files/7", {"ñ": "ü"}) == (6 + 2 + 16) + (3 + 3) + 32
    assert document_size("/files/7/", {}) == document_size("files/7", {})


def test_document_size_refuses_what_firestore_cannot_store() -> None:
    with pytest.raises(TypeError, match="set"):
        value_size({1, 2})
    with pytest.raises(ValueError):
        name_size("")


def test_max_document_bytes_is_one_mebibyte() -> None:
    assert MAX_DOCUMENT_BYTES == 1_048_576
    just_fits = "x" * (MAX_DOCUMENT_BYTES - document_size("c/1", {"f": ""}))
    assert document_size("c/1", {"f": just_fits}) == MAX_DOCUMENT_BYTES


# --------------------------------------------------------------------------- split_writes (pure)


def _writes(count: int, payload: int = 10, collection: str = "c") -> list[Write]:
    return [Write(f"{collection}/{number}", {"n": number, "p": "x" * payload}) for number in range(count)]


def test_a_write_needs_a_document_path() -> None:
    for bad in ("users", "users/1/files", "users//1", ""):
        with pytest.raises(ValueError):
            Write(bad, {})
    assert Write("users/1", None).is_delete
    assert Write("users/1", None).size == name_size("users/1")


def test_600_writes_make_two_requests_in_order() -> None:
    writes = _writes(600)
    requests = split_writes(writes)
    assert [len(request) for request in requests] == [500, 100]
    assert [write for request in requests for write in request] == writes


def test_requests_stay_under_the_byte_limit() -> None:
    big = 900 * KIB
    writes = _writes(7, payload=big)
    requests = split_writes(writes)
    # three 900 KiB documents fit in 3 MiB, a fourth would not
    assert [len(request) for request in requests] == [3, 3, 1]
    for request in requests:
        assert sum(write.size for write in request) <= MAX_BYTES_PER_REQUEST


def test_a_document_bigger_than_the_limit_goes_alone() -> None:
    writes = [*_writes(2, collection="a"), *_writes(1, payload=2000, collection="big"), *_writes(2, collection="z")]
    requests = split_writes(writes, max_bytes=1000)
    assert [[write.path for write in request] for request in requests] == [["a/0", "a/1"], ["big/0"], ["z/0", "z/1"]]


def test_split_never_exceeds_either_limit_on_random_input() -> None:
    rng = random.Random(7)
    for _ in range(50):
        writes = [
            Write(f"c/{n}", None) if rng.random() < 0.1 else Write(f"c/{n}", {"p": "x" * rng.randint(0, 400)})
            for n in range(rng.randint(0, 300))
        ]
        max_writes, max_bytes = rng.randint(1, 40), rng.randint(500, 5000)
        requests = split_writes(writes, max_writes=max_writes, max_bytes=max_bytes)
        assert [write for request in requests for write in request] == writes
        for request in requests:
            assert 1 <= len(request) <= max_writes
            assert sum(write.size for write in request) <= max_bytes or len(request) == 1
        # greedy: a request is cut only when the next write would break a limit
        for request, following in itertools.pairwise(requests):
            assert len(request) == max_writes or sum(w.size for w in request) + following[0].size > max_bytes


def test_split_refuses_non_positive_limits() -> None:
    with pytest.raises(ValueError):
        split_writes(_writes(1), max_writes=0)


# --------------------------------------------------------------------------- the 500/50/5 limiter (pure)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_limiter_starts_at_500_ops_and_grows_50_percent_every_5_minutes() -> None:
    clock = FakeClock()
    limiter = RampUpLimiter(clock=clock, sleep=clock.sleep)
    assert limiter.rate() == 500
    limiter.reserve(1)  # the ramp starts at first use
    for minutes, rate in [(4.99, 500), (5, 750), (9.99, 750), (10, 1125), (15, 1687.5), (30, 500 * 1.5**6)]:
        assert limiter.rate(1000.0 + minutes * 60) == pytest.approx(rate)


def test_limiter_is_a_token_bucket_with_one_second_of_burst() -> None:
    clock = FakeClock()
    limiter = RampUpLimiter(clock=clock, sleep=clock.sleep)
    assert limiter.reserve(500) == 0  # a full bucket
    assert limiter.reserve(250) == pytest.approx(0.5)  # in debt: wait for 250 tokens at 500/s
    clock.now += 0.5
    assert limiter.reserve(250) == pytest.approx(0.5)
    clock.now += 10  # idle: the bucket refills to one second's worth, no more
    assert limiter.reserve(500) == 0
    assert limiter.reserve(1) == pytest.approx(1 / 500)


def test_limiter_acquire_sleeps_and_holds_the_rate_over_time() -> None:
    clock = FakeClock()
    limiter = RampUpLimiter(clock=clock, sleep=clock.sleep)
    start = clock.now
    sent = 0
    while clock.now - start < 60:
        limiter.acquire(100)
        sent += 100
    elapsed = clock.now - start
    assert sum(clock.slept) == pytest.approx(elapsed)
    assert sent <= 500 * elapsed + 500 + 100  # the rate plus the initial burst
    assert sent >= 500 * elapsed - 100


def test_limiter_ramps_up_under_sustained_load_and_respects_max_rate() -> None:
    clock = FakeClock()
    limiter = RampUpLimiter(clock=clock, sleep=clock.sleep, max_rate=1000)
    sent_per_minute: list[int] = []
    for _minute in range(12):
        end, sent = clock.now + 60, 0
        while clock.now < end:
            limiter.acquire(50)
            sent += 50
        sent_per_minute.append(sent)
    assert sent_per_minute[1] == pytest.approx(500 * 60, rel=0.02)  # minutes 0-5: 500/s
    assert sent_per_minute[6] == pytest.approx(750 * 60, rel=0.02)  # minutes 5-10: 750/s
    assert sent_per_minute[11] == pytest.approx(1000 * 60, rel=0.02)  # 1125/s capped at 1000/s


def test_limiter_a_request_larger_than_the_bucket_still_goes() -> None:
    clock = FakeClock()
    limiter = RampUpLimiter(initial_rate=100, clock=clock, sleep=clock.sleep)
    assert limiter.acquire(100) == 0
    assert limiter.acquire(300) == pytest.approx(3.0)


def test_retry_policy_backs_off_exponentially_with_jitter() -> None:
    policy = RetryPolicy(initial=1, multiplier=2, maximum=5, jitter=0.5)
    rng = random.Random(1)
    for attempt, base in [(1, 1), (2, 2), (3, 4), (4, 5), (9, 5)]:
        delays = {policy.delay(attempt, rng) for _ in range(20)}
        assert all(base * 0.5 <= delay <= base for delay in delays)
        assert len(delays) > 1  # jittered
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_partial_commit_message_names_counts_and_code_not_data() -> None:
    cause = api_exceptions.InvalidArgument("value secret-password-hash is invalid")
    error = PartialCommit(500, cause, total=600, request=2, attempts=1)
    assert (error.committed, error.cause, error.in_doubt) == (500, cause, 0)
    assert (
        str(error)
        == "500 of 600 writes committed; request 2 failed after 1 attempt(s): InvalidArgument (INVALID_ARGUMENT)"
    )
    assert "secret" not in str(error)


# --------------------------------------------------------------------------- against the emulator


@pytest.fixture
def resource(firestore_emulator: str, firestore_project: str) -> FirestoreResource:
    return FirestoreResource(project=firestore_project, emulator_host=firestore_emulator)


class CommitSpy:
    """Counts Commit requests to the emulator, at the Firestore API client every commit goes through (the
    writer's own requests and the client library's ``WriteBatch`` alike); can fail chosen attempts first."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.sizes: list[int] = []
        self.fail: Callable[[int], Exception | None] = lambda _call: None
        original = FirestoreApi.commit

        def commit(api: FirestoreApi, *args: Any, request: Any = None, **kwargs: Any) -> Any:
            self.calls += 1
            self.sizes.append(len(request["writes"] if isinstance(request, dict) else request.writes))
            error = self.fail(self.calls)
            if error is not None:
                raise error
            return original(api, *args, request=request, **kwargs)

        monkeypatch.setattr(FirestoreApi, "commit", commit)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> CommitSpy:
    return CommitSpy(monkeypatch)


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _stored_ids(resource: FirestoreResource, collection: str) -> list[str]:
    return sorted((ref.id for ref in resource.client().collection(collection).list_documents()), key=int)


def test_exact_firestore_types_round_trip(resource: FirestoreResource) -> None:
    bogota = timezone(timedelta(hours=-5))
    data = {
        "legacy_id": 42,
        "big": 2**63 - 1,
        "negative": -(2**63),
        "ratio": 0.25,
        "is_active": True,
        "is_staff": False,
        "last_login": None,
        "date_joined": datetime(2023, 3, 4, 5, 6, 7, 123456, tzinfo=UTC),
        "uploaded_at": datetime(2024, 5, 1, 12, 0, tzinfo=bogota),
        "definition": {"op": "and", "rules": [{"field": "age", "gt": 30}, {"field": "city", "in": ["a", "b"]}]},
        "user_tags": ["x", "y"],
        "empty_list": [],
        "empty_map": {},
        "name": "Ñandú  日本",
    }
    result = resource.writer().commit([Write("users/42", data)])
    assert (result.writes, result.requests) == (1, 1)
    stored = resource.writer().get_many(["users/42"])["users/42"]
    assert stored is not None
    assert stored == {**data, "uploaded_at": datetime(2024, 5, 1, 17, 0, tzinfo=UTC)}
    for key in ("legacy_id", "big", "negative"):
        assert type(stored[key]) is int
    assert type(stored["is_active"]) is bool and type(stored["ratio"]) is float
    for key in ("date_joined", "uploaded_at"):
        assert stored[key].utcoffset() == timedelta(0)
    assert stored["uploaded_at"].hour == 17
    assert isinstance(stored["definition"], dict) and isinstance(stored["definition"]["rules"], list)


def test_the_writers_requests_are_the_client_librarys_byte_for_byte(
    resource: FirestoreResource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer builds its Commit requests itself (10x cheaper than proto-plus): the same messages as the
    client library's ``WriteBatch.set``/``create``/``delete`` of the same writes, every type and corner
    included."""
    client = resource.client()
    data = {
        "int": 42,
        "big": 2**63 - 1,
        "negative": -(2**63),
        "ratio": 0.25,
        "yes": True,
        "no": False,
        "nothing": None,
        "text": "Ñandú  日本 \U0001f680",
        "empty_text": "",
        "aware": datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=-5))),
        "naive": datetime(1960, 1, 1, 0, 0, 0, 500000),
        "last": datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        "first": datetime(1, 1, 1, tzinfo=UTC),
        "nanos": DatetimeWithNanoseconds(2020, 1, 1, 1, 1, 1, nanosecond=123456789, tzinfo=UTC),
        "raw": b"\x00\x01",
        "tuple": (1, 2),
        "a.b": {"`c`": [1, "a", None, {"q": []}], "empty": {}},
        "list_of_maps": [{}, {"x": {"y": {}}}],
        "empty_list": [],
        "empty_map": {},
        "geo": GeoPoint(1.5, -2.5),
        "reference": client.document("users/7"),
    }
    writes = [
        Write("users/1", data),
        Write("users/2", {}),
        Write("files/3", {"n": 3}),
        Write("users/4", None),
        Write("users/5", {"n": 5}, create=True),
    ]
    sent: list[Any] = []
    original = FirestoreApi.commit

    def commit(api: FirestoreApi, *args: Any, request: Any = None, **kwargs: Any) -> Any:
        sent.append(CommitRequest.pb(CommitRequest(request)))
        return original(api, *args, request=request, **kwargs)

    monkeypatch.setattr(FirestoreApi, "commit", commit)
    DocumentWriter(client).commit(writes)  # the client library's WriteBatch
    with pytest.raises(PartialCommit) as refused:  # the writer's own requests: users/5 exists by now
        resource.writer().commit(writes)
    assert refused.value.already_exists and refused.value.committed == 0
    assert len(sent) == 2 and resource.writer().channel is not None
    assert sent[0] == sent[1]
    assert sent[0].SerializeToString(deterministic=True) == sent[1].SerializeToString(deterministic=True)


def test_set_replaces_the_whole_document_and_none_deletes(resource: FirestoreResource) -> None:
    writer = resource.writer()
    writer.commit([Write("users/1", {"a": 1, "b": {"c": 2, "d": 3}}), Write("users/2", {"a": 2})])
    writer.commit([Write("users/1", {"b": {"c": 5}}), Write("users/2", None)])
    assert writer.get_many(["users/1", "users/2"]) == {"users/1": {"b": {"c": 5}}, "users/2": None}


def test_a_create_of_an_existing_document_refuses_its_whole_request(resource: FirestoreResource) -> None:
    writer = resource.writer(max_writes=2)
    writer.commit([Write("users/2", {"n": 2, "v": "old"})])
    writes = [Write("users/1", {"n": 1}, create=True), Write("users/9", None),  # request 1
              Write("users/3", {"n": 3}, create=True), Write("users/2", {"n": 2}, create=True)]  # fmt: skip
    with pytest.raises(PartialCommit) as refused:
        writer.commit(writes)
    assert refused.value.already_exists and (refused.value.committed, refused.value.in_doubt) == (2, 0)
    stored = writer.get_many(["users/1", "users/2", "users/3"])
    assert stored == {"users/1": {"n": 1}, "users/2": {"n": 2, "v": "old"}, "users/3": None}
    with pytest.raises(ValueError, match="deletion"):
        Write("users/4", None, create=True)


def test_600_writes_are_two_requests(resource: FirestoreResource, spy: CommitSpy) -> None:
    writes = [Write(f"files/{n}", {"n": n, "shard": "s1"}) for n in range(600)]
    result = resource.writer().commit(writes)
    assert spy.sizes == [500, 100]
    assert (result.writes, result.requests, result.retries) == (600, 2, 0)
    assert _stored_ids(resource, "files") == [str(n) for n in range(600)]


def test_a_batch_over_the_byte_limit_is_split(resource: FirestoreResource, spy: CommitSpy) -> None:
    payload = "x" * (900 * KIB)
    writes = [Write(f"blobs/{n}", {"n": n, "payload": payload}) for n in range(5)]
    assert all(write.size < MAX_DOCUMENT_BYTES for write in writes)
    result = resource.writer().commit(writes)
    assert spy.sizes == [3, 2]  # 3 x 900 KiB fit in 3 MiB, a fourth would not
    assert result.requests == 2 and result.bytes == sum(write.size for write in writes)
    stored = resource.writer().get_many([write.path for write in writes], fields=["n"])
    assert stored == {f"blobs/{n}": {"n": n} for n in range(5)}


def test_a_smaller_byte_limit_gives_more_requests(resource: FirestoreResource, spy: CommitSpy) -> None:
    writes = [Write(f"c/{n}", {"p": "x" * 1000}) for n in range(10)]
    writer = resource.writer(max_bytes=2500)
    assert writer.commit(writes).requests == 5
    assert spy.sizes == [2, 2, 2, 2, 2]
    assert len(_stored_ids(resource, "c")) == 10


def test_unavailable_is_retried_then_succeeds(resource: FirestoreResource, spy: CommitSpy) -> None:
    spy.fail = lambda call: api_exceptions.ServiceUnavailable("injected") if call in (1, 2) else None
    sleeps = Sleeps()
    writer = resource.writer(sleep=sleeps, retry=RetryPolicy(attempts=4, initial=0.1, multiplier=2, jitter=0.5))
    result = writer.commit([Write(f"users/{n}", {"n": n}) for n in range(3)])
    assert spy.calls == 3
    assert (result.writes, result.retries) == (3, 2)
    assert len(sleeps) == 2 and 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2
    assert _stored_ids(resource, "users") == ["0", "1", "2"]


@pytest.mark.parametrize(
    "error",
    [api_exceptions.Aborted("x"), api_exceptions.DeadlineExceeded("x"), api_exceptions.ResourceExhausted("x")],
)
def test_every_transient_code_is_retried(resource: FirestoreResource, spy: CommitSpy, error: Exception) -> None:
    spy.fail = lambda call: error if call == 1 else None
    result = resource.writer(sleep=Sleeps()).commit([Write("users/1", {"n": 1})])
    assert (spy.calls, result.retries) == (2, 1)


def test_a_non_retryable_error_raises_at_once(resource: FirestoreResource, spy: CommitSpy) -> None:
    spy.fail = lambda _call: api_exceptions.PermissionDenied("injected")
    sleeps = Sleeps()
    with pytest.raises(PartialCommit) as raised:
        resource.writer(sleep=sleeps).commit([Write("users/1", {"n": 1})])
    assert spy.calls == 1 and sleeps == []
    assert (raised.value.committed, raised.value.attempts, raised.value.in_doubt) == (0, 1, 0)
    assert isinstance(raised.value.cause, api_exceptions.PermissionDenied)


def test_a_real_refusal_by_the_emulator_is_not_retried(resource: FirestoreResource, spy: CommitSpy) -> None:
    writes = [*(Write(f"users/{n}", {"n": n}) for n in range(500)), Write("users/bad", {"__x__": 1})]
    with pytest.raises(PartialCommit) as raised:
        resource.writer(sleep=Sleeps()).commit(writes)
    assert spy.calls == 2
    assert (raised.value.committed, raised.value.request, raised.value.in_doubt) == (500, 2, 0)
    assert isinstance(raised.value.cause, api_exceptions.InvalidArgument)
    assert len(_stored_ids_any(resource, "users")) == 500


def _stored_ids_any(resource: FirestoreResource, collection: str) -> list[str]:
    return [ref.id for ref in resource.client().collection(collection).list_documents()]


def test_partial_commit_reports_exactly_the_durable_prefix(resource: FirestoreResource, spy: CommitSpy) -> None:
    # the second request never gets through: the first 500 writes are durable, the rest are not
    spy.fail = lambda call: api_exceptions.ServiceUnavailable("injected") if call >= 2 else None
    sleeps = Sleeps()
    writes = [Write(f"files/{n}", {"n": n}) for n in range(1200)]
    writer = resource.writer(sleep=sleeps, retry=RetryPolicy(attempts=3, initial=0.01))
    with pytest.raises(PartialCommit) as raised:
        writer.commit(writes)
    error = raised.value
    assert (error.committed, error.total, error.request, error.attempts) == (500, 1200, 2, 3)
    assert error.in_doubt == 500  # UNAVAILABLE: the server may or may not have applied request 2
    assert isinstance(error.cause, api_exceptions.ServiceUnavailable)
    assert spy.calls == 1 + 3 and len(sleeps) == 2
    assert _stored_ids(resource, "files") == [write.path.split("/")[1] for write in writes[: error.committed]]


def test_stream_collection_pages_by_cursor_in_id_order(
    resource: FirestoreResource, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = [Write(f"users/{n}", {"n": n, "shard": f"s{n % 3}", "extra": "e"}) for n in range(50)]
    resource.writer().commit(writes)
    pages: list[int] = []
    original = Query.stream

    def stream(query: Query, *args: Any, **kwargs: Any) -> Iterator[Any]:
        snapshots = list(original(query, *args, **kwargs))
        pages.append(len(snapshots))
        return iter(snapshots)

    monkeypatch.setattr(Query, "stream", stream)
    documents = list(resource.writer().stream_collection("users", "s1", ["n", "shard"], page_size=4))
    expected = sorted(str(n) for n in range(50) if n % 3 == 1)  # document ids order as strings
    assert [document.id for document in documents] == expected
    assert all(document.path == f"users/{document.id}" for document in documents)
    assert all(document.data == {"n": int(document.id), "shard": "s1"} for document in documents)  # projected
    assert len(expected) == 17 and pages == [4, 4, 4, 4, 1]  # 4 a page; a short page ends it

    pages.clear()
    everything = list(resource.writer().stream_collection("users", "s2", page_size=100))
    assert pages == [16] and everything[0].data == {"n": 11, "shard": "s2", "extra": "e"}
    assert list(resource.writer().stream_collection("users", "nope")) == []


def test_get_many_in_chunks_keeps_the_order_and_marks_missing(resource: FirestoreResource) -> None:
    resource.writer().commit([Write(f"users/{n}", {"n": n, "content_hash": f"h{n}", "shard": "s0"}) for n in range(10)])
    paths = ["users/9", "users/missing", "users/0", "users/5", "users/9", "other/1", "users/3"]
    found = get_many(resource.client(), paths, fields=["content_hash"], chunk_size=2)
    assert list(found) == ["users/9", "users/missing", "users/0", "users/5", "other/1", "users/3"]
    assert found == {
        "users/9": {"content_hash": "h9"},
        "users/missing": None,
        "users/0": {"content_hash": "h0"},
        "users/5": {"content_hash": "h5"},
        "other/1": None,
        "users/3": {"content_hash": "h3"},
    }
    assert resource.writer().get_many(["users/4"]) == {"users/4": {"n": 4, "content_hash": "h4", "shard": "s0"}}


def test_the_writers_reads_are_the_client_librarys(resource: FirestoreResource) -> None:
    """The writer decodes what it reads itself: the same values as the client library's snapshots (which it
    falls back on for what it does not decode: references, bytes, maps with ``__`` keys)."""
    client = resource.client()
    plain = {
        "int": -(2**63),
        "ratio": 0.5,
        "yes": True,
        "nothing": None,
        "text": "Ñandú 日本",
        "when": datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
        "map": {"a": [1, {"b": []}, None], "empty": {}},
        "list": [],
    }
    unusual = {"raw": b"\x01", "reference": client.document("users/1"), "underscored": {"__kind": "x"}}
    writer = resource.writer()
    writer.commit([Write("users/1", plain), Write("users/2", unusual), Write("files/3", {"n": 3})])
    paths = ["users/1", "users/9", "files/3", "users/1"]
    for fields in (None, ["int", "when", "map"], ["missing"]):
        assert writer.get_many(paths, fields=fields) == get_many(client, paths, fields=fields)
    ours, library = writer.get_many(["users/2", "users/1"]), get_many(client, ["users/2", "users/1"])
    assert ours["users/1"] == library["users/1"] == plain
    unusual_ours, unusual_library = dict(ours["users/2"] or {}), dict(library["users/2"] or {})
    assert unusual_ours.pop("reference").path == unusual_library.pop("reference").path == "users/1"
    assert unusual_ours == unusual_library == {"raw": b"\x01", "underscored": {"__kind": "x"}}
    assert isinstance(ours["users/1"]["when"], DatetimeWithNanoseconds)  # as the library returns timestamps


class InjectedRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "injected"

    def trailing_metadata(self) -> None:
        return None


class FlakyLookUps:
    """The writer's raw BatchGetDocuments call, whose next calls fail with ``codes`` first."""

    def __init__(self, inner: Any, codes: list[grpc.StatusCode]) -> None:
        self.inner, self.codes, self.calls = inner, codes, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.codes:
            raise InjectedRpcError(self.codes.pop(0))
        return self.inner(*args, **kwargs)


def test_look_ups_are_retried_like_commits_and_fail_with_the_api_clients_errors(resource: FirestoreResource) -> None:
    sleeps = Sleeps()
    writer = resource.writer(sleep=sleeps, retry=RetryPolicy(attempts=3, initial=0.01))
    writer.commit([Write("users/1", {"n": 1})])
    assert writer.channel is not None
    real = writer.channel.batch_get
    flaky = FlakyLookUps(real, [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
    writer.channel.__dict__["batch_get"] = flaky  # the cached call, replaced
    assert writer.get_many(["users/1", "users/2"]) == {"users/1": {"n": 1}, "users/2": None}
    assert (flaky.calls, len(sleeps)) == (3, 2)
    writer.channel.__dict__["batch_get"] = FlakyLookUps(real, [grpc.StatusCode.UNAVAILABLE] * 3)
    with pytest.raises(api_exceptions.ServiceUnavailable):
        writer.get_many(["users/1"])
    writer.channel.__dict__["batch_get"] = FlakyLookUps(real, [grpc.StatusCode.PERMISSION_DENIED])
    with pytest.raises(api_exceptions.PermissionDenied):
        writer.get_many(["users/1"])
    assert len(sleeps) == 4  # two more for the UNAVAILABLEs, none for a refusal


def test_the_production_channel_reads_look_ups_on_the_calling_thread(
    resource: FirestoreResource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real Firestore's channel is the one the API client's transport makes (endpoint, credentials, its
    options) with streams read on the calling thread, as the emulator's is. Nothing connects here."""
    monkeypatch.setattr(google.auth, "default", lambda *_, **__: (AnonymousCredentials(), "prod-project"))
    production = FirestoreResource(project="prod-project").commit_channel()
    plain = grpc.insecure_channel("127.0.0.1:9").unary_stream("/google.firestore.v1.Firestore/BatchGetDocuments")
    assert type(production.batch_get) is type(resource.commit_channel().batch_get)
    assert type(production.batch_get) is not type(plain)
    assert production.database == "projects/prod-project/databases/(default)"


def test_the_resource_talks_to_its_emulator_without_touching_the_environment(
    firestore_emulator: str, firestore_project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", "127.0.0.1:9")  # a stray variable must not matter
    resource = FirestoreResource(project=firestore_project, emulator_host=firestore_emulator)
    client = resource.client()
    assert os.environ["FIRESTORE_EMULATOR_HOST"] == "127.0.0.1:9"
    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST")
    client.document("users/1").set({"n": 1})  # the client keeps its emulator after construction
    assert "FIRESTORE_EMULATOR_HOST" not in os.environ
    other = FirestoreResource(project=f"{firestore_project}-other", emulator_host=firestore_emulator)
    assert other.writer().get_many(["users/1"]) == {"users/1": None}  # projects are isolated
    assert resource.writer().get_many(["users/1"]) == {"users/1": {"n": 1}}


def test_writer_has_no_limiter_on_the_emulator_and_the_ramp_up_on_firestore(
    resource: FirestoreResource, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resource.is_emulator and resource.writer().limiter is None
    production = FirestoreResource(project="prod-project")
    assert not production.is_emulator
    # no Google credentials on a test machine: hand the production resource the emulator's client and API
    emulator_client, emulator_channel = resource.client(), resource.commit_channel()
    monkeypatch.setattr(FirestoreResource, "client", lambda _self: emulator_client)
    monkeypatch.setattr(FirestoreResource, "commit_channel", lambda _self: emulator_channel)
    writer = production.writer(max_writes=MAX_WRITES_PER_REQUEST)
    assert isinstance(writer.limiter, RampUpLimiter) and writer.limiter.rate() == 500
    assert writer.commit([Write("users/1", {"n": 1})]).writes == 1  # one op: no wait from a full bucket


def test_the_writer_refuses_requests_firestore_would_refuse(resource: FirestoreResource) -> None:
    with pytest.raises(ValueError):
        DocumentWriter(resource.client(), max_writes=501)


def test_an_error_that_may_have_been_applied_is_in_doubt(resource: FirestoreResource, spy: CommitSpy) -> None:
    spy.fail = lambda call: api_exceptions.InternalServerError("injected") if call == 2 else None
    writes = [Write(f"users/{n}", {"n": n}) for n in range(510)]
    with pytest.raises(PartialCommit) as raised:
        resource.writer(sleep=Sleeps()).commit(writes)
    assert (raised.value.committed, raised.value.attempts, raised.value.in_doubt) == (500, 1, 10)
    assert spy.calls == 2


def test_an_unstorable_value_fails_before_anything_is_sent(resource: FirestoreResource, spy: CommitSpy) -> None:
    writes = [*(Write(f"users/{n}", {"n": n}) for n in range(600)), Write("users/bad", {"tags": {"a", "b"}})]
    with pytest.raises(PartialCommit) as raised:
        resource.writer().commit(writes)
    assert (raised.value.committed, raised.value.in_doubt, raised.value.total) == (0, 0, 601)
    assert isinstance(raised.value.cause, TypeError)
    assert spy.calls == 0 and _stored_ids_any(resource, "users") == []
