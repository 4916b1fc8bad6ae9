"""One exception hierarchy for EggAPI, each error classified for retry decisions.

EggAPI has no idempotency key and no cancel endpoint, so "may I retry this?" has three answers:

* ``TERMINAL``: the same inputs cannot succeed (validation, auth, balance, moderation).
* ``RETRYABLE``: the same inputs may succeed on another try, and nothing was paid for twice.
* ``AMBIGUOUS``: a submit may have been accepted; a blind retry could pay twice. Reconcile first.

Every error a caller can catch derives from :class:`EggAPIError`, storage errors included
(:class:`StorageError`), and carries one ``classification``: per class by default, per instance
where only the failure itself can tell (an S3 call refused for permissions vs. a dropped
connection). ``status_code`` is always the HTTP status that was really answered.

Why one module of ~400 lines: it is the whole tree, about thirty small classes that callers
``except`` on and that every layer imports from here; splitting it would scatter the hierarchy
that the classification rules above are read against, for no other gain.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, TypedDict, Unpack

if TYPE_CHECKING:
    from datetime import datetime
    from decimal import Decimal

    from prefect_eggapi.client.types import EggAPITask


class ErrorClass(StrEnum):
    TERMINAL = "terminal"
    RETRYABLE = "retryable"
    AMBIGUOUS = "ambiguous"


class EggAPIError(Exception):
    """Base of every error this package raises on purpose."""

    # A class default that an instance may override (S3 errors are classified per failure).
    classification: ErrorClass = ErrorClass.TERMINAL

    @property
    def retryable(self) -> bool:
        return self.classification is ErrorClass.RETRYABLE


class InvalidRequestError(EggAPIError, ValueError):
    """Rejected on our side before any HTTP call; ``problems`` maps each field to its rule."""

    def __init__(self, problems: list[tuple[str, str]], *, what: str = "request") -> None:
        self.problems = problems
        lines = "; ".join(f"{field}: {rule}" for field, rule in problems)
        super().__init__(f"invalid {what}: {lines}")


# --------------------------------------------------------------------------- HTTP errors


class APIStatusError(EggAPIError):
    """The API answered with an error envelope. ``status_code`` is the status it answered
    (a 504 is an :class:`InternalServerError` with ``status_code == 504``); ``default_status``
    is the one the class stands for."""

    default_status: ClassVar[int] = 0
    code: ClassVar[str] = ""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        method: str | None = None,
        path: str | None = None,
        task_id: str | None = None,
    ) -> None:
        self.message = message
        self.status_code = status_code if status_code is not None else self.default_status
        self.error_code = code or self.code
        self.method = method
        self.path = path
        self.task_id = task_id
        where = f" on {method} {path}" if method and path else ""
        task = f" (task {task_id})" if task_id else ""
        super().__init__(f"HTTP {self.status_code} {self.error_code}{where}{task}: {message}")

    @property
    def http_status(self) -> int:
        """Same as ``status_code`` (the name 0.1 used)."""
        return self.status_code


class BadRequestError(APIStatusError):
    default_status = 400
    code = "BAD_REQUEST"


class APIValidationError(APIStatusError):
    """The server rejected the body; nothing was created or billed (includes unknown models)."""

    default_status = 400
    code = "VALIDATION_ERROR"


class AuthenticationError(APIStatusError):
    default_status = 401
    code = "UNAUTHORIZED"


class ForbiddenError(APIStatusError):
    default_status = 403
    code = "FORBIDDEN"


class InsufficientBalanceError(APIStatusError):
    default_status = 403
    code = "INSUFFICIENT_BALANCE"


class NotFoundError(APIStatusError):
    default_status = 404
    code = "NOT_FOUND"


class RateLimitError(APIStatusError):
    classification = ErrorClass.RETRYABLE
    default_status = 429
    code = "RATE_LIMITED"


class InternalServerError(APIStatusError):
    classification = ErrorClass.RETRYABLE
    default_status = 500
    code = "INTERNAL_ERROR"


class UpstreamError(APIStatusError):
    classification = ErrorClass.RETRYABLE
    default_status = 502
    code = "UPSTREAM_ERROR"


class ServiceUnavailableError(APIStatusError):
    classification = ErrorClass.RETRYABLE
    default_status = 503
    code = "SERVICE_UNAVAILABLE"


_BY_CODE: dict[str, type[APIStatusError]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        APIValidationError,
        AuthenticationError,
        ForbiddenError,
        InsufficientBalanceError,
        NotFoundError,
        RateLimitError,
        InternalServerError,
        UpstreamError,
        ServiceUnavailableError,
    )
}
_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: ForbiddenError,
    404: NotFoundError,
    429: RateLimitError,
    500: InternalServerError,
    502: UpstreamError,
    503: ServiceUnavailableError,
}


def error_for_status(status_code: int, code: str | None) -> type[APIStatusError]:
    """The class for an error envelope: by documented code, else by HTTP status."""
    if code and code in _BY_CODE and _BY_CODE[code].default_status == status_code:
        return _BY_CODE[code]
    if status_code in _BY_STATUS:
        return _BY_STATUS[status_code]
    if status_code >= 500:
        return InternalServerError
    return APIStatusError


# --------------------------------------------------------------------------- transport


class APIConnectionError(EggAPIError):
    """The request never reached the server (connect failure); safe to retry."""

    classification = ErrorClass.RETRYABLE


class APITimeoutError(APIConnectionError):
    """A read or write timed out on a request that changes nothing (GET)."""


class NothingCreatedError(EggAPIError):
    """A POST failed and reconciliation proved that it created nothing: posting again is safe.

    Raised when a submit already re-posted once after such a proof and lost that answer too; the
    entry is left ``rejected`` (nothing exists), so a retry posts a fresh request.
    """

    classification = ErrorClass.RETRYABLE


class LostSubmit(TypedDict):
    """What a submit whose answer was lost sent, and when: what reconciliation matches
    ``GET /v1/tasks`` against. The keywords of :class:`AmbiguousSubmitError` and
    :class:`ReconciliationError`, written once for both."""

    sent_at: datetime
    failed_at: datetime
    model: str
    prompt: str
    task_type: str


class AmbiguousSubmitError(EggAPIError):
    """A submit may have created a task, but no task id came back.

    Retrying blindly could pay twice: reconcile against ``GET /v1/tasks`` first
    (see ``prefect_eggapi.safety.reconcile``).
    """

    classification = ErrorClass.AMBIGUOUS

    def __init__(
        self, message: str, *, cause: BaseException | None = None, **lost: Unpack[LostSubmit]
    ) -> None:
        self.sent_at = lost["sent_at"]
        self.failed_at = lost["failed_at"]
        self.model = lost["model"]
        self.prompt = lost["prompt"]
        self.task_type = lost["task_type"]
        self.cause = cause
        super().__init__(
            f"submit outcome unknown ({message}); a task may have been created between "
            f"{self.sent_at.isoformat()} and {self.failed_at.isoformat()}; "
            "not retried to avoid paying twice"
        )


# --------------------------------------------------------------------------- task outcomes


class TaskFailedError(EggAPIError):
    """The remote task ended ``failed``; a fresh attempt may succeed (upstream hiccup)."""

    classification = ErrorClass.RETRYABLE

    def __init__(self, task: EggAPITask) -> None:
        self.task = task
        self.task_id = task.id
        reason = task.error or "no reason given"
        super().__init__(f"EggAPI task {task.id} failed: {reason}")


class ContentModerationError(TaskFailedError):
    """The prompt or inputs were refused; the same inputs will be refused again."""

    classification = ErrorClass.TERMINAL


class EmptyOutputError(EggAPIError):
    """A completed task with no output URLs; a fresh attempt may succeed."""

    classification = ErrorClass.RETRYABLE

    def __init__(self, task: EggAPITask) -> None:
        self.task = task
        self.task_id = task.id
        super().__init__(f"EggAPI task {task.id} completed without output URLs")


class TaskAbandonedError(EggAPIError):
    """The wait deadline passed; the task may still complete and bill.

    Distinct from a failure: the task id is kept (and marked ``abandoned`` in the ledger) so a
    recovery run can collect the result later. Not retried automatically: that would silently
    extend a deadline the caller chose.
    """

    def __init__(self, task_id: str, *, last_status: str | None, waited_seconds: float) -> None:
        self.task_id = task_id
        self.last_status = last_status
        self.waited_seconds = waited_seconds
        super().__init__(
            f"gave up waiting for EggAPI task {task_id} after {waited_seconds:.1f}s "
            f"(last status: {last_status or 'unknown'}); abandoned — it may still complete and bill"
        )


class BudgetExceededError(EggAPIError):
    """Submitting would take the scope's spend past its cap; nothing was sent."""

    def __init__(self, *, scope: str, cap: Decimal, committed: Decimal, estimate: Decimal) -> None:
        self.scope = scope
        self.cap = cap
        self.committed = committed
        self.estimate = estimate
        super().__init__(
            f"budget cap ${cap} for {scope!r} would be exceeded: ${committed} already committed "
            f"+ ${estimate} for this request; not submitted"
        )


