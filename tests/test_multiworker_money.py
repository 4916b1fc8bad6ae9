"""Money safety with many workers, proven with REAL separate OS processes.

Each worker is its own process (``tests/mw_worker.py``, or the ``flows/batch_generate.py`` entry
file in D), with its own working directory and ``PREFECT_HOME``, talking HTTP to the emulator and
to SeaweedFS; the workers of a scenario share one S3 ledger (``EGGAPI_LEDGER_URI``) unless the
scenario says otherwise. Workers share the session's Prefect API the way workers share a server
(``MW_PREFECT_EPHEMERAL=1``: each starts its own temporary server instead).

The verdict comes only from outside the library (:func:`multiworker_common.judge`): the
emulator's audit of created (billable) tasks with their prompts, the bytes it serves for each
task, and what is in the bucket (status objects, ``status.jsonl``, the stored images, matched by
sha256 to the task that served them). The ledger is never read; run summaries are only compared
with what was billed.

A  two workers (two shards of a 60-line manifest), 12 POSTs answered 502 without creating
B  two workers, 12 answers lost after the task was created (502, cut, one 35 s late), then rerun
C  a foreign job on the key, a POST held 8 s then 502 (nothing created), SIGKILL during the hold
D  a fresh container: SIGKILL after 7 tasks, rerun from an empty dir with the default config
E  two concurrent runs of one manifest (same run key)
F  three workers on one manifest with lost answers; one SIGKILLed mid-batch and restarted

Fault rules fire at chosen opportunities (``skip`` counted per opportunity), kills are triggered
from the emulator's audit or fault counters, and every wait polls with a deadline.
Workers reach S3 through a proxy adding 0..``MW_S3_JITTER_MS`` (default 40) ms to each request
chunk, as real S3 latency would (SeaweedFS on loopback answers in a millisecond, which hides
every window between two writes). ``MW_ROUNDS`` (default 2) repeats scenario A. ``MW_SRC``
points the workers at another copy of ``src`` (e.g. ``git archive HEAD src``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from multiworker_common import (
    Batch,
    JitterProxy,
    Stack,
    Verdict,
    Workers,
    _get,
    _list,
    fault_rules,
    foreign_task,
    judge,
    make_items,
    spread,
    wait_until,
    workers,
    write_manifest,
)

pytestmark = pytest.mark.integration

ROUNDS = int(os.environ.get("MW_ROUNDS", "2"))
S3_JITTER_MS = float(os.environ.get("MW_S3_JITTER_MS", "40"))
CONFIG = dict(pending_seconds=0.05, processing_seconds=0.3, rate_limit_per_second=1000)


@dataclass
class MW:
    emulator: Any
    api_key: str
    s3: Any
    bucket: str
    stack: Stack
    pool: Workers
    tmp: Path

    def faults_fired(self) -> dict[str, int]:
        return dict(Counter(f["kind"] for f in self.emulator.audit()["faults_fired"]))

    def created(self) -> int:
        return len(self.emulator.created_tasks())

    def ledger(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"


@pytest.fixture
def mw(
    emulator: Any,
    emulator_api_key: str,
    local_s3: Any,
    s3_bucket: str,
    prefect_harness: None,
    tmp_path: Path,
) -> Iterator[MW]:
    from prefect.settings import PREFECT_API_URL

    emulator.set_config(**CONFIG)
    proxy = JitterProxy(local_s3.endpoint_url, S3_JITTER_MS)  # workers only; the oracle is direct
    stack = Stack(
        emulator_url=emulator.base_url,
        api_key=emulator_api_key,
        s3_env={**local_s3.env(), **proxy.env()},
        bucket=s3_bucket,
        prefix="out",
        prefect_api_url=PREFECT_API_URL.value(),
    )
    try:
        with workers(tmp_path / "procs", stack) as pool:
            s3 = local_s3.client()
            yield MW(emulator, emulator_api_key, s3, s3_bucket, stack, pool, tmp_path)
    finally:
        proxy.close()
        emulator.clear_faults()


def _fail_if(verdicts: list[tuple[str, Verdict]], pool: Workers) -> None:
    bad = [(t, v) for t, v in verdicts if v.violations]
    report = "\n\n".join(v.text(t) for t, v in verdicts)
    if not bad:
        print(report)
    else:
        runs = "\n".join(w.describe() for w in pool.all)
        pytest.fail(f"money/attribution invariant broken\n{report}\n\nworkers:\n{runs}", False)


def _exactly(v: Verdict, n: int) -> None:
    if v.numbers["billable_tasks"] != n:
        v.violations.insert(
            0, f"BILLABLE: {v.numbers['billable_tasks']} billable tasks for {n} items (want {n})"
        )


# --------------------------------------------------------------------------- A


@pytest.mark.timeout(240 * ROUNDS)
def test_a_two_workers_502_before_create_pay_once_and_keep_attribution(mw: MW) -> None:
    """60 items over two worker processes sharing the S3 ledger; 12 POSTs answered 502 and
    nothing created. Exactly 60 billable tasks, every item stores its own prompt's image, one
    final status per item, both runs' reported cost = billed."""
    verdicts = []
    for r in range(1, ROUNDS + 1):
        if r > 1:
            mw.emulator.reset()
            mw.emulator.set_config(**CONFIG)
        items = make_items(f"a{r}", 60)
        ids = list(items)
        shards = [ids[0::2], ids[1::2]]
        prefix = f"a{r}"
        mw.emulator.add_faults(
            fault_rules(
                {t: {"kind": "error_before_create", "status": 502} for t in spread(12, 60, 2)}
            )
        )
        ws = []
        for k, shard in enumerate(shards):
            manifest = write_manifest(mw.tmp / f"a{r}-{k}.jsonl", {i: items[i] for i in shard})
            ws.append(
                mw.pool.batch(
                    f"a{r}-w{k}",
                    manifest,
                    run_key=f"a{r}-shard{k}",
                    ledger_uri=mw.ledger(f"a{r}-ledger"),
                    prefix=prefix,
                )
            )
        mw.pool.wait_all(ws, 200)
        fired = mw.faults_fired()
        v = judge(
            emulator=mw.emulator,
            api_key=mw.api_key,
            s3=mw.s3,
            bucket=mw.bucket,
            items=items,
            batches=[Batch(prefix, f"a{r}-shard{k}", s) for k, s in enumerate(shards)],
            reports=[w.reported_cost() for w in ws],
        )
        _exactly(v, 60)
        v.numbers["faults_fired"] = fired
        v.notes += [w.describe() for w in ws]
        verdicts.append((f"A round {r}", v))
    _fail_if(verdicts, mw.pool)


