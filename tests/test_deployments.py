"""deployments/prefect.yaml for real: the README's Deployments commands, as a user types them.

The bash block of README.md's "Deployments" section runs line by line in `bash` subprocesses
("shells"), changed only where a test must: the server's port and the env file's path. The server
is `prefect server start` with a temporary PREFECT_HOME (SQLite); `prefect-eggapi stack` is the
local stack (emulator + SeaweedFS); the worker gets its variables from `source`-ing the env file
and is stopped with Ctrl-C (SIGINT to its process group), as documented. The verdict comes from
the emulator's audit and the bucket. Every process is stopped by PID (and the process group it
leads) at the end.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
import yaml

from prefect_procs import BIN, POOL, REPO, api_read, clean_env, prefect_server, stop, wait_until

pytestmark = pytest.mark.integration

PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
DOCUMENTED = [
    "prefect server start",
    "prefect-eggapi stack --env-file /tmp/eggapi.env",
    "export PREFECT_API_URL=http://127.0.0.1:4200/api",
    "source /tmp/eggapi.env",
    f"prefect work-pool create {POOL} --type process --overwrite",
    "prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml",
    f"prefect worker start --pool {POOL}",
    "export PREFECT_API_URL=http://127.0.0.1:4200/api",
    "prefect deployment run 'eggapi-image-pipeline/on-demand' --watch",
]
"""README.md's Deployments commands in order: shell 1 (server), 2 (stack), 3 (4 lines and the
worker), 4 (a run)."""


def _readme_commands() -> list[str]:
    """The command lines of the bash block in README.md's Deployments section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n### Deployments\n", 1)[1].split("\n### ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with prefect_server(tmp_path_factory.mktemp("prefect-home")) as env:
        yield env


def test_prefect_yaml_is_what_the_readme_says():
    config = yaml.safe_load(PREFECT_FILE.read_text())
    names = {d["name"]: d for d in config["deployments"]}
    entrypoints = {
        "nightly-posters": "flows/image_pipeline.py:image_pipeline",
        "on-demand": "flows/image_pipeline.py:image_pipeline",
        "recover-abandoned": "flows/recover_outputs.py:recover_outputs",
        "nightly-batch": "flows/batch_generate.py:batch_generate",
        "sharded-batch": "flows/sharded_batch.py:sharded_batch_generate",
        "batch-shard": "flows/batch_generate.py:batch_generate",
    }
    assert set(names) == set(entrypoints)
    for name, d in names.items():
        assert d["entrypoint"] == entrypoints[name]
        assert d["work_pool"]["name"] == POOL
        path, _, func = d["entrypoint"].partition(":")
        assert f"def {func}" in (REPO / path).read_text() or func in (REPO / path).read_text()
    assert names["nightly-posters"]["schedules"][0]["cron"] == "0 3 * * *"
    assert names["recover-abandoned"]["schedules"][0]["cron"] == "*/15 * * * *"
    assert names["nightly-batch"]["schedules"][0]["active"] is False
    assert _readme_commands() == DOCUMENTED
    readme = (REPO / "deployments" / "README.md").read_text()
    for command in DOCUMENTED:
        assert command in readme, command


def _shell(env: dict[str, str], lines: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A fresh `bash` in the repository root running ``lines``, in its own session."""
    with log.open("ab") as out:
        return subprocess.Popen(
            ["bash", "-c", "set -e\n" + "\n".join(lines)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _ctrl_c(proc: subprocess.Popen[bytes], timeout: float) -> float:
    """SIGINT to the shell's process group, as Ctrl-C in its terminal; seconds until it exits."""
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout)
    return time.monotonic() - started