class ReconciliationError(AmbiguousSubmitError):
    """Reconciliation could not tell whether (or which) task the lost submit created."""

    def __init__(self, message: str, *, evidence: str, **lost: Unpack[LostSubmit]) -> None:
        self.evidence = evidence
        super().__init__(f"{message}; {evidence}", **lost)


class DownloadError(EggAPIError):
    """An output could not be fetched whole (truncated, HTTP error, not an image)."""

    classification = ErrorClass.RETRYABLE

    def __init__(self, message: str, *, url: str, status_code: int | None = None) -> None:
        self.url = url
        self.status_code = status_code
        super().__init__(f"{message} ({url})")


class OutputGoneError(DownloadError):
    """The output URL answers 403/404/410: retention ran out; downloading again will not help."""

    classification = ErrorClass.TERMINAL


# --------------------------------------------------------------------------- storage


class StorageError(EggAPIError):
    """Anything the output store or the S3 ledger raises on purpose."""


class InvalidKeyError(StorageError, ValueError):
    """A task id, output index or key part that cannot be used in an S3 key."""


class InvalidMetadataError(StorageError, ValueError):
    """Caller metadata that cannot be stored (reserved or clashing key, too large)."""


class NotAnImageError(StorageError, ValueError):
    """The bytes are not PNG, JPEG, WebP or GIF (judged by magic bytes); nothing was uploaded."""

    def __init__(self, message: str, *, head: bytes = b"", size: int = 0) -> None:
        super().__init__(message)
        self.head = head
        self.size = size


