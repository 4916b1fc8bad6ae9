"""Scripts any running emulator over HTTP through its ``/_emulator/`` admin API.

:class:`~.server.EmulatorProcess` is one of these for the emulator it started; point this one
at an emulator started elsewhere (``prefect-eggapi emulator``).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx

from .config import EmulatorConfig, FaultRule, key_id

__all__ = ["EmulatorAdmin"]


class EmulatorAdmin:
    """Scripts a running emulator through its ``/_emulator/`` admin API."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self._base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._client: httpx.Client | None = None

    @property
    def base_url(self) -> str:
        return self._base_url

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(
                base_url=self.base_url, timeout=self._timeout, trust_env=False
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        response = self._http().request(
            method, f"/_emulator{path}", json=body if body is not None else None
        )
        payload = response.json()
        if response.status_code >= 400 or payload.get("error"):
            error = payload.get("error") or {}
            raise RuntimeError(
                f"emulator admin {method} {path} -> {response.status_code} "
                f"{error.get('code')}: {error.get('message')}"
            )
        return payload["data"]

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/health")
        return result

    def get_config(self) -> dict[str, Any]:
        """The live config, with API keys masked."""
        result: dict[str, Any] = self._call("GET", "/config")
        return result

    def set_config(self, patch: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """Patch the live config, e.g. ``set_config(manual=True, rate_limit_per_second=5)``.

        ``api_keys`` merges per key: ``set_config(api_keys={key: {"balance": "0.01"}})``.
        """
        body = {**(patch or {}), **fields}
        result: dict[str, Any] = self._call("PATCH", "/config", _jsonable(body))
        return result

    def add_fault(self, kind: str | None = None, **fields: Any) -> dict[str, Any]:
        """Add one fault rule, e.g. ``add_fault("error_after_create", status=502, times=1)``."""
        rule = FaultRule.model_validate({"kind": kind, **fields} if kind else fields)
        added: list[dict[str, Any]] = self._call(
            "POST", "/faults", rule.model_dump(mode="json", exclude_none=True)
        )
        return added[0]

    def add_faults(self, rules: list[dict[str, Any] | FaultRule]) -> list[dict[str, Any]]:
        body = [
            r.model_dump(mode="json", exclude_none=True) if isinstance(r, FaultRule) else r
            for r in rules
        ]
        result: list[dict[str, Any]] = self._call("POST", "/faults", body)
        return result

    def faults(self) -> list[dict[str, Any]]:
        """Rules with their ``seen``/``fired``/``exhausted`` counters."""
        result: list[dict[str, Any]] = self._call("GET", "/faults")
        return result

    def clear_faults(self) -> None:
        self._call("DELETE", "/faults")

    def audit(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/audit")
        return result

    def webhook_deliveries(self, task_id: str | None = None) -> list[dict[str, Any]]:
        """Audit records of webhook attempts (and skipped or lost deliveries), oldest first."""
        records: list[dict[str, Any]] = self.audit()["webhook_deliveries"]
        return [r for r in records if task_id is None or r["task_id"] == task_id]

    def created_tasks(self, api_key: str | None = None) -> list[dict[str, Any]]:
        """Audit records of every created (billable) task, optionally of one key only."""
        tasks: list[dict[str, Any]] = self.audit()["tasks"]
        if api_key is None:
            return tasks
        wanted = key_id(api_key)
        return [t for t in tasks if t["key_id"] == wanted]

    def request_count(self, api_key: str | None, endpoint: str) -> int:
        """Requests seen for ``endpoint`` with ``api_key`` (``None``: unauthenticated)."""
        who = key_id(api_key) if api_key else "anonymous"
        return int(self.audit()["requests"].get(who, {}).get(endpoint, 0))

    def balance(self, api_key: str) -> Decimal:
        return Decimal(self.audit()["balances"][key_id(api_key)]["balance"])

    def reset(self, config: EmulatorConfig | None = None) -> dict[str, Any]:
        """Forget tasks, audit and faults; back to the startup config (or ``config``)."""
        body = {"config": config.model_dump(mode="json")} if config is not None else None
        result: dict[str, Any] = self._call("POST", "/reset", body)
        return result

    def tasks(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/tasks")
        return result

    def task(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/tasks/{task_id}")
        return result

    def advance(self, task_id: str) -> dict[str, Any]:
        """pending -> processing, or processing -> its planned end (completed or failed)."""
        result: dict[str, Any] = self._call("POST", f"/tasks/{task_id}/advance")
        return result

    def complete(self, task_id: str, num_images: int | None = None) -> dict[str, Any]:
        body = {"num_images": num_images} if num_images is not None else None
        result: dict[str, Any] = self._call("POST", f"/tasks/{task_id}/complete", body)
        return result

    def fail(self, task_id: str, error: str | None = None) -> dict[str, Any]:
        body = {"error": error} if error is not None else None
        result: dict[str, Any] = self._call("POST", f"/tasks/{task_id}/fail", body)
        return result


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
