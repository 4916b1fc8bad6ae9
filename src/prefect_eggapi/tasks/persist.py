"""The persist tasks: stream every output of a completed task into S3, once.

Keys are deterministic (``{prefix}/{task_id}/{index}.{ext}``), so a retry or a rerun finds the
objects already stored and skips them; the tasks return references, never bytes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass

from prefect.cache_policies import NO_CACHE

from prefect_eggapi.client import EggAPIClient
from prefect_eggapi.client.errors import EmptyOutputError, InvalidRequestError
from prefect_eggapi.client.types import EggAPITask, TaskStatus
from prefect_eggapi.credentials import EggAPICredentials
from prefect_eggapi.safety.ledger import EntryState, LedgerStore, default_ledger
from prefect_eggapi.safety.submitter import record_outcome
from prefect_eggapi.storage import (
    OutputStore,
    S3BucketLike,
    S3Settings,
    StoredImage,
    is_transient_s3_error,
)
from prefect_eggapi.tasks.artifacts import emit_task_event, publish_images
from prefect_eggapi.tasks.naming import task_run_name
from prefect_eggapi.tasks.replay import recorded_before
from prefect_eggapi.tasks.retry import retry_transient
from prefect_eggapi.tasks.runtime import run_logger
from prefect_eggapi.tasks.twins import twin_tasks

__all__ = [
    "S3_OUTAGE_BACKOFF",
    "PersistArgs",
    "StoreLike",
    "adownload_outputs",
    "download_outputs",
    "output_store",
    "persist",
]

# Seconds between tries of one output while S3 is unreachable or answering 5xx (~1 minute).
S3_OUTAGE_BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)

#: Where outputs go: a store, its settings, a prefect-aws ``S3Bucket``, or None (from the env).
StoreLike = OutputStore | S3Settings | S3BucketLike | None


def output_store(store: StoreLike) -> OutputStore:
    """The :class:`OutputStore` a ``store=`` argument names."""
    if isinstance(store, OutputStore):
        return store
    if isinstance(store, S3Settings):
        return OutputStore.from_settings(store)
    if store is None:
        return OutputStore.from_settings(S3Settings.from_env())
    # Checked by shape at run time too: a flow parameter may be anything.
    if hasattr(store, "bucket_name") and hasattr(store, "credentials"):
        return OutputStore.from_prefect_aws(store)
    raise InvalidRequestError(
        [("store", "must be an OutputStore, S3Settings or a prefect-aws S3Bucket block")]
    )


@dataclass(frozen=True)
class PersistArgs:
    """The parameters of the persist tasks (see :func:`download_outputs`)."""

    task: EggAPITask
    store: StoreLike = None
    _: KW_ONLY
    credentials: EggAPICredentials | None = None
    label: str | None = None
    metadata: Mapping[str, str] | None = None
    image_artifacts: bool = True
    ledger: LedgerStore | None = None


def persist(args: PersistArgs) -> list[StoredImage]:
    """Stream the outputs into the store (blocking), riding out a short S3 outage."""
    logger = run_logger()
    task = args.task
    if task.status is not TaskStatus.COMPLETED:
        raise InvalidRequestError([("task", f"is {task.status.value}, not completed")])
    urls = task.output_urls
    if not urls:
        raise EmptyOutputError(task)
    target = output_store(args.store)
    book = args.ledger or default_ledger()
    entry = book.find_task(task.id)
    meta = {
        "model": task.model or "",
        "cost": str(task.cost_amount),
        "request-fingerprint": entry.fingerprint if entry else "",
        **(args.metadata or {}),
    }
    stored: list[StoredImage] = []
    creds = args.credentials or EggAPICredentials()
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
    if args.image_artifacts:
        described = " · ".join(p for p in (args.label or "", task.id) if p)
        publish_images(
            [(target.presign_get(s.key), f"{described} #{i}") for i, s in enumerate(stored)]
        )
    # Once per real transition: a rerun that found every output stored, for a task the ledger
    # already had as persisted, announces nothing (no automation fires twice).
    if new or (entry is not None and not recorded_before(entry, task.id, {EntryState.PERSISTED})):
        emit_task_event("persisted", task.id, task=task, uris=[s.uri for s in stored])
    return stored


download_outputs, adownload_outputs = twin_tasks(
    PersistArgs,
    persist,
    names=("download_outputs", "adownload_outputs"),
    docs=(
        """Stream every output of a completed task into S3 (deterministic keys; reruns skip).

        ``store`` is an :class:`OutputStore`, :class:`S3Settings`, a prefect-aws ``S3Bucket``,
        or None for ``S3Settings.from_env()``. Returns references, never bytes.
        """,
        "Async :func:`download_outputs` (the transfer runs in a worker thread).",
    ),
    name="eggapi-download-outputs",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[1, 5, 15],
    retry_condition_fn=retry_transient,
    task_run_name=task_run_name("persist"),
)
