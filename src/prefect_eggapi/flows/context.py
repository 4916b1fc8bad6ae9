"""What a flow body gets from its surroundings before the first paid call, one way for every flow.

The credentials block (or the environment), the S3 store (a prefect-aws block, or the flow's
``bucket``/``prefix`` over the environment, reached once), the scheduled slot a deployment run
was created for, and the scope its artifact keys live under. Bad or missing values raise
:class:`InvalidRequestError` naming the parameter.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from prefect.client.orchestration import get_client
from prefect.runtime import deployment, flow_run
from pydantic import ValidationError

from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.client.types import problems_from
from prefect_eggapi.credentials import EggAPICredentials
from prefect_eggapi.safety.ledger import LedgerStore
from prefect_eggapi.storage import OutputStore, S3Settings, bucket_problem
from prefect_eggapi.tasks.runtime import in_thread

__all__ = [
    "RunContext",
    "artifact_scope",
    "load_credentials",
    "open_store",
    "s3_settings",
    "scheduled_slot",
]


@dataclass
class RunContext:
    """What every item of one run shares: its key, where outputs go, who pays, the ledger."""

    run_key: str
    store: OutputStore
    credentials: EggAPICredentials
    ledger: LedgerStore


async def load_credentials(block_name: str | None) -> EggAPICredentials:
    """The named ``EggAPICredentials`` block, else one from the environment; the API key must
    resolve (an :class:`InvalidRequestError` naming ``api_key`` otherwise)."""
    creds = await EggAPICredentials.aload(block_name) if block_name else EggAPICredentials()
    creds.resolved_api_key()
    return creds


def s3_settings(
    bucket: str | None, prefix: str | None, *, presign_expires_in: int | None = None
) -> S3Settings:
    """S3 settings from a flow's ``bucket``/``prefix`` parameters over the environment; bad or
    missing values raise :class:`InvalidRequestError` naming the field (every flow, one way)."""
    try:
        return S3Settings.from_env(
            bucket=bucket or None, prefix=prefix, presign_expires_in=presign_expires_in
        )
    except ValidationError as exc:
        raise InvalidRequestError(problems_from(exc), what="S3 settings") from None
    except ValueError as exc:
        raise InvalidRequestError([("bucket", str(exc).removeprefix("bucket: "))]) from None


async def open_store(
    bucket: str | None,
    prefix: str | None,
    *,
    s3_bucket_block: str | None,
    presign_expires_in: int,
) -> OutputStore:
    """The output store (a prefect-aws ``S3Bucket`` block when named), its bucket reached."""
    make: Callable[[], OutputStore]
    if s3_bucket_block:
        # prefect-aws is an optional extra ("aws"): imported only when a block is named.
        from prefect_aws import S3Bucket

        block = await S3Bucket.aload(s3_bucket_block)
        make = partial(
            OutputStore.from_prefect_aws,
            block,
            prefix=prefix,
            presign_expires_in=presign_expires_in,
        )
    else:
        settings = s3_settings(bucket, prefix, presign_expires_in=presign_expires_in)
        make = partial(OutputStore.from_settings, settings)
    store = await in_thread(make)
    problem = await in_thread(partial(bucket_problem, store))
    if problem is not None:
        raise InvalidRequestError([("bucket", problem)], what="S3 settings")
    return store


async def scheduled_slot() -> str | None:
    """``deployment-{id}-{slot}`` when this flow run was created by a deployment schedule."""
    deployment_id = deployment.id
    run_id = flow_run.id
    scheduled = flow_run.scheduled_start_time
    if not deployment_id or not run_id or scheduled is None:
        return None
    try:
        async with get_client() as client:
            run = await client.read_flow_run(run_id)
    except Exception:
        return None
    if not run.auto_scheduled:
        return None
    slot = scheduled.strftime("%Y%m%dT%H%M%SZ")
    return f"deployment-{deployment_id}-{slot}"


async def artifact_scope(default_flow: str) -> str:
    """Which flow or deployment this run belongs to, for artifact keys: ad-hoc runs (the demo,
    a script) and each deployment keep their own histories under the same run key."""
    flow_name = str(flow_run.flow_name or default_flow)
    name: str | None = None
    deployment_id = deployment.id
    if deployment_id:
        # prefect.runtime's own override variable, honoured as prefect.runtime does; else one
        # async read (prefect.runtime's sync getter would block this event loop on another).
        name = os.environ.get("PREFECT__RUNTIME__DEPLOYMENT__NAME")
        if not name:
            try:
                async with get_client() as client:
                    name = (await client.read_deployment(deployment_id)).name
            except Exception:
                name = f"deployment-{str(deployment_id)[:8]}"
    return f"{flow_name}-{name}" if name else flow_name