# --------------------------------------------------------------------------- B


@pytest.mark.timeout(420)
def test_b_answers_lost_after_create_are_collected_and_a_rerun_pays_nothing(mw: MW) -> None:
    """12 of 60 answers lost after the task was created (6× 502, 5× cut mid-body, 1× 35 s late
    against the client's 30 s timeout): every created task is collected for its own item (no
    ReconciliationError, nothing billed uncollected) and rerunning both shards pays nothing."""
    items = make_items("b", 60)
    ids = list(items)
    shards = [ids[0::2], ids[1::2]]
    targets = spread(12, 60, 2)
    kinds: dict[int, dict[str, Any]] = {}
    for j, t in enumerate(targets):
        if j == 3:
            kinds[t] = {"kind": "timeout_after_create", "delay": 35}
        elif j % 2:
            kinds[t] = {"kind": "drop_after_create"}
        else:
            kinds[t] = {"kind": "error_after_create", "status": 502}
    mw.emulator.add_faults(fault_rules(kinds))
    ledger = mw.ledger("b-ledger")
    manifests = [
        write_manifest(mw.tmp / f"b-{k}.jsonl", {i: items[i] for i in s})
        for k, s in enumerate(shards)
    ]
    ws = [
        mw.pool.batch(f"b-w{k}", m, run_key=f"b-shard{k}", ledger_uri=ledger, prefix="b")
        for k, m in enumerate(manifests)
    ]
    mw.pool.wait_all(ws, 300)
    fired = mw.faults_fired()
    batches = [Batch("b", f"b-shard{k}", s) for k, s in enumerate(shards)]
    v = judge(
        emulator=mw.emulator,
        api_key=mw.api_key,
        s3=mw.s3,
        bucket=mw.bucket,
        items=items,
        batches=batches,
        reports=[w.reported_cost() for w in ws],
    )
    _exactly(v, 60)
    v.numbers["faults_fired"] = fired
    v.notes += [w.describe() for w in ws]
    if fired.get("timeout_after_create", 0) != 1:
        v.notes.append("the late answer did not fire (fewer creating POSTs than planned)")

    # rerun both shards: nothing new may be paid
    before = mw.created()
    again = [
        mw.pool.batch(f"b-rerun{k}", m, run_key=f"b-shard{k}", ledger_uri=ledger, prefix="b")
        for k, m in enumerate(manifests)
    ]
    mw.pool.wait_all(again, 200)
    new = mw.created() - before
    v.numbers["rerun_new_tasks"] = new
    v.notes += [w.describe() for w in again]
    if new:
        v.violations.insert(0, f"RERUN PAID: the rerun created {new} new billable task(s)")
    after = judge(
        emulator=mw.emulator,
        api_key=mw.api_key,
        s3=mw.s3,
        bucket=mw.bucket,
        items=items,
        batches=batches,
        reports=None,
    )
    _exactly(after, 60)
    _fail_if([("B first pass", v), ("B after rerun", after)], mw.pool)


