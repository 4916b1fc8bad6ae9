"""The flows' signatures and their parameter models agree: every field can be set from a flow.

No server, no Prefect engine: the flow functions' bodies (``.fn``) are called with the run
function replaced, so what reaches it is exactly what the flow validated.
"""

from __future__ import annotations

import asyncio
import inspect
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.flows import batch, pipeline, sharded
from prefect_eggapi.flows.params import BatchParams, PipelineParams, ShardPlan

FLOWS: list[tuple[Any, list[type[BaseModel]]]] = [
    (pipeline.image_pipeline, [PipelineParams]),
    (batch.batch_generate, [BatchParams]),
    # Shards choose their own line ranges: ``lines`` is refused by the parent, not offered.
    (sharded.sharded_batch_generate, [ShardPlan, BatchParams]),
]


@pytest.mark.parametrize(("flow", "models"), FLOWS, ids=lambda v: getattr(v, "name", ""))
def test_every_field_is_a_flow_parameter_with_the_models_default(flow, models):
    signature = inspect.signature(flow.fn)
    for model in models:
        for name, field in model.model_fields.items():
            if flow is sharded.sharded_batch_generate and name == "lines":
                continue
            assert name in signature.parameters, f"{flow.name} cannot set {model.__name__}.{name}"
            offered = signature.parameters[name].default
            if field.is_required():
                assert offered is inspect.Parameter.empty, (flow.name, name)
                continue
            default = field.get_default(call_default_factory=True)
            # None in a signature means "the model's default" (from_flow drops it).
            assert offered is None or offered == default, (flow.name, name, offered, default)


def _capture(monkeypatch, module, name: str) -> list[tuple[Any, ...]]:
    seen: list[tuple[Any, ...]] = []

    async def fake(*args: Any, **kwargs: Any) -> str:
        seen.append(args)
        return "done"

    monkeypatch.setattr(module, name, fake)
    return seen


def test_the_pipeline_flow_passes_every_parameter_on(monkeypatch):
    seen = _capture(monkeypatch, pipeline, "run_pipeline")
    result = asyncio.run(
        pipeline.image_pipeline.fn(
            prompts=["a", "b"], presign_expires_in=120, budget=0.1, prompt_source="pkg.mod:attr"
        )
    )
    assert result == "done"
    (params,) = seen[0]
    assert params.presign_expires_in == 120
    assert params.budget == Decimal("0.1")
    assert params.count == 2  # the length of prompts when count is not given
    assert params.prompt_source == "pkg.mod:attr"
    assert list(params.edit_instructions) == list(pipeline.DEFAULT_EDIT_INSTRUCTIONS)


def test_a_bad_flow_parameter_is_refused_naming_the_field(monkeypatch):
    _capture(monkeypatch, pipeline, "run_pipeline")
    with pytest.raises(InvalidRequestError, match="presign_expires_in"):
        asyncio.run(pipeline.image_pipeline.fn(presign_expires_in=5))


def test_the_batch_flows_pass_every_parameter_on(monkeypatch):
    seen = _capture(monkeypatch, batch, "run_batch")
    asyncio.run(batch.batch_generate.fn("m.jsonl", lines="2:5", budget=1.5, num_outputs=2))
    (params,) = seen[0]
    assert (params.lines, params.budget, params.num_outputs) == ("2:5", Decimal("1.5"), 2)

    seen = _capture(monkeypatch, sharded, "run_sharded")
    asyncio.run(sharded.sharded_batch_generate.fn("m.jsonl", shards=3, concurrency=2))
    params, plan = seen[0]
    assert (params.manifest, params.concurrency, plan.shards) == ("m.jsonl", 2, 3)
