"""deployments/prefect.yaml for real: `prefect server start` + `prefect deploy` + a process worker.

Everything runs as the documented CLI commands (deployments/README.md), in subprocesses with a
temporary PREFECT_HOME (SQLite), against the local stack (emulator + SeaweedFS). Every process is
stopped by PID (and the process group it leads) at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from prefect_eggapi.stack import LocalStack

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
BIN = Path(sys.executable).parent
POOL = "eggapi-process"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM the process group this test started (by its leader's PID), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # Children of the group (uvicorn workers, flow-run processes) must be gone as well.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EGGAPI_", "AWS_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=api,
        PREFECT_CLI_COLORS="false",
        PREFECT_CLI_WRAP_LINES="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
        COLUMNS="200",
    )
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError((home / "server.log").read_text()[-3000:])
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("prefect server did not start in 90 s")
            time.sleep(0.3)
        yield env
    finally:
        _stop(proc)
        log.close()


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [str(BIN / "prefect"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{out}"
    return out


def test_prefect_yaml_is_what_the_readme_says():
    config = yaml.safe_load(PREFECT_FILE.read_text())
    names = {d["name"]: d for d in config["deployments"]}
    assert set(names) == {"nightly-posters", "on-demand", "recover-abandoned", "nightly-batch"}
    entrypoints = {
        "nightly-posters": "flows/image_pipeline.py:image_pipeline",
        "on-demand": "flows/image_pipeline.py:image_pipeline",
        "recover-abandoned": "flows/recover_outputs.py:recover_outputs",
        "nightly-batch": "flows/batch_generate.py:batch_generate",
    }
    for name, d in names.items():
        assert d["entrypoint"] == entrypoints[name]
        assert d["work_pool"]["name"] == POOL
        path, _, func = d["entrypoint"].partition(":")
        assert f"def {func}" in (REPO / path).read_text() or func in (REPO / path).read_text()
    assert names["nightly-posters"]["schedules"][0]["cron"] == "0 3 * * *"
    assert names["recover-abandoned"]["schedules"][0]["cron"] == "*/15 * * * *"
    assert names["nightly-batch"]["schedules"][0]["active"] is False
    readme = (REPO / "deployments" / "README.md").read_text()
    for command in (
        "prefect server start",
        f"prefect work-pool create {POOL} --type process",
        "prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml",
        f"prefect worker start --pool {POOL}",
    ):
        assert command in readme


def test_deploy_all_and_a_process_worker_completes_a_run(prefect_server, tmp_path):
    env = prefect_server
    api = env["PREFECT_API_URL"]
    started = time.monotonic()
    _cli(env, "work-pool", "create", POOL, "--type", "process")
    out = _cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE))
    assert "eggapi-image-pipeline/nightly-posters" in out
    assert "eggapi-image-pipeline/on-demand" in out

    deployments = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
    by_name = {d["name"]: d for d in deployments}
    assert by_name["nightly-posters"]["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    assert by_name["on-demand"]["work_pool_name"] == POOL

    params = {
        "count": 2,
        "edit_instructions": ["add a rainbow"],
        "image_artifacts": False,
        "wait_timeout": 60,
    }
    out = _cli(
        env,
        "deployment",
        "run",
        "eggapi-image-pipeline/on-demand",
        "--params",
        json.dumps(params),
    )
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out
    flow_run_id = match.group(1)

    with LocalStack(pending_seconds=0.1, processing_seconds=0.3, bucket="eggapi-deploy") as stack:
        worker_env = {**env, **stack.env(), "EGGAPI_LEDGER_DIR": str(tmp_path / "ledger")}
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--run-once"],
            env=worker_env,
            cwd=tmp_path,  # the deployment's pull step sets the working directory itself
            stdout=(tmp_path / "worker.log").open("wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 180
            state = None
            while time.monotonic() < deadline:
                run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).json()
                state = run["state"]["type"]
                if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                time.sleep(0.5)
            worker.wait(timeout=60)
        finally:
            _stop(worker)
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert state == "COMPLETED", log[-5000:]

        # The run paid for 2 generations + 2 edits and stored them with a manifest.
        assert stack.emulator is not None
        created = stack.emulator.created_tasks()
        assert len(created) == 4
        client = stack.output_store().client
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=stack.bucket).get("Contents", [])]
        images = [k for k in keys if k.endswith(".png")]
        manifests = [k for k in keys if "/manifests/" in k]
        assert len(images) == 4 and len(manifests) == 1
        assert {t["task_id"] for t in created} == {k.split("/")[-2] for k in images}
        # No secret reached the worker's log.
        assert stack.env()["AWS_SECRET_ACCESS_KEY"] not in log
    print(f"\ndeploy + worker run took {time.monotonic() - started:.1f} s")
