"""The one benchmark command: runs every bench, prints the table, writes bench/RESULTS.md.

    python bench/run_all.py            # full run (about an hour on 2 cores: N = 10,000 twice)
    python bench/run_all.py --quick    # small N smoke test (a few minutes); writes nothing
                                       # unless --out is given
    python bench/run_all.py --only sharded --sharded-n 200   # one section, at a small N

Every figure is a ratio or a count measured within this run against a baseline measured in the
same run; absolute seconds are shown for context only. Each bench starts its own local stack
(EggAPI emulator + SeaweedFS on loopback) and runs each measured side in a fresh process.

Above 400 lines because most of it is RESULTS.md's Markdown, read top to bottom as one page;
the scale-out rows and the sharded section are rendered by ``scale_rows.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import api_efficiency
import overhead
import persist_memory
import ratelimit_use
import scale_rows
import sharded

FULL = {
    "overhead_n": [200, 1000, 10000],
    "items_per_task": [1, 100],
    "concurrency": 50,
    "api_n": 16,
    "api_concurrency": 8,
    "api_processing": [3.0, 10.0],
    "rate_n": 200,
    "rate_limit": 20.0,
    "rate_concurrency": 100,
    "memory_counts": [10, 100],
    "server_n": 200,
    "sharded_n": 10000,
    "sharded_workers": 2,
}
QUICK = {
    "overhead_n": [50],
    "items_per_task": [1, 10],
    "concurrency": 25,
    "api_n": 6,
    "api_concurrency": 3,
    "api_processing": [3.0],
    "rate_n": 60,
    "rate_limit": 20.0,
    "rate_concurrency": 50,
    "memory_counts": [2, 4],
    "server_n": 50,
    "sharded_n": 60,
    "sharded_workers": 2,
}
SECTIONS = ["overhead", "api", "rate", "memory", "server", "sharded"]

WHERE_TIME_GOES = """\
From `py-spy record --subprocesses --nonblocking --rate 50 --format speedscope` of
`python bench/overhead.py --n 1000`, `--n 3000` and `--n 5000` (2026-12-02, code of f2cf82b, a
2-core machine under heavy load from other jobs, which roughly doubled every CPU figure). CPU per
image, N = 1,000 / 3,000 / 5,000: flow process 61.4 / 62.7 / 63.8 ms, API server 55.0 / 67.4 /
70.1 ms, script 14.3 / 16.1 / 17.5 ms. Shares are taken within one process, start-up samples
left out, and scaled to that run's measured CPU per image; `python bench/profile_summary.py FILE
--cpu-ms flow=MS server=MS` redoes it for any profile.

**The API server is what grows** (+27 % per image from N = 1,000 to 5,000). Its SQLite work
(SQLAlchemy + aiosqlite) is 62 % of its CPU and rose from 34 to 43 ms per image, most of it in
compiling and running the bulk INSERTs of the event persister and the task-run recorder (the
recorder itself 7.0 -> 9.4 ms). Per image the server stores 6 events (Prefect's 3 task-run state
events and the library's `eggapi.task.submitted`, `.completed`, `.persisted`) with 21
`event_resources` rows, 5.3 log rows, 3 task-run states and 1 task run: 39 KiB of database per
image (191 MB at N = 5,000; 83 % of it events and their 8 indexes), so at 10,000 items a 400 MB
SQLite file sits behind a 2 MB page cache and every insert into the UUID-keyed indexes touches
more uncached pages. The recorder also lags: when the N = 1,000 flow ended the server had
recorded 755 of its 1,000 task runs (2,972 of 3,000 at N = 3,000).

**The flow process is nearly flat** (+4 %); per image at N = 1,000: S3 work 19 ms (the upload
through s3transfer's thread pool 12.3, the per-item status object's conditional PUT and DELETE
5.5 -> 7.2 at 5,000, a LIST before each download 1.7; inside the upload a HEAD after each PUT
2.8; the script makes one PUT), one Prefect task run per item 7.4 (`with_options` per item 1.1),
run logs 7.5 (5 INFO lines per item, each rendered by rich to the console, 4.2, and sent to the
API), the SQLite ledger 6.1, progress artifact updates 4.1 (each builds a new sync Prefect
client: TLS context and connection), events 3.9 (per-message deflate on the events websocket
1.8), the asyncio loop 3.5, a new EggAPI client per submit 2.5, EggAPI downloads 2.4, and the
poll board 1.3, the steepest riser (3.5 at N = 5,000: pydantic parsing of whole 100-task list
pages).

Fixed on the way (measured before in this table's earlier versions): one SSL context per process
instead of two per client (41 % of CPU), an I/O pool of 64 threads instead of asyncio's 6, run
scope read from memory, throttled progress updates, one boto3 client per S3 settings instead of
one per persist (0.3 s of every completion -> S3), and polls of concurrent waits served by shared
`GET /v1/tasks` pages.
"""


API_NOTES = """\
Polling: the waits of one account in a process hand their polls to a shared board, and one
`GET /v1/tasks?per_page=100` page answers every poll that is due (each may run up to 30 % early);
a poll the page does not answer is read with its own GET ("GET task/image"). Once a completion
has been seen, each wait sleeps until just after the learned completion time. Cold waits (the
first wave, before anything completed) still poll on the 1 s, x1.5 schedule, capped at 2 s while
pages are shared: that is most of the polling latency above.

Webhooks: 3 requests per image is the floor with one output per task under the design's rule to
re-read the task rather than trust a delivery (submit, the receiver's one re-read, the
download); the receiver now stores the task it read with the signal and the woken wait uses it,
so the wait makes no GET of its own (4 requests before). Reaching 2.5 would mean trusting the
signed payload; with 2 outputs per task the same path makes 2 requests per image (row above).
'polls saw' counts the statuses the flow's own GETs returned (the receiver's re-read is not
included there but is in req/image).
"""


def _target(value: float, limit: float, *, at_most: bool = True) -> str:
    if value != value:
        return "not measured"
    ok = value <= limit if at_most else value >= limit
    return "met" if ok else "**missed**"


def run_section(name: str, fn: Any, results: dict[str, Any], errors: dict[str, str]) -> None:
    started = time.monotonic()
    print(f"== {name}", flush=True)
    try:
        results[name] = fn()
    except Exception:
        errors[name] = traceback.format_exc()
        print(f"!! {name} failed:\n{errors[name]}", flush=True)
    print(f"== {name}: {time.monotonic() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N smoke test")
    parser.add_argument("--out", type=Path, default=None, help="where to write the Markdown")
    parser.add_argument(
        "--only", nargs="+", default=None, choices=SECTIONS, help="run only these sections"
    )
    parser.add_argument(
        "--sharded-n", type=int, default=None, help="N of the sharded row (full run: 10,000)"
    )
    parser.add_argument("--keep-logs", type=Path, default=None, help="keep child logs here")
    parser.add_argument(
        "--render", type=Path, default=None, help="only re-render the Markdown from a raw JSON"
    )
    args = parser.parse_args()
    if args.render is not None:
        raw = json.loads(args.render.read_text())
        text = render(raw["params"], raw["results"], {}, raw["wall"], quick=raw.get("quick", False))
        (args.out or Path(__file__).parent / "RESULTS.md").write_text(text)
        return
    params = dict(QUICK if args.quick else FULL)
    if args.sharded_n is not None:
        params["sharded_n"] = args.sharded_n
    # RESULTS.md is one full run: a quick, partial or resized run writes only where --out says.
    partial = args.quick or args.only or args.sharded_n is not None
    out_path = args.out or (None if partial else Path(__file__).parent / "RESULTS.md")
    log_dir = args.keep_logs
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only or SECTIONS)
    started = time.monotonic()
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}

    if "overhead" in wanted:
        run_section(
            "overhead",
            lambda: overhead.measure(
                params["overhead_n"],
                concurrency=params["concurrency"],
                log_dir=log_dir,
                items_per_task=params["items_per_task"],
            ),
            results,
            errors,
        )
    if "api" in wanted:
        run_section(
            "api",
            lambda: api_efficiency.measure(
                params["api_n"],
                params["api_concurrency"],
                tuple(params["api_processing"]),
                log_dir=log_dir,
            ),
            results,
            errors,
        )
    if "rate" in wanted:
        run_section(
            "rate",
            lambda: [
                ratelimit_use.measure(
                    params["rate_n"],
                    params["rate_limit"],
                    params["rate_concurrency"],
                    log_dir=log_dir,
                )
            ],
            results,
            errors,
        )
    if "memory" in wanted:
        run_section(
            "memory",
            lambda: persist_memory.measure(params["memory_counts"], ["default"])["default"],
            results,
            errors,
        )
    if "server" in wanted:

        def server() -> Any:
            with _common.PrefectServer() as srv:
                return overhead.measure(
                    [params["server_n"]],
                    concurrency=params["concurrency"],
                    api_url=srv.api_url,
                    log_dir=log_dir,
                )

        run_section("server", server, results, errors)
    if "sharded" in wanted:
        run_section(
            "sharded",
            lambda: sharded.measure(
                params["sharded_n"],
                workers=params["sharded_workers"],
                concurrency=params["concurrency"],
                log_dir=log_dir,
            ),
            results,
            errors,
        )

    wall = time.monotonic() - started
    raw_path = Path(tempfile.gettempdir()) / "eggapi-bench-results.json"
    raw_path.write_text(
        json.dumps({"params": params, "results": results, "wall": wall, "quick": args.quick})
    )
    print(f"raw results: {raw_path}")
    text = render(params, results, errors, wall, quick=args.quick)
    print()
    print(text)
    if out_path is not None:
        out_path.write_text(text)
        print(f"wrote {out_path}")
    if errors:
        sys.exit(1)


# --------------------------------------------------------------------------- rendering


def render(
    params: dict[str, Any],
    results: dict[str, Any],
    errors: dict[str, str],
    wall: float,
    *,
    quick: bool,
) -> str:
    f = _common.fmt
    nan = float("nan")
    lines: list[str] = []
    add = lines.append
    add("# prefect-eggapi benchmark results")
    add("")
    add(
        f"Generated by `python bench/run_all.py{' --quick' if quick else ''}` on "
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} in {wall / 60:.1f} min. "
        "Every figure is a ratio or a count measured in this run against a baseline measured "
        "in the same run; seconds are context only (a noisy 2-core machine). "
        "How to run and what each figure means: [README.md](README.md)."
    )
    add("")

    # ---- headline table
    ov = overhead.summarize(results["overhead"]) if "overhead" in results else {}
    api = results.get("api", [])
    rate = results.get("rate", [])
    mem = results.get("memory", [])
    sh = results.get("sharded")
    rows: list[tuple[str, str, str, str]] = scale_rows.overhead_rows(ov, quick=quick)
    for r in api:
        lim = 4.0 if r["mode"] == "polling" else 2.5
        if r["mode"] not in ("polling", "webhooks"):  # a variation, reported for context
            rows.append(
                (
                    f"2. Requests per image, {r['mode']}, processing {r['processing']:g} s",
                    f"{r['per_image']:.2f}",
                    "(info)",
                    "",
                )
            )
            continue
        rows.append(
            (
                f"2. Requests per image, {r['mode']}, processing {r['processing']:g} s",
                f"{r['per_image']:.2f}",
                f"<= {lim:g}",
                _target(r["per_image"], lim),
            )
        )
    for r in api:
        if r["mode"] not in ("polling", "webhooks"):
            continue
        target = _target(r["lat_p95"], 0.5) if r["mode"] == "webhooks" else "(info)"
        rows.append(
            (
                f"3. Completion -> in S3, {r['mode']}, processing {r['processing']:g} s: p50 / p95",
                f"{f(r['lat_p50'])} s / {f(r['lat_p95'])} s",
                "p95 <= 0.5 s with webhooks",
                target,
            )
        )
    if len(mem) >= 2:
        g0 = mem[0]["after_mb"] - mem[0]["before_mb"]
        g1 = mem[-1]["after_mb"] - mem[-1]["before_mb"]
        rows.append(
            (
                f"4. Peak RSS growth persisting {mem[-1]['n']} vs {mem[0]['n']} x 4k images",
                f"{g1 - g0:+.1f} MB ({g0:.1f} -> {g1:.1f} MB above warm-up)",
                "<= 64 MB",
                _target(g1 - g0, 64.0),
            )
        )
    for r in rate:
        rows.append(
            (
                "5. Rate-limit use: achieved / limit; 429s",
                f"{100 * r['use']:.0f} % of {r['limit']:g}/s; {r['status_429']} x 429 "
                f"({100 * r['share_429']:.1f} %)",
                ">= 90 %",
                _target(r["use"], 0.9, at_most=False),
            )
        )
    for n, sides in ov.items():
        for side, fig in sides.items():
            rows.append(
                (
                    f"6. Client CPU per image, N={n}, {side}",
                    f"{fig['cpu_ms_per_image']:.1f} ms"
                    + (f" (x{fig['cpu_ratio']:.1f} baseline)" if side != "baseline" else ""),
                    "(info)",
                    "",
                )
            )
    srv = overhead.summarize(results["server"]) if "server" in results else {}
    for n, sides in srv.items():
        for side in scale_rows.flow_sides(sides):
            if side in sides:
                eph = ov.get(n, {}).get(side, {}).get("ratio", nan)
                rows.append(
                    (
                        f"Real `prefect server start` (SQLite), N={n}: flow / baseline ({side})",
                        f"{sides[side]['ratio']:.2f} (ephemeral: {f(eph)})",
                        "(info)",
                        "",
                    )
                )
    if sh:
        rows += scale_rows.sharded_rows(sh, ov)
    add("| figure | measured | target | |")
    add("|---|---|---|---|")
    for row in rows:
        add("| " + " | ".join(row) + " |")
    if errors:
        add("")
        add("Sections that failed in this run: " + ", ".join(errors) + " (tracebacks below).")
    add("")

    # ---- machine and parameters
    add("## Machine and versions")
    add("")
    for k, v in _common.machine_info().items():
        add(f"- {k}: {v}")
    add("")
    add("## Parameters")
    add("")
    add(
        f"- Overhead: N = {params['overhead_n']}, concurrency {params['concurrency']} on both "
        f"sides, emulator pending {overhead.PENDING} s / processing {overhead.PROCESSING} s, "
        "emulator rate limit off, `EGGAPI_REQUESTS_PER_SECOND="
        f"{overhead.CLIENT_RATE}` (client limiter out of the way), 1 x 1344x768 PNG per prompt; "
        "order baseline -> prefect; the flow once per `items_per_task` in "
        f"{params.get('items_per_task', [1])} (`prefect` = 1, a task run per item; `prefect/K` = "
        "K items per task run); ephemeral API server started (and "
        "excluded from the timing) by a warm-up flow in the same process."
    )
    add(
        f"- API efficiency and latency: {params['api_n']} prompts per mode, "
        f"{params['api_concurrency']} in flight (so later items poll with learned durations), "
        f"pending {api_efficiency.PENDING} s, processing {params['api_processing']} s; the "
        "library's tasks (`asubmit_generation` -> `await_for_task` -> `adownload_outputs`) in "
        "a flow; webhook mode: signed webhooks to a `WebhookReceiver` + `SQLiteSignals`, "
        "backstop poll 15-60 s."
    )
    add(
        f"- Rate limit: `batch_generate`, {params['rate_n']} prompts, concurrency "
        f"{params['rate_concurrency']}, emulator limit {params['rate_limit']:g} req/s per key, "
        f"client `EGGAPI_REQUESTS_PER_SECOND={params['rate_limit']:g}`, pending 0.5 s, "
        "processing 3 s; achieved rate between 10 % and 90 % of the requests."
    )
    add(
        f"- Memory: `download_outputs` (the pipeline's persist step) of {params['memory_counts']}"
        " nanobanana-pro 4k outputs (5504x3072 random-pixel PNGs, ~36 MiB each), each count in "
        "a fresh process after a warm-up image; growth = peak RSS after - before."
    )
    add(
        f"- Real server: the overhead pair at N = {params['server_n']} with `PREFECT_API_URL` "
        "pointing at `prefect server start` (own PREFECT_HOME, SQLite) instead of the "
        "ephemeral server."
    )
    if "sharded_n" in params:  # raw figures of runs before the sharded row have none
        add(
            f"- Sharded: `python bench/sharded.py` at N = {params['sharded_n']}: "
            f"{params['sharded_workers']} `prefect worker start` process workers (and one for "
            "the parent), `prefect server start` on a PostgreSQL cluster of its own, one shard "
            f"per worker, the same total concurrency ({params['concurrency']}) and emulator "
            "timing as the overhead pair, the script in the same stack."
        )
    add("")

    # ---- details
    if ov:
        add("## 1 and 6. Overhead and client CPU")
        add("")
        add(
            "| N | side | flow wall s | ratio | client CPU ms/image | API server CPU ms/image "
            "| req/image | completion -> S3 p50 / p95 s |"
        )
        add("|---|---|---|---|---|---|---|---|")
        for n, sides in ov.items():
            for side, g in sides.items():
                add(
                    f"| {n} | {side} | {g['wall']:.1f} | {g.get('ratio', 1):.2f} | "
                    f"{g['cpu_ms_per_image']:.1f} | {g['server_cpu_ms_per_image']:.1f} | "
                    f"{g['req_per_image']:.2f} | {f(g['lat_p50'])} / {f(g['lat_p95'])} |"
                )
        add("")
        add("### Where the time goes")
        add("")
        add(WHERE_TIME_GOES)
    if api:
        add("## 2 and 3. Requests per image and detection latency")
        add("")
        add(
            "| processing s | mode | images | req/image | GET task/image | polls saw "
            "(pending/processing/completed) | p50 s | p95 s | completion -> receiver p50 s | "
            "receiver -> S3 p50 s |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|")
        for r in api:
            pb = r["polls_by_status"]
            seen = "/".join(str(pb.get(s, 0)) for s in ("pending", "processing", "completed"))
            webhook_only = r["mode"] != "polling"
            add(
                f"| {r['processing']:g} | {r['mode']} | {r['images']} | {r['per_image']:.2f} | "
                f"{r['polls_per_image']:.2f} | {seen} | {f(r['lat_p50'])} | {f(r['lat_p95'])} | "
                f"{f(r['to_receiver_p50']) if webhook_only else '-'} | "
                f"{f(r['receiver_to_s3_p50']) if webhook_only else '-'} |"
            )
        add("")
        add(API_NOTES)
        add("")
    if rate:
        add("## 5. Rate-limit use")
        add("")
        add("| API requests | achieved req/s | use | 429s | window s |")
        add("|---|---|---|---|---|")
        for r in rate:
            add(
                f"| {r['api_requests']} {r['requests']} | {r['achieved_rate']:.1f} | "
                f"{100 * r['use']:.0f} % | "
                f"{r['status_429']} | {r['window_s']:.1f} |"
            )
        add("")
    if mem:
        add("## 4. Memory")
        add("")
        add("| 4k images | MiB stored | peak RSS before MB | after MB | growth MB | seconds |")
        add("|---|---|---|---|---|---|")
        for r in mem:
            add(
                f"| {r['n']} | {r['bytes'] / 2**20:.0f} | {r['before_mb']:.1f} | "
                f"{r['after_mb']:.1f} | {r['after_mb'] - r['before_mb']:.1f} | {r['seconds']:.1f} |"
            )
        add("")
    if srv:
        add("## Real `prefect server start` vs the ephemeral server")
        add("")
        add("| N | side | server | flow wall s | ratio | client CPU ms/image |")
        add("|---|---|---|---|---|---|")
        for n, sides in srv.items():
            for side, g in sides.items():
                add(
                    f"| {n} | {side} | real | {g['wall']:.1f} | {g.get('ratio', 1):.2f} | "
                    f"{g['cpu_ms_per_image']:.1f} |"
                )
                e = ov.get(n, {}).get(side)
                if e:
                    add(
                        f"| {n} | {side} | ephemeral | {e['wall']:.1f} | {e.get('ratio', 1):.2f}"
                        f" | {e['cpu_ms_per_image']:.1f} |"
                    )
        add("")
    if sh:
        lines += scale_rows.sharded_details(sh, ov)
    if errors:
        add("## Failed sections")
        add("")
        for name, tb in errors.items():
            add(f"### {name}")
            add("")
            add("```")
            add(tb.strip()[-3000:])
            add("```")
            add("")
    raw = {
        k: v
        for k, v in results.items()
        if k in ("api", "rate", "memory", "sharded")  # small enough to keep verbatim
    }
    add("<details><summary>raw figures (JSON)</summary>")
    add("")
    add("```json")
    add(json.dumps({"params": params, **raw, "overhead": ov, "server": srv}, indent=1, default=str))
    add("```")
    add("</details>")
    add("")
    return "\n".join(lines)


if __name__ == "__main__":
    tempfile.tempdir = None
    main()
