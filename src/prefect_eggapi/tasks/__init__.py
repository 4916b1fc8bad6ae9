"""Prefect tasks over the client and the safety layer: submit, wait, persist, generate.

Each step is its own retryable task run; the retry conditions let Prefect retry only what can
succeed, and the submitter underneath makes a retry reconnect instead of paying again.
"""

from __future__ import annotations

from prefect_eggapi.tasks._tasks import (
    Budget,
    GenerationResult,
    adownload_outputs,
    agenerate_image,
    amaterialize_images,
    asubmit_edit,
    asubmit_generation,
    await_for_task,
    download_outputs,
    generate_image,
    result_of,
    retry_generation,
    retry_submit,
    retry_transient,
    submit_edit,
    submit_generation,
    wait_for_task,
)

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
