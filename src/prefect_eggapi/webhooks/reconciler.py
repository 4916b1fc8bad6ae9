"""After a delivery is answered: re-read its task from the API and announce it when terminal.

The receiver (:mod:`prefect_eggapi.webhooks.receiver`) never trusts a payload: what it hands
here is only a hint of which task to read. :class:`EggAPIReconciler` reads it with
``GET /v1/tasks/{id}`` through a client it builds once (from a credentials block or the
environment) and passes each confirmed terminal task to ``announce`` (the ``prefect-eggapi
webhooks`` command emits a Prefect event there; this module imports no Prefect).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Protocol

from prefect_eggapi.client import DEFAULT_BASE_URL, EggAPIClient
from prefect_eggapi.client.types import EggAPITask, WebhookPayload

# The receiver's logger: one place to look for everything that happens to a delivery.
log = logging.getLogger("prefect_eggapi.webhooks.receiver")


class PayloadProcessor(Protocol):
    """What the receiver does with a verified, new delivery, after it has answered."""

    def __call__(self, payload: WebhookPayload) -> EggAPITask | None:
        """Return the re-read terminal task, or None if the API does not confirm it."""
        ...


class ClientSource(Protocol):
    """Anything that builds a client: an ``EggAPICredentials`` block, for one."""

    def get_client(self) -> EggAPIClient: ...


class _FromEnvironment:
    """``EGGAPI_API_KEY`` / ``EGGAPI_BASE_URL``, as the credentials block reads them."""

    def get_client(self) -> EggAPIClient:
        key = os.environ.get("EGGAPI_API_KEY", "")
        if not key:
            raise ValueError("EGGAPI_API_KEY is empty: the receiver cannot re-read tasks")
        return EggAPIClient(key, os.environ.get("EGGAPI_BASE_URL") or DEFAULT_BASE_URL)


Announce = Callable[[EggAPITask, WebhookPayload], None]


class EggAPIReconciler:
    """Re-reads the task with ``GET /v1/tasks/{id}`` and announces it when it is terminal.

    Args:
        source: what builds the API client (an ``EggAPICredentials`` block; default: the
            ``EGGAPI_API_KEY`` / ``EGGAPI_BASE_URL`` variables).
        announce: called with each confirmed task, e.g. to emit a Prefect event (the
            ``prefect-eggapi webhooks`` command passes one); never fails the receiver.
    """

    def __init__(
        self, source: ClientSource | None = None, *, announce: Announce | None = None
    ) -> None:
        self._source: ClientSource = source or _FromEnvironment()
        self.announce = announce
        self._client: EggAPIClient | None = None
        self._lock = threading.Lock()

    def _http(self) -> EggAPIClient:
        with self._lock:
            if self._client is None:
                self._client = self._source.get_client()
            return self._client

    def __call__(self, payload: WebhookPayload) -> EggAPITask | None:
        task = self._http().get_task(payload.task_id)
        if not task.is_terminal:
            return None
        if self.announce is not None:
            try:
                self.announce(task, payload)
            except Exception:  # telemetry must not fail the receiver
                log.warning("could not announce %s", task.id, exc_info=True)
        return task

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
