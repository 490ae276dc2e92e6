"""The S3 backend (boto3), for AWS and anything speaking its API (MinIO, Ceph, moto) by endpoint alone.

Configuration is the standard AWS chain: credentials (env, profile, web identity, instance role), region,
and ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, all resolved by botocore itself. Retries are ours
(retry.py); botocore's are switched off so one policy decides and every request is counted.

Conditional creates use ``If-None-Match: *`` on PutObject and CompleteMultipartUpload. A retried
conditional write is ambiguous: if the first attempt reached S3 and only the answer was lost, the retry
sees 412 against our own object. Every write carries a random write id in its metadata, so a 412 (or a
vanished upload id) after a retry is resolved by reading that id back.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore import exceptions as boto_errors
from botocore.config import Config
from botocore.utils import parse_timestamp as botocore_parse_timestamp
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError
from s3transfer.subscribers import BaseSubscriber

from batchgen.core.errors import (
    AlreadyExistsError,
    ChangedError,
    ConfigError,
    NotFoundError,
    StorageError,
    TransientStorageError,
)
from batchgen.storage.base import ObjectInfo, Storage
from batchgen.storage.local import TEMP_PREFIX, validate_key
from batchgen.storage.retry import (
    TRANSIENT_WIRE_ERRORS,
    RetryPolicy,
    env_number,
    error_code,
    http_status,
    is_transient,
)

log = logging.getLogger("batchgen.storage.s3")

T = TypeVar("T")

WRITE_ID_META = "batchgen-write-id"
DEFAULT_MULTIPART_THRESHOLD = 16 * 1024 * 1024
DEFAULT_PART_SIZE = 16 * 1024 * 1024
MIN_PART_SIZE = 5 * 1024 * 1024  # S3's floor for every part but the last
MAX_POOL_CONNECTIONS = 32
# Ranged GETs in flight per large download: boto3's own default (10). On moto (bench/fetch.py) the number changes
# nothing, the server being one process that reads the whole object per request; on S3 each range is its own
# connection and S3's performance guide advises concurrent byte-range GETs of 8 or 16 MiB, aligned to the parts.
DEFAULT_DOWNLOAD_CONCURRENCY = TransferConfig().max_request_concurrency  # what boto3 calls max_concurrency
LIST_PAGE_SIZE = 1000
DEFAULT_READ_TIMEOUT_S = 60.0  # per socket read, not per request: a slow but live body never trips it
CHECK_BUCKET = "check bucket"

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_ACCESS_CODES = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled"})
_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"})


@functools.lru_cache(maxsize=4)
def _session(aws_environment: tuple[tuple[str, str], ...]) -> boto3.session.Session:
    # A session loads botocore's service models and resolves credentials once (~0.1 s of CPU); sharing it
    # makes each further client cheap. Keyed on the AWS_* environment so a changed configuration gets a
    # fresh chain instead of stale cached credentials.
    session = boto3.session.Session()
    session._session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_parse_timestamp)
    return session


def _parse_timestamp(value: Any) -> datetime:
    # botocore reads every listed object's LastModified with dateutil, about 33 us each: a third of a second of
    # a 10,000-key resume scan spent on a field we never use. S3 sends ISO 8601 with a zone, which the standard
    # library reads some 250 times faster; anything else still goes to botocore's own parser.
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    return botocore_parse_timestamp(value)


_session_lock = threading.Lock()


def make_client():
    """An S3 client from the standard AWS configuration, with botocore's own retries off."""
    config = Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=10,
        read_timeout=env_number("BATCHGEN_S3_READ_TIMEOUT_S", DEFAULT_READ_TIMEOUT_S, minimum=0.001),
        max_pool_connections=MAX_POOL_CONNECTIONS,
    )
    aws_environment = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    with _session_lock:  # sessions are not thread-safe; the clients they make are
        return _session(aws_environment).client("s3", config=config)


