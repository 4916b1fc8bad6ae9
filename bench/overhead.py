"""Bench 1 (overhead): the Prefect batch flow vs a hand-written asyncio+httpx+boto3 script.

Same emulator timing, same N, same concurrency, back to back in one invocation against one local
stack (A/B, order alternated on repeats). Each side runs in a fresh process; the ratio is Prefect
flow wall time / baseline wall time (the ephemeral API server's start-up is excluded and shown
separately).

    python bench/overhead.py [--n 200 1000] [--concurrency 50] [--profile]

The rest of this docstring describes the child, which is also the Prefect side of the other
benches (``python bench/overhead.py --child SPEC OUT``):

``batch`` runs the library's ``batch_generate`` flow over a manifest (one ``agenerate_image``
task run per line: submit -> wait -> persist). ``tasks`` runs a small flow of the library's own
tasks (``asubmit_generation`` -> ``await_for_task`` -> ``adownload_outputs``) so that the wait can
be woken by webhooks (``signals=``), which ``batch_generate`` does not expose.

The child records, in-process: when each task's outputs were persisted (right after
``OutputStore.persist`` returns), the statuses its polls saw, the flow's wall time, the CPU time
of this process and of its child processes (the ephemeral Prefect server), and optionally a
cProfile of the flow. The Prefect API server is warmed up by a trivial flow first, so the timed
flow does not include the ephemeral server's start-up (reported separately).
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

PERSISTED: dict[str, float] = {}  # task id -> when its last output was persisted
STORED: list[int] = [0]  # outputs persisted
POLLS: dict[str, int] = {}
LANE: dict[str, float] = {"holds": 0, "wall": 0.0, "cpu": 0.0, "post": 0.0, "posts": 0}
GC: list[float] = [0.0, 0.0]  # seconds in the cyclic collector, full (generation 2) collections


def _time_gc() -> None:
    """Count the seconds the cyclic garbage collector runs: it walks every live object, so its
    cost per image grows with whatever the flow keeps alive at once."""
    import gc

    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        GC[0] += time.perf_counter() - started[0]
        GC[1] += info["generation"] == 2

    gc.callbacks.append(callback)


def _children_cpu() -> float:
    """CPU seconds of this process's live descendants (e.g. the ephemeral API server)."""
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total = 0.0
    for pid in cpu:
        p = parents.get(pid)
        while p and p != me and p in parents:
            p = parents[p]
        if p == me and pid != me:
            total += cpu[pid]
    return total


def _instrument() -> None:
    from prefect_eggapi.client import AsyncEggAPIClient
    from prefect_eggapi.storage import OutputStore

    persist = OutputStore.persist

    def timed_persist(self: Any, chunks: Any, *, task_id: str, index: int, **kw: Any) -> Any:
        stored = persist(self, chunks, task_id=task_id, index=index, **kw)
        PERSISTED[task_id] = time.time()
        STORED[0] += 1
        return stored

    get_task = AsyncEggAPIClient.get_task

    async def counted_get_task(self: Any, task_id: str) -> Any:
        task = await get_task(self, task_id)
        POLLS[task.status.value] = POLLS.get(task.status.value, 0) + 1
        return task

    OutputStore.persist = timed_persist  # type: ignore[method-assign]
    AsyncEggAPIClient.get_task = counted_get_task  # type: ignore[method-assign]
    _time_lane()


