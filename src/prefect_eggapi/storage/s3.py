"""The thin S3 helpers every S3 user of the package shares: what a failure means (not found,
transient, the typed error), one conditional read and one conditional write.

One place answers "is this a 404" (:func:`is_not_found`) and "may another try succeed"
(:func:`is_transient_s3_error`), so the store, the ledger and the flows cannot disagree.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from prefect_eggapi.client.errors import PERMANENT_S3_CODES, EggAPIError, ErrorClass, S3CallError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# OS errors that another try of the same call can get past: the network, not the machine.
# PermissionError, ENOSPC, EROFS, EDQUOT and the like are not among them.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
        errno.EAGAIN,
        errno.EINTR,
    }
)


def is_transient_os_error(exc: OSError) -> bool:
    """Connection and timeout errors, or an errno of :data:`TRANSIENT_ERRNOS`."""
    return isinstance(exc, ConnectionError | TimeoutError) or exc.errno in TRANSIENT_ERRNOS


def is_transient_s3_error(exc: BaseException) -> bool:
    """Whether another try of the same S3 call may succeed: the server was unreachable, a
    connection dropped, or it answered 5xx / throttled; not permissions, a missing bucket or a
    full disk."""
    if isinstance(exc, EggAPIError):
        return exc.classification is ErrorClass.RETRYABLE
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return True
    if isinstance(exc, OSError):
        return is_transient_os_error(exc)
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code not in PERMANENT_S3_CODES and (status >= 500 or code in ("SlowDown", "503"))
    return False


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of a ClientError (None for anything else)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "")) or None
    return None


def _status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def call_failed(
    what: str, bucket: str, key: str, exc: BaseException, error: type[S3CallError] = S3CallError
) -> S3CallError:
    """The typed error for a failed S3 call, classified from the failure itself."""
    boto = isinstance(exc, ClientError | BotoCoreError)
    detail = str(exc) if boto else f"{type(exc).__name__}: {exc}"
    return error(
        f"{what} s3://{bucket}/{key} failed: {detail}",
        bucket=bucket,
        key=key,
        code=error_code(exc),
        retryable=is_transient_s3_error(exc),
    )


def is_not_found(exc: BaseException) -> bool:
    """Whether an S3 error says the object (or key) does not exist."""
    if not isinstance(exc, ClientError):
        return False
    return error_code(exc) in ("404", "NoSuchKey", "NotFound") or _status(exc) == 404


def read_object(s3: S3Client, bucket: str, key: str) -> tuple[bytes, str] | None:
    """The object's bytes and ETag, or None when it does not exist."""
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_not_found(exc):
            return None
        raise
    return obj["Body"].read(), obj["ETag"]


def put_if(
    s3: S3Client,
    bucket: str,
    key: str,
    body: bytes,
    version: str | None,
    *,
    content_type: str = "application/json",
) -> str | None:
    """PUT only over the ETag ``version`` (None: only where no object exists yet).

    The new ETag, or None when the condition failed (someone else wrote first): the basis of
    every compare-and-swap the package makes in S3.
    """
    condition = {"IfMatch": version} if version else {"IfNoneMatch": "*"}
    try:
        result = s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=body,
            ContentType=content_type,
            **condition,  # type: ignore[arg-type]
        )
    except ClientError as exc:
        if error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return None
        if _status(exc) in (409, 412):
            return None
        raise
    return result["ETag"]