# --------------------------------------------------------------------------- C


@pytest.mark.timeout(300)
def test_c_foreign_job_on_the_key_is_never_adopted_after_a_kill(mw: MW) -> None:
    """Someone else creates tasks on the key (one just before, one during our POST); our POST is
    held 8 s and answered 502 WITHOUT creating anything; the worker is SIGKILLed during the
    hold and rerun in a fresh process. No item may ever hold the foreign job's image; the item
    may fail loudly (ReconciliationError) or be resubmitted (nothing was created for it)."""
    items = make_items("c", 3)
    manifest = write_manifest(mw.tmp / "c.jsonl", items)
    ledger = mw.ledger("c-ledger")
    foreign = {"someone else's job 1: a tin robot", "someone else's job 2: a tin robot"}
    first, second = sorted(foreign)
    f1 = foreign_task(mw.emulator.base_url, mw.api_key, first)
    mw.emulator.add_fault("error_before_create", status=502, delay=8, times=1)
    w1 = mw.pool.batch("c-w1", manifest, run_key="c-run", ledger_uri=ledger, prefix="c")

    def held() -> bool:
        assert w1.alive(), f"worker exited before its POST was held:\n{w1.tail()}"
        return bool(mw.emulator.faults()[0]["fired"])

    wait_until(held, 120, "the worker's POST to be held by the emulator")
    f2 = foreign_task(mw.emulator.base_url, mw.api_key, second)  # created during our POST
    w1.kill()
    at_kill = [t["prompt"] for t in mw.emulator.created_tasks()]
    w2 = mw.pool.batch("c-w2", manifest, run_key="c-run", ledger_uri=ledger, prefix="c")
    mw.pool.wait_all([w2], 180)
    v = judge(
        emulator=mw.emulator,
        api_key=mw.api_key,
        s3=mw.s3,
        bucket=mw.bucket,
        items=items,
        batches=[Batch("c", "c-run", list(items))],
        reports=[w2.reported_cost()],
        foreign_prompts=foreign,
        expect_all_persisted=False,
        report_label="rerun",
    )
    v.numbers["foreign_tasks_ids"] = [f1, f2]
    v.numbers["item_tasks_when_killed"] = sum(p in items.values() for p in at_kill)
    v.notes += [w1.describe() + " (killed during the held POST)", w2.describe()]
    _fail_if([("C", v)], mw.pool)


# --------------------------------------------------------------------------- D


