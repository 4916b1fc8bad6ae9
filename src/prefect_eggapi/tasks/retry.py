"""Which failures Prefect retries: the failure taxonomy, per step, as ``retry_condition_fn``.

Every error carries one classification (terminal / retryable / ambiguous), but what a retry can
fix depends on what the retry re-runs:

* a **submit** retry re-runs the POST (through the ledger): transient errors and ambiguous
  submits (which it reconciles, never posting blindly);
* a **persist** retry re-reads the same outputs of the same task: transient network and S3
  errors only;
* a **generate** retry re-runs the whole chain, so it is the one step that can also cure a
  failure *of the remote task* (an upstream failure, a completed task without outputs): the
  submitter finds the failed attempt in the ledger and starts a fresh, billable attempt (a new
  attempt number), never a second payment for the same attempt. Moderation failures are
  terminal everywhere; an abandoned deadline is not retried (the task may still bill).

A remote-task failure is retryable by classification, but retrying a bare submit or persist
after one cannot help: the step that failed would get back the same failed task.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import RetryConditionCallable, Task

from prefect_eggapi.client.errors import EmptyOutputError, ErrorClass, TaskFailedError, classify
from prefect_eggapi.storage import is_transient_s3_error

__all__ = [
    "GENERATION",
    "SUBMIT",
    "TRANSIENT",
    "RetryCondition",
    "retry_generation",
    "retry_submit",
    "retry_transient",
]


def remote_task_failed(exc: BaseException) -> bool:
    """The remote task itself failed or came back empty (not the call that asked about it)."""
    return isinstance(exc, TaskFailedError | EmptyOutputError)


@dataclass(frozen=True)
class RetryCondition:
    """Which failed runs to retry: those whose exception is in ``classes``.

    ``remote_task`` says whether failures of the remote task count (only where the retry starts
    a fresh attempt of it). S3 errors sit outside the EggAPI classes: an unreachable or 5xx S3
    is transient for every step.
    """

    name: str
    classes: frozenset[ErrorClass]
    remote_task: bool = False

    def retries(self, exc: BaseException) -> bool:
        if remote_task_failed(exc) and not self.remote_task:
            return False
        return classify(exc) in self.classes or is_transient_s3_error(exc)

    def as_retry_condition_fn(self) -> RetryConditionCallable:
        """A plain function for ``retry_condition_fn``.

        Prefect 3.8 calls the condition only when ``inspect.isfunction`` says it is one
        (``SyncTaskRunEngine.can_retry``: any other callable counts as "no retry"), so a callable
        object would silently turn every retry off there; 3.9 accepts any callable.
        """

        def should_retry(task: Task[..., object], task_run: TaskRun, state: State[object]) -> bool:
            exc = state.data
            return isinstance(exc, BaseException) and self.retries(exc)

        should_retry.__name__ = should_retry.__qualname__ = self.name
        should_retry.__doc__ = f"{self!r}: retry when :meth:`RetryCondition.retries` says so."
        return should_retry


_TRANSIENT = frozenset({ErrorClass.RETRYABLE})
_RECONCILABLE = frozenset({ErrorClass.RETRYABLE, ErrorClass.AMBIGUOUS})

#: Submits retry transient failures and re-reconcile ambiguous ones (never a blind POST).
SUBMIT = RetryCondition("retry_submit", _RECONCILABLE)
#: Downloads/persists retry transient network and S3 errors.
TRANSIENT = RetryCondition("retry_transient", _TRANSIENT)
#: The whole chain also retries a failure of the remote task: as a fresh attempt.
GENERATION = RetryCondition("retry_generation", _RECONCILABLE, remote_task=True)

retry_submit = SUBMIT.as_retry_condition_fn()
retry_transient = TRANSIENT.as_retry_condition_fn()
retry_generation = GENERATION.as_retry_condition_fn()
