"""The storage interface: a flat key space under one root URI (an S3 prefix or a local folder).

Both backends give the same guarantees, which the commit protocol relies on:
- a put is atomic: readers see the whole object or none of it;
- ``if_absent=True`` is a conditional create: exactly one concurrent writer wins, the others get
  ``AlreadyExistsError`` (S3 ``IfNoneMatch="*"``; the file backend uses an atomic link);
- ``if_match=<etag>`` is a conditional replace: it succeeds only while the object is still the version with that
  etag (S3 ``If-Match``; the file backend compares a change token under a lock), else ``ChangedError``;
- listings are strongly consistent and cost one request per 1000 keys.
Transient errors are retried inside the backend; what escapes is permanent (``StorageError``) or a
transient error that outlasted the retries (``TransientStorageError``).
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    """Relative to the storage root."""
    size: int
    etag: str | None = None
    """A token that changes whenever the object is replaced (S3's ETag; inode, mtime and size on a file system)."""
    modified: float | None = None
    """Last-modified time (epoch seconds) where the listing reports it: rates and ETAs come from it."""


class Storage(abc.ABC):
    """Keys are '/'-separated paths relative to ``self.uri``."""

    uri: str

    @abc.abstractmethod
    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
        content_type: str | None = None,
    ) -> str | None:
        """Write an object atomically and return its new etag. With ``if_absent``, raise AlreadyExistsError if it
        exists; with ``if_match``, raise ChangedError unless the stored object still has that etag."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str | Path, *, if_absent: bool = False, content_type: str | None = None) -> None:
        """Upload a local file (multipart for large files on S3, completed conditionally with ``if_absent``)."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read a whole object; NotFoundError if absent."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | Path) -> None:
        """Download an object to a local file (atomically); NotFoundError if absent."""

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size and etag, or None if absent."""

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    @abc.abstractmethod
    def list(self, prefix: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order; with ``start_after``, only keys that sort
        after it (S3 ``StartAfter``), so disjoint key ranges can be listed concurrently."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete an object; deleting a missing object is not an error."""

    @abc.abstractmethod
    def copy(self, source: str, key: str) -> None:
        """Create ``key`` as a copy of the object ``source`` without moving its bytes through this process (S3
        CopyObject, a hard link on a file system). AlreadyExistsError if ``key`` exists, NotFoundError if ``source``
        does not; ``source`` is never changed."""

    @abc.abstractmethod
    def url(self, key: str) -> str:
        """Full URI of a key (s3://bucket/prefix/key or file:///abs/path)."""

    def leftovers(self, prefix: str) -> builtins.list[str]:
        """Files under ``prefix`` that an interrupted writer left and listings skip (the file backend's temporary
        and lock files). None on S3, where an interrupted put leaves no object."""
        return []

    @property
    def request_count(self) -> int:
        """Requests sent so far (for benchmarks); backends without a meaningful count return 0."""
        return 0
