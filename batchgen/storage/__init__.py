"""Object storage: ``open_storage(uri)`` picks the backend from the URI.

``s3://bucket/prefix`` -> S3Storage (boto3, imported only when used), ``file:///abs/path`` or a plain
path -> LocalStorage.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from batchgen.core.errors import InputError
from batchgen.storage.base import ObjectInfo, Storage
from batchgen.storage.local import LocalStorage

__all__ = ["ObjectInfo", "Storage", "LocalStorage", "open_storage", "parse_s3_uri"]


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ("bucket", "some/prefix")."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise InputError(f"{uri!r} is not an s3://bucket[/prefix] URI")
    if parts.query or parts.fragment:
        raise InputError(f"{uri!r}: S3 URIs take no query or fragment")
    return parts.netloc, parts.path.strip("/")


def open_storage(uri: str) -> Storage:
    """The storage rooted at ``uri``: "s3://bucket/prefix", "file:///abs", "/plain/path" or "rel/path"."""
    if not uri or not uri.strip():
        raise InputError("empty storage URI")
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme == "s3":
        from batchgen.storage.s3 import S3Storage  # boto3 costs ~0.3 s to import: only for S3 runs

        bucket, prefix = parse_s3_uri(uri)
        return S3Storage(bucket, prefix)
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise InputError(f"{uri!r}: file URIs must name a local path (file:///abs/path)")
        if not parts.path:
            raise InputError(f"{uri!r}: file URI without a path")
        return LocalStorage(unquote(parts.path))
    if scheme:
        raise InputError(f"{uri!r}: unsupported storage scheme {scheme!r} (use s3://, file:// or a path)")
    return LocalStorage(uri)
