"""Prefect tasks: submit, wait, persist, and generate (all three), in sync and async variants.

Each step is its own retryable task run. Retrying any of them never pays twice: submits go through
the ledger (``submission.py``), waits only read, and persists skip outputs already stored. Every
variant is a real ``Task`` object, so ``.submit``, ``.map`` and ``.with_options`` work (the
``a``-prefixed ones are async).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from decimal import Decimal
from functools import partial
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from pydantic import BaseModel, ConfigDict, Field

from prefect_eggapi.client import EggAPIClient, TaskSignals
from prefect_eggapi.client.errors import (
    EggAPIError,
    EmptyOutputError,
    ErrorClass,
    InvalidRequestError,
    TaskAbandonedError,
    TaskFailedError,
    classify,
)
from prefect_eggapi.client.polling import PollPolicy
from prefect_eggapi.client.pricing import format_cost
from prefect_eggapi.client.types import EggAPITask, GenerateRequest, TaskStatus
from prefect_eggapi.credentials import EggAPICredentials
from prefect_eggapi.safety.ledger import EntryState, LedgerEntry, LedgerStore, default_ledger
from prefect_eggapi.safety.submitter import Submitter, record_outcome
from prefect_eggapi.storage import OutputStore, S3Settings, StoredImage, is_transient_s3_error
from prefect_eggapi.tasks.artifacts import Progress, ReportRow, emit_task_event, publish_images
from prefect_eggapi.tasks.runtime import in_thread, run_logger, run_scope

DEFAULT_WAIT_SECONDS = 300.0
# Seconds between tries of one output while S3 is unreachable or answering 5xx (~1 minute).
S3_OUTAGE_BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)

# --------------------------------------------------------------------------- retry conditions


def _exception(state: State[Any]) -> BaseException | None:
    data = state.data
    return data if isinstance(data, BaseException) else None


def _retry_when(*classes: ErrorClass) -> Any:
    def should_retry(task: Any, task_run: TaskRun, state: State[Any]) -> bool:
        exc = _exception(state)
        if exc is None:
            return False
        # S3 errors sit outside the EggAPI taxonomy: an unreachable or 5xx S3 is transient.
        return classify(exc) in classes or is_transient_s3_error(exc)

    should_retry.__name__ = f"retry_when_{'_'.join(c.value for c in classes)}"
    return should_retry


#: Submits retry transient failures and re-reconcile ambiguous ones (never a blind POST).
retry_submit = _retry_when(ErrorClass.RETRYABLE, ErrorClass.AMBIGUOUS)
#: Downloads/persists retry transient network and S3 errors.
retry_transient = _retry_when(ErrorClass.RETRYABLE)
#: The whole chain may also start a fresh attempt after an upstream failure of the remote task.
retry_generation = _retry_when(ErrorClass.RETRYABLE, ErrorClass.AMBIGUOUS)


# --------------------------------------------------------------------------- naming


def _task_label() -> tuple[str, str]:
    from prefect.runtime import task_run

    params = task_run.parameters or {}
    source = params.get("task")
    task_id = source.id if isinstance(source, EggAPITask) else str(source or "")
    return task_id, str(params.get("label") or "")


def _run_name(verb: str) -> Callable[[], str]:
    def name() -> str:
        task_id, label = _task_label()
        return " · ".join(p for p in (verb, task_id, label) if p)

    name.__name__ = f"{verb}_run_name"
    return name


def _request_name(verb: str) -> Callable[[], str]:
    def name() -> str:
        from prefect.runtime import task_run

        params = task_run.parameters or {}
        req = params.get("request")
        model = req.model if isinstance(req, GenerateRequest) else ""
        return " · ".join(p for p in (verb, model, str(params.get("label") or "")) if p)

    name.__name__ = f"{verb}_run_name"
    return name


# --------------------------------------------------------------------------- helpers


def _coerce(request: GenerateRequest | Mapping[str, Any]) -> GenerateRequest:
    if isinstance(request, GenerateRequest):
        return request
    if isinstance(request, Mapping):
        return GenerateRequest(**request)
    raise InvalidRequestError([("request", "must be a GenerateRequest or a mapping")])


class Budget(BaseModel):
    """A spend cap in dollars over a named scope (default: this run's scope).

    A plain number as ``budget=`` caps the current run scope; a ``Budget`` with a ``scope`` caps
    work that spans runs, e.g. a batch that is resumed by later flow runs.
    """

    model_config = ConfigDict(frozen=True)

    cap: Decimal = Field(ge=0)
    scope: str | None = None


BudgetLike = Decimal | float | str | Budget | None


def _budget(value: BudgetLike) -> tuple[Decimal | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, Budget):
        return value.cap, value.scope
    try:
        amount = Decimal(str(value))
    except ArithmeticError:
        amount = Decimal(-1)
    if not amount.is_finite() or amount < 0:
        raise InvalidRequestError([("budget", "must be a non-negative amount in dollars")])
    return amount, None


def _store(store: OutputStore | S3Settings | Any | None) -> OutputStore:
    if isinstance(store, OutputStore):
        return store
    if isinstance(store, S3Settings):
        return OutputStore.from_settings(store)
    if store is None:
        return OutputStore.from_settings(S3Settings.from_env())
    if hasattr(store, "bucket_name") and hasattr(store, "credentials"):
        return OutputStore.from_prefect_aws(store)
    raise InvalidRequestError(
        [("store", "must be an OutputStore, S3Settings or a prefect-aws S3Bucket block")]
    )


def _already(entry: LedgerEntry | None, task_id: str, states: Collection[EntryState]) -> bool:
    """The ledger had ``task_id`` in one of ``states`` before this step: a replay, not news."""
    return entry is not None and entry.task_id == task_id and entry.state in states


#: Ledger states in which a task's completion was already recorded (and announced).
COMPLETED_STATES = frozenset({EntryState.COMPLETED, EntryState.PERSISTED})


# --------------------------------------------------------------------------- submit


def _submit(
    request: GenerateRequest | Mapping[str, Any],
    credentials: EggAPICredentials | None,
    key: str | None,
    label: str | None,
    budget: BudgetLike,
    ledger: LedgerStore | None,
    edit: bool,
) -> EggAPITask:
    logger = run_logger()
    req = _coerce(request)
    if edit and not req.image_urls:
        raise InvalidRequestError([("image_urls", "an edit needs at least one input image URL")])
    cap, budget_scope = _budget(budget)
    scope = run_scope()
    logical_key = key or f"{scope}/{label or ''}"
    creds = credentials or EggAPICredentials()
    req = creds.with_webhook(req)  # webhooks on: the POST gets its own /s/<nonce> URL
    with creds.get_client() as client:
        submitter = Submitter(
            client, ledger or default_ledger(), lane_width=creds.submits_in_flight
        )
        outcome = submitter.submit(
            req,
            logical_key=logical_key,
            scope=budget_scope or scope,
            budget=cap,
            label=label or "",
        )
    t = outcome.task
    if outcome.reconnected:
        logger.info(
            "Reconnected to EggAPI task %s (%s); not submitting again", t.id, t.status.value
        )
    else:
        how = "adopted after an ambiguous submit" if outcome.adopted else "submitted"
        logger.info(
            "EggAPI task %s %s (%s, %s, attempt %d, up to %s)",
            t.id,
            how,
            req.model,
            req.task_type,
            outcome.entry.attempt,
            format_cost(outcome.entry.estimate),
        )
        emit_task_event(
            "submitted",
            t.id,
            task=t,
            label=label,
            adopted=outcome.adopted,
            attempt=outcome.entry.attempt,
            estimate=str(outcome.entry.estimate),
        )
    return t


_SUBMIT_OPTS: dict[str, Any] = dict(
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[1, 5, 15],
    retry_condition_fn=retry_submit,
    task_run_name=_request_name("submit"),
)


@task(name="eggapi-submit-generation", **_SUBMIT_OPTS)
def submit_generation(
    request: GenerateRequest | dict[str, Any],
    *,
    credentials: EggAPICredentials | None = None,
    key: str | None = None,
    label: str | None = None,
    budget: BudgetLike = None,
    ledger: LedgerStore | None = None,
) -> EggAPITask:
    """Create an EggAPI task once per logical key; retries and reruns reconnect to it.

    ``key`` defaults to the run scope (deployment slot or flow run) plus ``label``; identical
    requests under one key share one paid task. ``budget`` caps estimated spend in the run scope.
    """
    return _submit(request, credentials, key, label, budget, ledger, edit=False)


@task(name="eggapi-submit-edit", **_SUBMIT_OPTS)
def submit_edit(
    request: GenerateRequest | dict[str, Any],
    *,
    credentials: EggAPICredentials | None = None,
    key: str | None = None,
    label: str | None = None,
    budget: BudgetLike = None,
    ledger: LedgerStore | None = None,
) -> EggAPITask:
    """Like :func:`submit_generation`, for requests with ``image_urls`` (``type: image_edit``)."""
    return _submit(request, credentials, key, label, budget, ledger, edit=True)


@task(name="eggapi-submit-generation", **_SUBMIT_OPTS)
async def asubmit_generation(
    request: GenerateRequest | dict[str, Any],
    *,
    credentials: EggAPICredentials | None = None,
    key: str | None = None,
    label: str | None = None,
    budget: BudgetLike = None,
    ledger: LedgerStore | None = None,
) -> EggAPITask:
    """Async :func:`submit_generation`."""
    return await in_thread(
        partial(_submit, request, credentials, key, label, budget, ledger, False)
    )


@task(name="eggapi-submit-edit", **_SUBMIT_OPTS)
async def asubmit_edit(
    request: GenerateRequest | dict[str, Any],
    *,
    credentials: EggAPICredentials | None = None,
    key: str | None = None,
    label: str | None = None,
    budget: BudgetLike = None,
    ledger: LedgerStore | None = None,
) -> EggAPITask:
    """Async :func:`submit_edit`."""
    return await in_thread(partial(_submit, request, credentials, key, label, budget, ledger, True))


# --------------------------------------------------------------------------- wait


class _WaitObserver:
    """Logs and progress on status changes only; counts polls for the ledger and report."""

    def __init__(
        self, task_id: str, label: str | None, progress: bool, signals: TaskSignals | None = None
    ) -> None:
        self.logger = run_logger()
        self.task_id = task_id
        self.signals = signals
        self.polls = 0
        self.status: TaskStatus | None = None
        name = " · ".join(p for p in (f"EggAPI task {task_id}", label or "") if p)
        self.progress = Progress(name) if progress else None

    def __call__(self, task: EggAPITask) -> None:
        self.polls += 1
        if task.status is self.status:
            return
        self.status = task.status
        self.logger.info("EggAPI task %s is %s", task.id, task.status.value)
        if self.progress is not None:
            percent = {TaskStatus.PENDING: 10, TaskStatus.PROCESSING: 50}.get(task.status, 100)
            self.progress.update(percent, f"{task.id}: {task.status.value}")

    def _receiver_announced(self, task_id: str) -> bool:
        """The webhook receiver already emitted this task's terminal event (one per task)."""
        is_signalled = getattr(self.signals, "is_signalled", None)
        return bool(is_signalled and is_signalled(task_id))

    def finished(self, ledger: LedgerStore, task: EggAPITask) -> EggAPITask:
        replay = _already(ledger.find_task(task.id), task.id, COMPLETED_STATES)
        record_outcome(ledger, task.id, task=task, polls=self.polls)
        self.logger.info(
            "EggAPI task %s completed: %d output(s), cost %s, %d poll(s)",
            task.id,
            len(task.output_urls),
            task.cost or "?",
            self.polls,
        )
        if replay:
            # A rerun reconnecting to a task completed earlier: its event went out then, and an
            # automation on eggapi.task.completed must not fire again for the same task.
            self.logger.debug("EggAPI task %s was already completed: no event", task.id)
            return task
        if self._receiver_announced(task.id):
            return task
        emit_task_event(
            "completed",
            task.id,
            task=task,
            polls=self.polls,
            outputs=len(task.output_urls),
            queue_seconds=task.queue_seconds,
            processing_seconds=task.processing_seconds,
        )
        return task

    def failed(self, ledger: LedgerStore, exc: EggAPIError) -> None:
        record_outcome(ledger, self.task_id, error=exc, polls=self.polls)
        if isinstance(exc, TaskAbandonedError):
            self.logger.error("%s", exc)
            emit_task_event(
                "abandoned",
                self.task_id,
                waited_seconds=exc.waited_seconds,
                last_status=exc.last_status,
            )
        elif isinstance(exc, TaskFailedError | EmptyOutputError):
            self.logger.error("%s (%s)", exc, exc.classification.value)
            if self._receiver_announced(self.task_id):
                return
            emit_task_event(
                "failed", self.task_id, task=exc.task, classification=exc.classification.value
            )


_WAIT_OPTS: dict[str, Any] = dict(cache_policy=NO_CACHE, task_run_name=_run_name("wait"))


@task(name="eggapi-wait", **_WAIT_OPTS)
def wait_for_task(
    task: EggAPITask | str,
    *,
    credentials: EggAPICredentials | None = None,
    timeout: float = DEFAULT_WAIT_SECONDS,
    poll: PollPolicy | None = None,
    label: str | None = None,
    progress: bool = True,
    ledger: LedgerStore | None = None,
    signals: TaskSignals | None = None,
) -> EggAPITask:
    """Poll inside this one task run until the EggAPI task finishes or ``timeout`` passes.

    Raises :class:`TaskFailedError` (moderation: :class:`ContentModerationError`),
    :class:`EmptyOutputError`, or :class:`TaskAbandonedError` at the deadline; the ledger records
    each so a later submit knows whether a fresh attempt is due.
    """
    book = ledger or default_ledger()
    task_id = task.id if isinstance(task, EggAPITask) else task
    observer = _WaitObserver(task_id, label, progress, signals)
    creds = credentials or EggAPICredentials()
    with creds.get_client(poll) as client:
        try:
            done = client.wait_for_task(task, timeout=timeout, on_poll=observer, signals=signals)
        except (TaskAbandonedError, TaskFailedError, EmptyOutputError) as exc:
            observer.failed(book, exc)
            raise
    return observer.finished(book, done)


@task(name="eggapi-wait", **_WAIT_OPTS)
async def await_for_task(
    task: EggAPITask | str,
    *,
    credentials: EggAPICredentials | None = None,
    timeout: float = DEFAULT_WAIT_SECONDS,
    poll: PollPolicy | None = None,
    label: str | None = None,
    progress: bool = True,
    ledger: LedgerStore | None = None,
    signals: TaskSignals | None = None,
) -> EggAPITask:
    """Async :func:`wait_for_task`: hundreds can wait concurrently on one event loop."""
    book = ledger or default_ledger()
    task_id = task.id if isinstance(task, EggAPITask) else task
    observer = await in_thread(lambda: _WaitObserver(task_id, label, progress, signals))
    creds = credentials or EggAPICredentials()
    async with creds.get_async_client(poll) as client:
        try:
            done = await client.wait_for_task(
                task, timeout=timeout, on_poll=observer, signals=signals
            )
        except (TaskAbandonedError, TaskFailedError, EmptyOutputError) as exc:
            await in_thread(partial(observer.failed, book, exc))
            raise
    return await in_thread(partial(observer.finished, book, done))


# --------------------------------------------------------------------------- persist


def _persist(
    task: EggAPITask,
    store: OutputStore | S3Settings | Any | None,
    credentials: EggAPICredentials | None,
    label: str | None,
    metadata: Mapping[str, str] | None,
    image_artifacts: bool,
    ledger: LedgerStore | None,
) -> list[StoredImage]:
    logger = run_logger()
    if task.status is not TaskStatus.COMPLETED:
        raise InvalidRequestError([("task", f"is {task.status.value}, not completed")])
    urls = task.output_urls
    if not urls:
        raise EmptyOutputError(task)
    target = _store(store)
    book = ledger or default_ledger()
    entry = book.find_task(task.id)
    meta = {
        "model": task.model or "",
        "cost": str(task.cost_amount),
        "request-fingerprint": entry.fingerprint if entry else "",
        **(metadata or {}),
    }
    stored: list[StoredImage] = []
    creds = credentials or EggAPICredentials()
    client: EggAPIClient | None = None
    try:
        for index, url in enumerate(urls):
            for attempt in range(len(S3_OUTAGE_BACKOFF) + 1):
                try:
                    existing = target.find_existing(task.id, index)
                    if existing is not None:
                        stored.append(existing)
                        break
                    client = client or creds.get_client()
                    with client.stream_output(url) as (chunks, _):
                        stored.append(
                            target.persist(chunks, task_id=task.id, index=index, metadata=meta)
                        )
                    break
                except Exception as exc:
                    # An S3 restart takes seconds: ride it out here rather than fail the item.
                    if attempt == len(S3_OUTAGE_BACKOFF) or not is_transient_s3_error(exc):
                        raise
                    logger.warning("S3 unavailable (%s); retrying output %d", exc, index)
                    time.sleep(S3_OUTAGE_BACKOFF[attempt])
    finally:
        if client is not None:
            client.close()
    new = sum(s.created for s in stored)
    logger.info(
        "Stored %d output(s) of EggAPI task %s (%d new, %d already there): %s",
        len(stored),
        task.id,
        new,
        len(stored) - new,
        ", ".join(s.uri for s in stored),
    )
    record_outcome(book, task.id, outputs=[s.model_dump(mode="json") for s in stored])
    if image_artifacts:
        described = " · ".join(p for p in (label or "", task.id) if p)
        publish_images(
            [(target.presign_get(s.key), f"{described} #{i}") for i, s in enumerate(stored)]
        )
    # Once per real transition: a rerun that found every output stored, for a task the ledger
    # already had as persisted, announces nothing (no automation fires twice).
    if new or (entry is not None and not _already(entry, task.id, {EntryState.PERSISTED})):
        emit_task_event("persisted", task.id, task=task, uris=[s.uri for s in stored])
    return stored


_PERSIST_OPTS: dict[str, Any] = dict(
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[1, 5, 15],
    retry_condition_fn=retry_transient,
    task_run_name=_run_name("persist"),
)


@task(name="eggapi-persist-outputs", **_PERSIST_OPTS)
def download_outputs(
    task: EggAPITask,
    store: OutputStore | S3Settings | Any | None = None,
    *,
    credentials: EggAPICredentials | None = None,
    label: str | None = None,
    metadata: dict[str, str] | None = None,
    image_artifacts: bool = True,
    ledger: LedgerStore | None = None,
) -> list[StoredImage]:
    """Stream every output of a completed task into S3 (deterministic keys; reruns skip).

    ``store`` is an :class:`OutputStore`, :class:`S3Settings`, a prefect-aws ``S3Bucket``, or
    None for ``S3Settings.from_env()``. Returns references, never bytes.
    """
    return _persist(task, store, credentials, label, metadata, image_artifacts, ledger)


@task(name="eggapi-persist-outputs", **_PERSIST_OPTS)
async def adownload_outputs(
    task: EggAPITask,
    store: OutputStore | S3Settings | Any | None = None,
    *,
    credentials: EggAPICredentials | None = None,
    label: str | None = None,
    metadata: dict[str, str] | None = None,
    image_artifacts: bool = True,
    ledger: LedgerStore | None = None,
) -> list[StoredImage]:
    """Async :func:`download_outputs` (the transfer runs in a worker thread)."""
    return await in_thread(
        partial(_persist, task, store, credentials, label, metadata, image_artifacts, ledger)
    )


# --------------------------------------------------------------------------- assets

_ASSET_PROMPT_CHARS = 300
_log = logging.getLogger(__name__)


def _asset_metadata(
    image: StoredImage,
    task: EggAPITask,
    prompt: str,
    sources: Sequence[str],
    extra: Mapping[str, str],
) -> dict[str, Any]:
    return {
        "prompt": prompt[:_ASSET_PROMPT_CHARS],
        "model": task.model or "",
        "task_id": task.id,
        "cost": str(task.cost_amount),
        "sha256": image.sha256,
        "size": image.size,
        "width": image.width,
        "height": image.height,
        "content_type": image.content_type,
        "sources": list(sources),
        **extra,
    }


def _image_asset(image: StoredImage, label: str, prompt: str) -> Any:
    from prefect.assets import Asset, AssetProperties

    return Asset(
        key=image.uri,
        properties=AssetProperties(
            name=" · ".join(p for p in (label, image.key.rsplit("/", 2)[-2]) if p),
            description=prompt[:_ASSET_PROMPT_CHARS] or None,
        ),
    )


async def amaterialize_images(
    stored: Sequence[StoredImage],
    task: EggAPITask,
    *,
    sources: Sequence[str] = (),
    prompt: str = "",
    label: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bool:
    """Record the stored images of ``task`` as materialized Prefect assets (one task run).

    Each image is an asset keyed by its ``s3://`` URI; ``sources`` (the ``s3://`` URIs of the
    images an edit was made from) are its upstream assets, so Prefect shows the edit chain.
    Prompt, model, task id and cost go in as materialization metadata. The asset keys are only
    known once the outputs are stored (the extension comes from the bytes), so the materializing
    task is built per call with :func:`prefect.assets.materialize`. Telemetry: never raises;
    returns whether the materialization was recorded.
    """
    from prefect.assets import add_asset_metadata, materialize

    extra = dict(metadata or {})
    try:
        assets = [_image_asset(s, label or "", prompt) for s in stored]
        deps: list[Any] = list(dict.fromkeys(sources))

        async def record() -> int:
            for image in stored:
                add_asset_metadata(image.uri, _asset_metadata(image, task, prompt, deps, extra))
            return len(stored)

        materializing = materialize(
            *assets,
            asset_deps=deps or None,
            name="eggapi-image-asset",
            task_run_name=" · ".join(p for p in ("asset", task.id, label or "") if p),
            cache_policy=NO_CACHE,
            persist_result=False,
        )(record)
        await materializing()
    except Exception:
        _log.debug("could not record assets of EggAPI task %s", task.id, exc_info=True)
        return False
    return True


# --------------------------------------------------------------------------- all three


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


def _generate(
    request: GenerateRequest | Mapping[str, Any],
    store: OutputStore | S3Settings | Any | None,
    credentials: EggAPICredentials | None,
    key: str | None,
    label: str | None,
    budget: BudgetLike,
    timeout: float,
    image_artifacts: bool,
    ledger: LedgerStore | None,
) -> GenerationResult:
    req = _coerce(request)
    book = ledger or default_ledger()
    created = _submit(req, credentials, key, label, budget, book, edit=False)
    done = wait_for_task.fn(
        created, credentials=credentials, timeout=timeout, label=label, progress=False, ledger=book
    )
    stored = _persist(done, store, credentials, label, None, image_artifacts, book)
    return result_of(req, done, stored, label=label, ledger=book)


_GENERATE_OPTS: dict[str, Any] = dict(
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_generation,
    task_run_name=_request_name("generate"),
)


@task(name="eggapi-generate-image", **_GENERATE_OPTS)
def generate_image(
    request: GenerateRequest | dict[str, Any],
    store: OutputStore | S3Settings | Any | None = None,
    *,
    credentials: EggAPICredentials | None = None,
    key: str | None = None,
    label: str | None = None,
    budget: BudgetLike = None,
    timeout: float = DEFAULT_WAIT_SECONDS,
    image_artifacts: bool = True,
    ledger: LedgerStore | None = None,
) -> GenerationResult:
    """Submit, wait and persist in one task run; a retry resumes where the last one stopped.

    An upstream failure of the remote task starts a fresh (billable) attempt on retry; moderation
    failures, validation errors and abandoned deadlines do not retry.
    """
    return _generate(
        request, store, credentials, key, label, budget, timeout, image_artifacts, ledger
    )


@task(name="eggapi-generate-image", **_GENERATE_OPTS)
async def agenerate_image(
    request: GenerateRequest | dict[str, Any],
    store: OutputStore | S3Settings | Any | None = None,
    *,
    credentials: EggAPICredentials | None = None,
    key: str | None = None,
    label: str | None = None,
    budget: BudgetLike = None,
    timeout: float = DEFAULT_WAIT_SECONDS,
    image_artifacts: bool = True,
    ledger: LedgerStore | None = None,
) -> GenerationResult:
    """Async :func:`generate_image`: the wait runs on the event loop, transfers in threads."""
    req = _coerce(request)
    book = ledger or default_ledger()
    created = await in_thread(partial(_submit, req, credentials, key, label, budget, book, False))
    done = await await_for_task.fn(
        created, credentials=credentials, timeout=timeout, label=label, progress=False, ledger=book
    )
    stored = await in_thread(
        partial(_persist, done, store, credentials, label, None, image_artifacts, book)
    )
    return result_of(req, done, stored, label=label, ledger=book)
