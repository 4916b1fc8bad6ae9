"""Conformance of the local EggAPI emulator with docs eggapi-api.md, over real HTTP (plain httpx).

The session emulator runs in a subprocess; the ``emulator`` fixture resets it before each test.
No test sleeps and hopes: lifecycles use manual mode or bounded polling against a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from prefect_eggapi.cli.emulator import build_config, configure_parser
from prefect_eggapi.cli.emulator import main as cli_main
from prefect_eggapi.testing.emulator import (
    ApiKeyConfig,
    EmulatorConfig,
    EmulatorProcess,
    create_app,
)

pytestmark = pytest.mark.integration

ID_RE = re.compile(r"^gen_[a-z0-9]{12}$")
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

# Section 7.3 (G2, nanobanana-pro), verbatim.
DOCS_PRO_REQUEST = {
    "model": "nanobanana-pro",
    "prompt": "A futuristic cityscape at night, cyberpunk style",
    "negative_prompt": "blurry, low quality",
    "aspect_ratio": "16:9",
    "resolution": "2k",
    "num_outputs": 2,
    "webhook_url": "https://webhook.site/your-webhook-id",
}
# Section 16.1 (G3 "Create a Task").
DOCS_G3_REQUEST = {
    "model": "nanobanana",
    "prompt": "A cute cat sitting on a windowsill",
    "aspect_ratio": "16:9",
    "num_outputs": 1,
}


def go_line(field: str, tag: str) -> str:
    return (
        f"Key: 'GenerateRequest.{field}' Error:Field validation for '{field}' failed on the "
        f"'{tag}' tag"
    )


def assert_error(
    response: httpx.Response, status: int, code: str, message: str | None = None
) -> dict[str, str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["data"] is None
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    if message is not None:
        assert body["error"]["message"] == message
    error: dict[str, str] = body["error"]
    return error


def create(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"model": "nanobanana", "prompt": "a test image", **fields}
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 202, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


def wait_for(
    client: httpx.Client, task_id: str, statuses: tuple[str, ...] = ("completed", "failed")
) -> dict[str, Any]:
    deadline = time.monotonic() + 10.0
    while True:
        response = client.get(f"/v1/tasks/{task_id}")
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()["data"]
        if data["status"] in statuses:
            return data
        assert time.monotonic() < deadline, f"task stuck in {data['status']}"
        time.sleep(0.02)


def poll_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met before deadline"
        time.sleep(0.02)


def png_size(content: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(content)) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


# --------------------------------------------------------------------------- documented examples


def test_docs_example_73_returns_202_pending_task(emulator_client: httpx.Client) -> None:
    response = emulator_client.post("/v1/generate", json=DOCS_PRO_REQUEST)
    assert response.status_code == 202
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] is None
    data = body["data"]
    # G3 style: output/error/started_at/completed_at are absent while pending (17.7).
    assert list(data) == ["id", "status", "model", "type", "cost", "created_at"]
    assert ID_RE.match(data["id"])
    assert data["status"] == "pending"
    assert data["model"] == "nanobanana-pro"
    assert data["type"] == "image_generate"
    assert data["cost"] == "$0.00"
    assert TS_RE.match(data["created_at"])


def test_docs_example_73_completes_with_two_images_and_cost(
    emulator: EmulatorProcess, emulator_client: httpx.Client
) -> None:
    task = emulator_client.post("/v1/generate", json=DOCS_PRO_REQUEST).json()["data"]
    done = wait_for(emulator_client, task["id"])
    assert done["status"] == "completed"
    urls = done["output"]["urls"]
    assert urls == [f"{emulator.base_url}/images/{task['id']}/{i}.png" for i in range(2)]
    assert done["output"]["url"] == urls[0]
    assert done["cost"] == "$0.0320"  # 2 images x $0.016 at 2k
    digests = set()
    for url in urls:
        image = httpx.get(url, trust_env=False)
        assert image.status_code == 200
        assert png_size(image.content) == (2752, 1536)
        digests.add(hashlib.sha256(image.content).hexdigest())
    assert len(digests) == 2  # every (task, index) renders a different image


def test_outputs_exist_at_completion_like_on_a_cdn(
    emulator: EmulatorProcess, emulator_client: httpx.Client
) -> None:
    task = emulator_client.post("/v1/generate", json=DOCS_PRO_REQUEST).json()["data"]
    assert wait_for(emulator_client, task["id"])["status"] == "completed"
    # rendered while processing: nothing is left to render when the first download arrives
    deadline = time.monotonic() + 10
    while (rendered := emulator.audit()["images_rendered"]) < 2:
        assert time.monotonic() < deadline, rendered
        time.sleep(0.05)
    for i in range(2):
        assert httpx.get(f"{emulator.base_url}/images/{task['id']}/{i}.png").status_code == 200
    assert emulator.audit()["images_rendered"] == rendered  # from the cache, not rendered again


def test_docs_example_8_completed_task_shape(emulator_client: httpx.Client) -> None:
    task = create(emulator_client, **DOCS_G3_REQUEST)
    done = wait_for(emulator_client, task["id"])
    assert list(done) == [
        "id",
        "status",
        "model",
        "type",
        "output",
        "cost",
        "created_at",
        "started_at",
        "completed_at",
    ]
    assert done["status"] == "completed"
    assert done["cost"] == "$0.0100"
    assert set(done["output"]) == {"url", "urls"}
    assert done["output"]["url"].endswith(f"/images/{task['id']}/0.png")
    for key in ("created_at", "started_at", "completed_at"):
        assert TS_RE.match(done[key])
    assert done["created_at"] <= done["started_at"] <= done["completed_at"]


def test_docs_example_9_list_tasks(emulator_client: httpx.Client) -> None:
    first = create(emulator_client)
    second = create(emulator_client, prompt="second")
    response = emulator_client.get("/v1/tasks?page=1&per_page=20")
    assert response.status_code == 200
    data = response.json()["data"]
    assert [t["id"] for t in data["items"]] == [second["id"], first["id"]]
    assert data["pagination"] == {"page": 1, "per_page": 20, "total": 2, "total_pages": 1}
    single = emulator_client.get(f"/v1/tasks/{second['id']}").json()["data"]
    assert set(data["items"][0]) == set(single)


def test_docs_example_10_usage_summary(emulator_client: httpx.Client) -> None:
    assert emulator_client.get("/v1/usage/summary").json() == {"data": [], "error": None}
    task = create(emulator_client, **DOCS_G3_REQUEST)
    wait_for(emulator_client, task["id"])
    summary = emulator_client.get("/v1/usage/summary").json()
    assert summary == {
        "data": [
            {"model": "nanobanana", "total_units": 1, "total_cost": "$0.0100", "request_count": 1}
        ],
        "error": None,
    }


def test_usage_records_and_summary_per_model(emulator_client: httpx.Client) -> None:
    a = create(emulator_client)
    b = create(emulator_client, model="nanobanana-pro", num_outputs=2, resolution="4k")
    for task in (a, b):
        wait_for(emulator_client, task["id"])
    usage = emulator_client.get("/v1/usage").json()["data"]
    assert usage["pagination"]["total"] == 2
    records = {r["task_id"]: r for r in usage["items"]}
    assert set(records[b["id"]]) == {"task_id", "model", "type", "units", "cost", "created_at"}
    assert records[b["id"]]["units"] == 2
    assert records[b["id"]]["cost"] == "$0.0640"
    assert records[a["id"]]["cost"] == "$0.0100"
    summary = emulator_client.get("/v1/usage/summary").json()["data"]
    assert summary == [
        {"model": "nanobanana", "total_units": 1, "total_cost": "$0.0100", "request_count": 1},
        {"model": "nanobanana-pro", "total_units": 2, "total_cost": "$0.0640", "request_count": 1},
    ]


# --------------------------------------------------------------------------- output files


@pytest.mark.parametrize(
    ("model", "aspect_ratio", "resolution", "size"),
    [
        ("nanobanana-pro", "16:9", "4k", (5504, 3072)),
        ("nanobanana-pro", "9:16", "2k", (1536, 2752)),
        ("nanobanana-pro", None, None, (1376, 768)),  # defaults: 16:9, 1k (17.2)
        ("nanobanana", "9:16", "4k", (768, 1344)),  # resolution ignored (17.3)
        ("nanobanana", None, None, (1344, 768)),
    ],
)
def test_output_png_sizes(
    emulator: EmulatorProcess,
    emulator_client: httpx.Client,
    model: str,
    aspect_ratio: str | None,
    resolution: str | None,
    size: tuple[int, int],
) -> None:
    emulator.set_config(manual=True)
    fields = {k: v for k, v in (("aspect_ratio", aspect_ratio), ("resolution", resolution)) if v}
    task = create(emulator_client, model=model, **fields)
    emulator.complete(task["id"])
    url = emulator_client.get(f"/v1/tasks/{task['id']}").json()["data"]["output"]["url"]
    started = time.monotonic()
    response = httpx.get(url, trust_env=False)  # no Authorization: a public CDN
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_size(response.content) == size
    assert elapsed < 5.0
    # Cached: the second download returns identical bytes.
    assert httpx.get(url, trust_env=False).content == response.content


def test_missing_output_files_are_404(
    emulator: EmulatorProcess, emulator_client: httpx.Client
) -> None:
    emulator.set_config(manual=True)
    task = create(emulator_client)
    base = f"{emulator.base_url}/images/{task['id']}"
    assert_error(httpx.get(f"{base}/0.png", trust_env=False), 404, "NOT_FOUND")  # not done yet
    emulator.complete(task["id"])
    assert httpx.get(f"{base}/0.png", trust_env=False).status_code == 200
    assert_error(httpx.get(f"{base}/1.png", trust_env=False), 404, "NOT_FOUND")
    assert_error(httpx.get(f"{base}/0.jpg", trust_env=False), 404, "NOT_FOUND")


def test_public_base_url_is_configurable(
    emulator: EmulatorProcess, emulator_client: httpx.Client
) -> None:
    emulator.set_config(public_base_url="https://file.eggapi.test/", manual=True)
    task = create(emulator_client)
    done = emulator.complete(task["id"])
    assert done["output"]["urls"] == [f"https://file.eggapi.test/images/{task['id']}/0.png"]


def test_edit_request_is_image_edit(emulator_client: httpx.Client) -> None:
    # Edits fetch their inputs (17.21): edit a real image, one of the emulator's own outputs.
    source = wait_for(emulator_client, create(emulator_client)["id"])
    task = create(emulator_client, image_urls=[source["output"]["url"]], prompt="make it red")
    assert task["type"] == "image_edit"
    done = wait_for(emulator_client, task["id"])
    assert done["type"] == "image_edit"
    assert done["status"] == "completed", done
    assert create(emulator_client, image_urls=[])["type"] == "image_generate"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("body", "lines"),
    [
        ({}, [go_line("Model", "required"), go_line("Prompt", "required")]),
        ({"model": "veo3.1", "prompt": "x"}, [go_line("Model", "oneof")]),
        ({"model": "nanobanana", "prompt": ""}, [go_line("Prompt", "required")]),
        ({"model": "nanobanana", "prompt": "é" * 2001}, [go_line("Prompt", "max")]),
        (
            {"model": "nanobanana", "prompt": "x", "negative_prompt": "n" * 1001},
            [go_line("NegativePrompt", "max")],
        ),
        (
            {"model": "nanobanana", "prompt": "x", "aspect_ratio": "1:1"},
            [go_line("AspectRatio", "oneof")],
        ),
        ({"model": "nanobanana", "prompt": "x", "num_outputs": 5}, [go_line("NumOutputs", "max")]),
        ({"model": "nanobanana", "prompt": "x", "num_outputs": 0}, [go_line("NumOutputs", "min")]),
        (
            {"model": "nanobanana", "prompt": "x", "resolution": "4K"},
            [go_line("Resolution", "oneof")],
        ),
        (
            {"model": "nanobanana", "prompt": "x", "image_urls": ["https://e.com/a.png"] * 10},
            [go_line("ImageURLs", "max")],
        ),
        (
            {
                "model": "nanobanana",
                "prompt": "x",
                "image_urls": ["https://e.com/a", "nope", "ftp://e.com/b"],
            },
            [go_line("ImageURLs[1]", "url"), go_line("ImageURLs[2]", "url")],
        ),
        (
            {"model": "nanobanana", "prompt": "x", "webhook_url": "not a url"},
            [go_line("WebhookURL", "url")],
        ),
        (
            {"model": "nanobanana", "prompt": "x", "webhook_url": "https://e.com/" + "a" * 2040},
            [go_line("WebhookURL", "max")],
        ),
        ({"model": "nanobanana", "prompt": "x", "duration": 61}, [go_line("Duration", "max")]),
        ({"model": "nanobanana", "prompt": "x", "duration": 0}, [go_line("Duration", "min")]),
        (
            {"model": "", "prompt": "x" * 2001, "num_outputs": 9, "resolution": "8k"},
            [
                go_line("Model", "required"),
                go_line("Prompt", "max"),
                go_line("NumOutputs", "max"),
                go_line("Resolution", "oneof"),
            ],
        ),
    ],
)
def test_validation_errors_go_style(
    emulator: EmulatorProcess,
    emulator_client: httpx.Client,
    emulator_api_key: str,
    body: dict[str, Any],
    lines: list[str],
) -> None:
    response = emulator_client.post("/v1/generate", json=body)
    assert_error(response, 400, "VALIDATION_ERROR", "\n".join(lines))
    assert emulator.created_tasks(emulator_api_key) == []


def test_validation_boundaries_are_accepted(emulator_client: httpx.Client) -> None:
    task = create(
        emulator_client,
        prompt="é" * 2000,  # counted in runes, not bytes
        negative_prompt="n" * 1000,
        num_outputs=4,
        aspect_ratio="9:16",
        resolution="4k",
        image_urls=["https://e.com/a.png"] * 9,
        webhook_url="https://e.com/" + "a" * 2034,
        duration=60,
        unknown_field={"ignored": True},  # Go's decoder ignores unknown keys
    )
    assert task["type"] == "image_edit"


def test_model_allow_list_switch(emulator: EmulatorProcess, emulator_client: httpx.Client) -> None:
    assert create(emulator_client, model="nanobanana-pro")["model"] == "nanobanana-pro"
    emulator.set_config(allowed_models=["nanobanana"])  # the G3 validator (17.1)
    response = emulator_client.post("/v1/generate", json={"model": "nanobanana-pro", "prompt": "x"})
    assert_error(response, 400, "VALIDATION_ERROR", go_line("Model", "oneof"))


@pytest.mark.parametrize(
    ("content", "message_part"),
    [
        (b"{not json", "Invalid request body"),
        (b"", "EOF"),
        (b'["model"]', "cannot unmarshal array into Go value of type GenerateRequest"),
        (
            b'{"model": "nanobanana", "prompt": "x", "num_outputs": "2"}',
            "cannot unmarshal string into Go struct field GenerateRequest.num_outputs of type int",
        ),
        (
            b'{"model": "nanobanana", "prompt": 5}',
            "cannot unmarshal number into Go struct field GenerateRequest.prompt of type string",
        ),
        (b'{"model": "nanobanana", "prompt": "x", "num_outputs": 1.5}', "number 1.5"),
    ],
)
def test_malformed_bodies_are_bad_request(
    emulator_client: httpx.Client, content: bytes, message_part: str
) -> None:
    response = emulator_client.post(
        "/v1/generate", content=content, headers={"Content-Type": "application/json"}
    )
    error = assert_error(response, 400, "BAD_REQUEST")
    assert message_part in error["message"]


# --------------------------------------------------------------------------- auth, routing


def test_auth_errors(emulator: EmulatorProcess) -> None:
    with httpx.Client(base_url=emulator.base_url, trust_env=False) as client:
        for path in ("/v1/tasks", "/v1/usage", "/v1/usage/summary", "/v1/tasks/gen_x"):
            assert_error(client.get(path), 401, "UNAUTHORIZED", "Missing Authorization header")
        assert_error(
            client.post("/v1/generate", json=DOCS_G3_REQUEST, headers={"Authorization": "Token x"}),
            401,
            "UNAUTHORIZED",
            "Invalid Authorization format, expected 'Bearer <token>'",
        )
        assert_error(
            client.get("/v1/tasks", headers={"Authorization": "Bearer"}),
            401,
            "UNAUTHORIZED",
            "Invalid Authorization format, expected 'Bearer <token>'",
        )
        assert_error(
            client.get("/v1/usage", headers={"Authorization": "Bearer egg_sk_wrong"}),
            401,
            "UNAUTHORIZED",
            "Invalid API key",
        )
    assert emulator.audit()["task_count"] == 0


def test_suspended_key_is_forbidden(
    emulator: EmulatorProcess, emulator_client: httpx.Client, emulator_api_key: str
) -> None:
    emulator.set_config(api_keys={emulator_api_key: {"suspended": True}})
    assert_error(emulator_client.post("/v1/generate", json=DOCS_G3_REQUEST), 403, "FORBIDDEN")
    assert_error(emulator_client.get("/v1/tasks"), 403, "FORBIDDEN")


def test_unknown_routes_methods_and_cancel_are_enveloped(
    emulator: EmulatorProcess, emulator_client: httpx.Client
) -> None:
    task = create(emulator_client)
    assert_error(emulator_client.get("/v1/models"), 404, "NOT_FOUND")
    assert_error(emulator_client.get("/nothing/here"), 404, "NOT_FOUND")
    assert_error(emulator_client.get("/v1/tasks/"), 404, "NOT_FOUND")
    assert_error(emulator_client.get("/v1/generate"), 405, "METHOD_NOT_ALLOWED")
    assert_error(emulator_client.put(f"/v1/tasks/{task['id']}"), 405, "METHOD_NOT_ALLOWED")
    # No cancellation (17.10): DELETE and any .../cancel path are 404.
    assert_error(emulator_client.delete(f"/v1/tasks/{task['id']}"), 404, "NOT_FOUND")
    assert_error(emulator_client.post(f"/v1/tasks/{task['id']}/cancel"), 404, "NOT_FOUND")
    assert_error(emulator_client.post("/v1/tasks/cancel"), 404, "NOT_FOUND")
    assert_error(emulator_client.get("/v1/tasks/gen_doesnotexist"), 404, "NOT_FOUND")
    assert emulator_client.get(f"/v1/tasks/{task['id']}").status_code == 200  # still there


def test_tasks_are_scoped_per_key(
    emulator: EmulatorProcess, emulator_client: httpx.Client, emulator_other_api_key: str
) -> None:
    mine = create(emulator_client)
    wait_for(emulator_client, mine["id"])
    with httpx.Client(
        base_url=emulator.base_url,
        headers={"Authorization": f"Bearer {emulator_other_api_key}"},
        trust_env=False,
    ) as other:
        assert_error(other.get(f"/v1/tasks/{mine['id']}"), 404, "NOT_FOUND")
        assert other.get("/v1/tasks").json()["data"]["items"] == []
        assert other.get("/v1/usage").json()["data"]["items"] == []
        assert other.get("/v1/usage/summary").json()["data"] == []
        theirs = create(other)
    ids = [t["id"] for t in emulator_client.get("/v1/tasks").json()["data"]["items"]]
    assert ids == [mine["id"]]
    assert theirs["id"] != mine["id"]


# --------------------------------------------------------------------------- pagination


def test_pagination_order_caps_and_defaults(
    emulator: EmulatorProcess, emulator_client: httpx.Client
) -> None:
    emulator.set_config(manual=True)
    created = [create(emulator_client, prompt=f"p{i}")["id"] for i in range(5)]
    newest_first = list(reversed(created))

    def page(query: str) -> dict[str, Any]:
        response = emulator_client.get(f"/v1/tasks{query}")
        assert response.status_code == 200
        data: dict[str, Any] = response.json()["data"]
        return data

    p1 = page("?page=1&per_page=2")
    assert [t["id"] for t in p1["items"]] == newest_first[:2]
    assert p1["pagination"] == {"page": 1, "per_page": 2, "total": 5, "total_pages": 3}
    assert [t["id"] for t in page("?page=3&per_page=2")["items"]] == newest_first[4:]
    assert page("?page=4&per_page=2")["items"] == []
    assert page("?per_page=500")["pagination"]["per_page"] == 100
    defaults = page("?page=0&per_page=-3&status=completed&sort=asc")
    assert defaults["pagination"] == {"page": 1, "per_page": 20, "total": 5, "total_pages": 1}
    assert [t["id"] for t in defaults["items"]] == newest_first
    assert page("?page=abc")["pagination"]["page"] == 1


# --------------------------------------------------------------------------- lifecycle, money


def test_manual_mode_lifecycle(emulator: EmulatorProcess, emulator_client: httpx.Client) -> None:
    emulator.set_config(manual=True)
    task = create(emulator_client)
    # Well past the automatic timings (0.25 s), a manual task is still pending.
    time.sleep(0.4)
    pending = emulator_client.get(f"/v1/tasks/{task['id']}").json()["data"]
    assert pending["status"] == "pending"
    assert "started_at" not in pending
    processing = emulator.advance(task["id"])
    assert processing["status"] == "processing"
    seen = emulator_client.get(f"/v1/tasks/{task['id']}").json()["data"]
    assert seen["status"] == "processing"
    assert TS_RE.match(seen["started_at"])
    assert "completed_at" not in seen and "output" not in seen
    done = emulator.advance(task["id"])
    assert done["status"] == "completed"
    assert emulator_client.get(f"/v1/tasks/{task['id']}").json()["data"]["cost"] == "$0.0100"
    with pytest.raises(RuntimeError, match="409"):
        emulator.advance(task["id"])
    other = create(emulator_client)
    failed = emulator.fail(other["id"], "Upstream provider error: scripted")
    assert failed["status"] == "failed"
    assert failed["error"] == "Upstream provider error: scripted"
    empty = create(emulator_client, num_outputs=3)
    assert emulator.complete(empty["id"], num_images=2)["cost"] == "$0.0200"


def test_scheduler_finishes_tasks_without_polling(
    emulator: EmulatorProcess, emulator_client: httpx.Client, emulator_api_key: str
) -> None:
    task = create(emulator_client)
    # The admin audit never advances tasks itself: only the background scheduler does.
    poll_until(lambda: emulator.created_tasks(emulator_api_key)[0]["status"] == "completed")
    record = emulator.created_tasks(emulator_api_key)[0]
    assert record["task_id"] == task["id"]
    assert record["cost"] == "$0.0100"


def test_terminal_hook_fires_from_scheduler_in_process() -> None:
    key = "egg_sk_inprocess_0001"
    app = create_app(EmulatorConfig(api_keys={key: ApiKeyConfig()}, processing_seconds=0.05))
    seen: list[tuple[str, str]] = []
    app.state.emulator.terminal_listeners.append(lambda task: seen.append((task.id, task.status)))

    async def scenario() -> str:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://emulator.test") as client,
        ):
            response = await client.post(
                "/v1/generate",
                json={"model": "nanobanana", "prompt": "hook"},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert response.status_code == 202
            deadline = time.monotonic() + 10.0
            while not seen:  # nobody polls the task: the scheduler must finish it
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            task_id: str = response.json()["data"]["id"]
            return task_id

    task_id = asyncio.run(scenario())
    assert seen == [(task_id, "completed")]


def test_emulator_is_independent_of_prefect_and_the_client() -> None:
    """The emulator tests the client, so it must not share its code (nor import Prefect)."""
    import ast

    import prefect_eggapi.testing.emulator as package

    allowed = {"fastapi", "starlette", "uvicorn", "PIL", "pydantic", "httpx", "prefect_eggapi"}
    for path in Path(package.__file__).parent.glob("*.py"):
        if path.name == "__main__.py":
            continue  # ``python -m`` entry: two lines that call the cli (as in test_layers.py)
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, (path.name, name)
                if top == "prefect_eggapi":
                    # Its own package, and the testing kit's process helper (stdlib only).
                    assert name.startswith("prefect_eggapi.testing.emulator") or name == (
                        "prefect_eggapi.testing._process"
                    ), (path.name, name)
    helper = Path(package.__file__).parent.parent / "_process.py"
    for node in ast.walk(ast.parse(helper.read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            )
            for name in modules:
                assert name and name.split(".")[0] in sys.stdlib_module_names | {"__future__"}
    code = "import sys, prefect_eggapi.cli.emulator; print('prefect' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"


def test_balance_checked_at_create_and_charged_on_completion(
    emulator: EmulatorProcess, emulator_client: httpx.Client, emulator_api_key: str
) -> None:
    emulator.set_config(api_keys={emulator_api_key: {"balance": "0.015"}})
    error = assert_error(
        emulator_client.post("/v1/generate", json={"model": "nanobanana-pro", "prompt": "x"}),
        403,
        "INSUFFICIENT_BALANCE",
    )
    assert error["message"]
    task = create(emulator_client)  # $0.01 fits
    wait_for(emulator_client, task["id"])
    assert emulator.balance(emulator_api_key) == Decimal("0.005")
    assert_error(
        emulator_client.post("/v1/generate", json=DOCS_G3_REQUEST), 403, "INSUFFICIENT_BALANCE"
    )
    assert [t["task_id"] for t in emulator.created_tasks(emulator_api_key)] == [task["id"]]


def test_content_moderation_failure(
    emulator: EmulatorProcess, emulator_client: httpx.Client, emulator_api_key: str
) -> None:
    task = create(emulator_client, prompt="A FORBIDDEN castle")
    failed = wait_for(emulator_client, task["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == "Content moderation: prompt contains prohibited content"
    assert failed["cost"] == "$0.00"
    assert "output" not in failed
    assert TS_RE.match(failed["started_at"]) and TS_RE.match(failed["completed_at"])
    assert emulator.balance(emulator_api_key) == Decimal("1000")
    assert emulator_client.get("/v1/usage").json()["data"]["items"] == []


def test_rate_limit_per_key(
    emulator: EmulatorProcess, emulator_client: httpx.Client, emulator_other_api_key: str
) -> None:
    emulator.set_config(rate_limit_per_second=1, rate_limit_burst=5)
    statuses = [emulator_client.get("/v1/tasks").status_code for _ in range(12)]
    assert statuses[:5] == [200] * 5  # the burst
    assert statuses.count(429) >= 5
    limited = emulator_client.get("/v1/tasks")
    assert_error(limited, 429, "RATE_LIMITED")
    assert "retry-after" not in limited.headers  # 17.18
    statuses.append(limited.status_code)
    other = httpx.get(
        f"{emulator.base_url}/v1/tasks",
        headers={"Authorization": f"Bearer {emulator_other_api_key}"},
        trust_env=False,
    )
    assert other.status_code == 200  # the limit is per key
    assert emulator.audit()["rate_limited"] == statuses.count(429)


# --------------------------------------------------------------------------- faults


def test_fault_error_before_create(
    emulator: EmulatorProcess, emulator_client: httpx.Client, emulator_api_key: str
) -> None:
    emulator.add_fault("error_before_create", status=503)
    response = emulator_client.post("/v1/generate", json=DOCS_G3_REQUEST)
    assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert emulator.created_tasks(emulator_api_key) == []
    create(emulator_client)  # times=1: the next one passes
    assert len(emulator.created_tasks(emulator_api_key)) == 1


def test_fault_error_after_create_still_creates_and_bills(
    emulator: EmulatorProcess, emulator_client: httpx.Client, emulator_api_key: str
) -> None:
    emulator.add_fault("error_after_create", status=500)
    assert_error(emulator_client.post("/v1/generate", json=DOCS_G3_REQUEST), 500, "INTERNAL_ERROR")
    items = emulator_client.get("/v1/tasks").json()["data"]["items"]
    assert len(items) == 1
    assert wait_for(emulator_client, items[0]["id"])["cost"] == "$0.0100"
    records = emulator.created_tasks(emulator_api_key)
    assert [r["task_id"] for r in records] == [items[0]["id"]]
    assert records[0]["faults"] == ["error_after_create"]
    assert emulator.balance(emulator_api_key) == Decimal("999.99")


def test_fault_drop_after_create_breaks_connection(
    emulator: EmulatorProcess, emulator_client: httpx.Client, emulator_api_key: str
) -> None:
    emulator.add_fault("drop_after_create")
    with pytest.raises(httpx.TransportError):
        emulator_client.post("/v1/generate", json=DOCS_G3_REQUEST)
    assert len(emulator.created_tasks(emulator_api_key)) == 1
    assert emulator_client.get("/v1/tasks").json()["data"]["pagination"]["total"] == 1


def test_fault_timeout_after_create(
    emulator: EmulatorProcess, emulator_client: httpx.Client, emulator_api_key: str
) -> None:
    emulator.add_fault("timeout_after_create", delay=1.0)
    with pytest.raises(httpx.ReadTimeout):
        emulator_client.post("/v1/generate", json=DOCS_G3_REQUEST, timeout=0.3)
    assert len(emulator.created_tasks(emulator_api_key)) == 1
    # A patient client gets a valid 202 late.
    emulator.add_fault("timeout_after_create", delay=0.3)
    started = time.monotonic()
    response = emulator_client.post("/v1/generate", json=DOCS_G3_REQUEST)
    assert response.status_code == 202
    assert time.monotonic() - started >= 0.3


def test_fault_http_error_with_skip_on_get_task(
    emulator: EmulatorProcess, emulator_client: httpx.Client
) -> None:
    task = create(emulator_client)
    emulator.add_fault("http_error", endpoint="get_task", status=502, skip=1, times=1)
    path = f"/v1/tasks/{task['id']}"
    assert emulator_client.get(path).status_code == 200
    assert_error(emulator_client.get(path), 502, "UPSTREAM_ERROR")
    assert emulator_client.get(path).status_code == 200
    assert emulator_client.get("/v1/tasks").status_code == 200  # other endpoints unaffected
    (rule,) = emulator.faults()
    assert (rule["seen"], rule["fired"], rule["exhausted"]) == (2, 1, True)


def test_fault_http_error_on_usage_and_custom_message(
    emulator: EmulatorProcess, emulator_client: httpx.Client
) -> None:
    emulator.add_fault("http_error", endpoint="usage", status=500, message="db down", times=2)
    assert_error(emulator_client.get("/v1/usage"), 500, "INTERNAL_ERROR", "db down")
    assert_error(emulator_client.get("/v1/usage/summary"), 500, "INTERNAL_ERROR", "db down")
    assert emulator_client.get("/v1/usage").status_code == 200


def test_fault_rate_limit_burst(emulator: EmulatorProcess, emulator_client: httpx.Client) -> None:
    emulator.add_fault("rate_limit_burst", times=3)
    statuses = [emulator_client.get("/v1/tasks").status_code for _ in range(4)]
    assert statuses == [429, 429, 429, 200]
    assert emulator.audit()["rate_limited"] == 3


def test_fault_upstream_failure(emulator: EmulatorProcess, emulator_client: httpx.Client) -> None:
    emulator.add_fault("upstream_failure", times=1)
    failed = wait_for(emulator_client, create(emulator_client)["id"])
    assert failed["status"] == "failed"
    assert failed["error"].startswith("Upstream provider error:")
    assert failed["cost"] == "$0.00"
    assert wait_for(emulator_client, create(emulator_client)["id"])["status"] == "completed"


def test_fault_empty_output(emulator: EmulatorProcess, emulator_client: httpx.Client) -> None:
    emulator.add_fault("empty_output")
    done = wait_for(emulator_client, create(emulator_client, num_outputs=2)["id"])
    assert done["status"] == "completed"
    assert done["output"]["urls"] == []
    assert done["cost"] == "$0.0000"


def test_fault_slow_download(emulator: EmulatorProcess, emulator_client: httpx.Client) -> None:
    emulator.set_config(manual=True)
    task = create(emulator_client)
    url = emulator.complete(task["id"])["output"]["url"]
    full = httpx.get(url, trust_env=False).content
    rate = max(1, len(full) * 3)  # about 1/3 s for the whole file
    emulator.add_fault("slow_download", bytes_per_second=rate)
    started = time.monotonic()
    slow = httpx.get(url, trust_env=False)
    elapsed = time.monotonic() - started
    assert slow.content == full
    assert int(slow.headers["content-length"]) == len(full)
    assert elapsed >= 0.25


def test_fault_truncated_download(emulator: EmulatorProcess, emulator_client: httpx.Client) -> None:
    emulator.set_config(manual=True)
    task = create(emulator_client)
    url = emulator.complete(task["id"])["output"]["url"]
    emulator.add_fault("truncated_download", fraction=0.25)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url, trust_env=False)
    with httpx.stream("GET", url, trust_env=False) as response:  # the next one is whole
        body = response.read()
        assert len(body) == int(response.headers["content-length"])


# --------------------------------------------------------------------------- audit, admin


def test_audit_counts_created_tasks_and_requests(
    emulator: EmulatorProcess,
    emulator_client: httpx.Client,
    emulator_api_key: str,
    emulator_other_api_key: str,
) -> None:
    ids = [create(emulator_client, prompt=f"dup {i}")["id"] for i in range(3)]
    emulator_client.post("/v1/generate", json={"model": "nope", "prompt": "x"})  # 400: no task
    for task_id in ids:
        wait_for(emulator_client, task_id)
    audit = emulator.audit()
    assert audit["task_count"] == 3
    records = emulator.created_tasks(emulator_api_key)
    assert [r["task_id"] for r in records] == ids
    assert [r["prompt"] for r in records] == ["dup 0", "dup 1", "dup 2"]
    assert {r["status"] for r in records} == {"completed"}
    assert {r["key"] for r in records} == {"test-key-1"}
    assert emulator_api_key not in str(audit)  # keys never appear in clear
    assert emulator.request_count(emulator_api_key, "generate") == 4
    assert emulator.request_count(emulator_api_key, "get_task") >= 3
    assert emulator.created_tasks(emulator_other_api_key) == []


def test_reset_restores_startup_config(
    emulator: EmulatorProcess, emulator_client: httpx.Client
) -> None:
    emulator.set_config(manual=True, pending_seconds=9)
    create(emulator_client)
    emulator.add_fault("http_error", times=None)
    assert_error(emulator_client.get("/v1/tasks"), 500, "INTERNAL_ERROR")
    emulator.reset()
    config = emulator.get_config()
    assert config["manual"] is False and config["pending_seconds"] == 0.05
    assert emulator.faults() == []
    assert emulator.audit()["task_count"] == 0
    assert emulator_client.get("/v1/tasks").json()["data"]["items"] == []


def test_seeded_ids_are_deterministic(emulator: EmulatorProcess, emulator_api_key: str) -> None:
    config = EmulatorConfig(api_keys={emulator_api_key: ApiKeyConfig()}, seed=42, manual=True)
    runs = []
    for _ in range(2):
        emulator.reset(config)
        with httpx.Client(
            base_url=emulator.base_url,
            headers={"Authorization": f"Bearer {emulator_api_key}"},
            trust_env=False,
        ) as client:
            runs.append([create(client)["id"] for _ in range(3)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 3


def test_admin_rejects_bad_fault_rule(emulator: EmulatorProcess) -> None:
    response = httpx.post(
        f"{emulator.base_url}/_emulator/faults", json={"kind": "explode"}, trust_env=False
    )
    assert_error(response, 400, "BAD_REQUEST")


# --------------------------------------------------------------------------- process, CLI


def test_process_binds_loopback_and_stops_cleanly() -> None:
    with EmulatorProcess() as process:
        assert process.base_url.startswith("http://127.0.0.1:")
        assert process.health()["pid"] == process.pid
        pid = process.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ValueError, match="loopback"):
        EmulatorProcess(host="0.0.0.0")


def test_cli_parser_builds_config() -> None:
    parser = argparse.ArgumentParser(prog="prefect-eggapi")
    configure_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "emulator",
            "--api-key",
            "egg_sk_cli_key_123456",
            "--balance",
            "5",
            "--manual",
            "--rate-limit",
            "0",
            "--fault",
            '{"kind": "upstream_failure", "times": 2}',
        ]
    )
    config = build_config(args)
    assert list(config.api_keys) == ["egg_sk_cli_key_123456"]
    assert config.api_keys["egg_sk_cli_key_123456"].balance == Decimal("5")
    assert config.manual is True
    assert config.rate_limit_per_second == 0
    assert config.faults[0].kind == "upstream_failure"
    assert callable(args.func)
    assert cli_main(["--host", "0.0.0.0", "--port", "0"]) == 2  # never binds 0.0.0.0


def test_python_m_emulator_serves_and_prints_env() -> None:
    key = "egg_sk_cli_secret_9876"
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect_eggapi.testing.emulator", "--port", "0", "--api-key", key],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", first)
        assert match, first
        base_url = match.group(1)
        lines: list[str] = []
        while not any("Ctrl+C" in line for line in lines):
            lines.append(process.stdout.readline())
        text = first + "".join(lines)
        assert f"EGGAPI_BASE_URL={base_url}" in text
        assert key not in text  # masked
        assert "egg_sk_…9876" in text
        poll_until(lambda: _healthy(base_url))
        response = httpx.get(
            f"{base_url}/v1/tasks", headers={"Authorization": f"Bearer {key}"}, trust_env=False
        )
        assert response.status_code == 200
    finally:
        process.terminate()
        process.wait(10)


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/_emulator/health", trust_env=False).status_code == 200
    except httpx.TransportError:
        return False


def test_cli_webhook_options_read_the_secret_from_the_environment(monkeypatch):
    import argparse

    from prefect_eggapi.cli.emulator import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("HOOK_SECRET", "whsec_from_env_123")
    args = parser.parse_args(
        [
            "--webhook-secret-env",
            "HOOK_SECRET",
            "--webhook-retries",
            "3",
            "--webhook-allow-host",
            "127.0.0.1",
            "--webhook-allow-host",
            "localhost",
        ]
    )
    config = build_config(args)
    assert config.webhook_secret == "whsec_from_env_123"
    assert config.webhook_retries == 3
    assert config.webhook_allowed_hosts == ["127.0.0.1", "localhost"]
    monkeypatch.delenv("HOOK_SECRET")
    with pytest.raises(ValueError, match="HOOK_SECRET"):
        build_config(parser.parse_args(["--webhook-secret-env", "HOOK_SECRET"]))


def test_a_request_in_flight_across_a_reset_is_not_audited_after_it(emulator, emulator_api_key):
    import threading

    emulator.add_fault("timeout_after_create", delay=1.5)
    done = threading.Event()

    def slow_submit() -> None:
        httpx.post(
            f"{emulator.base_url}/v1/generate",
            json={"model": "nanobanana", "prompt": "held back"},
            headers={"Authorization": f"Bearer {emulator_api_key}"},
            timeout=10,
        )
        done.set()

    thread = threading.Thread(target=slow_submit)
    thread.start()
    deadline = time.monotonic() + 5
    while not emulator.created_tasks() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert emulator.created_tasks(), "the held-back submit never reached the emulator"
    emulator.reset()
    assert done.wait(10)  # its response went out after the reset...
    thread.join(5)
    assert emulator.audit()["requests"] == {}  # ...but it counts in the audit it began in
