"""Which failures Prefect retries: the taxonomy wired into retry_condition_fn.

The three conditions differ by what a retry re-runs: a submit retry re-posts (through the
ledger), a persist retry re-reads the same outputs, a generate retry re-runs the whole chain and
so is the only one that can cure a failure of the remote task (as a fresh attempt).
"""

from __future__ import annotations

import errno
import inspect
from datetime import UTC, datetime

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from prefect.states import Failed

from prefect_eggapi.client.errors import (
    AmbiguousSubmitError,
    APIValidationError,
    BudgetExceededError,
    ContentModerationError,
    DownloadError,
    EmptyOutputError,
    InsufficientBalanceError,
    OutputGoneError,
    TaskAbandonedError,
    TaskFailedError,
    UpstreamError,
)
from prefect_eggapi.client.types import EggAPITask, TaskStatus
from prefect_eggapi.storage import S3CallError, UploadError, is_transient_s3_error
from prefect_eggapi.tasks import retry_generation, retry_submit, retry_transient

NOW = datetime.now(UTC)
FAILED = EggAPITask(id="gen_x", status=TaskStatus.FAILED, error="Upstream provider error")
MODERATED = EggAPITask(id="gen_y", status=TaskStatus.FAILED, error="Content moderation: no")
EMPTY = EggAPITask(id="gen_e", status=TaskStatus.COMPLETED)


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


CASES = [
    # exception, retried by submit, by persist, by generate (whole chain)
    (APIValidationError("bad"), False, False, False),
    (InsufficientBalanceError("poor"), False, False, False),
    (ContentModerationError(MODERATED), False, False, False),
    (BudgetExceededError(scope="s", cap=1, committed=1, estimate=1), False, False, False),
    (TaskAbandonedError("gen_z", last_status="processing", waited_seconds=5), False, False, False),
    (OutputGoneError("gone", url="http://x/0.png", status_code=404), False, False, False),
    (UpstreamError("502"), True, True, True),
    # The remote task failed upstream or came back empty: only a fresh attempt can help, and
    # only the whole chain starts one (a bare submit or persist would get the same task back).
    (TaskFailedError(FAILED), False, False, True),
    (EmptyOutputError(EMPTY), False, False, True),
    (DownloadError("truncated", url="http://x/0.png"), True, True, True),
    (
        AmbiguousSubmitError(
            "timeout",
            sent_at=NOW,
            failed_at=NOW,
            model="nanobanana",
            prompt="p",
            task_type="image_generate",
        ),
        True,
        False,
        True,
    ),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), True, True, True),
    (client_error("InternalError", 500), True, True, True),
    (client_error("AccessDenied", 403), False, False, False),
    (UploadError("denied", bucket="b", key="k", code="AccessDenied"), False, False, False),
    (UploadError("reset", bucket="b", key="k", code=None), True, True, True),
    (ValueError("a bug"), False, False, False),
    # OS errors by errno: the network may come back, a full disk or a permission will not.
    (ConnectionResetError(errno.ECONNRESET, "reset"), True, True, True),
    (TimeoutError("read timed out"), True, True, True),
    (OSError(errno.EHOSTUNREACH, "no route"), True, True, True),
    (PermissionError(errno.EACCES, "denied"), False, False, False),
    (OSError(errno.ENOSPC, "No space left on device"), False, False, False),
    (OSError(errno.EROFS, "Read-only file system"), False, False, False),
    (S3CallError("HEAD failed", bucket="b", key="k", code="NoSuchBucket"), False, False, False),
    (S3CallError("LIST failed", bucket="b", key="k", retryable=True), True, True, True),
]


@pytest.mark.parametrize(
    ("exc", "submit", "persist", "generate"),
    CASES,
    ids=[type(c[0]).__name__ + str(i) for i, c in enumerate(CASES)],
)
def test_retry_decisions(exc, submit, persist, generate):
    state = Failed(data=exc)
    assert retry_submit(None, None, state) is submit
    assert retry_transient(None, None, state) is persist
    assert retry_generation(None, None, state) is generate


def test_a_state_without_an_exception_is_not_retried():
    for condition in (retry_submit, retry_transient, retry_generation):
        assert condition(None, None, Failed(data="just a message")) is False