def _redact(text: str) -> str:
    """Defence in depth: error text from a server or library must never carry our secrets onward."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return text


def _etag(response: dict) -> str | None:
    return response.get("ETag", "").strip('"') or None


def _is_precondition_failed(exc: boto_errors.ClientError) -> bool:
    return error_code(exc) == "PreconditionFailed" or http_status(exc) == 412


def _needs_new_upload(exc: boto_errors.ClientError) -> bool:
    """A conditional CompleteMultipartUpload that met a conflicting operation cannot be completed again: AWS's
    API reference (CompleteMultipartUpload, If-None-Match) says "If a conflicting operation occurs during the
    upload S3 returns a 409 ConditionalRequestConflict response. On a 409 failure you should re-initiate the
    multipart upload with CreateMultipartUpload and re-upload each part." OperationAborted ("A conflicting
    conditional operation is currently in progress against this resource. Please try again.") is retried as it
    is, with the same upload id; a 409 whose body was lost is treated as the
    conflict, since a new upload is right in either case."""
    code = error_code(exc)
    return code == "ConditionalRequestConflict" or (code != "OperationAborted" and http_status(exc) == 409)


class _KnownObject(BaseSubscriber):
    """Tells the transfer manager an object's size and ETag, read from a GET's answer, so it sends no HEAD."""

    def __init__(self, size: int, etag: str | None):
        self.size = size
        self.etag = etag

    def on_queued(self, future, **kwargs) -> None:
        future.meta.provide_transfer_size(self.size)
        if self.etag and hasattr(future.meta, "provide_object_etag"):  # an older s3transfer pins no ETag
            future.meta.provide_object_etag(self.etag)


class _UploadConflict(Exception):
    """Raised through the retry loop (not transient) to make ``_put_multipart`` start a new upload."""


class S3Storage(Storage):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client=None,
        retry: RetryPolicy | None = None,
        multipart_threshold: int | None = None,
        part_size: int | None = None,
        download_concurrency: int | None = None,
    ):
        if not bucket or "/" in bucket:
            raise StorageError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix, f"s3://{bucket}")
        self._root = f"{self.prefix}/" if self.prefix else ""
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = client if client is not None else make_client()
        self._retry = retry if retry is not None else RetryPolicy.from_env()
        self.multipart_threshold = int(
            multipart_threshold
            if multipart_threshold is not None
            else env_number("BATCHGEN_S3_MULTIPART_THRESHOLD", DEFAULT_MULTIPART_THRESHOLD, minimum=1, integer=True)
        )
        self.part_size = int(
            part_size
            if part_size is not None
            else env_number("BATCHGEN_S3_PART_SIZE", DEFAULT_PART_SIZE, minimum=MIN_PART_SIZE, integer=True)
        )
        self.download_concurrency = int(
            download_concurrency
            if download_concurrency is not None
            else env_number("BATCHGEN_S3_DOWNLOAD_CONCURRENCY", DEFAULT_DOWNLOAD_CONCURRENCY, minimum=1, integer=True)
        )
        if self.download_concurrency > MAX_POOL_CONNECTIONS:
            raise ConfigError(
                f"S3 download concurrency {self.download_concurrency} (BATCHGEN_S3_DOWNLOAD_CONCURRENCY) exceeds the "
                f"client's {MAX_POOL_CONNECTIONS} pooled connections"
            )
        # The same threshold and piece size as uploads: one owner for "big enough to split" and "how big a piece".
        # s3transfer retries a range whose body broke off (without backoff); everything else is our policy's.
        self._transfer_config = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.part_size,
            max_concurrency=self.download_concurrency,
            num_download_attempts=self._retry.max_attempts,
            preferred_transfer_client="classic",
        )
        self._requests = 0
        self._count_lock = threading.Lock()
        self._bucket_checked = False
        # before-send fires once per HTTP attempt, so this counts what actually went on the wire.
        self._client.meta.events.register("before-send.s3", self._count_request)

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r})"

    @property
    def request_count(self) -> int:
        return self._requests

    def _count_request(self, **_: Any) -> None:
        with self._count_lock:
            self._requests += 1

    # -- plumbing -----------------------------------------------------------------------------------------

    def _full_key(self, key: str) -> str:
        return self._root + validate_key(key, self.uri)

    def _where(self, key: str | None) -> str:
        return f"{self.uri}/{key}" if key else self.uri

    def _run(self, what: str, key: str | None, fn: Callable[[int], T], *, check_bucket: bool = True) -> T:
        """Call ``fn(attempt_number)`` under the retry policy; translate what escapes into our errors."""
        if check_bucket and not self._bucket_checked:
            self._check_bucket()
        attempts = 0

        def once() -> T:
            nonlocal attempts
            attempts += 1
            return fn(attempts)

        def before_sleep(state) -> None:
            exc = state.outcome.exception()
            log.info(
                "S3 %s %s: %s, retrying in %.2fs (attempt %d of %d)",
                what,
                self._where(key),
                error_code(exc),
                state.next_action.sleep,
                attempts,
                self._retry.max_attempts,
            )

        try:
            return self._retry.retrying(before_sleep=before_sleep)(once)
        except (boto_errors.BotoCoreError, boto_errors.ClientError, *TRANSIENT_WIRE_ERRORS) as exc:
            raise self._translate(exc, what, key, attempts) from exc

    def _translate(self, exc: Exception, what: str, key: str | None, attempts: int) -> StorageError:
        where = self._where(key)
        code = error_code(exc)
        if is_transient(exc):
            return TransientStorageError(
                _redact(f"S3 {what} {where}: {code} persisted after {attempts} attempt(s) ({exc})")
            )
        if isinstance(exc, (boto_errors.NoCredentialsError, boto_errors.PartialCredentialsError)):
            return StorageError(
                f"S3 {what} {where}: no usable AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or run with an IAM role)"
            )
        # Listing names no key, so a bare 404 there (its error body lost) can only mean the bucket.
        if code == "NoSuchBucket" or (what == CHECK_BUCKET and http_status(exc) == 404):
            return StorageError(
                f"S3 {what} {where}: bucket {self.bucket!r} does not exist (endpoint {self._client.meta.endpoint_url})"
            )
        if code in _ACCESS_CODES:
            return StorageError(
                f"S3 {what} {where}: access denied (S3 error {code}); check the credentials' permissions "
                "and the bucket policy"
            )
        if code in _CREDENTIAL_CODES:
            return StorageError(f"S3 {what} {where}: credentials rejected (S3 error {code})")
        if isinstance(exc, boto_errors.ClientError):
            message = exc.response.get("Error", {}).get("Message") or ""
            return StorageError(
                _redact(
                    f"S3 {what} {where}: S3 error {code} (HTTP {http_status(exc)}){': ' + message if message else ''}"
                )
            )
        return StorageError(_redact(f"S3 {what} {where}: {code}: {exc}"))

    def _check_bucket(self) -> None:
        """Fail fast on a missing bucket or missing permissions, before any work is done.

        Listing one key under our prefix needs only what the worker needs anyway (ListBucket, which a
        prefix-scoped policy can grant), unlike HeadBucket.
        """
        self._run(
            CHECK_BUCKET,
            None,
            lambda _: self._client.list_objects_v2(Bucket=self.bucket, Prefix=self._root, MaxKeys=1),
            check_bucket=False,
        )
        self._bucket_checked = True

    def _written_by_us(self, full_key: str, key: str, write_id: str) -> bool:
        """After an ambiguous retry: is the stored object the one this write id put there?"""
        response = self._head_response(key, full_key, check_bucket=False)
        return response is not None and response.get("Metadata", {}).get(WRITE_ID_META) == write_id

    def _head_response(self, key: str, full_key: str, *, check_bucket: bool = True) -> dict | None:
        def attempt(_: int) -> dict | None:
            try:
                return self._client.head_object(Bucket=self.bucket, Key=full_key)
            except boto_errors.ClientError as exc:
                # HEAD has no body, so a missing key is a bare 404 (a missing bucket was ruled out first).
                if error_code(exc) in _NOT_FOUND_CODES:
                    return None
                raise

        return self._run("head", key, attempt, check_bucket=check_bucket)

    # -- writes -------------------------------------------------------------------------------------------

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
        content_type: str | None = None,
    ) -> str | None:
        full_key = self._full_key(key)
        write_id = uuid.uuid4().hex
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": full_key,
            "Body": data,
            "Metadata": {WRITE_ID_META: write_id},
        }
        if content_type:
            args["ContentType"] = content_type
        if if_absent:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = f'"{if_match}"'

        def attempt(number: int) -> str | None:
            try:
                return _etag(self._client.put_object(**args))
            except boto_errors.ClientError as exc:
                # If-Match on a missing object answers 404: the version we read is gone, a lost race like 412.
                lost = _is_precondition_failed(exc) or (if_match is not None and error_code(exc) in _NOT_FOUND_CODES)
                if (if_absent or if_match is not None) and lost:
                    if number > 1:
                        ours = self._head_response(key, full_key, check_bucket=False)
                        if ours is not None and ours.get("Metadata", {}).get(WRITE_ID_META) == write_id:
                            log.debug("S3 put %s: 412 on retry is our own earlier attempt", self._where(key))
                            return _etag(ours)
                    if if_match is not None:
                        raise ChangedError(f"{self._where(key)} changed since it was read (etag {if_match})") from None
                    raise AlreadyExistsError(f"{self._where(key)} already exists") from None
                raise

        return self._run("put", key, attempt)

    def put_file(self, key: str, path: str | Path, *, if_absent: bool = False, content_type: str | None = None) -> None:
        source = Path(path)
        try:
            size = source.stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot upload {source} to {self._where(key)}: {exc.strerror or exc}") from exc
        if not source.is_file():
            raise StorageError(f"cannot upload {source} to {self._where(key)}: not a file")
        if size < self.multipart_threshold:
            self.put_bytes(key, source.read_bytes(), if_absent=if_absent, content_type=content_type)
        else:
            self._put_multipart(key, source, if_absent=if_absent, content_type=content_type)

    def _put_multipart(self, key: str, source: Path, *, if_absent: bool, content_type: str | None) -> None:
        if if_absent and self.head(key) is not None:
            # Not the decision (completion is), but saves uploading gigabytes only to be refused.
            raise AlreadyExistsError(f"{self._where(key)} already exists")
        for upload in range(1, self._retry.max_attempts + 1):
            try:
                self._upload_parts_and_complete(key, source, if_absent=if_absent, content_type=content_type)
                return
            except _UploadConflict as conflict:
                log.info(
                    "S3 complete multipart upload %s: %s, uploading again (upload %d of %d)",
                    self._where(key), conflict, upload, self._retry.max_attempts,
                )  # fmt: skip
        raise TransientStorageError(
            f"S3 complete multipart upload {self._where(key)}: ConditionalRequestConflict persisted after "
            f"{self._retry.max_attempts} upload(s)"
        )

    def _upload_parts_and_complete(self, key: str, source: Path, *, if_absent: bool, content_type: str | None) -> None:
        """One multipart upload, start to completion; aborted unless it completes."""
        full_key = self._full_key(key)
        write_id = uuid.uuid4().hex
        create_args: dict[str, Any] = {"Bucket": self.bucket, "Key": full_key, "Metadata": {WRITE_ID_META: write_id}}
        if content_type:
            create_args["ContentType"] = content_type
        create_attempts = 0

        def create(attempt: int) -> dict:
            nonlocal create_attempts
            create_attempts = attempt
            return self._client.create_multipart_upload(**create_args)

        upload_id = self._run("create multipart upload", key, create)["UploadId"]
        if create_attempts > 1:
            # S3 has no idempotent create: an attempt whose answer was lost may have started an upload we
            # cannot tell from a concurrent writer's. It stays invisible; a lifecycle rule removes it.
            log.info(
                "S3 %s: retried multipart creation may have left an incomplete upload behind "
                "(an AbortIncompleteMultipartUpload lifecycle rule cleans these up)",
                self._where(key),
            )
        completed = False
        try:
            parts = self._upload_parts(key, full_key, source, upload_id)
            self._complete(key, full_key, upload_id, parts, write_id, if_absent=if_absent)
            completed = True
        finally:
            if not completed:
                self._abort_upload(key, full_key, upload_id)

    def _upload_parts(self, key: str, full_key: str, source: Path, upload_id: str) -> list[dict]:
        parts = []
        with open(source, "rb") as f:
            number = 0
            while chunk := f.read(self.part_size):
                number += 1
                response = self._run(
                    f"upload part {number}",
                    key,
                    # mypy infers no lambda with default arguments (they bind this loop's part)
                    lambda _, n=number, body=chunk: self._client.upload_part(  # type: ignore[misc]
                        Bucket=self.bucket, Key=full_key, UploadId=upload_id, PartNumber=n, Body=body
                    ),
                )
                parts.append({"PartNumber": number, "ETag": response["ETag"]})
        return parts

    def _complete(
        self, key: str, full_key: str, upload_id: str, parts: list[dict], write_id: str, *, if_absent: bool
    ) -> None:
        complete_args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": full_key,
            "UploadId": upload_id,
            "MultipartUpload": {"Parts": parts},
        }
        if if_absent:
            complete_args["IfNoneMatch"] = "*"

        def complete(attempt: int) -> None:
            try:
                self._client.complete_multipart_upload(**complete_args)
            except boto_errors.ClientError as exc:
                ours = attempt > 1 and self._written_by_us(full_key, key, write_id)
                if ours and (_is_precondition_failed(exc) or error_code(exc) == "NoSuchUpload"):
                    return  # an earlier attempt completed; only its answer was lost
                if if_absent and _is_precondition_failed(exc):
                    raise AlreadyExistsError(f"{self._where(key)} already exists") from None
                if _needs_new_upload(exc):
                    raise _UploadConflict(error_code(exc)) from None
                raise

        self._run("complete multipart upload", key, complete)

    def _abort_upload(self, key: str, full_key: str, upload_id: str) -> None:
        try:
            self._run(
                "abort multipart upload",
                key,
                lambda _: self._client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id),
                check_bucket=False,
            )
        except StorageError as exc:
            # Parts left behind cost storage until a lifecycle rule removes them; they are never visible.
            log.warning("could not abort multipart upload of %s: %s", self._where(key), exc)

    # -- reads --------------------------------------------------------------------------------------------

    def _get_object(self, key: str, full_key: str):
        try:
            return self._client.get_object(Bucket=self.bucket, Key=full_key)
        except boto_errors.ClientError as exc:
            if error_code(exc) in _NOT_FOUND_CODES:
                raise NotFoundError(f"{self._where(key)} does not exist") from None
            raise

    def get_bytes(self, key: str) -> bytes:
        full_key = self._full_key(key)
        # Reading the body inside the attempt: a connection dropped mid-body is retried like any other.
        return self._run("get", key, lambda _: self._get_object(key, full_key)["Body"].read())

    def get_file(self, key: str, path: str | Path) -> None:
        """One GET; if its answer is at least the multipart threshold long, its body is dropped and boto3's transfer
        manager fetches the object in concurrent ranged GETs (``If-Match`` the answer's ETag) instead. Small objects
        thus still cost one request, checked against their checksum by botocore as before. Written to a temporary file
        in the destination folder and renamed, so the final name only ever holds a whole object."""
        full_key = self._full_key(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        temp = dest.parent / f"{TEMP_PREFIX}{dest.name}.{uuid.uuid4().hex}"

        def attempt(_: int) -> None:
            response = self._get_object(key, full_key)
            with open(temp, "wb") as f:  # "wb": a retry starts the file over
                if response["ContentLength"] < self.multipart_threshold:
                    for chunk in response["Body"].iter_chunks(1024 * 1024):
                        f.write(chunk)
                else:
                    response["Body"].close()  # its headers serve as the transfer manager's HEAD
                    self._get_ranges(key, full_key, f, _KnownObject(response["ContentLength"], response.get("ETag")))

        try:
            self._run("get", key, attempt)
            os.replace(temp, dest)
        except OSError as exc:
            raise StorageError(f"cannot download {self._where(key)} to {dest}: {exc.strerror or exc}") from exc
        finally:
            temp.unlink(missing_ok=True)

    def _get_ranges(self, key: str, full_key: str, fileobj, known: _KnownObject) -> None:
        try:
            with create_transfer_manager(self._client, self._transfer_config) as manager:
                manager.download(self.bucket, full_key, fileobj, subscribers=[known]).result()
        except RetriesExceededError as exc:
            raise exc.last_exception from exc  # a wire error: transient, so our policy retries the whole file
        except S3DownloadFailedError:
            raise StorageError(f"S3 get {self._where(key)}: the object changed during the download") from None
        except boto_errors.ClientError as exc:
            if error_code(exc) in _NOT_FOUND_CODES:
                raise NotFoundError(f"{self._where(key)} does not exist") from None
            raise

    def head(self, key: str) -> ObjectInfo | None:
        response = self._head_response(key, self._full_key(key))
        if response is None:
            return None
        etag = response.get("ETag", "").strip('"') or None
        return ObjectInfo(key=key, size=int(response["ContentLength"]), etag=etag)

    def list(self, prefix: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        if prefix.startswith("/"):
            raise StorageError(f"{self.uri}: list prefix {prefix!r} must be relative")
        full_prefix = self._root + prefix
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix, "MaxKeys": LIST_PAGE_SIZE}
        if start_after is not None:
            args["StartAfter"] = self._root + start_after
        while True:
            # mypy infers no lambda with default arguments (the copy keeps this page's token)
            page = self._run("list", prefix or None, lambda _, a=dict(args): self._client.list_objects_v2(**a))  # type: ignore[misc]
            for obj in page.get("Contents", ()):
                yield ObjectInfo(
                    key=obj["Key"][len(self._root) :],
                    size=int(obj["Size"]),
                    etag=obj.get("ETag", "").strip('"') or None,
                    modified=obj["LastModified"].timestamp() if "LastModified" in obj else None,
                )
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]

    # -- other --------------------------------------------------------------------------------------------

    def copy(self, source: str, key: str) -> None:
        args = {
            "Bucket": self.bucket,
            "Key": self._full_key(key),
            "CopySource": {"Bucket": self.bucket, "Key": self._full_key(source)},
            "IfNoneMatch": "*",
        }

        # IfNoneMatch closes the race on S3 (botocore's CopyObject model carries it); moto ignores it on copies,
        # so a HEAD first gives the same answer wherever there is no race.
        if self.head(key) is not None:
            raise AlreadyExistsError(f"{self._where(key)} already exists")

        def attempt(_: int) -> None:
            # A 412 after a retried attempt may be that attempt's own copy: callers treat AlreadyExistsError as
            # "an object is there" and check it (batchgen.dataset.reuse), as after a crash.
            try:
                self._client.copy_object(**args)
            except boto_errors.ClientError as exc:
                if error_code(exc) in _NOT_FOUND_CODES:
                    raise NotFoundError(f"{self._where(source)} does not exist") from None
                if _is_precondition_failed(exc):
                    raise AlreadyExistsError(f"{self._where(key)} already exists") from None
                raise

        self._run("copy", key, attempt)

    def delete(self, key: str) -> None:
        full_key = self._full_key(key)

        def attempt(_: int) -> None:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=full_key)
            except boto_errors.ClientError as exc:
                if error_code(exc) not in _NOT_FOUND_CODES:
                    raise

        self._run("delete", key, attempt)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full_key(key)}"
