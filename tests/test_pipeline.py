"""The image pipeline end to end: emulator over HTTP, SeaweedFS, Prefect test harness.

Billable tasks are counted in the emulator's audit (that is the money); S3 objects are counted by
listing the bucket.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from decimal import Decimal
from typing import Any

import pytest

from lineage import lineage_problems, sources_of
from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.client.imageinfo import sniff
from prefect_eggapi.flows import PipelineError, PipelineSummary, image_pipeline
from prefect_eggapi.flows.prompts import (
    CallablePrompts,
    ListPrompts,
    PromptSource,
    TemplatePrompts,
    as_prompt_source,
)

EDITS = ["turn it into a night scene", "add falling snow"]


def _objects(local_s3, bucket: str) -> dict[str, dict[str, Any]]:
    client = local_s3.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj
    return out


def _read(local_s3, bucket: str, key: str) -> tuple[bytes, dict[str, str]]:
    obj = local_s3.client().get_object(Bucket=bucket, Key=key)
    return obj["Body"].read(), obj.get("Metadata") or {}


def _run(**params: Any) -> PipelineSummary:
    result: PipelineSummary = asyncio.run(image_pipeline(**params))
    return result


@pytest.fixture
def pipeline_env(eggapi_env, local_s3, s3_bucket, monkeypatch):
    """Emulator + local S3 through the documented environment variables only."""
    for name, value in local_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EGGAPI_S3_BUCKET", s3_bucket)
    monkeypatch.setenv("EGGAPI_S3_PREFIX", "pipeline")
    return eggapi_env


pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


# ------------------------------------------------------------------------------------ end to end


def test_two_prompts_two_edit_rounds_then_idempotent_rerun(pipeline_env, local_s3, s3_bucket):
    emulator = pipeline_env
    summary = _run(count=2, seed=11, edit_instructions=EDITS, concurrency=2, image_artifacts=False)

    created = emulator.created_tasks()
    assert len(created) == 6  # 2 generations + 2 × 2 edits
    assert summary.submitted_tasks == 6 and summary.reused_tasks == 0
    assert len(summary.images) == 6

    # The report total equals what the emulator billed.
    billed = sum((Decimal(t["billed"]) for t in created), Decimal("0"))
    assert billed == Decimal("0.096")  # 6 × $0.016
    assert summary.total_cost == billed == summary.new_cost

    manifest_key = summary.manifest_uri.removeprefix(f"s3://{s3_bucket}/")
    assert manifest_key == f"pipeline/manifests/{summary.run_key}.json"
    manifest = json.loads(_read(local_s3, s3_bucket, manifest_key)[0])
    assert Decimal(manifest["total_cost"]) == billed
    items = manifest["items"]
    assert [(i["item"], i["round"]) for i in items] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)
    ]  # fmt: skip
    by_task = {t["task_id"]: t for t in created}
    output_url = {}
    for item in items:
        audit = by_task[item["task_id"]]
        assert Decimal(item["cost"]) == Decimal(audit["billed"])
        assert item["prompt"] == audit["prompt"]
        if item["round"] == 0:
            assert audit["type"] == "image_generate" and audit["image_urls"] == []
            assert item["prompt"] == manifest["prompts"][item["item"]]
        else:
            assert audit["type"] == "image_edit"
            assert item["prompt"] == EDITS[item["round"] - 1]
            # Round r edits round r-1's image, through its EggAPI output URL.
            assert audit["image_urls"] == [output_url[(item["item"], item["round"] - 1)]]
        output_url[(item["item"], item["round"])] = emulator.task(item["task_id"])["output"]["url"]

        # The object: right pixel size, sha256 metadata == bytes == manifest.
        data, meta = _read(local_s3, s3_bucket, item["key"])
        digest = hashlib.sha256(data).hexdigest()
        assert digest == meta["sha256"] == item["sha256"]
        assert len(data) == item["size"]
        info = sniff(data[:65536])
        assert (info.width, info.height) == (1376, 768) == (item["width"], item["height"])
        assert meta["width"] == "1376" and meta["height"] == "768"
        assert meta["pipeline-round"] == str(item["round"])
        assert meta["pipeline-run-key"] == summary.run_key
    assert sorted(summary.images) == sorted(i["s3_uri"] for i in items)
    # No secrets in the manifest.
    raw = json.dumps(manifest)
    assert local_s3.secret_key not in raw and "egg_sk_" not in raw

    objects_before = _objects(local_s3, s3_bucket)
    assert len(objects_before) == 7  # 6 images + manifest
    assert summary.new_objects == 7

    # Same parameters again: reconnect, pay nothing, write nothing.
    again = _run(count=2, seed=11, edit_instructions=EDITS, concurrency=2, image_artifacts=False)
    assert len(emulator.created_tasks()) == 6
    objects_after = _objects(local_s3, s3_bucket)
    assert objects_after.keys() == objects_before.keys()
    assert [o["ETag"] for o in objects_after.values()] == [
        o["ETag"] for o in objects_before.values()
    ]
    assert again.run_key == summary.run_key
    assert again.submitted_tasks == 0 and again.reused_tasks == 6 and again.new_objects == 0
    assert again.new_cost == 0 and again.total_cost == summary.total_cost
    assert sorted(again.images) == sorted(summary.images)

    # A different seed is different work under a different run key.
    other = _run(count=1, seed=12, edit_instructions=[], image_artifacts=False)
    assert other.run_key != summary.run_key
    assert len(emulator.created_tasks()) == 7


@pytest.mark.parametrize(
    ("model", "resolution", "size"),
    [
        ("nanobanana-pro", "2k", (2752, 1536)),
        ("nanobanana-pro", "4k", (5504, 3072)),
        ("nanobanana", "1k", (1344, 768)),
    ],
)
def test_documented_pixel_sizes(pipeline_env, local_s3, s3_bucket, model, resolution, size):
    summary = _run(
        model=model, resolution=resolution, count=1, edit_instructions=[], image_artifacts=False
    )
    assert len(pipeline_env.created_tasks()) == 1
    key = summary.images[0].removeprefix(f"s3://{s3_bucket}/")
    data, meta = _read(local_s3, s3_bucket, key)
    info = sniff(data[:65536])
    assert (info.width, info.height) == size
    assert (int(meta["width"]), int(meta["height"])) == size
    assert hashlib.sha256(data).hexdigest() == meta["sha256"]


def test_presigned_inputs_edit_from_the_bucket_and_rerun_reconnects(
    pipeline_env, local_s3, s3_bucket
):
    emulator = pipeline_env
    params: dict[str, Any] = dict(
        count=1, seed=3, edit_instructions=["add a rainbow"], use_presigned_inputs=True
    )
    summary = _run(**params, image_artifacts=False)
    created = emulator.created_tasks()
    assert len(created) == 2
    edit = created[1]
    assert edit["type"] == "image_edit"
    [url] = edit["image_urls"]
    # A presigned URL of round 0's object in our bucket, not the EggAPI output URL.
    assert url.startswith(f"{local_s3.endpoint_url}/{s3_bucket}/pipeline/{created[0]['task_id']}")
    assert "X-Amz-Signature=" in url

    # The presigned URL differs at every signing; the logical key still reconnects.
    again = _run(**params, image_artifacts=False)
    assert len(emulator.created_tasks()) == 2
    assert again.submitted_tasks == 0 and again.new_objects == 0
    assert sorted(again.images) == sorted(summary.images)


def test_own_prompt_list_and_callable_source(pipeline_env, local_s3, s3_bucket):
    emulator = pipeline_env
    mine = ["a blue bicycle leaning on a wall", "a teapot on a windowsill"]
    summary = _run(prompts=mine, edit_instructions=[], image_artifacts=False)
    assert sorted(t["prompt"] for t in emulator.created_tasks()) == sorted(mine)
    assert len(summary.images) == 2

    calls: list[tuple[int, int]] = []

    def llm(count: int, seed: int) -> list[str]:  # stands in for an LLM call
        calls.append((count, seed))
        return [f"idea {seed}-{i}: a paper boat on a pond" for i in range(count)]

    summary = _run(count=2, seed=5, prompt_source=llm, edit_instructions=[], image_artifacts=False)
    assert calls == [(2, 5)]
    prompts = sorted(t["prompt"] for t in emulator.created_tasks()[2:])
    assert prompts == ["idea 5-0: a paper boat on a pond", "idea 5-1: a paper boat on a pond"]


def test_a_failed_item_fails_the_run_but_the_rest_is_stored(pipeline_env, local_s3, s3_bucket):
    # The emulator refuses prompts containing "forbidden" (content moderation).
    with pytest.raises(PipelineError, match="1 of 2 item"):
        _run(
            prompts=["a quiet harbour", "something forbidden"],
            edit_instructions=[],
            image_artifacts=False,
        )
    assert len(pipeline_env.created_tasks()) == 2  # moderation is terminal: not retried
    keys = _objects(local_s3, s3_bucket)
    manifests = [k for k in keys if "/manifests/" in k]
    assert len(manifests) == 1
    manifest = json.loads(_read(local_s3, s3_bucket, manifests[0])[0])
    assert len(manifest["items"]) == 1 and len(manifest["failed"]) == 1


# ------------------------------------------------------------------------------ bad parameters


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"count": 0}, "count"),
        ({"count": 5000}, "count"),
        ({"concurrency": 0}, "concurrency"),
        ({"bucket": "Not_A_Bucket"}, "bucket"),
        ({"prefix": "a/../b"}, "prefix"),
        ({"run_key": "../escape"}, "run_key"),
        ({"edit_instructions": ["  "]}, "edit_instructions"),
        ({"budget": 0.01}, "budget"),
        ({"budget": -1}, "budget"),
        ({"wait_timeout": 0}, "wait_timeout"),
        ({"prompts": ["x" * 2001]}, "prompts"),
        ({"templates": ["{subject} in {colour}"]}, "templates"),
        ({"count": 1000}, "count"),  # more than templates × subjects × styles
        ({"negative_prompt": "n" * 1001}, "negative_prompt"),
        ({"prompt_source": "no.such.module:thing"}, "prompt_source"),
    ],
)
def test_invalid_parameters_fail_before_any_paid_call(pipeline_env, params, field):
    with pytest.raises(InvalidRequestError) as info:
        _run(**{"edit_instructions": EDITS, **params})
    assert field in str(info.value)
    assert pipeline_env.created_tasks() == []


@pytest.mark.parametrize(("params", "field"), [({"resolution": "8k"}, "resolution")])
def test_wrong_types_are_refused_by_prefect_naming_the_field(pipeline_env, params, field):
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError) as info:
        _run(**params)
    assert field in str(info.value)
    assert pipeline_env.created_tasks() == []


def test_unreachable_bucket_and_missing_settings_fail_before_any_paid_call(
    pipeline_env, monkeypatch
):
    with pytest.raises(InvalidRequestError, match="bucket"):
        _run(bucket="eggapi-no-such-bucket-here", count=1)
    monkeypatch.delenv("EGGAPI_S3_BUCKET")
    with pytest.raises(InvalidRequestError, match="bucket"):
        _run(count=1)
    monkeypatch.setenv("EGGAPI_S3_BUCKET", "whatever")
    monkeypatch.delenv("EGGAPI_API_KEY")
    with pytest.raises(InvalidRequestError, match="api_key"):
        _run(count=1)
    assert pipeline_env.created_tasks() == []


# ------------------------------------------------------------------------------------- prompts


def test_template_prompts_are_deterministic_distinct_and_seeded():
    a = TemplatePrompts(seed=42, count=10).prompts()
    assert a == TemplatePrompts(seed=42, count=10).prompts()
    assert len(set(a)) == 10
    assert a != TemplatePrompts(seed=43, count=10).prompts()
    assert (
        TemplatePrompts(seed=42, count=3).prompts() == TemplatePrompts(seed=42, count=3).prompts()
    )
    small: dict[str, Any] = dict(
        templates=["{subject} as {style}"], subjects=["a"], styles=["b", "c"]
    )
    with pytest.raises(ValueError, match="count"):
        TemplatePrompts(**small, count=3)  # only 2 distinct prompts exist
    assert sorted(TemplatePrompts(**small, count=2).prompts()) == ["a as b", "a as c"]


def test_prompt_sources_are_pluggable():
    assert isinstance(TemplatePrompts(), PromptSource)
    assert as_prompt_source(["x", "y", "z"], count=2).prompts() == ["x", "y"]
    with pytest.raises(ValueError, match="count"):
        ListPrompts(["x"], count=2)
    source = as_prompt_source(lambda n, s: [f"p{s}{i}" for i in range(n)], count=2, seed=9)
    assert isinstance(source, CallablePrompts)
    assert source.prompts() == ["p90", "p91"]

    class Mine:
        def prompts(self) -> list[str]:
            return ["from my own source"]

    mine = Mine()
    assert as_prompt_source(mine, count=1) is mine
    imported = as_prompt_source("prefect_eggapi.flows.prompts:DEFAULT_SUBJECTS", count=2)
    assert imported.prompts() == list(as_prompt_source(None, count=5).__class__().subjects)[:2]
    with pytest.raises(ValueError, match="prompt_source"):
        as_prompt_source("nonsense", count=1)


# ------------------------------------------------------------------------------------- lineage


@pytest.mark.parametrize("presigned", [False, True], ids=["output-urls", "presigned-inputs"])
def test_each_edit_round_was_made_from_the_previous_rounds_stored_bytes(
    pipeline_env, local_s3, s3_bucket, presigned
):
    """Proven from the PNGs, not from our records: round k's stored image names, in its
    ``eggapi:sources`` tEXt chunk, the sha256 of round k-1's stored bytes."""
    summary = _run(
        count=2,
        seed=17,
        edit_instructions=EDITS,
        use_presigned_inputs=presigned,
        image_artifacts=False,
    )
    key = summary.manifest_uri.removeprefix(f"s3://{s3_bucket}/")
    manifest = json.loads(_read(local_s3, s3_bucket, key)[0])
    rounds: dict[int, dict[int, bytes]] = {}
    for item in manifest["items"]:
        data, _ = _read(local_s3, s3_bucket, item["key"])
        rounds.setdefault(item["item"], {})[item["round"]] = data
    assert sorted(rounds) == [0, 1] and all(sorted(r) == [0, 1, 2] for r in rounds.values())
    assert all(sources_of(r[0]) == [] for r in rounds.values())  # generations have no source
    assert lineage_problems(rounds) == []
    # And not from any other item: the chains are distinct.
    assert sources_of(rounds[0][1]) != sources_of(rounds[1][1])
