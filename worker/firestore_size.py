"""Firestore's documented storage size of a document, as a pure function.

https://cloud.google.com/firestore/docs/storage-size:

- document name: the size of each path segment (a string id: UTF-8 bytes + 1; an integer id:
  8) plus 16;
- a field name or string value: UTF-8 bytes + 1;
- integer, float, timestamp: 8; boolean, null: 1; bytes: their length; geo point: 16;
  reference: the referenced document's name size;
- map: the sum of its keys' and values' sizes; array: the sum of its values' sizes;
- a document: its name size + its fields' sizes + 32.

No dagster or google import here: the transform rules (which run on the legacy host) use it to
quarantine a document over ``MAX_DOCUMENT_BYTES`` and the Firestore writer uses it to size
its requests, so both agree byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, time
from typing import Any

MAX_DOCUMENT_BYTES = 1_048_576
"""Firestore's limit on one document's storage size (1 MiB)."""

DOCUMENT_OVERHEAD = 32
NAME_OVERHEAD = 16


def string_size(value: str) -> int:
    """A string's size: its UTF-8 bytes + 1."""
    return len(value.encode("utf-8", "surrogatepass")) + 1


def name_size(path: str) -> int:
    """The size of a document name such as ``users/42`` (segments are string ids)."""
    segments = [segment for segment in path.strip("/").split("/") if segment]
    if not segments:
        raise ValueError("empty document path")
    return sum(string_size(segment) for segment in segments) + NAME_OVERHEAD


def value_size(value: Any) -> int:
    """The size of one field value; ``TypeError`` for a type Firestore cannot store."""
    kind = type(value)  # plain maps and lists by their exact type, then the leaves: an ABC's test comes last
    if kind is dict:
        return _map_size(value)
    if kind is list:
        return sum(value_size(item) for item in value)
    if isinstance(value, str):
        return string_size(value)
    if value is None or isinstance(value, bool):  # before int: bool is an int subclass
        return 1
    if isinstance(value, (int, float, datetime, date, time)):
        return 8
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value)
    if isinstance(value, Mapping):
        return _map_size(value)
    if isinstance(value, list | tuple):
        return sum(value_size(item) for item in value)
    # google.cloud.firestore types, recognised by shape so this module imports nothing of google's
    if hasattr(value, "latitude") and hasattr(value, "longitude"):  # GeoPoint
        return 16
    path = getattr(value, "path", None)
    if isinstance(path, str):  # DocumentReference
        return name_size(path)
    raise TypeError(f"Firestore cannot store a value of type {type(value).__name__}")


def _map_size(value: Mapping[Any, Any]) -> int:
    size = 0
    for key, item in value.items():
        size += string_size(str(key)) + value_size(item)
    return size


def document_size(path: str, data: Mapping[str, Any]) -> int:
    """Storage size in bytes of the document at ``path`` (e.g. ``users/42``) holding ``data``."""
    return name_size(path) + value_size(data) + DOCUMENT_OVERHEAD
