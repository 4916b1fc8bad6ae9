"""Deterministic fault injection: scripted rules, counted per opportunity.

Evaluation points (a rule only ever sees opportunities of its own kind):

- ``pre``: every API request on the rule's endpoint, after authentication and the real rate
  limit, before the body is read: ``http_error``, ``rate_limit_burst``, ``error_before_create``
  (the latter on ``generate`` only, so no task is created).
- ``post_create``: after ``POST /v1/generate`` created (and will bill) a task:
  ``error_after_create``, ``drop_after_create``, ``timeout_after_create``.
- ``outcome``: when a task is created, decides how it ends: ``upstream_failure``, ``empty_output``.
- ``download``: a download of an existing output file: ``slow_download``, ``truncated_download``.
- ``webhook``: a terminal task with a ``webhook_url`` (one opportunity per task, per kind):
  ``webhook_lost``, ``webhook_duplicate``, ``webhook_delayed``, ``webhook_out_of_order``,
  ``webhook_bad_signature``. Several webhook kinds can fire for one delivery (see
  :mod:`prefect_eggapi.testing.emulator.webhooks`).

At one point, rules are tried in insertion order; each live rule that matches counts the
opportunity, and the first whose ``skip`` is used up fires; evaluation stops there.

Seeded rates: a rule with a ``rate`` fires at each opportunity past ``skip`` with that
probability, drawn from the rule's own RNG (seeded with ``fault_seed``, else ``seed``, and the
rule id), and otherwise lets the opportunity pass to the next rule. Each rule draws once per
opportunity it sees, so its faults depend only on the order of *its* opportunities: the same seed
and the same calls give the same faults, even if polling or other rules vary. ``fault_rates`` in
the config are such rules (ids ``rate_<name>``; see
:func:`~prefect_eggapi.testing.emulator.config.rate_rule`). Without any seed the draws are random.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from .config import FaultRule, key_id, mask_key

PRE_KINDS = frozenset({"http_error", "rate_limit_burst", "error_before_create"})
POST_CREATE_KINDS = frozenset({"error_after_create", "drop_after_create", "timeout_after_create"})
OUTCOME_KINDS = frozenset({"upstream_failure", "empty_output"})
DOWNLOAD_KINDS = frozenset({"slow_download", "truncated_download"})
WEBHOOK_KINDS = frozenset(
    {
        "webhook_lost",
        "webhook_duplicate",
        "webhook_delayed",
        "webhook_out_of_order",
        "webhook_bad_signature",
    }
)

logger = logging.getLogger("prefect_eggapi.testing.emulator.faults")

STATUS_CODES: dict[int, tuple[str, str]] = {
    400: ("BAD_REQUEST", "Bad request"),
    401: ("UNAUTHORIZED", "Invalid API key"),
    403: ("FORBIDDEN", "Forbidden"),
    404: ("NOT_FOUND", "Not found"),
    429: ("RATE_LIMITED", "Rate limit exceeded"),
    500: ("INTERNAL_ERROR", "Internal server error"),
    502: ("UPSTREAM_ERROR", "Upstream provider returned a gateway failure"),
    503: ("SERVICE_UNAVAILABLE", "Service temporarily unavailable"),
}


def code_for_status(status: int) -> tuple[str, str]:
    """Default ``(error.code, error.message)`` for an HTTP status."""
    if status in STATUS_CODES:
        return STATUS_CODES[status]
    if status >= 500:
        return STATUS_CODES[500]
    return ("BAD_REQUEST", "Bad request")


def default_status(kind: str) -> int:
    return 429 if kind == "rate_limit_burst" else 500


def rule_rng(seed: int | None, rule_id: str | None) -> random.Random:
    """The RNG of one rated rule: reproducible for a seed, independent of other rules."""
    if seed is None:
        return random.Random()
    return random.Random(f"eggapi-fault-rate/{seed}/{rule_id}")


@dataclass
class FaultSlot:
    rule: FaultRule
    seen: int = 0
    fired: int = 0
    origin: str = "rule"  # "rule" (faults / POST /_emulator/faults) or "rate" (fault_rates)
    rng: random.Random = field(default_factory=random.Random)

    @property
    def exhausted(self) -> bool:
        return self.rule.times is not None and self.fired >= self.rule.times

    def to_json(self) -> dict[str, Any]:
        data = self.rule.model_dump(mode="json")
        if data.get("api_key"):
            data["api_key"] = mask_key(data["api_key"])
        data["endpoint"] = self.rule.effective_endpoint
        data["seen"] = self.seen
        data["fired"] = self.fired
        data["exhausted"] = self.exhausted
        data["origin"] = self.origin
        return data


@dataclass
class FiredFault:
    rule: FaultRule

    @property
    def kind(self) -> str:
        return self.rule.kind

    @property
    def status(self) -> int:
        return self.rule.status or default_status(self.rule.kind)

    @property
    def code_and_message(self) -> tuple[str, str]:
        code, message = code_for_status(self.status)
        return (self.rule.code or code, self.rule.message or message)


def _endpoint_matches(rule_endpoint: str, endpoint: str) -> bool:
    if rule_endpoint == "any":
        return endpoint != "admin"
    if rule_endpoint == "usage":
        return endpoint in ("usage", "usage_summary")
    return rule_endpoint == endpoint


@dataclass
class FaultInjector:
    slots: list[FaultSlot] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    seed: int | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def add(self, rule: FaultRule, origin: str = "rule") -> FaultRule:
        rule = rule.model_copy(update={"id": rule.id or f"fault_{next(self._ids)}"})
        self.slots.append(FaultSlot(rule, origin=origin, rng=rule_rng(self.seed, rule.id)))
        return rule

    def reseed(self, seed: int | None) -> None:
        """New seed: every rule's draws start again from the seed's beginning."""
        self.seed = seed
        for slot in self.slots:
            slot.rng = rule_rng(seed, slot.rule.id)

    def clear(self) -> None:
        self.slots.clear()

    def reset(self) -> None:
        self.slots.clear()
        self.log.clear()
        self._ids = itertools.count(1)

    def to_json(self) -> list[dict[str, Any]]:
        return [slot.to_json() for slot in self.slots]

    def match(
        self,
        kinds: frozenset[str],
        endpoint: str,
        api_key: str | None,
        task_id: str | None = None,
    ) -> FiredFault | None:
        for slot in self.slots:
            rule = slot.rule
            if rule.kind not in kinds or slot.exhausted:
                continue
            if not _endpoint_matches(rule.effective_endpoint, endpoint):
                continue
            if rule.api_key is not None and rule.api_key != api_key:
                continue
            slot.seen += 1
            if slot.seen <= rule.skip:
                continue
            if rule.rate is not None and slot.rng.random() >= rule.rate:
                continue
            slot.fired += 1
            self.log.append(
                {
                    "fault_id": rule.id,
                    "kind": rule.kind,
                    "seen": slot.seen,
                    "endpoint": endpoint,
                    "key_id": key_id(api_key) if api_key else None,
                    "task_id": task_id,
                    "at": time.time(),
                }
            )
            logger.info("fault %s fired: %s on %s", rule.id, rule.kind, endpoint)
            return FiredFault(rule)
        return None