def test_the_readme_commands_deploy_and_a_worker_completes_a_run(prefect_env, tmp_path):
    started = time.monotonic()
    api = prefect_env["PREFECT_API_URL"]
    env_file = tmp_path / "eggapi.env"

    def adapt(line: str) -> str:
        return line.replace("http://127.0.0.1:4200/api", api).replace(
            "/tmp/eggapi.env", str(env_file)
        )

    commands = [adapt(line) for line in DOCUMENTED]
    assert commands[0] == "prefect server start"  # shell 1: the prefect_env fixture
    # Every other shell: a fresh environment with this venv first on PATH and the server's
    # PREFECT_HOME, but no PREFECT_API_URL, EGGAPI_* or AWS_* variable unless a line sets it.
    shell_env = clean_env()
    shell_env.update(
        PATH=f"{BIN}{os.pathsep}{shell_env.get('PATH', '')}",
        PREFECT_HOME=prefect_env["PREFECT_HOME"],
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        COLUMNS="200",
    )
    stack = worker = None
    try:
        stack = _shell(shell_env, commands[1:2], tmp_path / "stack.log")
        wait_until(
            lambda: env_file.exists() and "Local stack up" in (tmp_path / "stack.log").read_text(),
            60,
            "prefect-eggapi stack",
        )
        stack_env = {}
        for line in env_file.read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            stack_env[key] = shlex.split(value)[0]

        worker = _shell(shell_env, commands[2:7], tmp_path / "worker.log")
        worker_log = tmp_path / "worker.log"

        def worker_ready() -> bool:
            return worker.poll() is not None or "started!" in worker_log.read_text(errors="replace")

        wait_until(worker_ready, 120, "the pool, the deployments and the worker")
        assert worker.poll() is None, worker_log.read_text(errors="replace")[-5000:]
        out = worker_log.read_text(errors="replace")
        assert "eggapi-image-pipeline/nightly-posters" in out
        assert "eggapi-image-pipeline/on-demand" in out
        deployments = api_read("POST", f"{api}/deployments/filter", {})
        assert isinstance(deployments, list), deployments
        by_name = {d["name"]: d for d in deployments}
        assert by_name["nightly-posters"]["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        assert by_name["on-demand"]["work_pool_name"] == POOL

        # Shell 4 has PREFECT_API_URL only: the worker, not this shell, needs the variables.
        run = subprocess.run(
            ["bash", "-c", "set -e\n" + "\n".join(commands[7:])],
            env=shell_env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
        )
        out = run.stdout + run.stderr
        log = worker_log.read_text(errors="replace")
        assert run.returncode == 0, out[-3000:] + "\n--- worker ---\n" + log[-5000:]
        assert "Flow run finished successfully in 'Completed'." in out, out[-3000:]

        # The defaults: 3 prompts × (1 generation + 2 edits) = 9 billable tasks, all stored.
        audit = httpx.get(f"{stack_env['EGGAPI_BASE_URL']}/_emulator/audit", timeout=10)
        created = audit.json()["data"]["tasks"]
        assert len(created) == 9
        s3 = boto3.client(
            "s3",
            endpoint_url=stack_env["AWS_ENDPOINT_URL_S3"],
            aws_access_key_id=stack_env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=stack_env["AWS_SECRET_ACCESS_KEY"],
            region_name=stack_env["AWS_REGION"],
        )
        bucket = stack_env["EGGAPI_S3_BUCKET"]
        keys = [
            o["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])
        ]
        images = [k for k in keys if k.endswith(".png")]
        manifests = [k for k in keys if "/manifests/" in k]
        assert len(images) == 9 and len(manifests) == 1, keys
        assert {t["task_id"] for t in created} == {k.split("/")[-2] for k in images}
        # No secret reached the worker's log.
        assert stack_env["AWS_SECRET_ACCESS_KEY"] not in log

        # Ctrl-C stops the idle worker promptly, then the stack.
        worker_stop = _ctrl_c(worker, 30)
        stack_stop = _ctrl_c(stack, 30)
        assert "Local stack stopped." in (tmp_path / "stack.log").read_text()
    finally:
        for proc in (worker, stack):
            if proc is not None:
                stop(proc)
    print(
        f"\nREADME commands: {time.monotonic() - started:.1f} s; Ctrl-C stopped the worker in "
        f"{worker_stop:.1f} s, the stack in {stack_stop:.1f} s"
    )
