"""prefect-eggapi: EggAPI image generation for Prefect 3, without paying twice.

The client layer (``client/``) and the layers on it (``safety/``, ``storage/``, ``webhooks/``)
import nothing from Prefect;
the Prefect blocks and tasks are loaded on first use so that plain scripts stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect_eggapi._version import __version__
from prefect_eggapi.client import AsyncEggAPIClient, EggAPIClient, RetryPolicy
from prefect_eggapi.client.errors import (
    AmbiguousSubmitError,
    APIStatusError,
    BudgetExceededError,
    ContentModerationError,
    DownloadError,
    EggAPIError,
    EmptyOutputError,
    ErrorClass,
    InvalidRequestError,
    ReconciliationError,
    S3CallError,
    StorageError,
    TaskAbandonedError,
    TaskFailedError,
    UploadError,
)
from prefect_eggapi.client.polling import PollPolicy
from prefect_eggapi.client.types import EggAPITask, GenerateRequest, TaskStatus

if TYPE_CHECKING:
    from prefect_eggapi.credentials import EggAPICredentials

_LAZY = {"EggAPICredentials": "prefect_eggapi.credentials"}


def __getattr__(name: str) -> Any:
    if name == "Task":  # the 0.1 name of EggAPITask; warns, kept for one release
        from prefect_eggapi.client import types

        return types.Task
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefect_eggapi' has no attribute {name!r}")


def __dir__() -> list[str]:
    # `prefect block register -m prefect_eggapi` discovers blocks through dir().
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "APIStatusError",
    "AmbiguousSubmitError",
    "AsyncEggAPIClient",
    "BudgetExceededError",
    "ContentModerationError",
    "DownloadError",
    "EggAPIClient",
    "EggAPICredentials",
    "EggAPIError",
    "EggAPITask",
    "EmptyOutputError",
    "ErrorClass",
    "GenerateRequest",
    "InvalidRequestError",
    "PollPolicy",
    "ReconciliationError",
    "RetryPolicy",
    "S3CallError",
    "StorageError",
    "TaskAbandonedError",
    "TaskFailedError",
    "TaskStatus",
    "UploadError",
    "__version__",
]
