"""The gallery as a person sees it: a real `prefect server start`, the pipeline run against it,
the S3 server STOPPED, then the flow run's gallery artifact opened in headless Chromium.

Every embedded thumbnail must have loaded (``naturalWidth > 0``) although no image URL can be
fetched any more, and the cost table must fit a 1366 px wide window. Skipped, with the reason,
only where no Chromium is installed (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from browser import IMAGES_JS, Browser, chromium_path
from prefect_eggapi.testing.local_s3 import LocalS3
from prefect_procs import api_read, prefect_server
from procs import gone

CHROMIUM = chromium_path()

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium on this machine (Debian: apt-get install chromium); the browser "
        "test of the gallery needs one",
    ),
]

BUCKET = "eggapi-ui-test"
EDITS = ["turn the scene to night with warm window lights"]
RUN_SCRIPT = """
import asyncio, json, sys
from prefect_eggapi.flows import image_pipeline
state = asyncio.run(image_pipeline(count=2, seed=4, edit_instructions=json.loads(sys.argv[1]),
                                   concurrency=2, wait_timeout=60, return_state=True))
print("FLOW_RUN", state.state_details.flow_run_id, state.type.value)
"""


#: Elements that scroll sideways (their content is wider than their box), and the page width.
OVERFLOW_JS = (
    "(() => { const over = []; document.querySelectorAll('*').forEach(el => { "
    "if (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX !== 'visible') "
    "over.push([el.tagName, String(el.className).slice(0, 60), el.scrollWidth, "
    "el.clientWidth]); }); return JSON.stringify({over: over, "
    "page: document.documentElement.scrollWidth, window: window.innerWidth}); })()"
)


def _run_pipeline(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", RUN_SCRIPT, json.dumps(EDITS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("FLOW_RUN "))
    _, flow_run_id, state = line.split()
    assert state == "COMPLETED", out[-4000:]
    return flow_run_id


def _artifacts(api: str, flow_run_id: str) -> list[dict[str, Any]]:
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    found = api_read("POST", f"{api}/artifacts/filter", json=body)
    assert isinstance(found, list)
    return found


def _loaded_images(page: Any, expected: int) -> list[list[Any]]:
    """Poll until the page shows ``expected`` embedded images and every image has settled."""
    script = (
        f"(() => {{ const v = JSON.parse({IMAGES_JS}); "
        "const data = v.filter(x => x[0].startsWith('data:')); "
        f"return data.length >= {expected} && v.every(x => x[1]) ? v : null; }})()"
    )
    images: list[list[Any]] = page.wait_for(script, timeout=60)
    return images


def test_gallery_thumbnails_render_with_s3_stopped(
    tmp_path: Path, emulator: Any, emulator_api_key: str
) -> None:
    assert CHROMIUM is not None
    s3 = LocalS3()
    s3_pid = s3.pid
    try:
        s3.create_bucket(BUCKET)
        home = tmp_path / "prefect-home"
        home.mkdir()
        with prefect_server(home) as env:
            api = env["PREFECT_API_URL"]
            env.update(s3.env())
            env.update(
                EGGAPI_API_KEY=emulator_api_key,
                EGGAPI_BASE_URL=emulator.base_url,
                EGGAPI_LEDGER_DIR=str(tmp_path / "ledger"),
                EGGAPI_S3_BUCKET=BUCKET,
                EGGAPI_S3_PREFIX="ui",
            )
            flow_run_id = _run_pipeline(env)
            run = api_read("GET", f"{api}/flow_runs/{flow_run_id}")
            assert isinstance(run, dict)
            assert run["name"] == "pipeline · 2 prompts × 2 rounds · nanobanana-pro 1k"

            s3.stop()
            assert gone(s3_pid), "the S3 server must be stopped before the page is opened"

            artifacts = _artifacts(api, flow_run_id)
            by_key = {a["key"]: a for a in artifacts if a.get("key")}
            [gallery_key] = [k for k in by_key if k.endswith("-gallery")]
            assert gallery_key.startswith("eggapi-image-pipeline-params-")
            [table_key] = [k for k in by_key if k.endswith("-cost")]
            # One progress bar for the run, not one per task; no per-image link cards.
            kinds = sorted(a["type"] for a in artifacts)
            assert kinds.count("progress") == 1 and "image" not in kinds, kinds

            ui = api.removesuffix("/api")
            with Browser(CHROMIUM) as browser, browser.page() as page:
                page.goto(f"{ui}/artifacts/artifact/{by_key[gallery_key]['id']}")
                images = _loaded_images(page, expected=4)
                page.screenshot(tmp_path / "gallery.png")
                embedded = [i for i in images if i[0].startswith("data:image/webp")]
                assert len(embedded) == 4, images
                assert all(width > 0 for _, _, width in embedded), images
                text = page.evaluate("document.body.innerText")
                assert "this run paid $0.0640" in text.replace("*", ""), text[:2000]
                assert f"s3://{BUCKET}/" in text and "gen_" in text

                page.goto(f"{ui}/artifacts/artifact/{by_key[table_key]['id']}")
                page.wait_for(
                    "document.querySelectorAll('table tr').length >= 6 && "
                    "document.body.innerText.includes('4 tasks, 0 reused')",
                    timeout=60,
                )
                page.screenshot(tmp_path / "cost-table.png")
                layout = json.loads(page.evaluate(OVERFLOW_JS))
                # Nothing scrolls sideways at 1366 px: not the table's box, not the page.
                assert layout["over"] == [], layout
                assert layout["page"] <= layout["window"] == 1366, layout
                text = page.evaluate("document.body.innerText")
                assert "total" in text and "$0.0640" in text, text[:3000]
    finally:
        s3.stop()
    assert gone(s3_pid)
