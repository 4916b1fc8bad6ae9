"""In-memory state of one emulator: tasks, keys and balances, rate limiter, usage, audit.

Everything here runs on the server's event loop (routes are ``async def``); nothing blocks.
Task transitions happen in :meth:`EmulatorState.process_due`, called by the background
:meth:`EmulatorState.run_scheduler` at each task's due time and, so reads are never stale, before
every read. Every terminal transition (completed or failed) goes through
:meth:`EmulatorState.on_task_terminal` exactly once: the single hook for signed webhooks.

Edits fetch their inputs (:mod:`prefect_eggapi.testing.emulator.inputs`) in an asyncio task
started when
the edit enters ``processing``. An edit whose processing time is up while its inputs are still
being fetched waits for them (``awaiting_inputs``) and ends as soon as they arrive; in manual
mode, ``advance`` and ``complete`` wait for the fetch before ending the task, so tests stay
deterministic without sleeping.

Why one module of ~590 lines: :class:`EmulatorState` is one state machine whose invariants
(each task's due time in the heap, each terminal transition exactly once, balances charged
once) span its methods; they all run on one event loop without locks because they live in one
object. Its plain records are :mod:`.records`; splitting the machine itself would scatter those
invariants for a test kit's benefit of nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import string
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

from .config import EmulatorConfig, FaultRule, key_id, mask_key
from .faults import OUTCOME_KINDS, FaultInjector, FaultSlot
from .images import ImageCache, RenderSpec, output_size
from .inputs import InputFetcher
from .records import (
    COMPLETED,
    FAILED,
    PENDING,
    PROCESSING,
    TERMINAL,
    ApiError,
    KeyState,
    RateLimiter,
    Task,
    UsageRecord,
    money,
    rfc3339,
)
from .validation import GenerateRequest
from .webhooks import WebhookDispatcher

logger = logging.getLogger("prefect_eggapi.testing.emulator.state")

_ID_ALPHABET = string.ascii_lowercase + string.digits


class EmulatorState:
    """All mutable state of one emulator instance."""

    def __init__(self, config: EmulatorConfig, clock: Callable[[], float] = time.time) -> None:
        self.initial_config = config.model_copy(deep=True)
        self.clock = clock
        self.epoch = 0  # bumped by reset(); requests are audited in the epoch they began in
        self.server_base_url: str | None = None
        self.terminal_listeners: list[Callable[[Task], None]] = []
        self.faults = FaultInjector()
        self.rate_limiter = RateLimiter()
        self.images = ImageCache(config.image_cache_bytes)
        self._renderer = ThreadPoolExecutor(1, thread_name_prefix="emulator-render")
        self.webhooks = WebhookDispatcher(self)
        self.inputs = InputFetcher(lambda: self.config, self._renderer)
        self._input_jobs: set[asyncio.Task[None]] = set()
        self._wakeup: asyncio.Event | None = None
        self._apply_config(config, fresh=True)

    # ----------------------------------------------------------------- configuration / reset

    def _apply_config(
        self,
        config: EmulatorConfig,
        *,
        fresh: bool,
        keep_rules: bool = False,
        keep_rates: bool = False,
    ) -> None:
        self.config = config
        if fresh:
            self.tasks: dict[str, Task] = {}
            self.usage: list[UsageRecord] = []
            self.audit_tasks: list[dict[str, Any]] = []
            self.requests: defaultdict[str, defaultdict[str, int]] = defaultdict(
                lambda: defaultdict(int)
            )
            self.statuses: defaultdict[str, defaultdict[str, int]] = defaultdict(
                lambda: defaultdict(int)
            )
            self.rate_limited: defaultdict[str, int] = defaultdict(int)
            self.webhook_deliveries: list[dict[str, Any]] = []
            self._heap: list[tuple[float, int, str]] = []
            self._seq = itertools.count(1)
            self.keys: dict[str, KeyState] = {}
            self.faults.reset()
            self.rate_limiter.reset()
            self.images.clear()
            self._rng: random.Random = (
                random.Random(config.seed) if config.seed is not None else random.SystemRandom()
            )
        for key, key_config in config.api_keys.items():
            if key not in self.keys:
                self.keys[key] = KeyState(key_config, key_config.balance)
            else:
                self.keys[key].config = key_config
        for key in list(self.keys):
            if key not in config.api_keys:
                del self.keys[key]
        self._install_faults(config, keep_rules=keep_rules, keep_rates=keep_rates)
        self.images.max_bytes = config.image_cache_bytes

    def _install_faults(
        self, config: EmulatorConfig, *, keep_rules: bool, keep_rates: bool
    ) -> None:
        """Explicit rules (``faults``) and seeded rates (``fault_rates``); kept ones keep their
        counters and RNG state, so patching an unrelated setting does not restart a fault plan."""
        old = list(self.faults.slots)
        self.faults.seed = config.effective_fault_seed()
        if keep_rules and keep_rates:
            self.faults.slots = old
            return
        kept: list[FaultSlot] = [
            slot
            for slot in old
            if (slot.origin == "rule" and keep_rules) or (slot.origin == "rate" and keep_rates)
        ]
        self.faults.slots = kept
        if not keep_rules:
            for rule in config.faults:
                self.faults.add(rule)
        if not keep_rates:
            for rule in config.rate_rules():
                self.faults.add(rule, origin="rate")

    def reset(self, config: EmulatorConfig | None = None) -> None:
        """Forget everything and run with ``config``, or else with the startup config.

        The startup config stays the one a later plain reset returns to.
        """
        self.webhooks.cancel_all()
        for job in list(self._input_jobs):
            job.cancel()
        self._input_jobs.clear()
        self.epoch += 1
        self._apply_config((config or self.initial_config).model_copy(deep=True), fresh=True)
        self._wake()

    def patch_config(self, patch: dict[str, Any]) -> EmulatorConfig:
        """Shallow-merge ``patch`` into the config.

        ``api_keys`` merges per key (``{"key": null}`` removes one); a ``balance`` given for a key
        also sets its live balance. ``faults`` replaces the explicit rules and ``fault_rates`` the
        rated ones (both restart their counters); ``seed`` reseeds ids and, with ``fault_seed``,
        the draws of every rated rule.
        """
        current = self.config.model_dump(mode="python")
        api_keys_patch = patch.get("api_keys")
        merged = {k: v for k, v in patch.items() if k != "api_keys"}
        new_keys: dict[str, Any] = {k: v.model_dump() for k, v in self.config.api_keys.items()}
        if isinstance(api_keys_patch, dict):
            for key, value in api_keys_patch.items():
                if value is None:
                    new_keys.pop(key, None)
                else:
                    new_keys[key] = {**new_keys.get(key, {}), **value}
        elif api_keys_patch is not None:
            raise ApiError(400, "BAD_REQUEST", "api_keys must be an object")
        if "faults" not in patch:
            merged["faults"] = [s.rule for s in self.faults.slots if s.origin == "rule"]
        config = EmulatorConfig.model_validate({**current, **merged, "api_keys": new_keys})
        self._apply_config(
            config,
            fresh=False,
            keep_rules="faults" not in patch,
            keep_rates="fault_rates" not in patch,
        )
        if "seed" in patch or "fault_seed" in patch:
            self.faults.reseed(config.effective_fault_seed())
        if isinstance(api_keys_patch, dict):
            for key, value in api_keys_patch.items():
                if value is not None and "balance" in value and key in self.keys:
                    self.keys[key].balance = config.api_keys[key].balance
        if "seed" in patch and config.seed is not None:
            self._rng = random.Random(config.seed)
        self._wake()
        return config

    def add_fault(self, rule: FaultRule) -> FaultRule:
        return self.faults.add(rule)

    # ----------------------------------------------------------------- auth and limits

    def authenticate(self, header: str | None) -> str:
        if header is None or header == "":
            raise ApiError(401, "UNAUTHORIZED", "Missing Authorization header")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401, "UNAUTHORIZED", "Invalid Authorization format, expected 'Bearer <token>'"
            )
        key = self.keys.get(token)
        if key is None:
            raise ApiError(401, "UNAUTHORIZED", "Invalid API key")
        if key.config.suspended:
            raise ApiError(403, "FORBIDDEN", "Account suspended")
        return token

    def check_rate_limit(self, api_key: str) -> None:
        cfg = self.config
        if not self.rate_limiter.allow(api_key, cfg.rate_limit_per_second, cfg.burst()):
            raise ApiError(429, "RATE_LIMITED", "Rate limit exceeded")

    def key_label(self, api_key: str) -> str:
        key = self.keys.get(api_key)
        if key is not None and key.config.name:
            return key.config.name
        return mask_key(api_key)

    # ----------------------------------------------------------------- tasks

    def _new_id(self) -> str:
        while True:
            task_id = "gen_" + "".join(self._rng.choice(_ID_ALPHABET) for _ in range(12))
            if task_id not in self.tasks:
                return task_id

    def create_task(self, api_key: str, request: GenerateRequest) -> Task:
        """Balance check (403 INSUFFICIENT_BALANCE), then create, schedule and audit a task."""
        cfg = self.config
        price = cfg.unit_price(request.model, request.resolution)
        if self.keys[api_key].balance < price * request.num_outputs:
            raise ApiError(403, "INSUFFICIENT_BALANCE", "Insufficient balance")
        now = self.clock()
        width, height = output_size(request.model, request.aspect_ratio, request.resolution)
        task = Task(
            id=self._new_id(),
            api_key=api_key,
            request=request,
            seq=next(self._seq),
            created_at=now,
            unit_price=price,
            width=width,
            height=height,
            manual=cfg.manual,
        )
        word = cfg.moderation_word
        if word and word.lower() in request.prompt.lower():
            task.planned_error = "Content moderation: prompt contains prohibited content"
        else:
            fired = self.faults.match(OUTCOME_KINDS, "generate", api_key, task.id)
            if fired is not None:
                task.faults.append(fired.kind)
                if fired.kind == "upstream_failure":
                    task.planned_error = fired.rule.message or cfg.upstream_error_message
                else:
                    task.planned_empty = True
        self.tasks[task.id] = task
        self.audit_tasks.append(self._audit_record(task))
        if not task.manual:
            self._schedule(task, now + cfg.pending_seconds)
        return task

    def _audit_record(self, task: Task) -> dict[str, Any]:
        req = task.request
        return {
            "task_id": task.id,
            "key_id": key_id(task.api_key),
            "key": self.key_label(task.api_key),
            "model": req.model,
            "type": task.type,
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "aspect_ratio": req.aspect_ratio,
            "resolution": req.resolution,
            "num_outputs": req.num_outputs,
            "image_urls": list(req.image_urls),
            "webhook_url": req.webhook_url,
            "created_at": rfc3339(task.created_at),
            "created_at_unix": task.created_at,
            "status": task.status,
            "cost": "$0.00",
            "billed": "0",
            "error": None,
            "faults": task.faults,
            "sources": [],
        }

    def _schedule(self, task: Task, due: float) -> None:
        task.due = due
        heapq.heappush(self._heap, (due, task.seq, task.id))
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _step(self, task: Task, at: float) -> None:
        """One lifecycle step: pending -> processing, processing -> completed|failed."""
        if task.status == PENDING:
            task.status = PROCESSING
            task.started_at = at
            if not task.manual:
                self._schedule(task, at + self.config.processing_seconds)
            if self._start_inputs(task) is None:
                self._prerender(task)
        elif task.status == PROCESSING:
            if task.planned_error is not None:
                self._finish_failed(task, at, task.planned_error)
            elif task.inputs_pending:
                task.awaiting_inputs = True  # _fetch_inputs ends it when they arrive
            elif task.input_error is not None:
                self._finish_failed(task, at, task.input_error)
            else:
                self._finish_completed(task, at, 0 if task.planned_empty else None)

    # edit inputs

    def _start_inputs(self, task: Task) -> asyncio.Task[None] | None:
        """Start fetching an edit's inputs on the event loop; None when nothing is fetched."""
        if (
            not task.request.image_urls
            or not self.config.fetch_inputs
            or task.planned_error is not None
            or task.planned_empty
        ):
            return None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # state driven without a server: nothing can be fetched
            task.input_error = "Upstream provider error: input images could not be fetched"
            return None
        job = loop.create_task(self._fetch_inputs(task, self.epoch), name=f"inputs-{task.id}")
        task.inputs_job = job
        self._input_jobs.add(job)
        job.add_done_callback(self._input_jobs.discard)
        return job

    async def _fetch_inputs(self, task: Task, epoch: int) -> None:
        try:
            result = await self.inputs.fetch(task.request.image_urls, task.width, task.height)
        except Exception:  # a bug here must fail the task, not leave it processing forever
            logger.exception("fetching the inputs of %s failed", task.id)
            task.input_error = "Upstream provider error: input images could not be fetched"
        else:
            task.input_fetches = result.records
            task.sources = result.sources
            task.source_image = result.source_image
            task.input_error = result.error
        task.inputs_ready = True
        if epoch != self.epoch or task.status != PROCESSING:
            return
        if task.awaiting_inputs:
            task.awaiting_inputs = False
            self._step(task, self.clock())
        elif task.input_error is None:
            self._prerender(task)

    async def settle_inputs(self, task_id: str) -> None:
        """Wait until the inputs of ``task_id`` are fetched (admin actions end tasks only then)."""
        task = self.tasks.get(task_id)
        if task is None or task.inputs_job is None or not task.inputs_pending:
            return
        cfg = self.config
        limit = cfg.input_fetch_timeout_seconds * (len(task.request.image_urls) + 1) + 5
        await asyncio.wait({task.inputs_job}, timeout=limit)

    def render_spec(self, task: Task, index: int) -> RenderSpec:
        """What output ``index`` of ``task`` is drawn from (the same spec gives the same bytes)."""
        cfg = self.config
        return RenderSpec(
            task_id=task.id,
            index=index,
            width=task.width,
            height=task.height,
            prompt=task.request.prompt,
            compress_level=cfg.png_compress_level,
            noise=cfg.png_noise,
            task_type=task.type,
            sources=tuple(task.sources),
            source_image=task.source_image,
        )

    def _prerender(self, task: Task) -> None:
        """Render the outputs while the task processes, so that, as on the real CDN, the files
        exist at completion and a download right after it is not slowed by rendering. Noisy
        (realistic-size) PNGs are too big to keep ahead of time: they render on download."""
        if task.planned_error is not None or task.planned_empty or self.config.png_noise:
            return
        for index in range(task.request.num_outputs):
            self._renderer.submit(self.images.get_or_render, self.render_spec(task, index))

    def _finish_completed(self, task: Task, at: float, num_images: int | None) -> None:
        self._stop_inputs(task)
        task.status = COMPLETED
        task.started_at = task.started_at if task.started_at is not None else at
        task.completed_at = at
        task.due = None
        count = task.request.num_outputs if num_images is None else num_images
        task.num_images = count
        task.cost = task.unit_price * count
        task.output_base = self.config.public_base_url or self.server_base_url
        key = self.keys.get(task.api_key)
        if key is not None:
            key.balance -= task.cost
        self.usage.append(
            UsageRecord(
                task_id=task.id,
                api_key=task.api_key,
                model=task.model,
                type=task.type,
                units=count,
                cost=task.cost,
                created_at=at,
                seq=task.seq,
            )
        )
        self._terminal(task)

    def _stop_inputs(self, task: Task) -> None:
        """An edit ending by other means (admin fail/complete) stops fetching its inputs."""
        if task.inputs_job is not None and task.inputs_pending:
            task.inputs_job.cancel()
        task.awaiting_inputs = False

    def _finish_failed(self, task: Task, at: float, error: str) -> None:
        self._stop_inputs(task)
        task.status = FAILED
        task.started_at = task.started_at if task.started_at is not None else at
        task.completed_at = at
        task.due = None
        task.error = error
        task.cost = Decimal("0")
        self._terminal(task)

    def _terminal(self, task: Task) -> None:
        for record in reversed(self.audit_tasks):
            if record["task_id"] == task.id:
                record["status"] = task.status
                record["cost"] = (
                    money(task.cost or Decimal("0")) if task.status == COMPLETED else "$0.00"
                )
                record["billed"] = str(task.cost or Decimal("0"))
                record["error"] = task.error
                record["completed_at_unix"] = task.completed_at
                record["sources"] = list(task.sources)
                break
        self.on_task_terminal(task)

    def on_task_terminal(self, task: Task) -> None:
        """The one hook every terminal transition calls: signed webhook, then listeners."""
        self.webhooks.on_terminal(task)
        for listener in list(self.terminal_listeners):
            listener(task)

    def process_due(self, now: float | None = None) -> int:
        """Apply every scheduled transition that is due; returns how many were applied."""
        now = self.clock() if now is None else now
        applied = 0
        while self._heap and self._heap[0][0] <= now:
            due, _, task_id = heapq.heappop(self._heap)
            task = self.tasks.get(task_id)
            if task is None or task.due != due or task.status in TERMINAL:
                continue
            task.due = None
            self._step(task, due)
            applied += 1
        return applied

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    async def run_scheduler(self) -> None:
        """Background loop: fire transitions at their due time, not only when someone polls."""
        self._wakeup = asyncio.Event()
        while True:
            self.process_due()
            self._wakeup.clear()
            due = self.next_due()
            timeout = None if due is None else max(0.0, due - self.clock())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    # manual control (admin endpoints)

    def _admin_task(self, task_id: str) -> Task:
        self.process_due()
        task = self.tasks.get(task_id)
        if task is None:
            raise ApiError(404, "NOT_FOUND", "Task not found")
        if task.status in TERMINAL:
            raise ApiError(409, "CONFLICT", f"Task is already {task.status}")
        return task

    def advance(self, task_id: str) -> Task:
        """One step of the lifecycle, applying the planned outcome at the end."""
        task = self._admin_task(task_id)
        task.due = None
        task.manual = True
        self._step(task, self.clock())
        return task

    def complete(self, task_id: str, num_images: int | None = None) -> Task:
        task = self._admin_task(task_id)
        task.due = None
        task.manual = True
        self._finish_completed(task, self.clock(), num_images)
        return task

    def fail(self, task_id: str, error: str | None = None) -> Task:
        task = self._admin_task(task_id)
        task.due = None
        task.manual = True
        self._finish_failed(task, self.clock(), error or self.config.upstream_error_message)
        return task

    # ----------------------------------------------------------------- reads

    def get_task(self, api_key: str, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None or task.api_key != api_key:
            raise ApiError(404, "NOT_FOUND", "Task not found")
        return task

    def list_tasks(self, api_key: str) -> list[Task]:
        tasks = [t for t in self.tasks.values() if t.api_key == api_key]
        tasks.sort(key=lambda t: (t.created_at, t.seq), reverse=True)
        return tasks

    def usage_records(self, api_key: str) -> list[UsageRecord]:
        records = [r for r in self.usage if r.api_key == api_key]
        records.sort(key=lambda r: (r.created_at, r.seq), reverse=True)
        return records

    def usage_summary(self, api_key: str) -> list[dict[str, Any]]:
        totals: dict[str, list[Any]] = {}
        for record in self.usage:
            if record.api_key != api_key:
                continue
            entry = totals.setdefault(record.model, [0, Decimal("0"), 0])
            entry[0] += record.units
            entry[1] += record.cost
            entry[2] += 1
        return [
            {
                "model": model,
                "total_units": units,
                "total_cost": money(cost),
                "request_count": count,
            }
            for model, (units, cost, count) in sorted(totals.items())
        ]

    # ----------------------------------------------------------------- audit

    def count_request(self, who: str, endpoint: str, status: int) -> None:
        self.requests[who][endpoint] += 1
        self.statuses[endpoint][str(status)] += 1
        if status == 429:
            self.rate_limited[who] += 1

    def audit(self) -> dict[str, Any]:
        """Everything tests need to count duplicates and check billing."""
        return {
            "tasks": [dict(record) for record in self.audit_tasks],
            "task_count": len(self.audit_tasks),
            "requests": {who: dict(counts) for who, counts in self.requests.items()},
            "statuses": {ep: dict(counts) for ep, counts in self.statuses.items()},
            "rate_limited": sum(self.rate_limited.values()),
            "rate_limited_by_key": dict(self.rate_limited),
            "faults_fired": list(self.faults.log),
            "webhook_deliveries": list(self.webhook_deliveries),
            "balances": {
                key_id(key): {"key": self.key_label(key), "balance": str(state.balance)}
                for key, state in self.keys.items()
            },
            "images_rendered": self.images.renders,
        }