@pytest.mark.timeout(300)
def test_d_fresh_container_with_default_config_never_pays_twice(mw: MW) -> None:
    """``python flows/batch_generate.py`` with only the documented S3 variables (no
    EGGAPI_LEDGER_URI/DIR), SIGKILLed once 7 tasks exist (the 7th's answer held, so the count
    stops there), then rerun from a FRESH empty directory and PREFECT_HOME, as a retried
    container would. No prompt may be paid twice; the rerun either finishes every item or
    refuses to start with a clear message (creating nothing)."""
    items = make_items("d", 20)
    manifest = write_manifest(mw.tmp / "d.jsonl", items)
    mw.emulator.set_config(processing_seconds=2.0)  # killed mid-wait, not only mid-submit
    mw.emulator.add_fault("timeout_after_create", skip=6, delay=60, times=1)

    def env_for(name: str) -> dict[str, str]:
        return mw.stack.env(mw.pool.root / name, ledger_uri=None, EGGAPI_S3_PREFIX="d")

    w1 = mw.pool.entry_file("d-container1", manifest, env_for("d-container1"))

    def seven() -> bool:
        assert w1.alive(), f"the batch exited before 7 tasks were created:\n{w1.tail()}"
        return mw.created() >= 7

    wait_until(seven, 150, "7 created tasks")
    w1.kill()
    at_kill = mw.created()
    w2 = mw.pool.entry_file("d-container2", manifest, env_for("d-container2"))
    mw.pool.wait_all([w2], 200)
    rerun_new = mw.created() - at_kill
    refused = w2.proc.returncode != 0 and rerun_new == 0 and "ledger" in w2.tail(20000).lower()
    # The entry file leaves no flow run id behind: tell the runs apart by the status objects.
    # The killed run can have written at most the 6 items whose answers came back before the
    # kill; the rerun wrote the rest. A killed run reports nothing, so its share is counted
    # from its own status objects (as in F).
    writers = Counter(
        json.loads(_get(mw.s3, mw.bucket, key) or b"{}").get("run_id")
        for key in _list(mw.s3, mw.bucket, "d/batches/")
        if key.endswith(".persisted.json")
    )
    rerun_id = writers.most_common(1)[0][0] if writers else None
    killed_ids = [r for r in writers if r != rerun_id]
    assert sum(writers[r] for r in killed_ids) <= 6, writers
    v = judge(
        emulator=mw.emulator,
        api_key=mw.api_key,
        s3=mw.s3,
        bucket=mw.bucket,
        items=items,
        batches=[Batch("d", w2.result().get("summary", {}).get("run_key", "?"), list(items))]
        if not refused
        else [],
        reports=None if refused else [w2.reported_cost()],
        run_ids=None if refused else [rerun_id],
        killed_run_ids=killed_ids,
        expect_all_persisted=not refused,
        report_label="rerun",
    )
    v.numbers.update(created_when_killed=at_kill, rerun_new_tasks=rerun_new, rerun_refused=refused)
    v.notes += [w1.describe() + " (killed)", w2.describe()]
    if not refused:
        _exactly(v, 20)
    _fail_if([("D", v)], mw.pool)


# --------------------------------------------------------------------------- E


@pytest.mark.timeout(300)
def test_e_two_runs_of_one_manifest_share_the_work_and_the_bill(mw: MW) -> None:
    """Two processes run the same 30-line manifest with the same run key at once (a duplicated
    deployment run): 30 billable tasks, each item one final status, status.jsonl says persisted
    for every persisted item, and the two reported costs add up to what was billed."""
    items = make_items("e", 30)
    manifest = write_manifest(mw.tmp / "e.jsonl", items)
    mw.emulator.set_config(processing_seconds=0.5)
    ledger = mw.ledger("e-ledger")
    ws = [
        mw.pool.batch(f"e-w{k}", manifest, run_key="e-run", ledger_uri=ledger, prefix="e")
        for k in range(2)
    ]
    mw.pool.wait_all(ws, 200)
    v = judge(
        emulator=mw.emulator,
        api_key=mw.api_key,
        s3=mw.s3,
        bucket=mw.bucket,
        items=items,
        batches=[Batch("e", "e-run", list(items))],
        reports=[w.reported_cost() for w in ws],
    )
    _exactly(v, 30)
    v.notes += [w.describe() for w in ws]
    _fail_if([("E", v)], mw.pool)


# --------------------------------------------------------------------------- F


