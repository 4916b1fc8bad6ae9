"""LocalStack and `prefect-eggapi stack`: both servers up, the env works, everything stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from prefect_eggapi.client import EggAPIClient
from prefect_eggapi.storage import OutputStore, S3Settings
from prefect_eggapi.testing.emulator import DEFAULT_API_KEY
from prefect_eggapi.testing.stack import LocalStack
from procs import gone

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def test_local_stack_env_drives_client_and_store_then_stops_by_pid():
    with LocalStack(pending_seconds=0, processing_seconds=0, bucket="eggapi-stack-test") as stack:
        assert stack.running and len(stack.pids) == 2
        env = stack.env()
        assert env["EGGAPI_API_KEY"] == DEFAULT_API_KEY  # the public emulator test key
        assert env["EGGAPI_BASE_URL"].startswith("http://127.0.0.1:")
        assert env["EGGAPI_S3_BUCKET"] == "eggapi-stack-test"
        # What the pipeline reads: S3Settings.from_env on exactly this environment.
        settings = S3Settings.from_env(environ=env)
        assert settings.endpoint_url == stack.s3_endpoint_url
        store = OutputStore.from_settings(settings)
        with EggAPIClient(env["EGGAPI_API_KEY"], env["EGGAPI_BASE_URL"]) as client:
            task = client.generate(model="nanobanana", prompt="stack smoke test")
            done = client.wait_for_task(task, timeout=30)
            with client.stream_output(done.output_urls[0]) as (chunks, _):
                stored = store.persist(chunks, task_id=done.id, index=0)
        assert (stored.width, stored.height) == (1344, 768)
        head = store.client.head_object(Bucket=stack.bucket, Key=stored.key)
        assert head["Metadata"]["sha256"] == stored.sha256
        # The secret key is not in the repr.
        assert env["AWS_SECRET_ACCESS_KEY"] not in repr(stack)
        pids = stack.pids
    assert not stack.running
    assert all(gone(p) for p in pids), pids
    assert stack.alive_pids() == []
    stack.stop()  # idempotent


def test_local_stack_start_failure_stops_the_other_component(monkeypatch):
    from prefect_eggapi.testing import local_s3

    def broken(*args, **kwargs):
        raise local_s3.LocalS3Error("weed not found (simulated)")

    monkeypatch.setattr(local_s3, "LocalS3", broken)
    stack = LocalStack()
    with pytest.raises(RuntimeError, match="simulated"):
        stack.start()
    assert stack.emulator is None and stack.s3 is None
    assert stack.pids and all(gone(p) for p in stack.pids)  # the emulator was stopped


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stack_command_prints_exports_and_stops_cleanly(tmp_path, sig):
    env_file = tmp_path / "eggapi.env"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EGGAPI_", "AWS_"))}
    proc = subprocess.Popen(
        [
            str(BIN / "prefect-eggapi"), "stack", "--bucket", "eggapi-cli",
            "--pending-seconds", "0.1", "--processing-seconds", "0.2",
            "--env-file", str(env_file),
        ],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C here stops the stack" in line:
                break
        text = "".join(lines)
        exports = dict(
            line.removeprefix("export ").strip().split("=", 1)
            for line in lines
            if line.startswith("export ")
        )
        for name in (
            "EGGAPI_API_KEY", "EGGAPI_BASE_URL", "EGGAPI_S3_BUCKET", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3",
        ):  # fmt: skip
            assert name in exports, text
        assert env_file.stat().st_mode & 0o777 == 0o600
        assert "export EGGAPI_S3_BUCKET=eggapi-cli" in env_file.read_text()
        pids = [int(p) for p in __import__("re").findall(r"pid (\d+)", text)]
        assert len(pids) == 2, text
        # The servers answer with the exported settings.
        health = httpx.get(exports["EGGAPI_BASE_URL"] + "/_emulator/health", timeout=5)
        assert health.status_code == 200
        settings = S3Settings.from_env(environ=exports)
        OutputStore.from_settings(settings).client.head_bucket(Bucket="eggapi-cli")

        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, text + rest
        assert "Local stack stopped." in rest
        assert all(gone(p) for p in pids), pids
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_stack_command_api_key_is_the_key_the_emulator_accepts_and_exports(tmp_path):
    key = "egg_sk_my_ci_key_3141592653"
    env_file = tmp_path / "eggapi.env"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EGGAPI_", "AWS_"))}
    proc = subprocess.Popen(
        [
            str(BIN / "prefect-eggapi"), "stack", "--bucket", "eggapi-key", "--api-key", key,
            "--pending-seconds", "0", "--processing-seconds", "0", "--env-file", str(env_file),
        ],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C here stops the stack" in line:
                break
        text = "".join(lines)
        exports = dict(
            line.removeprefix("export ").strip().split("=", 1)
            for line in lines
            if line.startswith("export ")
        )
        assert exports.get("EGGAPI_API_KEY") == key, text
        assert f"export EGGAPI_API_KEY={key}" in env_file.read_text()
        base_url = exports["EGGAPI_BASE_URL"]
        # The emulator takes the given key, and only it: the default test key is refused.
        with EggAPIClient(key, base_url) as client:
            task = client.wait_for_task(client.generate(model="nanobanana", prompt="k"), timeout=30)
            assert task.output_urls
        refused = httpx.get(
            f"{base_url}/v1/tasks", headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"}
        )
        assert refused.status_code == 401
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, text + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_stack_command_refuses_an_unusable_api_key():
    done = subprocess.run(
        [str(BIN / "prefect-eggapi"), "stack", "--api-key", "has a space"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 2
    assert "the API key must be non-empty, without spaces" in done.stderr
