"""Issue 9, part 3: a catalogue of bad inputs; each gets a clear error and costs zero HTTP calls.

Every case runs against the live emulator (reset before each case) and then checks its audit:
not one request of any kind may have reached it. "Clear" means the error names the offending
field (or the rule). Broken manifest lines are a separate matter: they are reported line by line
and skipped, never silently dropped, while the valid lines still run.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prefect import flow

from prefect_eggapi.flows import batch_generate, image_pipeline
from prefect_eggapi.flows.batch import BatchError
from prefect_eggapi.tasks import submit_edit, submit_generation, wait_for_task
from reliability_common import read_status, write_manifest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

GOOD_LINE = json.dumps({"id": "ok", "prompt": "a quiet harbour"})


def _manifest(tmp: Path, name: str = "m.jsonl", lines: tuple[str, ...] = (GOOD_LINE,)) -> str:
    return write_manifest(tmp / name, lines)


def batch(tmp: Path, **overrides: Any) -> Any:
    params: dict[str, Any] = {"manifest": _manifest(tmp)}
    params.update(overrides)
    return asyncio.run(batch_generate(**params))


def pipeline(**overrides: Any) -> Any:
    params: dict[str, Any] = {"prompts": ["a lighthouse"], "edit_instructions": []}
    params.update(overrides)
    return asyncio.run(image_pipeline(**params))


def submit(request: dict[str, Any], *, edit: bool = False, **kwargs: Any) -> Any:
    @flow(name="bad-input-submit")
    def one() -> Any:
        task = submit_edit if edit else submit_generation
        return task(request, key="bad-input", **kwargs)

    return one()


OK_REQ: dict[str, Any] = {"model": "nanobanana", "prompt": "a red kite"}

# (case id, call(tmp_path), text the error must contain)
CASES: list[tuple[str, Callable[[Path], Any], str]] = [
    # --- batch flow parameters
    ("batch-concurrency-0", lambda t: batch(t, concurrency=0), "concurrency"),
    ("batch-concurrency-1001", lambda t: batch(t, concurrency=1001), "concurrency"),
    ("batch-concurrency-type", lambda t: batch(t, concurrency="many"), "concurrency"),
    ("batch-num-outputs-0", lambda t: batch(t, num_outputs=0), "num_outputs"),
    ("batch-num-outputs-5", lambda t: batch(t, num_outputs=5), "num_outputs"),
    # As strict as the client: "2" is refused, not silently paid for as 2 images.
    ("batch-num-outputs-str", lambda t: batch(t, num_outputs="2"), "num_outputs"),
    ("batch-concurrency-str", lambda t: batch(t, concurrency="4"), "concurrency"),
    ("batch-budget-negative", lambda t: batch(t, budget=-1), "budget"),
    ("batch-budget-type", lambda t: batch(t, budget="lots"), "budget"),
    ("batch-wait-timeout-0", lambda t: batch(t, wait_timeout=0), "wait_timeout"),
    ("batch-wait-timeout-8-days", lambda t: batch(t, wait_timeout=8 * 86400), "wait_timeout"),
    ("batch-model", lambda t: batch(t, model="dall-e-3"), "model"),
    ("batch-aspect-ratio", lambda t: batch(t, aspect_ratio="1:1"), "aspect_ratio"),
    ("batch-resolution", lambda t: batch(t, resolution="8k"), "resolution"),
    ("batch-manifest-empty", lambda t: batch(t, manifest=""), "manifest"),
    ("batch-manifest-blank", lambda t: batch(t, manifest="   "), "manifest"),
    ("batch-manifest-missing", lambda t: batch(t, manifest=str(t / "nope.jsonl")), "manifest"),
    (
        "batch-manifest-format",
        lambda t: batch(t, manifest_format="xml"),
        "manifest_format",
    ),
    (
        "batch-manifest-unknown-extension",
        lambda t: batch(t, manifest=_manifest(t, "m.txt")),
        "manifest_format",
    ),
    ("batch-manifest-s3-no-key", lambda t: batch(t, manifest="s3://only-bucket"), "manifest"),
    (
        "batch-manifest-all-broken",
        lambda t: batch(t, manifest=_manifest(t, "broken.jsonl", ("{oops", "[1, 2]", '{"x": 1}'))),
        "no valid lines",
    ),
    (
        "batch-manifest-empty-file",
        lambda t: batch(t, manifest=_manifest(t, "e.jsonl", ())),
        "manifest",
    ),
    ("batch-bucket-invalid", lambda t: batch(t, bucket="Not_A_Bucket!"), "bucket"),
    ("batch-bucket-ip", lambda t: batch(t, bucket="192.168.0.1"), "bucket"),
    ("batch-prefix-dotdot", lambda t: batch(t, prefix="out/../escape"), "prefix"),
    ("batch-run-key-slash", lambda t: batch(t, run_key="a/b"), "run_key"),
    ("batch-run-key-long", lambda t: batch(t, run_key="k" * 200), "run_key"),
    # --- pipeline flow parameters
    ("pipeline-count-0", lambda t: pipeline(count=0), "count"),
    ("pipeline-count-1001", lambda t: pipeline(prompts=None, count=1001), "count"),
    ("pipeline-blank-prompt", lambda t: pipeline(prompts=["   "]), "prompts"),
    ("pipeline-long-prompt", lambda t: pipeline(prompts=["x" * 2001]), "prompts"),
    ("pipeline-negative-prompt", lambda t: pipeline(negative_prompt="n" * 1001), "negative_prompt"),
    ("pipeline-blank-edit", lambda t: pipeline(edit_instructions=[" "]), "edit_instructions"),
    ("pipeline-21-edits", lambda t: pipeline(edit_instructions=["e"] * 21), "edit_instructions"),
    ("pipeline-budget-too-small", lambda t: pipeline(budget=0.001), "budget"),
    ("pipeline-concurrency-65", lambda t: pipeline(concurrency=65), "concurrency"),
    ("pipeline-resolution", lambda t: pipeline(resolution="16k"), "resolution"),
    ("pipeline-prompt-source", lambda t: pipeline(prompt_source="no.such.module:x"), "prompt"),
    ("pipeline-bucket", lambda t: pipeline(bucket="UPPER"), "bucket"),
    # --- requests to the tasks
    ("request-empty-prompt", lambda t: submit({**OK_REQ, "prompt": ""}), "prompt"),
    ("request-blank-prompt", lambda t: submit({**OK_REQ, "prompt": " \n "}), "prompt"),
    ("request-long-prompt", lambda t: submit({**OK_REQ, "prompt": "p" * 2001}), "prompt"),
    (
        "request-long-negative",
        lambda t: submit({**OK_REQ, "negative_prompt": "n" * 1001}),
        "negative_prompt",
    ),
    ("request-model", lambda t: submit({**OK_REQ, "model": "gpt-image-1"}), "model"),
    ("request-missing-model", lambda t: submit({"prompt": "x"}), "model"),
    ("request-aspect", lambda t: submit({**OK_REQ, "aspect_ratio": "4:3"}), "aspect_ratio"),
    ("request-resolution", lambda t: submit({**OK_REQ, "resolution": "1080p"}), "resolution"),
    ("request-outputs-0", lambda t: submit({**OK_REQ, "num_outputs": 0}), "num_outputs"),
    ("request-outputs-5", lambda t: submit({**OK_REQ, "num_outputs": 5}), "num_outputs"),
    ("request-outputs-str", lambda t: submit({**OK_REQ, "num_outputs": "2"}), "num_outputs"),
    (
        "request-image-urls-string",
        lambda t: submit({**OK_REQ, "image_urls": "http://h/a.png"}),
        "image_urls",
    ),
    (
        "request-image-url-ftp",
        lambda t: submit({**OK_REQ, "image_urls": ["ftp://h/a.png"]}),
        "image_urls",
    ),
    (
        "request-image-url-no-host",
        lambda t: submit({**OK_REQ, "image_urls": ["http:///a.png"]}),
        "image_urls",
    ),
    (
        "request-image-url-space",
        lambda t: submit({**OK_REQ, "image_urls": ["http://h/a b.png"]}),
        "image_urls",
    ),
    (
        "request-image-url-relative",
        lambda t: submit({**OK_REQ, "image_urls": ["/tmp/a.png"]}),
        "image_urls",
    ),
    (
        "request-10-image-urls",
        lambda t: submit({**OK_REQ, "image_urls": [f"http://h/{i}.png" for i in range(10)]}),
        "image_urls",
    ),
    (
        "request-webhook-javascript",
        lambda t: submit({**OK_REQ, "webhook_url": "javascript:alert(1)"}),
        "webhook_url",
    ),
    (
        "request-webhook-too-long",
        lambda t: submit({**OK_REQ, "webhook_url": "https://h/" + "a" * 2100}),
        "webhook_url",
    ),
    ("request-unknown-field", lambda t: submit({**OK_REQ, "seed": 42}), "seed"),
    ("request-not-a-mapping", lambda t: submit(["nanobanana", "x"]), "request"),
    ("edit-without-images", lambda t: submit(OK_REQ, edit=True), "image_urls"),
    ("submit-budget-text", lambda t: submit(OK_REQ, budget="plenty"), "budget"),
    ("submit-budget-negative", lambda t: submit(OK_REQ, budget=-0.5), "budget"),
    ("submit-budget-nan", lambda t: submit(OK_REQ, budget="NaN"), "budget"),
    (
        "wait-timeout-0",
        lambda t: flow(name="bad-wait")(lambda: wait_for_task("gen_aaaaaaaaaaaa", timeout=0))(),
        "timeout",
    ),
]


def http_calls(emulator: Any) -> int:
    audit = emulator.audit()
    return sum(sum(counts.values()) for counts in audit["requests"].values()) + audit["task_count"]


def test_the_catalogue_has_at_least_40_cases() -> None:
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("call", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_before_any_http_call(
    eggapi_env, emulator_api_key, local_s3, s3_bucket, monkeypatch, tmp_path, call, needle
):
    for name, value in local_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EGGAPI_S3_BUCKET", s3_bucket)
    with pytest.raises(Exception) as info:
        call(tmp_path)
    message = str(info.value)
    assert needle.lower() in message.lower(), f"{type(info.value).__name__}: {message}"
    assert not isinstance(info.value, BatchError)  # refused up front, not per item
    assert emulator_api_key not in message and emulator_api_key not in repr(info.value)
    assert local_s3.secret_key not in message
    assert http_calls(eggapi_env) == 0, eggapi_env.audit()["requests"]


BROKEN_LINES = [
    ("{not json", "not valid JSON"),
    ("[1, 2, 3]", "must be a JSON object"),
    ('"just a string"', "must be a JSON object"),
    (json.dumps({"id": "u", "prompt": "x", "colour": "red"}), "unknown field"),
    (json.dumps({"id": "bad id!", "prompt": "x"}), "id"),
    (json.dumps({"id": "ok", "prompt": "dup"}), "duplicate id"),
    (json.dumps({"id": "np"}), "prompt"),
    (json.dumps({"id": "lp", "prompt": "p" * 2001}), "prompt"),
    (json.dumps({"id": "m", "prompt": "x", "model": "midjourney"}), "model"),
    (json.dumps({"id": "n", "prompt": "x", "num_outputs": 9}), "num_outputs"),
    (json.dumps({"id": "f", "prompt": "x", "image_urls": ["ftp://h/a.png"]}), "image_urls"),
    (json.dumps({"id": "w", "prompt": "x", "webhook_url": "http://h/w"}), "unknown field"),
    (json.dumps({"id": "big", "prompt": "x" * 70_000}), "longer than"),
]


def test_broken_manifest_lines_are_reported_and_skipped_never_dropped(
    eggapi_env, local_s3, s3_bucket, monkeypatch, tmp_path
):
    for name, value in local_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EGGAPI_S3_BUCKET", s3_bucket)
    monkeypatch.setenv("EGGAPI_S3_PREFIX", "out")
    lines = [GOOD_LINE] + [line for line, _ in BROKEN_LINES]
    path = write_manifest(tmp_path / "broken.jsonl", lines)
    with pytest.raises(BatchError, match=f"{len(BROKEN_LINES)} broken line"):
        asyncio.run(batch_generate(manifest=path, run_key="broken-lines"))
    assert len(eggapi_env.created_tasks()) == 1  # only the valid line was paid for
    rows = read_status(local_s3.client(), s3_bucket, "out/batches/broken-lines/status.jsonl")
    assert [r["line"] for r in rows] == list(range(1, len(lines) + 1))  # every line, in order
    assert rows[0]["status"] == "persisted"
    for row, (_, reason) in zip(rows[1:], BROKEN_LINES, strict=True):
        assert row["status"] == "broken", row
        assert reason.lower() in row["error"]["message"].lower(), (reason, row)


def test_broken_csv_lines_are_reported_too(eggapi_env, local_s3, s3_bucket, monkeypatch, tmp_path):
    for name, value in local_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EGGAPI_S3_BUCKET", s3_bucket)
    monkeypatch.setenv("EGGAPI_S3_PREFIX", "out")
    path = tmp_path / "m.csv"
    path.write_text(
        "id,prompt,num_outputs\n"
        "a,a calm lake,1\n"
        "b,too many cells,1,extra\n"
        "c,bad count,seven\n"
        "d,,1\n"
    )
    with pytest.raises(BatchError, match="3 broken line"):
        asyncio.run(batch_generate(manifest=str(path), run_key="broken-csv"))
    assert len(eggapi_env.created_tasks()) == 1
    rows = read_status(local_s3.client(), s3_bucket, "out/batches/broken-csv/status.jsonl")
    assert [r["status"] for r in rows] == ["persisted", "broken", "broken", "broken"]
    assert all(r["error"]["message"] for r in rows[1:])
