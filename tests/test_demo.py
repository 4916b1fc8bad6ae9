"""`prefect-eggapi demo`: the README's main job, as a user runs it, in a subprocess; and where it
says the runs can be seen (unit tests, no servers)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from browser import IMAGES_JS, Browser, chromium_path
from lineage import lineage_problems
from prefect_eggapi.testing.demo import ui_hint, ui_url
from procs import gone

BIN = Path(sys.executable).parent


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EGGAPI_", "AWS_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # ephemeral server DB of its own
    # A loaded 2-core machine can take longer than Prefect's default 20 s to start it.
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    return env


@pytest.mark.integration
def test_demo_runs_end_to_end_and_leaves_no_process(tmp_path):
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "prefect-eggapi"), "demo"],
        env=_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.monotonic() - started
    out = done.stdout + done.stderr
    assert done.returncode == 0, out

    # 3 prompts × (generation + 2 edits), nanobanana-pro 1k 16:9: 9 images of 1376x768.
    images = re.findall(r"^\s+(s3://eggapi-demo/eggapi/gen_\w+/0\.png)\s+1376x768", out, re.M)
    assert len(images) == 9, out
    assert "Manifest: s3://eggapi-demo/eggapi/manifests/params-" in out
    assert "Total cost: $0.1440 for 9 billable task(s) (the emulator billed $0.1440 for 9)" in out
    assert "Rerun with the same parameters: 0 new billable task(s), 0 new S3 object(s)" in out
    assert "prefect server start" in out and "PREFECT_API_URL=" in out
    assert "none left." in out
    # The S3 secret key never appears; the emulator key is the public test key.
    assert "AWS_SECRET_ACCESS_KEY" not in out

    pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
    stopped = re.search(r"Stopped every process the demo started \((.*)\)", out)
    assert stopped, out
    pids += [int(p) for p in re.findall(r"(\d+)", stopped.group(1))]
    assert len(set(pids)) >= 3, out  # emulator, SeaweedFS, ephemeral Prefect server
    assert all(gone(p) for p in pids), pids
    print(f"\ndemo wall time {elapsed:.1f} s")
    _check_local_gallery(out, tmp_path)


def _check_local_gallery(out: str, cwd: Path) -> None:
    """The demo leaves ./eggapi-demo/gallery.html with copies of its 9 images, usable with every
    server gone; round k's copy was made from round k-1's bytes (read from the PNGs)."""
    found = re.search(r"^Gallery \(works after the demo stopped S3\): (.+)$", out, re.M)
    assert found, out
    page = Path(found.group(1))
    assert page == (cwd / "eggapi-demo" / "gallery.html").resolve() and page.is_file()
    html = page.read_text()
    sources = re.findall(r'<img src="(images/[^"]+)"', html)
    assert len(sources) == 9 and "s3://eggapi-demo/eggapi/gen_" in html, html[:2000]
    rounds: dict[int, dict[int, bytes]] = {}
    for src in sources:
        item, rnd = map(int, re.findall(r"\d+", src)[:2])
        rounds.setdefault(item, {})[rnd] = (page.parent / src).read_bytes()
    assert sorted(rounds) == [0, 1, 2] and all(sorted(r) == [0, 1, 2] for r in rounds.values())
    assert lineage_problems(rounds) == []
    binary = chromium_path()
    if binary is None:
        return  # the browser half of this check needs Chromium (see test_ui_browser.py)
    with Browser(binary) as browser, browser.page() as tab:
        tab.goto(page.as_uri())
        images = tab.wait_for(
            f"(() => {{ const v = JSON.parse({IMAGES_JS}); "
            "return v.length === 9 && v.every(x => x[1]) ? v : null; })()",
            timeout=60,
        )
    assert all(width > 0 for _, _, width in images), images


@pytest.mark.integration
def test_demo_fails_with_a_clear_message_and_cleans_up(tmp_path):
    # A count the templates cannot satisfy fails validation before any paid call.
    done = subprocess.run(
        [str(BIN / "prefect-eggapi"), "demo", "--count", "5000", "--no-rerun"],
        env=_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "demo failed: InvalidRequestError" in out and "count" in out
    assert "none left." in out
    pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
    assert pids and all(gone(p) for p in pids)


@pytest.mark.parametrize(
    ("api_url", "ui"),
    [
        ("http://127.0.0.1:4200/api", "http://127.0.0.1:4200"),
        ("http://127.0.0.1:4200/api/", "http://127.0.0.1:4200"),
        ("https://prefect.example.com/team/api", "https://prefect.example.com/team"),
    ],
)
def test_the_demo_points_at_the_ui_not_the_api(api_url, ui):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        assert ui_url(api_url) == ui
        (line,) = ui_hint(api_url)
    assert f"open {ui} -> Runs -> eggapi-image-pipeline" in line
    assert "/api" not in line


def test_the_demo_uses_prefect_ui_url_when_set():
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    updates = {PREFECT_API_URL: "http://10.0.0.5:4200/api", PREFECT_UI_URL: "https://ui.example/"}
    with temporary_settings(updates=updates):
        assert ui_url("http://10.0.0.5:4200/api") == "https://ui.example"
    # Another API than the configured one: its own address, without /api.
    assert ui_url("http://127.0.0.1:4300/api") == "http://127.0.0.1:4300"


def test_without_a_server_the_demo_says_how_to_start_one():
    text = "\n".join(ui_hint(None))
    assert "prefect server start" in text
    assert "PREFECT_API_URL=http://127.0.0.1:4200/api prefect-eggapi demo" in text
    assert "open http://127.0.0.1:4200 " in text