def test_the_three_conditions_are_told_apart():
    """Each pair of conditions disagrees on some failure: none is an alias of another."""
    decisions = {
        name: tuple(c[i] for c in CASES)
        for i, name in ((1, "submit"), (2, "persist"), (3, "generate"))
    }
    assert len(set(decisions.values())) == 3, decisions
    ambiguous = Failed(data=CASES[[type(c[0]) for c in CASES].index(AmbiguousSubmitError)][0])
    upstream = Failed(data=TaskFailedError(FAILED))
    # submit vs persist: an ambiguous submit is reconciled by a submit retry only.
    assert retry_submit(None, None, ambiguous) and not retry_transient(None, None, ambiguous)
    # submit vs generate: an upstream failure of the remote task is retried by the chain only.
    assert retry_generation(None, None, upstream) and not retry_submit(None, None, upstream)
    assert not retry_transient(None, None, upstream)


def test_moderation_is_terminal_even_for_the_whole_chain():
    """A moderation refusal is a TaskFailedError too, but no retry (fresh attempt) may follow."""
    moderated = Failed(data=ContentModerationError(MODERATED))
    assert isinstance(ContentModerationError(MODERATED), TaskFailedError)
    assert retry_generation(None, None, moderated) is False


def test_conditions_are_plain_functions_that_say_what_they_are():
    """Prefect 3.8 runs a ``retry_condition_fn`` only if ``inspect.isfunction`` (any other
    callable means "never retry", silently); Prefect logs it by name."""
    for condition, name in (
        (retry_submit, "retry_submit"),
        (retry_transient, "retry_transient"),
        (retry_generation, "retry_generation"),
    ):
        assert inspect.isfunction(condition), condition
        assert condition.__name__ == name
    assert "remote_task=True" in (retry_generation.__doc__ or "")
    assert "remote_task=False" in (retry_submit.__doc__ or "")


def test_is_transient_s3_error_direct():
    assert is_transient_s3_error(ConnectionResetError())
    assert not is_transient_s3_error(client_error("NoSuchBucket", 404))
    assert is_transient_s3_error(client_error("SlowDown", 503))


def test_storage_errors_are_in_the_one_tree_with_their_own_classification():
    from prefect_eggapi.client.errors import EggAPIError, ErrorClass, StorageError, classify

    denied = UploadError("denied", bucket="b", key="k", code="AccessDenied")
    reset = UploadError("reset", bucket="b", key="k")
    assert isinstance(denied, StorageError) and isinstance(denied, EggAPIError)
    assert classify(denied) is ErrorClass.TERMINAL and not denied.retryable
    assert classify(reset) is ErrorClass.RETRYABLE and reset.retryable
    # per instance: the class default is not changed by one instance's failure
    assert UploadError.classification is ErrorClass.TERMINAL


@pytest.mark.parametrize(
    ("exc", "generate"),
    [(c[0], c[3]) for c in CASES],
    ids=[type(c[0]).__name__ + str(i) for i, c in enumerate(CASES)],
)
def test_generations_in_a_chunk_retry_exactly_what_the_task_retries(monkeypatch, exc, generate):
    """A batch chunk runs items without task runs of their own: same decisions, same count."""
    import asyncio

    from prefect_eggapi.tasks import generate as module

    calls: list[int] = []
    done = object()

    async def flaky(args):
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return done

    monkeypatch.setattr(module, "agenerate", flaky)
    args = module.GenerateArgs(request="unused")
    if generate:
        assert asyncio.run(module.agenerate_with_retries(args, (0.0, 0.0))) is done
        assert len(calls) == 2
    else:
        with pytest.raises(type(exc)):
            asyncio.run(module.agenerate_with_retries(args, (0.0, 0.0)))
        assert len(calls) == 1


def test_a_chunked_generation_gives_up_after_its_retries(monkeypatch):
    import asyncio

    from prefect_eggapi.tasks import generate as module

    calls: list[int] = []

    async def always(args):
        calls.append(1)
        raise TaskFailedError(FAILED)

    monkeypatch.setattr(module, "agenerate", always)
    with pytest.raises(TaskFailedError):
        asyncio.run(module.agenerate_with_retries(module.GenerateArgs(request="x"), (0.0, 0.0)))
    assert len(calls) == 3  # the first try and two retries, as retries=2 on the task
