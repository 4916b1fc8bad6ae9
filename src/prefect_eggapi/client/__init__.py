"""The EggAPI client layer: HTTP clients, the API's types, errors, prices, polling, rate limits.

Nothing here imports Prefect, so the clients work in plain scripts and in other engines. The
sync and async clients share one decision core and differ only in their I/O loops:

* ``_core``: the actions an operation yields, the driver that steps it, the pure rules;
* ``_ops`` and ``_wait``: the operations (GET with retries, submit, wait), written once;
* ``_base``: configuration shared by both twins (key, URL, pools, limiter);
* ``_sync`` / ``_async``: ``EggAPIClient`` / ``AsyncEggAPIClient``, the two I/O loops;
* ``download``: checked, streamed output downloads.
"""

from __future__ import annotations

from prefect_eggapi.client._async import AsyncEggAPIClient
from prefect_eggapi.client._base import DEFAULT_BASE_URL
from prefect_eggapi.client._core import RetryPolicy, TaskSignals
from prefect_eggapi.client._sync import EggAPIClient
from prefect_eggapi.client._wait import DEFAULT_WAIT_TIMEOUT
from prefect_eggapi.client.download import DownloadResult, DownloadStream

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_WAIT_TIMEOUT",
    "AsyncEggAPIClient",
    "DownloadResult",
    "DownloadStream",
    "EggAPIClient",
    "RetryPolicy",
    "TaskSignals",
]
