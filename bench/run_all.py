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
**Machine first.** The same commit of 2026-11-25 (6d89d29) that gave 1.21 and 24.9 ms per image
here then gives 1.79 and 46.4 ms today (Prefect 3.8.4, same venv as HEAD), and the *script's* CPU
per image went from 7.0 to 14-19 ms with no change to its code: this machine does about half the
work per CPU second it did then, and a flow that was not CPU-bound is now. HEAD in the same
environment: 1.76 (3.8.4) / 1.96 (3.9.1), so the code since then neither lost nor won much.

**A task run per item** (`prefect`): 44-48 ms of API server CPU per image (its SQLite database:
6 events with 21 `event_resources` rows, 5.3 log rows, 3 states per image; see
`bench/profiles/compare-*.txt`), rising with N as the database outgrows its page cache.
`items_per_task=100` (`prefect/100`) removes the per-item states and Prefect's task-run events
and makes the steps log warnings only (one line per item): server CPU per image 44.4 -> 13.0 ms
at N = 1,000, flow 54.1 -> 32.4 ms, wall ratio 2.03 -> 1.40.

**What is left, N = 1,000, 100 items per task run** (`bench/profiles/chunked100-n1000.txt`,
py-spy, idle machine): flow 34.9 ms per image, of which the SQLite ledger and submit lanes 8.7,
the S3 upload 7.9 (the script's upload costs about the same), per-item status objects 3.9, EggAPI
client set-up and calls 3.5 (a new client per submit, wait and persist), events 2.3, the HEAD
before each download 2.3, asyncio 2.7; the Prefect task engine 0.2 and logs 0.9. The server's
13-14 ms is mostly its database storing the 3 `eggapi.task.*` events per image.

**Wall time is bounded by the submit lane, not only by CPU.** POSTs of one model go one at a time
per ledger (`submits_in_flight=1`, so that lost answers stay attributable). The overhead child
prints each side's mean lane hold, the holder's own CPU in it and its POST time: with 64 I/O
threads a hold was 56.5 ms for 5.0 ms of CPU, the rest spent winning back the GIL from ~50
runnable threads at each SQLite statement and socket call, and 1,000 holds were 56.5 s of an
84.7 s run. Transfers now run in a pool of 16 threads and submits (which wait for their lane
blocked) in a pool of their own: hold ~21 ms, ratio 1.44 against 1.88-2.21 the same day
(`bench/profiles/lane-and-threads-2026-12-02.txt`); the lane hold column above is this run's
figure. Before that change, `submits_in_flight=8`
gave 1.33 instead of 1.72 (one pair each).

**Flat with N.** The GC column is the cyclic collector's share (3 ms per image at every N
measured). The morning run of 2026-12-02 showed CPU per image rising 29 % from N = 1,000 to
10,000 with 100 items per task run; same-code pairs that evening (1,000 vs 4,000, and 1,000 vs
10,000 with chunk runs started in turn) were flat within 2 %, while one N alone moved 49-63 ms
between runs: the rise was the machine between two sides an hour apart, not the batch.
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
            "| GC ms/image | lane hold ms | req/image | completion -> S3 p50 / p95 s |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|")
        for n, sides in ov.items():
            for side, g in sides.items():
                add(
                    f"| {n} | {side} | {g['wall']:.1f} | {g.get('ratio', 1):.2f} | "
                    f"{g['cpu_ms_per_image']:.1f} | {g['server_cpu_ms_per_image']:.1f} | "
                    f"{f(g.get('gc_ms_per_image', float('nan')))} | "
                    f"{f(g.get('lane_hold_ms', float('nan')))} | "
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
