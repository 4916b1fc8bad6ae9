"""The shared ledger store: entries as JSON objects in a bucket, for runs that move between
machines or containers (every write a conditional PUT)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from prefect_eggapi.safety.ledger.base import (
    UNRESOLVED_STATES,
    EntryState,
    LedgerConflictError,
    LedgerEntry,
    lane_free,
    lane_waits,
)
from prefect_eggapi.storage import put_if, read_object

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class S3Ledger:
    """Entries as JSON objects in a bucket, shared by every worker on every machine.

    Every write is conditional: ``If-Match`` on the ETag the entry was read (or last written)
    at, ``If-None-Match: *`` for a new entry; the loser of a race gets
    :class:`LedgerConflictError` and re-plans. Around each entry: ``tasks/<id>`` names its entry
    (written before the entry, so a recorded task is never missing from the index);
    ``unresolved/<key>`` marks entries whose POST outcome is open; per-scope spend is kept in
    marker object *names* (``spend/<scope>/<key>.<micro-dollars>``) so one LIST sums a budget;
    ``lanes/<name>/<slot>.json`` are the cross-worker submit leases; ``deliveries/<nonce>``
    names the task a webhook was delivered for (written once, by the receiver).
    """

    def __init__(self, s3_client: S3Client, bucket: str, prefix: str = "eggapi/ledger") -> None:
        self._s3 = s3_client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def __repr__(self) -> str:
        return f"S3Ledger(s3://{self.bucket}/{self.prefix})"

    # -- keys ----------------------------------------------------------------------------------

    def _entry_key(self, key: str) -> str:
        return f"{self.prefix}/entries/{key}.json"

    def _task_key(self, task_id: str) -> str:
        return f"{self.prefix}/tasks/{task_id}"

    def _unresolved_key(self, key: str) -> str:
        return f"{self.prefix}/unresolved/{key}"

    def _spend_prefix(self, scope: str) -> str:
        return f"{self.prefix}/spend/{hashlib.sha256(scope.encode()).hexdigest()[:32]}/"

    def _lane_key(self, name: str, slot: int) -> str:
        return f"{self.prefix}/lanes/{hashlib.sha256(name.encode()).hexdigest()[:32]}/{slot}.json"

    def _delivery_key(self, nonce: str) -> str:
        return f"{self.prefix}/deliveries/{nonce}"

    def _list(self, prefix: str) -> Iterator[str]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"]

    # -- conditional reads and writes ----------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Nothing to hold: every put is conditional on the version its entry was read at."""
        yield

    def _read(self, object_key: str) -> tuple[bytes, str] | None:
        return read_object(self._s3, self.bucket, object_key)

    def _put_if(self, object_key: str, body: bytes, version: str | None) -> str:
        """Write only over ``version`` (None: only if absent); the new ETag, or a conflict."""
        etag = put_if(self._s3, self.bucket, object_key, body, version)
        if etag is None:
            raise LedgerConflictError(object_key)
        return etag

    def _load(self, object_key: str) -> LedgerEntry | None:
        found = self._read(object_key)
        if found is None:
            return None
        return LedgerEntry.model_validate_json(found[0]).at_version(found[1])

    def get(self, key: str) -> LedgerEntry | None:
        return self._load(self._entry_key(key))

    def put(self, entry: LedgerEntry) -> None:
        entry.updated_at = datetime.now(UTC)
        for task_id in filter(None, [entry.task_id, *entry.extra_tasks]):
            self._s3.put_object(
                Bucket=self.bucket, Key=self._task_key(task_id), Body=entry.key.encode()
            )
        open_outcome = entry.state in UNRESOLVED_STATES
        if open_outcome:
            self._s3.put_object(Bucket=self.bucket, Key=self._unresolved_key(entry.key), Body=b"")
        old_micros = entry.spend_micros
        entry.spend_micros = int(entry.committed_spend * 1_000_000) if entry.scope else None
        try:
            entry.at_version(
                self._put_if(
                    self._entry_key(entry.key), entry.model_dump_json().encode(), entry.version
                )
            )
        except LedgerConflictError:
            entry.spend_micros = old_micros
            raise
        if not open_outcome:
            self._s3.delete_object(Bucket=self.bucket, Key=self._unresolved_key(entry.key))
        self._write_spend(entry, old_micros)

    def _write_spend(self, entry: LedgerEntry, old_micros: int | None) -> None:
        if not entry.scope or entry.spend_micros == old_micros:
            return
        prefix = f"{self._spend_prefix(entry.scope)}{entry.key}."
        self._s3.put_object(Bucket=self.bucket, Key=f"{prefix}{entry.spend_micros}", Body=b"")
        if old_micros is not None:
            self._s3.delete_object(Bucket=self.bucket, Key=f"{prefix}{old_micros}")

    def find_task(self, task_id: str) -> LedgerEntry | None:
        found = self._read(self._task_key(task_id))
        return self.get(found[0].decode()) if found else None

    def known_task_ids(self) -> set[str]:
        base = f"{self.prefix}/tasks/"
        return {k[len(base) :] for k in self._list(base)}

    def task_entry_key(self, task_id: str) -> str | None:
        """The entry a task id is indexed to (None: not indexed). The index is written before
        the entry, so a writer killed in between leaves its task indexed to an entry that does
        not record it yet: that task is still the entry's own."""
        found = self._read(self._task_key(task_id))
        return found[0].decode() if found else None

    def unresolved(self) -> list[LedgerEntry]:
        base = f"{self.prefix}/unresolved/"
        out = []
        for object_key in self._list(base):
            entry = self.get(object_key[len(base) :])
            if entry is not None and entry.state in UNRESOLVED_STATES:
                out.append(entry)
        return out

    def scope_spend(self, scope: str) -> Decimal:
        """Sum of the markers; an entry caught between writing its new marker and deleting the
        old one counts once (its newest marker)."""
        newest: dict[str, int] = {}
        for key in self._list(self._spend_prefix(scope)):
            name, _, micros = key.rsplit("/", 1)[1].rpartition(".")
            newest[name] = int(micros) if name not in newest else max(newest[name], int(micros))
        return Decimal(sum(newest.values())) / 1_000_000

    def entries(self, states: set[EntryState] | None = None) -> list[LedgerEntry]:
        out = []
        for object_key in self._list(f"{self.prefix}/entries/"):
            entry = self._load(object_key)
            if entry is not None and (states is None or entry.state in states):
                out.append(entry)
        return out

    @contextmanager
    def lane(self, name: str, *, width: int, owner: str, seconds: float) -> Iterator[None]:
        held: tuple[str, str] | None = None
        for _ in lane_waits(time.monotonic() + 3 * seconds):
            for slot in range(width):
                object_key = self._lane_key(name, slot)
                found = self._read(object_key)
                if found is not None:
                    state = json.loads(found[0])
                    if not lane_free(state.get("owner"), state.get("until")):
                        continue
                body = json.dumps({"owner": owner, "until": time.time() + seconds}).encode()
                try:
                    held = (object_key, self._put_if(object_key, body, found[1] if found else None))
                except LedgerConflictError:
                    continue  # another worker took this slot first
                break
            if held is not None:
                break
        assert held is not None
        try:
            yield
        finally:
            # Free it only if it is still ours (after a lease ran out, someone else may hold it).
            with contextlib.suppress(LedgerConflictError):
                self._put_if(held[0], json.dumps({"owner": None}).encode(), held[1])

    def record_delivery(self, nonce: str, task_id: str) -> str:
        with contextlib.suppress(LedgerConflictError):
            self._put_if(self._delivery_key(nonce), task_id.encode(), None)
            return task_id
        recorded = self.delivered(nonce)
        assert recorded is not None
        return recorded

    def delivered(self, nonce: str) -> str | None:
        found = self._read(self._delivery_key(nonce))
        return found[0].decode() if found else None
