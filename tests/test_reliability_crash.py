"""Issue 9, part 2: SIGKILL the batch flow process at five points, rerun, and lose nothing.

Each kill point is reached deterministically and detected from the outside before the kill:

- ``after_submit``: the POST was accepted (the emulator's audit shows the task) but its 202 is
  held back (``timeout_after_create``), so the ledger still says ``submitting``;
- ``mid_poll``: the emulator is in manual mode; every item is ``submitted`` in the ledger and has
  been polled (audit ``get_task`` count);
- ``mid_download``: ``slow_download`` has started streaming an output (audit ``faults_fired``) and
  no object exists in S3 yet;
- ``mid_upload``: a holding proxy in front of S3 has the ``PUT`` of an output object in hand;
- ``mid_manifest``: the proxy holds the ``PUT`` of ``status.jsonl`` (every item is persisted).

The rerun happens in this process; afterwards every item is persisted once, billable tasks equal
items (no duplicates), every object's sha256 equals the bytes the emulator serves, and the killed
process's output holds no secret.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prefect_eggapi.flows import batch_generate
from reliability_common import (
    HoldingProxy,
    check_invariants,
    file_texts,
    find_secrets,
    list_keys,
    read_status,
    wait_until,
    write_manifest,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

ITEMS = 3


@pytest.fixture
def crash_env(eggapi_env, local_s3, s3_bucket, monkeypatch):
    for name, value in local_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EGGAPI_S3_BUCKET", s3_bucket)
    monkeypatch.setenv("EGGAPI_S3_PREFIX", "out")
    return eggapi_env


def ledger_states(ledger_dir: Path) -> list[str]:
    path = ledger_dir / "ledger.sqlite3"
    if not path.exists():
        return []
    with sqlite3.connect(path, timeout=5) as db:
        try:
            return [row[0] for row in db.execute("select state from entries order by key")]
        except sqlite3.OperationalError:
            return []


class Victim:
    """The batch flow in a child process (its own session, so the kill takes every thread)."""

    def __init__(self, tmp_path: Path, manifest: str, run_key: str, env: dict[str, str]) -> None:
        script = tmp_path / "victim.py"
        script.write_text(
            textwrap.dedent(f"""
            import asyncio
            from prefect_eggapi.flows import batch_generate
            asyncio.run(batch_generate(manifest={manifest!r}, concurrency=1, run_key={run_key!r}))
            """)
        )
        self.log = tmp_path / "victim.log"
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            env=env,
            start_new_session=True,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        assert self.alive(), f"the victim exited early:\n{self.log.read_text()[-3000:]}"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        assert self.proc.returncode == -signal.SIGKILL

    def close(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._fh.close()


def victim_env(s3_endpoint: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env["AWS_ENDPOINT_URL_S3"] = env["AWS_ENDPOINT_URL"] = s3_endpoint
    api = PREFECT_API_URL.value()
    if api:  # share the session's test server instead of starting an ephemeral one
        env["PREFECT_API_URL"] = api
    return env


def prepare(tmp_path: Path, name: str) -> tuple[str, dict[str, str], str]:
    prompts = {f"{name}-{i}": f"crash {name} item {i} a brass owl" for i in range(ITEMS)}
    manifest = write_manifest(
        tmp_path / f"{name}.jsonl", [{"id": k, "prompt": p} for k, p in prompts.items()]
    )
    return manifest, prompts, f"crash-{name}"


def rerun_and_check(emulator, local_s3, bucket, manifest, run_key, prompts, victim, api_key):
    emulator.clear_faults()
    emulator.set_config(manual=False)
    for task in emulator.tasks():  # tasks created in manual mode: let them finish now
        if task["status"] in ("pending", "processing"):
            emulator.complete(task["id"])
    summary = asyncio.run(batch_generate(manifest=manifest, concurrency=3, run_key=run_key))
    assert summary.persisted == ITEMS and summary.failed == 0, summary
    s3 = local_s3.client()
    rows = read_status(s3, bucket, f"out/batches/{run_key}/status.jsonl")
    inv = check_invariants(
        emulator=emulator,
        s3=s3,
        bucket=bucket,
        status_rows=rows,
        prompts_by_id=prompts,
        broken_lines=0,
    )
    assert inv.lost == 0 and inv.duplicates == 0 and inv.sha_mismatches == 0, inv.problems
    assert inv.billable_tasks == ITEMS, inv.problems  # nothing was paid twice
    assert inv.persisted == ITEMS and not inv.problems, inv.problems
    assert len({r["task_id"] for r in rows}) == ITEMS
    # A second rerun changes nothing.
    again = asyncio.run(batch_generate(manifest=manifest, concurrency=3, run_key=run_key))
    assert again.resumed == ITEMS and len(emulator.created_tasks()) == ITEMS
    # The killed process printed no secret.
    assert find_secrets(file_texts(victim.log), [api_key]) == []
    return summary


def test_kill_after_submit_before_the_202_arrives(
    crash_env, local_s3, s3_bucket, tmp_path, ledger_dir, emulator_api_key
):
    manifest, prompts, run_key = prepare(tmp_path, "after-submit")
    crash_env.add_fault("timeout_after_create", delay=25, times=None)
    victim = Victim(tmp_path, manifest, run_key, victim_env(local_s3.endpoint_url))
    try:
        wait_until(lambda: len(crash_env.created_tasks()) == 1, 120, "the first POST to create")
        wait_until(lambda: ledger_states(ledger_dir) == ["submitting"], 10, "ledger: submitting")
        victim.kill()
        assert len(crash_env.created_tasks()) == 1  # paid once, and the 202 never arrived
        rerun_and_check(
            crash_env, local_s3, s3_bucket, manifest, run_key, prompts, victim, emulator_api_key
        )
    finally:
        victim.close()


def test_kill_mid_poll(crash_env, local_s3, s3_bucket, tmp_path, ledger_dir, emulator_api_key):
    manifest, prompts, run_key = prepare(tmp_path, "mid-poll")
    crash_env.set_config(manual=True)  # tasks stay pending: the flow can only poll
    victim = Victim(tmp_path, manifest, run_key, victim_env(local_s3.endpoint_url))
    try:
        wait_until(lambda: ledger_states(ledger_dir) == ["submitted"], 120, "a submitted item")
        polls = lambda: crash_env.request_count(emulator_api_key, "get_task")  # noqa: E731
        wait_until(lambda: polls() >= 2, 60, "the flow to poll")
        victim.kill()
        assert len(crash_env.created_tasks()) == 1
        assert list_keys(local_s3.client(), s3_bucket) == []  # nothing stored yet
        rerun_and_check(
            crash_env, local_s3, s3_bucket, manifest, run_key, prompts, victim, emulator_api_key
        )
    finally:
        victim.close()


def test_kill_mid_download(crash_env, local_s3, s3_bucket, tmp_path, ledger_dir, emulator_api_key):
    manifest, prompts, run_key = prepare(tmp_path, "mid-download")
    crash_env.add_fault("slow_download", bytes_per_second=500, times=None)
    victim = Victim(tmp_path, manifest, run_key, victim_env(local_s3.endpoint_url))
    try:

        def streaming() -> bool:
            return any(f["kind"] == "slow_download" for f in crash_env.audit()["faults_fired"])

        wait_until(streaming, 120, "a slow download to start")
        victim.kill()
        task_id = crash_env.audit()["faults_fired"][0]["task_id"]
        assert not [k for k in list_keys(local_s3.client(), s3_bucket) if task_id in k]
        rerun_and_check(
            crash_env, local_s3, s3_bucket, manifest, run_key, prompts, victim, emulator_api_key
        )
    finally:
        victim.close()


def test_kill_mid_upload(crash_env, local_s3, s3_bucket, tmp_path, ledger_dir, emulator_api_key):
    manifest, prompts, run_key = prepare(tmp_path, "mid-upload")
    proxy = HoldingProxy(local_s3.endpoint_url)
    proxy.arm(f"PUT /{s3_bucket}/out/gen_")
    victim = Victim(tmp_path, manifest, run_key, victim_env(proxy.url))
    try:
        assert proxy.hit.wait(120), f"no upload seen:\n{victim.log.read_text()[-3000:]}"
        held_key = proxy.held_request.split(b" ")[1].decode().split("?")[0]
        victim.kill()
        assert held_key.startswith(f"/{s3_bucket}/out/gen_") and held_key.endswith(".png")
        # the held upload never completed: no object there
        assert held_key[len(s3_bucket) + 2 :] not in list_keys(local_s3.client(), s3_bucket)
        rerun_and_check(
            crash_env, local_s3, s3_bucket, manifest, run_key, prompts, victim, emulator_api_key
        )
    finally:
        victim.close()
        proxy.close()


def test_kill_while_writing_the_status_manifest(
    crash_env, local_s3, s3_bucket, tmp_path, ledger_dir, emulator_api_key
):
    manifest, prompts, run_key = prepare(tmp_path, "mid-manifest")
    proxy = HoldingProxy(local_s3.endpoint_url)
    status_key = f"out/batches/{run_key}/status.jsonl"
    proxy.arm(f"PUT /{s3_bucket}/{status_key}")
    victim = Victim(tmp_path, manifest, run_key, victim_env(proxy.url))
    try:
        assert proxy.hit.wait(120), f"no manifest PUT seen:\n{victim.log.read_text()[-3000:]}"
        victim.kill()
        keys = list_keys(local_s3.client(), s3_bucket)
        assert status_key not in keys
        assert sum(k.endswith(".persisted.json") for k in keys) == ITEMS
        summary = rerun_and_check(
            crash_env, local_s3, s3_bucket, manifest, run_key, prompts, victim, emulator_api_key
        )
        assert summary.resumed == ITEMS  # the rerun only wrote the manifest
    finally:
        victim.close()
        proxy.close()
