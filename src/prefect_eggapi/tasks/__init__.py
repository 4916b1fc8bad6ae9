"""Prefect tasks over the client and the safety layer: submit, wait, persist, generate.

Each step is its own retryable task run; the retry conditions let Prefect retry only what can
succeed, and the submitter underneath makes a retry reconnect instead of paying again.

One module per job: ``submit``, ``wait``, ``persist``, ``generate`` (the task pairs, each built
by ``twins`` from one signature), ``retry`` (conditions), ``naming`` (task run names),
``budget``, ``assets``, ``artifacts`` and ``gallery`` (what a run shows), ``runtime`` (run
scope, logger, I/O threads), ``global_limit``.
"""

from __future__ import annotations

from prefect_eggapi.tasks.assets import amaterialize_images
from prefect_eggapi.tasks.budget import Budget
from prefect_eggapi.tasks.generate import (
    GenerationResult,
    agenerate_image,
    generate_image,
    result_of,
)
from prefect_eggapi.tasks.persist import adownload_outputs, download_outputs
from prefect_eggapi.tasks.retry import retry_generation, retry_submit, retry_transient
from prefect_eggapi.tasks.submit import (
    asubmit_edit,
    asubmit_generation,
    submit_edit,
    submit_generation,
)
from prefect_eggapi.tasks.wait import await_for_task, wait_for_task

__all__ = [
    "Budget",
    "GenerationResult",
    "adownload_outputs",
    "agenerate_image",
    "amaterialize_images",
    "asubmit_edit",
    "asubmit_generation",
    "await_for_task",
    "download_outputs",
    "generate_image",
    "result_of",
    "retry_generation",
    "retry_submit",
    "retry_transient",
    "submit_edit",
    "submit_generation",
    "wait_for_task",
]
