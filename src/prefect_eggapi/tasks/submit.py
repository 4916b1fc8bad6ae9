"""The submit tasks: create an EggAPI task at most once per logical key.

Retries, flow retries and reruns of the same key go through the ledger (the submitter), so they
reconnect to the recorded task instead of paying again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from functools import partial

from prefect.cache_policies import NO_CACHE

from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.client.pricing import format_cost
from prefect_eggapi.client.types import EggAPITask, GenerateRequest
from prefect_eggapi.credentials import EggAPICredentials
from prefect_eggapi.safety.ledger import LedgerStore, default_ledger
from prefect_eggapi.safety.submitter import Submitter
from prefect_eggapi.tasks.artifacts import emit_task_event
from prefect_eggapi.tasks.budget import BudgetLike, budget_cap
from prefect_eggapi.tasks.naming import request_run_name
from prefect_eggapi.tasks.retry import retry_submit
from prefect_eggapi.tasks.runtime import run_logger, run_scope, submit_pool
from prefect_eggapi.tasks.twins import StepOptions, threaded, twin_tasks

__all__ = [
    "RequestLike",
    "SubmitArgs",
    "asubmit_edit",
    "asubmit_generation",
    "coerce_request",
    "submit",
    "submit_edit",
    "submit_generation",
]

#: A request as the tasks take it: the model, or its fields as a mapping (e.g. from JSON).
RequestLike = GenerateRequest | Mapping[str, object]


def coerce_request(request: RequestLike) -> GenerateRequest:
    """The request as a :class:`GenerateRequest`; a bad one names its fields."""
    if isinstance(request, GenerateRequest | Mapping):
        return GenerateRequest.parse(request)
    raise InvalidRequestError([("request", "must be a GenerateRequest or a mapping")])


@dataclass(frozen=True)
class SubmitArgs:
    """The parameters of the submit tasks (see :func:`submit_generation`)."""

    request: RequestLike
    _: KW_ONLY
    credentials: EggAPICredentials | None = None
    key: str | None = None
    label: str | None = None
    budget: BudgetLike = None
    ledger: LedgerStore | None = None


def submit(args: SubmitArgs, *, edit: bool = False) -> EggAPITask:
    """Submit ``args.request`` through the ledger (blocking); log and announce what happened."""
    logger = run_logger()
    req = coerce_request(args.request)
    if edit and not req.image_urls:
        raise InvalidRequestError([("image_urls", "an edit needs at least one input image URL")])
    cap, budget_scope = budget_cap(args.budget)
    scope = run_scope()
    logical_key = args.key or f"{scope}/{args.label or ''}"
    creds = args.credentials or EggAPICredentials()
    req = creds.with_webhook(req)  # webhooks on: the POST gets its own /s/<nonce> URL
    with creds.get_client() as client:
        submitter = Submitter(
            client, args.ledger or default_ledger(), lane_width=creds.submits_in_flight
        )
        outcome = submitter.submit(
            req,
            logical_key=logical_key,
            scope=budget_scope or scope,
            budget=cap,
            label=args.label or "",
        )
    t = outcome.task
    if outcome.reconnected:
        logger.info(
            "Reconnected to EggAPI task %s (%s); not submitting again", t.id, t.status.value
        )
        return t
    how = "adopted after an ambiguous submit" if outcome.adopted else "submitted"
    logger.info(
        "EggAPI task %s %s (%s, %s, attempt %d, up to %s)",
        t.id,
        how,
        req.model,
        req.task_type,
        outcome.entry.attempt,
        format_cost(outcome.entry.estimate),
    )
    emit_task_event(
        "submitted",
        t.id,
        task=t,
        label=args.label,
        adopted=outcome.adopted,
        attempt=outcome.entry.attempt,
        estimate=str(outcome.entry.estimate),
    )
    return t


_SUBMIT_OPTIONS: StepOptions = {
    "cache_policy": NO_CACHE,
    "retries": 3,
    "retry_delay_seconds": [1, 5, 15],
    "retry_condition_fn": retry_submit,
    "task_run_name": request_run_name("submit"),
}

submit_generation, asubmit_generation = twin_tasks(
    SubmitArgs,
    submit,
    threaded(submit, submit_pool),  # a submit waits for its lane blocked, in a pool of its own
    names=("submit_generation", "asubmit_generation"),
    docs=(
        """Create an EggAPI task once per logical key; retries and reruns reconnect to it.

        ``key`` defaults to the run scope (deployment slot or flow run) plus ``label``; identical
        requests under one key share one paid task. ``budget`` caps estimated spend in the run
        scope (or in the scope of a :class:`Budget`).
        """,
        "Async :func:`submit_generation`.",
    ),
    name="eggapi-submit-generation",
    **_SUBMIT_OPTIONS,
)

_submit_edit = partial(submit, edit=True)

submit_edit, asubmit_edit = twin_tasks(
    SubmitArgs,
    _submit_edit,
    threaded(_submit_edit, submit_pool),
    names=("submit_edit", "asubmit_edit"),
    docs=(
        "Like :func:`submit_generation`, for requests with ``image_urls`` (``type: image_edit``).",
        "Async :func:`submit_edit`.",
    ),
    name="eggapi-submit-edit",
    **_SUBMIT_OPTIONS,
)
