"""The EggAPI client layer: HTTP clients, the API's types, errors, prices, polling, rate limits.

Nothing here imports Prefect, so the clients work in plain scripts and in other engines. The
sync and async clients share one decision core and differ only in their I/O loops.
"""

from __future__ import annotations

from prefect_eggapi.client._client import (
    DEFAULT_BASE_URL,
    AsyncEggAPIClient,
    DownloadResult,
    DownloadStream,
    EggAPIClient,
    RetryPolicy,
    TaskSignals,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "AsyncEggAPIClient",
    "DownloadResult",
    "DownloadStream",
    "EggAPIClient",
    "RetryPolicy",
    "TaskSignals",
]
