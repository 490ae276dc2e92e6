"""Which S3 failures are worth retrying, and how long to keep trying.

Decided once, here: throttling, 5xx, request timeouts, conditional-write conflicts (409) and anything
that went wrong on the wire are transient; every other client error (403, 404, 400, 412...) is permanent
and must surface at once. botocore's own retries are switched off (see s3.py) so every attempt is
counted and backed off in one place.
"""

from __future__ import annotations

import http.client
import os
from dataclasses import dataclass

import tenacity
import urllib3.exceptions
from botocore import exceptions as boto_errors
from botocore.parsers import ResponseParserError

from batchgen.core.errors import ConfigError

TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        # 409s of a write racing another operation on the same key. AWS's API reference (PutObject, If-None-Match):
        # "If a conflicting operation occurs during the upload S3 returns a 409 ConditionalRequestConflict
        # response. On a 409 failure you should retry the upload."; with If-Match: "...fetch the object's ETag and
        # retry the upload" (our retry keeps the ETag we read: a changed object then answers 412, ChangedError, and
        # the caller reads it again). A conditional CompleteMultipartUpload must start a new upload instead
        # (s3.py, _needs_new_upload). OperationAborted, 409 in the S3 API reference's error list (ErrorResponses),
        # as real S3 words it: "A conflicting conditional operation is currently in progress against this
        # resource. Please try again." https://docs.aws.amazon.com/AmazonS3/latest/API/API_PutObject.html,
        # .../API_CompleteMultipartUpload.html, .../ErrorResponses.html (the same words are in every AWS SDK's
        # generated docs, e.g. the Kotlin SDK's PutObjectRequest.ifNoneMatch).
        "ConditionalRequestConflict",
        "OperationAborted",
    }
)

# Failures below the HTTP layer: the request may or may not have reached the server.
TRANSIENT_WIRE_ERRORS = (
    boto_errors.ConnectionError,  # endpoint unreachable, connect timeout, proxy errors
    boto_errors.HTTPClientError,  # connection closed mid-response, read timeout, broken body stream
    boto_errors.IncompleteReadError,
    boto_errors.FlexibleChecksumError,  # a body cut short or corrupted in transit
    boto_errors.AwsChunkedWrapperError,
    ResponseParserError,  # a response body cut short (botocore itself says "further retries may succeed")
    # botocore reads an error answer's body outside its own exception wrapping, so a connection reset or a body
    # cut short there arrives as the raw urllib3 / http.client / socket error.
    urllib3.exceptions.HTTPError,  # ProtocolError ("Connection broken: IncompleteRead"), ReadTimeoutError...
    http.client.HTTPException,  # IncompleteRead
    ConnectionError,  # ConnectionResetError, BrokenPipeError
)


def error_code(exc: BaseException) -> str:
    """The S3 error code of a ClientError ("AccessDenied", "404"...), else the exception's class name."""
    if isinstance(exc, boto_errors.ClientError):
        err = exc.response.get("Error", {})
        return str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
    return type(exc).__name__


def http_status(exc: BaseException) -> int | None:
    if isinstance(exc, boto_errors.ClientError):
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, boto_errors.ClientError):
        status = http_status(exc) or 0
        # 409 on an object operation is a conflicting concurrent request; checked by status too because an
        # error whose body was lost arrives with only its status for a code.
        return error_code(exc) in TRANSIENT_CODES or status >= 500 or status in (409, 429)
    return isinstance(exc, TRANSIENT_WIRE_ERRORS)


def env_number(name: str, default: float, *, minimum: float, integer: bool = False) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not a {'whole ' if integer else ''}number") from None
    if value < minimum:
        raise ConfigError(f"environment variable {name}={raw!r} must be >= {minimum}")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 10
    """Attempts per operation, the first included."""
    backoff_initial_s: float = 0.2
    """First wait; doubles per attempt, plus up to the same again of random jitter."""
    backoff_max_s: float = 20.0
    """Cap on one wait."""

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """BATCHGEN_S3_MAX_ATTEMPTS, BATCHGEN_S3_BACKOFF_S, BATCHGEN_S3_BACKOFF_MAX_S override the defaults."""
        return cls(
            max_attempts=int(env_number("BATCHGEN_S3_MAX_ATTEMPTS", cls.max_attempts, minimum=1, integer=True)),
            backoff_initial_s=env_number("BATCHGEN_S3_BACKOFF_S", cls.backoff_initial_s, minimum=0),
            backoff_max_s=env_number("BATCHGEN_S3_BACKOFF_MAX_S", cls.backoff_max_s, minimum=0),
        )

    def retrying(self, before_sleep=None) -> tenacity.Retrying:
        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_attempts),
            # Exponential backoff plus random jitter, spelled so that every tenacity >= 8.2 accepts it.
            wait=tenacity.wait_exponential(multiplier=self.backoff_initial_s, max=self.backoff_max_s)
            + tenacity.wait_random(0, self.backoff_initial_s),
            retry=tenacity.retry_if_exception(is_transient),
            before_sleep=before_sleep,
            reraise=True,
        )
