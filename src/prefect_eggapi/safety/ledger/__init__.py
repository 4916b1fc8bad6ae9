"""The submission ledger: request fingerprint + logical key -> EggAPI task id, crash-safe.

EggAPI has no idempotency key, so "did we already pay for this?" must be answered on our side.
An entry is written *before* the POST (state ``submitting``, with an owner and a lease) and
updated right after the 202 (``submitted`` + task id). A retry, a flow retry, a rerun of the same
logical key or a restarted process finds the entry and reconnects instead of posting again; an
entry stuck in ``submitting`` whose owner died is reconciled against ``GET /v1/tasks``.

**Every write is a compare-and-swap.** An entry read from a store carries the version it was
read at; :meth:`LedgerStore.put` writes only if the stored entry is still that version (a new
entry only if none exists) and raises :class:`LedgerConflictError` otherwise. So no path can
overwrite what another worker recorded without having read it: the loser re-reads and re-plans.

**Lanes.** :meth:`LedgerStore.lane` is a lease shared by every worker of the ledger: the
submitter holds the lane of (account, model, type) from just before a POST until its answer is
recorded, so across all workers at most ``width`` POSTs of one lane have an unknown outcome at a
time (the task list shows no prompt; two lost answers in one window could not be told apart).

No Prefect imports. The default store is SQLite in WAL mode (safe across threads and processes on
one machine); claims are short ``BEGIN IMMEDIATE`` transactions, never held across HTTP calls.
Where runs can move between machines or containers, use the S3 store beside the outputs.

Modules: :mod:`.base` (entries, states, the store protocol, shared helpers), :mod:`.sqlite`,
:mod:`.s3` (the two stores); this one picks the store a configuration names. Everything is
imported from ``prefect_eggapi.safety.ledger``.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect_eggapi.client.registry import Registry
from prefect_eggapi.safety.ledger.base import (
    DEFAULT_LEDGER_DIR,
    LEDGER_DIR_ENV,
    LEDGER_URI_ENV,
    LIVE_STATES,
    UNRESOLVED_STATES,
    DeliveryLog,
    EntryState,
    LaneBusyError,
    LedgerConflictError,
    LedgerEntry,
    LedgerStore,
    ledger_key,
    owner_id,
    owner_is_dead,
    with_conflict_retry,
)
from prefect_eggapi.safety.ledger.s3 import S3Ledger
from prefect_eggapi.safety.ledger.sqlite import SQLiteLedger
from prefect_eggapi.storage import OutputStore, S3Settings, build_s3_client

__all__ = [
    "DEFAULT_LEDGER_DIR",
    "LEDGER_DIR_ENV",
    "LEDGER_URI_ENV",
    "LIVE_STATES",
    "UNRESOLVED_STATES",
    "DeliveryLog",
    "EntryState",
    "LaneBusyError",
    "LedgerConflictError",
    "LedgerEntry",
    "LedgerStore",
    "S3Ledger",
    "SQLiteLedger",
    "default_ledger",
    "ledger_at",
    "ledger_key",
    "owner_id",
    "owner_is_dead",
    "with_conflict_retry",
]


def default_ledger(beside: OutputStore | None = None) -> LedgerStore:
    """The ledger this configuration names, one instance per process and location.

    In order: ``EGGAPI_LEDGER_URI`` (``s3://bucket/prefix``, shared by every machine);
    ``EGGAPI_LEDGER_DIR`` (SQLite, one machine); with outputs going to S3 (``beside``) and
    nothing else configured, ``{prefix}/ledger`` in the outputs' bucket, so that a run retried in
    a fresh container (no local files) finds what it paid for; else SQLite in ``./.eggapi``.
    """
    uri = os.environ.get(LEDGER_URI_ENV, "").strip()
    directory = os.environ.get(LEDGER_DIR_ENV, "").strip()
    if uri:
        if not uri.startswith("s3://") or len(uri) <= len("s3://"):
            raise ValueError(f"{LEDGER_URI_ENV} must look like s3://bucket/prefix, got {uri!r}")
        return ledger_at(uri)
    if not directory and beside is not None:
        prefix = "/".join(p for p in (beside.prefix, "ledger") if p)
        ident = f"s3://{beside.bucket}/{prefix}"
        return _DEFAULTS.get(ident, lambda: S3Ledger(beside.client, beside.bucket, prefix))
    return ledger_at(directory or DEFAULT_LEDGER_DIR)


def ledger_at(location: str | Path) -> LedgerStore:
    """The ledger at ``s3://bucket/prefix`` (S3 settings from the environment) or in a
    directory (SQLite), one instance per process and location."""
    text = str(location)
    ident: str | Path = text if text.startswith("s3://") else Path(text).resolve()

    def make() -> LedgerStore:
        if isinstance(ident, Path):
            return SQLiteLedger(ident / "ledger.sqlite3")
        bucket, _, prefix = text[len("s3://") :].partition("/")
        client = build_s3_client(S3Settings.from_env(bucket=bucket))
        return S3Ledger(client, bucket, prefix or "eggapi/ledger")

    return _DEFAULTS.get(ident, make)


_DEFAULTS: Registry[str | Path, LedgerStore] = Registry("default ledgers by location")
