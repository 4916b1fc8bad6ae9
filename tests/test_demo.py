"""`prefect-eggapi demo`: the README's main job, as a user runs it, in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from procs import gone

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EGGAPI_", "AWS_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # ephemeral server DB of its own
    return env


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
