"""A batch's durable record in S3: one status object per item, and ``status.jsonl``.

::

    {prefix}/batches/{run_key}/items/{item id}.{persisted|failed|skipped}.json
    {prefix}/batches/{run_key}/status.jsonl          every manifest line, broken ones included

The status objects are the ground truth whoever wrote them (a batch run, a shard, recovery);
``status.jsonl`` is derived from them and written conditionally on the version read, so the
last one written never says failed for an item that is persisted. No Prefect here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, Field

from prefect_eggapi.flows.manifests import BrokenLine
from prefect_eggapi.storage import OutputStore, delete_keys, list_keys, put, put_if, read_object

__all__ = [
    "FINAL",
    "ItemResult",
    "ItemStatus",
    "batch_base",
    "item_status_key",
    "list_item_statuses",
    "load_item_status",
    "record_item_status",
    "status_lines",
    "write_status_file",
]

ItemStatus = Literal["persisted", "failed", "skipped"]
FINAL: tuple[ItemStatus, ...] = ("persisted", "failed", "skipped")  # persisted first: it wins
_NDJSON = "application/x-ndjson"


class ItemResult(BaseModel):
    """One manifest line's outcome, as written to the status manifest."""

    id: str | None = None
    line: int
    status: ItemStatus | Literal["broken"]
    task_id: str | None = None
    cost: Decimal = Decimal("0")
    s3_uris: list[str] = Field(default_factory=list)
    error: dict[str, Any] | None = None
    # The flow run whose status object this is: it accounts for the item's cost. A retry of
    # that flow run (same id) takes over what a crashed attempt persisted.
    run_id: str | None = None


def batch_base(store: OutputStore, run_key: str) -> str:
    """Where a batch's status objects and ``status.jsonl`` live."""
    return "/".join(p for p in (store.prefix, "batches", run_key) if p)


def item_status_key(base: str, item_id: str, status: str) -> str:
    return f"{base}/items/{item_id}.{status}.json"


def load_item_status(store: OutputStore, base: str, item_id: str, status: str) -> ItemResult | None:
    found = read_object(store.client, store.bucket, item_status_key(base, item_id, status))
    return ItemResult.model_validate_json(found[0]) if found else None


def list_item_statuses(store: OutputStore, base: str) -> dict[str, set[str]]:
    """Item id -> the final statuses stored for it, from one listing of ``{base}/items/``."""
    prefix = f"{base}/items/"
    found: dict[str, set[str]] = {}
    for key in list_keys(store, prefix):
        name = key[len(prefix) :]
        if not name.endswith(".json"):
            continue
        item_id, _, status = name[: -len(".json")].rpartition(".")
        if status in FINAL:
            found.setdefault(item_id, set()).add(status)
    return found


def _delete_statuses(store: OutputStore, base: str, item_id: str, statuses: Iterable[str]) -> None:
    """Remove the item's other status objects in one request (missing keys are fine): every
    persisted item pays this once, so two DELETEs per item would add up in a large batch."""
    delete_keys(store, [item_status_key(base, item_id, s) for s in sorted(statuses)])


def record_item_status(
    store: OutputStore, base: str, result: ItemResult
) -> tuple[ItemResult, bool]:
    """Write the item's one final status; returns it and whether ``result`` is it.

    ``persisted`` is written only where none exists (If-None-Match): when two runs finish
    one item, the first write stands and the other run reports the item as reused, at no
    cost. A failure never stands beside a persisted result: it is written only while none
    exists, and taken back if one appeared meanwhile (the persisting run deletes stale
    failures after its own write, so either order leaves one status).
    """
    assert result.id is not None
    body = result.model_dump_json().encode()
    others = set(FINAL) - {result.status}
    persisted_key = item_status_key(base, result.id, "persisted")
    if result.status == "persisted":
        if put_if(store.client, store.bucket, persisted_key, body, None) is None:
            winner = load_item_status(store, base, result.id, "persisted")
            if winner is not None:
                return winner, False
            # Deleted in between: ours is the only one now.
            put(store, persisted_key, body)
        _delete_statuses(store, base, result.id, others)
        return result, True
    winner = load_item_status(store, base, result.id, "persisted")
    if winner is not None:
        return winner, False
    put(store, item_status_key(base, result.id, result.status), body)
    _delete_statuses(store, base, result.id, others - {"persisted"})
    winner = load_item_status(store, base, result.id, "persisted")
    if winner is not None:
        _delete_statuses(store, base, result.id, {result.status})
        return winner, False
    return result, True


def status_lines(results: list[ItemResult], broken: list[BrokenLine]) -> bytes:
    """``status.jsonl``: one sorted JSON line per manifest line, broken lines included."""
    rows = [r.model_dump(mode="json") for r in results]
    rows += [
        ItemResult(
            line=b.line, status="broken", error={"message": b.reason, "text": b.text}
        ).model_dump(mode="json")
        for b in broken
    ]
    rows.sort(key=lambda r: r["line"])
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()


def write_status_file(
    store: OutputStore,
    key: str,
    final_results: Callable[[], list[ItemResult]],
    broken: list[BrokenLine],
) -> list[ItemResult]:
    """Write the status file ``key`` from ``final_results()``; returns what was written.

    The write is conditional on the file read first (If-Match, or If-None-Match when there was
    none): when another run of the batch wrote it meanwhile, ``final_results()`` is asked again,
    so it reads the status objects after that other run's writes."""
    while True:
        current = read_object(store.client, store.bucket, key)
        results = final_results()
        body = status_lines(results, broken)
        version = current[1] if current else None
        if put_if(store.client, store.bucket, key, body, version, content_type=_NDJSON):
            return results
