"""The generate tasks: submit, wait and persist in one task run.

A retry re-runs the chain and resumes where the last try stopped: the ledger reconnects the
submit to the task already paid for, the wait reads it again, and the persist skips stored
outputs. After a failure of the remote task itself the ledger starts a fresh attempt instead
(see :mod:`prefect_eggapi.tasks.retry`). The steps are the submit, wait and persist tasks'
implementations, called in this run (not as task runs of their own).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from decimal import Decimal
from functools import partial

from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from prefect_eggapi.client import DEFAULT_WAIT_TIMEOUT
from prefect_eggapi.client.types import EggAPITask, GenerateRequest
from prefect_eggapi.credentials import EggAPICredentials
from prefect_eggapi.safety.ledger import LedgerStore, default_ledger
from prefect_eggapi.storage import StoredImage
from prefect_eggapi.tasks.artifacts import ReportRow
from prefect_eggapi.tasks.budget import BudgetLike
from prefect_eggapi.tasks.naming import request_run_name
from prefect_eggapi.tasks.persist import PersistArgs, StoreLike, persist
from prefect_eggapi.tasks.retry import GENERATION, retry_generation
from prefect_eggapi.tasks.runtime import in_thread, submit_pool
from prefect_eggapi.tasks.submit import RequestLike, SubmitArgs, coerce_request, submit
from prefect_eggapi.tasks.twins import twin_tasks
from prefect_eggapi.tasks.wait import WaitArgs, await_, wait

__all__ = [
    "GenerateArgs",
    "GenerationResult",
    "agenerate",
    "agenerate_image",
    "agenerate_with_retries",
    "generate_image",
    "result_of",
]


class GenerationResult(BaseModel):
    """What one generation produced: the task, where its images are, and what it cost."""

    label: str = ""
    prompt: str
    model: str
    task_id: str
    status: str
    cost: Decimal
    queue_seconds: float | None = None
    processing_seconds: float | None = None
    polls: int = 0
    output_urls: list[str] = Field(default_factory=list)
    stored: list[StoredImage] = Field(default_factory=list)

    def report_row(self) -> ReportRow:
        return ReportRow(
            label=self.label,
            prompt=self.prompt,
            task_id=self.task_id,
            status=self.status,
            queue_seconds=self.queue_seconds,
            processing_seconds=self.processing_seconds,
            polls=self.polls,
            cost=self.cost,
            stored=", ".join(s.uri for s in self.stored),
        )


def result_of(
    request: GenerateRequest,
    task: EggAPITask,
    stored: list[StoredImage],
    *,
    label: str | None = None,
    ledger: LedgerStore | None = None,
) -> GenerationResult:
    """The :class:`GenerationResult` of a finished, persisted task (polls from the ledger)."""
    entry = (ledger or default_ledger()).find_task(task.id)
    return GenerationResult(
        label=label or "",
        prompt=request.prompt,
        model=request.model,
        task_id=task.id,
        status=task.status.value,
        cost=task.cost_amount,
        queue_seconds=task.queue_seconds,
        processing_seconds=task.processing_seconds,
        polls=entry.polls if entry else 0,
        output_urls=task.output_urls,
        stored=stored,
    )


@dataclass(frozen=True)
class GenerateArgs:
    """The parameters of the generate tasks (see :func:`generate_image`)."""

    request: RequestLike
    store: StoreLike = None
    _: KW_ONLY
    credentials: EggAPICredentials | None = None
    key: str | None = None
    label: str | None = None
    budget: BudgetLike = None
    timeout: float = DEFAULT_WAIT_TIMEOUT
    image_artifacts: bool = True
    ledger: LedgerStore | None = None


@dataclass(frozen=True)
class _Chain:
    """One generation's steps, over one request and one ledger; only the wait differs between
    the sync and the async task."""

    args: GenerateArgs
    request: GenerateRequest
    ledger: LedgerStore

    @classmethod
    def of(cls, args: GenerateArgs) -> _Chain:
        return cls(args, coerce_request(args.request), args.ledger or default_ledger())

    def submit(self) -> EggAPITask:
        a = self.args
        return submit(
            SubmitArgs(
                self.request,
                credentials=a.credentials,
                key=a.key,
                label=a.label,
                budget=a.budget,
                ledger=self.ledger,
            )
        )

    def waiting(self, created: EggAPITask) -> WaitArgs:
        a = self.args
        return WaitArgs(
            created,
            credentials=a.credentials,
            timeout=a.timeout,
            label=a.label,
            progress=False,
            ledger=self.ledger,
        )

    def finish(self, done: EggAPITask) -> GenerationResult:
        a = self.args
        stored = persist(
            PersistArgs(
                done,
                a.store,
                credentials=a.credentials,
                label=a.label,
                image_artifacts=a.image_artifacts,
                ledger=self.ledger,
            )
        )
        return result_of(self.request, done, stored, label=a.label, ledger=self.ledger)


def generate(args: GenerateArgs) -> GenerationResult:
    """Submit, wait and persist, blocking this thread."""
    chain = _Chain.of(args)
    return chain.finish(wait(chain.waiting(chain.submit())))


async def agenerate(args: GenerateArgs) -> GenerationResult:
    """:func:`generate` with the wait on the event loop and the transfers in worker threads."""
    chain = _Chain.of(args)
    created = await in_thread(chain.submit, submit_pool)
    done = await await_(chain.waiting(created))
    return await in_thread(partial(chain.finish, done))


#: The generate tasks' delays between tries (one per retry), shared with
#: :func:`agenerate_with_retries` so the two policies cannot drift apart.
RETRY_DELAYS: tuple[float, ...] = (2.0, 10.0)


async def agenerate_with_retries(
    args: GenerateArgs, delays: Sequence[float] = RETRY_DELAYS
) -> GenerationResult:
    """:func:`agenerate` under the retry policy of :func:`agenerate_image`, in the caller's run.

    For a caller that runs many generations inside one task run (a batch's chunk of items):
    each generation retries on its own, ``len(delays)`` times at most, on exactly the failures
    the task would retry (:data:`~prefect_eggapi.tasks.retry.GENERATION`), so a fresh attempt
    after an upstream failure is the ledger's decision here too, never a second payment.
    """
    for attempt in range(len(delays) + 1):
        try:
            return await agenerate(args)
        except Exception as exc:
            if attempt == len(delays) or not GENERATION.retries(exc):
                raise
            await asyncio.sleep(delays[attempt])
    raise AssertionError("unreachable: the last attempt returns or raises")


generate_image, agenerate_image = twin_tasks(
    GenerateArgs,
    generate,
    agenerate,
    names=("generate_image", "agenerate_image"),
    docs=(
        """Submit, wait and persist in one task run; a retry resumes where the last one stopped.

        An upstream failure of the remote task (or a completed task without outputs) starts a
        fresh (billable) attempt on retry; moderation failures, validation errors and
        abandoned deadlines do not retry.
        """,
        "Async :func:`generate_image`: the wait runs on the event loop, transfers in threads.",
    ),
    name="eggapi-generate-image",
    cache_policy=NO_CACHE,
    retries=len(RETRY_DELAYS),
    retry_delay_seconds=list(RETRY_DELAYS),
    retry_condition_fn=retry_generation,
    task_run_name=request_run_name("generate"),
)