class TooManyInputsError(StorageError, ValueError):
    """More edit inputs than EggAPI accepts; raised before any upload."""


PERMANENT_S3_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "NoSuchBucket",
        "InvalidBucketName",
        "AllAccessDisabled",
    }
)


class S3CallError(StorageError):
    """An S3 call failed after botocore's retries. Retryable unless the same call cannot get
    past it (permissions, a missing bucket: ``PERMANENT_S3_CODES``)."""

    def __init__(
        self,
        message: str,
        *,
        bucket: str,
        key: str,
        code: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.bucket = bucket
        self.key = key
        self.code = code
        if retryable is None:
            retryable = code not in PERMANENT_S3_CODES
        self.classification = ErrorClass.RETRYABLE if retryable else ErrorClass.TERMINAL


class UploadError(S3CallError):
    """An upload failed; no object was left at ``key``."""


def classify(exc: BaseException) -> ErrorClass:
    """Terminal unless we know better: unknown exceptions are not retried blindly."""
    if isinstance(exc, EggAPIError):
        return exc.classification
    return ErrorClass.TERMINAL


def is_retryable(exc: BaseException) -> bool:
    return classify(exc) is ErrorClass.RETRYABLE


def describe(exc: BaseException) -> dict[str, str | int]:
    """A JSON-safe summary for ledgers and artifacts (never includes credentials)."""
    out: dict[str, str | int] = {"type": type(exc).__name__, "message": str(exc)}
    out["classification"] = classify(exc).value
    for attr in ("task_id", "http_status", "error_code"):
        value = getattr(exc, attr, None)
        if value is not None:
            out[attr] = value
    return out