@pytest.mark.timeout(480)
def test_f_three_workers_chaos_with_a_kill(mw: MW) -> None:
    """Three processes on one 45-line manifest (same run key, shared ledger); answers lost
    before create (4× 502), after create (3× 502, 2× cut) and one 35 s late; one process
    SIGKILLed once 15 tasks exist and restarted fresh. Then one more rerun. Exactly 45
    billable, every item its own image and one final status, every billed task collected or
    explained, and the rerun pays nothing. Cost: a run reports what it accounted for (the items
    whose status object names its flow run id); the killed run reports nothing, so its share is
    the cost of the status objects it wrote: every finished run's report equals its own
    objects' cost, and the reports plus the killed run's share equal the bill."""
    items = make_items("f", 45)
    manifest = write_manifest(mw.tmp / "f.jsonl", items)
    ledger = mw.ledger("f-ledger")
    pre = fault_rules({t: {"kind": "error_before_create", "status": 502} for t in spread(4, 45, 3)})
    post_at = spread(6, 45, 5)
    post = fault_rules(
        {
            post_at[0]: {"kind": "error_after_create", "status": 502},
            post_at[1]: {"kind": "drop_after_create"},
            post_at[2]: {"kind": "timeout_after_create", "delay": 35},
            post_at[3]: {"kind": "error_after_create", "status": 502},
            post_at[4]: {"kind": "drop_after_create"},
            post_at[5]: {"kind": "error_after_create", "status": 502},
        }
    )
    mw.emulator.add_faults(pre + post)

    def start(name: str) -> Any:
        return mw.pool.batch(
            name, manifest, run_key="f-run", ledger_uri=ledger, prefix="f", concurrency=6
        )

    ws = [start(f"f-w{k}") for k in range(3)]
    victim = ws[1]

    def fifteen() -> bool:
        assert victim.alive(), f"the victim finished before 15 tasks existed:\n{victim.tail()}"
        return mw.created() >= 15

    wait_until(fifteen, 180, "15 created tasks")
    victim.kill()
    at_kill = mw.created()
    ws.append(start("f-w1-restarted"))
    mw.pool.wait_all([w for w in ws if w is not victim], 360)
    fired = mw.faults_fired()
    survivors = [w for w in ws if w is not victim]
    v = judge(
        emulator=mw.emulator,
        api_key=mw.api_key,
        s3=mw.s3,
        bucket=mw.bucket,
        items=items,
        batches=[Batch("f", "f-run", list(items))],
        reports=[w.reported_cost() for w in survivors],
        expect_all_persisted=False,
        report_label="finished_runs",
        run_ids=[w.flow_run_id() for w in survivors],
        killed_run_ids=[victim.flow_run_id()],
    )
    v.numbers.update(faults_fired=fired, created_when_killed=at_kill)
    v.notes += [w.describe() for w in ws]

    before = mw.created()
    rerun = start("f-rerun")
    mw.pool.wait_all([rerun], 200)
    new = mw.created() - before
    after = judge(
        emulator=mw.emulator,
        api_key=mw.api_key,
        s3=mw.s3,
        bucket=mw.bucket,
        items=items,
        batches=[Batch("f", "f-run", list(items))],
        reports=None,
    )
    _exactly(after, 45)
    after.numbers["rerun_new_tasks"] = new
    after.numbers["rerun_reported_usd"] = str(rerun.reported_cost())
    after.notes.append(rerun.describe())
    if new:
        after.violations.insert(0, f"RERUN PAID: the rerun created {new} new billable task(s)")
    _fail_if([("F concurrent pass", v), ("F after rerun", after)], mw.pool)


def test_fault_rule_placement_is_what_the_tests_assume(
    emulator: Any, emulator_api_key: str
) -> None:
    """The skip arithmetic of fault_rules: 502s land on exactly the planned POSTs."""
    import httpx

    emulator.add_faults(
        fault_rules({t: {"kind": "error_before_create", "status": 502} for t in (2, 3, 7)})
    )
    codes = []
    with httpx.Client(base_url=emulator.base_url, trust_env=False, timeout=10) as http:
        for i in range(8):
            r = http.post(
                "/v1/generate",
                headers={"Authorization": f"Bearer {emulator_api_key}"},
                json={"model": "nanobanana", "prompt": f"placement {i}"},
            )
            codes.append(r.status_code)
    assert codes == [202, 502, 502, 202, 202, 202, 502, 202]
    assert len(emulator.created_tasks()) == 5