def _time_lane() -> None:
    """How long each submit holds its lane (POSTs of one model go one at a time), how much of
    that is the holding thread's own CPU, and how long its POST takes: the rest of a hold is
    waiting (for the GIL among the batch's threads, for SQLite, for the emulator)."""
    from contextlib import contextmanager

    from prefect_eggapi.client import EggAPIClient
    from prefect_eggapi.safety.submitter import Submitter

    lane = Submitter._lane
    generate = EggAPIClient.generate

    @contextmanager
    def timed_lane(self: Any, model: str, task_type: str) -> Any:
        with lane(self, model, task_type):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                yield
            finally:
                LANE["holds"] += 1
                LANE["wall"] += time.perf_counter() - wall
                LANE["cpu"] += time.thread_time() - cpu

    def timed_generate(self: Any, *args: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        try:
            return generate(self, *args, **kw)
        finally:
            LANE["posts"] += 1
            LANE["post"] += time.perf_counter() - started

    Submitter._lane = timed_lane  # type: ignore[method-assign,assignment]
    EggAPIClient.generate = timed_generate  # type: ignore[method-assign]


def _tasks_flow() -> Any:
    from prefect import flow

    from prefect_eggapi.client.types import GenerateRequest
    from prefect_eggapi.tasks import adownload_outputs, asubmit_generation, await_for_task
    from prefect_eggapi.webhooks.signals import SQLiteSignals

    @flow(name="eggapi-bench-tasks")
    async def bench_tasks(
        prompts: list[str],
        concurrency: int,
        webhook_url: str | None = None,
        signals_path: str | None = None,
        num_outputs: int = 1,
    ) -> int:
        semaphore = asyncio.Semaphore(concurrency)
        signals = SQLiteSignals(signals_path) if signals_path else None

        async def one(i: int, prompt: str) -> int:
            async with semaphore:
                request = GenerateRequest(
                    model="nanobanana",
                    prompt=prompt,
                    aspect_ratio="16:9",
                    webhook_url=webhook_url,
                    num_outputs=num_outputs,
                )
                label = f"item-{i:05d}"
                task = await asubmit_generation(request, label=label)
                done = await await_for_task(task, label=label, progress=False, signals=signals)
                stored = await adownload_outputs(done, label=label, image_artifacts=False)
                return len(stored)

        return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    return bench_tasks


def child(spec: dict[str, Any]) -> dict[str, Any]:
    from prefect import flow

    _instrument()

    @flow(name="eggapi-bench-warmup")
    async def warmup() -> int:
        return 1

    t0 = time.time()
    asyncio.run(warmup())
    startup = time.time() - t0

    tmp = Path(tempfile.mkdtemp(prefix="eggapi-bench-flow-"))
    prompts = [f"{spec['tag']} bench image {i}" for i in range(spec["n"])]
    if spec["flow"] == "batch":
        from _common import write_manifest

        from prefect_eggapi.flows import batch_generate

        manifest = write_manifest(tmp / "manifest.jsonl", spec["n"], spec["tag"])
        call = batch_generate(
            manifest=manifest,
            concurrency=spec["concurrency"],
            items_per_task=spec.get("items_per_task", 1),
            prefix=spec.get("prefix", "prefect"),
            run_key=spec["tag"],
        )
    else:
        call = _tasks_flow()(
            prompts,
            spec["concurrency"],
            webhook_url=spec.get("webhook_url"),
            signals_path=spec.get("signals_path"),
            num_outputs=spec.get("num_outputs", 1),
        )

    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
    _time_gc()
    server_cpu0 = _children_cpu()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    if profiler is not None:
        profiler.enable()
    result = asyncio.run(call)
    if profiler is not None:
        profiler.disable()
    wall = time.time() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    server_cpu = _children_cpu() - server_cpu0
    out: dict[str, Any] = {
        "wall": wall,
        "started_at": started,
        "startup": startup,
        "cpu": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
        "server_cpu": server_cpu,
        "gc": GC[0],
        "gc_full": GC[1],
        "lane": dict(LANE),
        "images": STORED[0],
        "persisted_at": PERSISTED,
        "polls_by_status": POLLS,
        "peak_rss_mb": cpu1.ru_maxrss / 1024,
        "result": str(getattr(result, "persisted", result)),
    }
    if profiler is not None:
        import io
        import pstats

        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
        path = Path(spec.get("profile_path") or tmp / "profile.txt")
        path.write_text(text.getvalue())
        stats.dump_stats(str(path.with_suffix(".pstats")))
        out["profile"] = str(path)
    return out


# --------------------------------------------------------------------------- the parent

PENDING = 0.1
PROCESSING = 1.0
CLIENT_RATE = "1000"  # EGGAPI_REQUESTS_PER_SECOND: the client-side limiter must not dominate


def latencies(persisted_at: dict[str, float], completed: dict[str, float]) -> list[float]:
    return [t - completed[k] for k, t in persisted_at.items() if k in completed]


def measure(
    ns: list[int],
    *,
    concurrency: int = 50,
    repeats: int = 1,
    api_url: str | None = None,
    profile_dir: Path | None = None,
    log_dir: Path | None = None,
    items_per_task: list[int] | None = None,
) -> list[dict[str, Any]]:
    """One row per (N, side, repeat). Sides: baseline (the hand-written script), then the flow
    once per ``items_per_task`` (default [1]): ``prefect`` for a task run per item,
    ``prefect/K`` for K items per task run."""
    from _common import diff_counts, key_requests, local_stack, prefect_env, run_child

    sides: list[tuple[str, str, dict[str, Any]]] = [("baseline", "baseline_script", {})]
    for k in items_per_task or [1]:
        name = "prefect" if k == 1 else f"prefect/{k}"
        sides.append((name, "overhead", {"flow": "batch", "items_per_task": k}))
    rows: list[dict[str, Any]] = []
    with local_stack(
        pending_seconds=PENDING, processing_seconds=PROCESSING, rate_limit_per_second=None
    ) as stack:
        base_env = {**stack.env(), "EGGAPI_REQUESTS_PER_SECOND": CLIENT_RATE}
        for n in ns:
            for rep in range(repeats):
                order = sides if rep % 2 == 0 else sides[::-1]
                for side, module, extra in order:
                    home = Path(tempfile.mkdtemp(prefix="eggapi-bench-home-"))
                    env = {
                        **base_env,
                        **prefect_env(home, api_url),
                        "EGGAPI_LEDGER_DIR": str(home / "ledger"),
                    }
                    tag = f"{side.replace('+', '-').replace('/', '-')}-n{n}-r{rep}-{time.time_ns()}"
                    spec = {"n": n, "concurrency": concurrency, "tag": tag, "name": tag, **extra}
                    spec["prefix"] = tag
                    if profile_dir is not None and module == "overhead":
                        spec["profile"] = True
                        spec["profile_path"] = str(profile_dir / f"profile-{tag}.txt")
                    before = key_requests(stack.emulator.audit(), stack.api_key)
                    out = run_child(module, spec, env, log_dir=log_dir)
                    if log_dir is None:  # its SQLite API database: ~40 KiB per image
                        shutil.rmtree(home, ignore_errors=True)
                    audit = stack.emulator.audit()
                    counts = diff_counts(key_requests(audit, stack.api_key), before)
                    completed = {
                        t["task_id"]: t["completed_at_unix"]
                        for t in audit["tasks"]
                        if t.get("completed_at_unix")
                    }
                    lat = latencies(out.pop("persisted_at"), completed)
                    rows.append(
                        {
                            "n": n,
                            "side": side,
                            "repeat": rep,
                            "server": "real" if api_url else "ephemeral",
                            "requests": counts,
                            "latencies": lat,
                            **out,
                        }
                    )
                    print(
                        f"  overhead n={n} {side:<17} wall {out['wall']:6.1f}s  "
                        f"cpu {out['cpu']:6.1f}s  server {out.get('server_cpu', 0):6.1f}s  "
                        f"gc {out.get('gc', 0):5.1f}s ({out.get('gc_full', 0)} full)  "
                        f"images {out['images']}{_lane_line(out.get('lane'))}",
                        flush=True,
                    )
    return rows


def _lane_hold_ms(lane: dict[str, float] | None) -> float:
    """Mean milliseconds a submit held its lane (NaN: no submit timed, e.g. the script)."""
    if not lane or not lane["holds"]:
        return float("nan")
    return 1000 * lane["wall"] / lane["holds"]


def _lane_line(lane: dict[str, float] | None) -> str:
    if not lane or not lane["holds"]:
        return ""
    posts = max(lane["posts"], 1)
    return (
        f"  lane hold {_lane_hold_ms(lane):.1f} ms (its thread's CPU "
        f"{1000 * lane['cpu'] / lane['holds']:.1f} ms, POST {1000 * lane['post'] / posts:.1f} ms)"
    )


def summarize(rows: list[dict[str, Any]]) -> dict[int, dict[str, dict[str, float]]]:
    """Per N and side: median wall, CPU ms per image, ratios against the baseline."""
    from _common import median

    out: dict[int, dict[str, dict[str, float]]] = {}
    for n in sorted({r["n"] for r in rows}):
        by_side: dict[str, dict[str, float]] = {}
        for side in dict.fromkeys(r["side"] for r in rows if r["n"] == n):
            mine = [r for r in rows if r["n"] == n and r["side"] == side]
            lat = sorted(x for r in mine for x in r["latencies"])
            by_side[side] = {
                "wall": median([r["wall"] for r in mine]),
                "cpu_ms_per_image": median([1000 * r["cpu"] / max(r["images"], 1) for r in mine]),
                "server_cpu_ms_per_image": median(
                    [1000 * r.get("server_cpu", 0.0) / max(r["images"], 1) for r in mine]
                ),
                "images": min(r["images"] for r in mine),
                "gc_ms_per_image": median(
                    [1000 * r.get("gc", float("nan")) / max(r["images"], 1) for r in mine]
                ),
                "lane_hold_ms": median([_lane_hold_ms(r.get("lane")) for r in mine]),
                "startup": median([r.get("startup", 0.0) for r in mine]),
                "lat_p50": _pct(lat, 50),
                "lat_p95": _pct(lat, 95),
                "req_per_image": median(
                    [
                        sum(r["requests"].get(e, 0) for e in API_ENDPOINTS) / max(r["images"], 1)
                        for r in mine
                    ]
                ),
            }
        base = by_side.get("baseline")
        for _side, fig in by_side.items():
            if base:
                fig["ratio"] = fig["wall"] / base["wall"]
                fig["cpu_ratio"] = fig["cpu_ms_per_image"] / max(base["cpu_ms_per_image"], 1e-9)
        out[n] = by_side
    return out


API_ENDPOINTS = ("generate", "get_task", "list_tasks", "download")


def _pct(values: list[float], q: float) -> float:
    from _common import percentile

    return percentile(values, q)


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profile", type=Path, default=None, help="write cProfiles here")
    parser.add_argument(
        "--items-per-task",
        type=int,
        nargs="+",
        default=[1],
        help="one flow side per value (1: a task run per item; K: K items per task run)",
    )
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    rows = measure(
        args.n,
        concurrency=args.concurrency,
        repeats=args.repeats,
        profile_dir=args.profile,
        items_per_task=args.items_per_task,
    )
    summary = summarize(rows)
    print(f"emulator pending {PENDING}s processing {PROCESSING}s, concurrency {args.concurrency}")
    print(f"{'N':>6} {'side':<18}{'wall s':>8}{'ratio':>7}{'CPU ms/img':>11}{'p95 s':>7}")
    for n, sides in summary.items():
        for side, f in sides.items():
            print(
                f"{n:>6} {side:<18}{f['wall']:>8.1f}{f.get('ratio', 1):>7.2f}"
                f"{f['cpu_ms_per_image']:>11.1f}{f['lat_p95']:>7.2f}"
            )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        from _common import child_entry

        child_entry(child)
    else:
        main()
