"""Issue 16: the batch flow's progress bar goes through the flow run's own client.

Counted, not timed: no Prefect client (sync or async) is built per update, updates that are not
due never leave the loop, and the bar still ends at 100 % whatever order concurrent updates take.
"""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import PrefectClient, SyncPrefectClient, get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from prefect_eggapi.tasks import artifacts as artifacts_module
from prefect_eggapi.tasks.artifacts import Progress

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def _count_constructions(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    built = {"sync": 0, "async": 0}
    sync_init = SyncPrefectClient.__init__
    async_init = PrefectClient.__init__

    def counting_sync(self: SyncPrefectClient, *args: Any, **kwargs: Any) -> None:
        built["sync"] += 1
        sync_init(self, *args, **kwargs)

    def counting_async(self: PrefectClient, *args: Any, **kwargs: Any) -> None:
        built["async"] += 1
        async_init(self, *args, **kwargs)

    monkeypatch.setattr(SyncPrefectClient, "__init__", counting_sync)
    monkeypatch.setattr(PrefectClient, "__init__", counting_async)
    return built


def _progress_of(key: str) -> float:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert len(found) == 1, "one progress bar per run"
    return float(found[0].data)  # type: ignore[arg-type]


def test_updates_reuse_the_flow_runs_client(monkeypatch: pytest.MonkeyPatch) -> None:
    key = f"perf-progress-{UUID(int=1).hex[:8]}-reuse"
    sent: list[float] = []
    real = artifacts_module.aupdate_progress_artifact

    async def spy(artifact_id: UUID, progress: float, **kwargs: Any) -> UUID:
        sent.append(progress)
        assert isinstance(kwargs["client"], PrefectClient)  # the run's client, not a new one
        return await real(artifact_id, progress, **kwargs)

    monkeypatch.setattr(artifacts_module, "aupdate_progress_artifact", spy)

    @flow
    async def bar() -> dict[str, int]:
        progress = await asyncio.to_thread(Progress, "perf bar", key)
        built = _count_constructions(monkeypatch)
        progress.min_interval = 0.0  # every changed value is due: the worst case for clients
        for done in range(1, 201):
            await progress.aupdate(100 * done / 200, f"{done}/200 items")
        return dict(built)

    built = asyncio.run(bar())
    assert built == {"sync": 0, "async": 0}
    assert sent == [float(v) for v in range(1, 101)]  # only changed rounded values are sent
    assert _progress_of(key) == 100.0


def test_throttled_updates_stay_in_the_loop_and_the_bar_ends_at_100(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = f"perf-progress-{UUID(int=2).hex[:8]}-throttle"
    sent: list[float] = []
    real = artifacts_module.aupdate_progress_artifact

    async def spy(artifact_id: UUID, progress: float, **kwargs: Any) -> UUID:
        sent.append(progress)
        return await real(artifact_id, progress, **kwargs)

    monkeypatch.setattr(artifacts_module, "aupdate_progress_artifact", spy)

    @flow
    async def bar() -> None:
        progress = await asyncio.to_thread(Progress, "perf bar", key)
        progress.min_interval = 3600.0  # nothing below 100 % is due after the first update
        await asyncio.gather(*(progress.aupdate(100 * done / 50) for done in range(1, 50)))
        progress.min_interval = 0.0
        # Items finishing at once: 100 % is sent first, the 99 % queued behind it must not
        # land after it (the bar would end at 99 %).
        await asyncio.gather(progress.aupdate(100.0), progress.aupdate(99.0))

    asyncio.run(bar())
    assert sent == [2.0, 100.0]
    assert _progress_of(key) == 100.0
