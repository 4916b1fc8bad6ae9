"""The scale-out figures of RESULTS.md (issue 16): overhead and CPU per image at N = 1,000 and
10,000, and the sharded 2-worker row; each with its target, marked met or missed.

Kept apart from ``run_all.py`` so the renderer stays one screen per concern. ``ov`` is
``overhead.summarize(...)`` (per N and side: wall, CPU ms per image of the flow process and of
the API server, ratios against the script of the same run); ``sh`` is ``sharded.measure(...)``.
"""

from __future__ import annotations

from typing import Any

Row = tuple[str, str, str, str]
OVERHEAD_LIMITS = {1000: 1.10, 10000: 1.15}  # flow / script wall time
CPU_LIMIT = 3.0  # (flow process + API server) CPU per image / the script's
RISE_ALLOWANCE = 1.05  # "not rising": at most 5 % above the N = 1,000 figure (run-to-run noise)
POLLING_REQUESTS = 2.5  # requests per image of the batch flow (polling)


def _mark(value: float, limit: float) -> str:
    if value != value:
        return "not measured"
    return "met" if value <= limit else "**missed**"


def together(fig: dict[str, float]) -> float:
    """CPU ms per image of the flow process and the API server together."""
    return fig["cpu_ms_per_image"] + fig["server_cpu_ms_per_image"]


def flow_sides(sides: dict[str, dict[str, float]]) -> list[str]:
    """The flow's sides of one N: ``prefect`` (a task run per item), ``prefect/K`` (K items
    per task run)."""
    return [side for side in sides if side.startswith("prefect")]


def describe(side: str) -> str:
    return (
        "a task run per item" if side == "prefect" else f"{side.split('/')[1]} items per task run"
    )


def overhead_rows(ov: dict[int, dict[str, dict[str, float]]], *, quick: bool) -> list[Row]:
    rows: list[Row] = []
    for n, sides in ov.items():
        base = sides.get("baseline")
        if base is None:
            continue
        limit = OVERHEAD_LIMITS.get(n)
        for side in flow_sides(sides):
            mine = sides[side]
            rows.append(
                (
                    f"1. Overhead N={n} ({describe(side)}): flow / script wall time",
                    f"{mine['ratio']:.2f} ({mine['wall']:.1f} s / {base['wall']:.1f} s)",
                    f"<= {limit:.2f}" if limit else "(info)",
                    _mark(mine["ratio"], limit) if limit and not quick else "(info)",
                )
            )
    for n, sides in ov.items():
        base = sides.get("baseline")
        if base is None:
            continue
        for side in flow_sides(sides):
            mine = sides[side]
            ratio = together(mine) / max(base["cpu_ms_per_image"], 1e-9)
            rows.append(
                (
                    f"1b. CPU per image N={n} ({describe(side)}): flow process + API server / "
                    "script",
                    f"{ratio:.1f}x ({mine['cpu_ms_per_image']:.1f} + "
                    f"{mine['server_cpu_ms_per_image']:.1f} ms vs "
                    f"{base['cpu_ms_per_image']:.1f} ms)",
                    f"<= {CPU_LIMIT:g}x" if n in OVERHEAD_LIMITS else "(info)",
                    _mark(ratio, CPU_LIMIT) if n in OVERHEAD_LIMITS and not quick else "(info)",
                )
            )
            rows.append(
                (
                    f"1c. Requests per image N={n} ({describe(side)}), batch flow (polling)",
                    f"{mine['req_per_image']:.2f}",
                    f"<= {POLLING_REQUESTS:g}",
                    _mark(mine["req_per_image"], POLLING_REQUESTS) if not quick else "(info)",
                )
            )
    small, large = ov.get(1000, {}), ov.get(10000, {})
    for side in flow_sides(large):
        if side not in small:
            continue
        rise = together(large[side]) / together(small[side])
        rows.append(
            (
                f"1d. CPU per image ({describe(side)}), flow + API server, N=10000 / N=1000",
                f"{rise:.2f} ({together(large[side]):.1f} / {together(small[side]):.1f} ms)",
                f"<= {RISE_ALLOWANCE:.2f} (not rising)",
                _mark(rise, RISE_ALLOWANCE),
            )
        )
    return rows


def single_process(
    sh: dict[str, Any], ov: dict[int, dict[str, dict[str, float]]]
) -> dict[str, float] | None:
    """The single-process overhead row that the sharded run compares with: same N, same items
    per task run (else a task run per item)."""
    sides = ov.get(sh["n"], {})
    k = sh.get("items_per_task", 1)
    return sides.get("prefect" if k == 1 else f"prefect/{k}") or sides.get("prefect")


def sharded_rows(sh: dict[str, Any], ov: dict[int, dict[str, dict[str, float]]]) -> list[Row]:
    n = sh["n"]
    if "skipped" in sh:
        return [(f"7. Sharded N={n}, 2 workers on PostgreSQL", sh["skipped"], "-", "not measured")]
    single = single_process(sh, ov)
    vs_single = (
        f"; single process {sh['wall'] / single['wall']:.2f}x its {single['wall']:.1f} s"
        if single
        else ""
    )
    complete = sh["persisted"] == n and sh["lines_not_exactly_once"] == 0
    safe = sh["duplicates"] == 0 and sh["wrong_images"] == 0
    return [
        (
            f"7. Sharded N={n}, {sh['workers']} workers on PostgreSQL: wall vs script",
            f"{sh['ratio']:.2f} ({sh['wall']:.1f} s / {sh['baseline']['wall']:.1f} s){vs_single}",
            "(reported)",
            "",
        ),
        (
            f"7b. Sharded N={n}: persisted; duplicates; wrong images",
            f"{sh['persisted']} of {n}; **{sh['duplicates']}**; **{sh['wrong_images']}**",
            "all; 0; 0",
            "met" if complete and safe else "**missed**",
        ),
    ]


def sharded_details(sh: dict[str, Any], ov: dict[int, dict[str, dict[str, float]]]) -> list[str]:
    """The sharded section's Markdown lines."""
    if "skipped" in sh:
        return ["## 7. Sharded batch on PostgreSQL", "", f"Not measured: {sh['skipped']}", ""]
    cpu, base = sh["cpu_ms_per_image"], sh["baseline"]
    single = single_process(sh, ov)
    lines = [
        "## 7. Sharded batch: 2 process workers, Prefect server on PostgreSQL",
        "",
        f"`sharded_batch_generate` (deployment `sharded-batch`) split N = {sh['n']} into "
        f"{sh['shards']} shard runs of `batch-shard` ({sh['concurrency_per_shard']} items in "
        f"flight each, {sh.get('items_per_task', 1)} items per task run; shard runs per worker: "
        f"{sh['shards_per_worker']}); the script did the "
        "same N with the same total concurrency in the same stack. Wall = from "
        "`prefect deployment run` to the parent's terminal state "
        f"({sh['state']}); the parent run's own start -> end was {sh['parent_seconds']:.1f} s, "
        "its shard runs' "
        + ", ".join(f"{x:.1f}" for x in sh["shard_seconds"])
        + " s (the rest is workers picking runs up and starting their processes).",
        "",
        "| side | wall s | ratio | CPU ms/image |",
        "|---|---|---|---|",
        f"| script | {base['wall']:.1f} | 1.00 | {base['cpu_ms_per_image']:.1f} |",
        f"| sharded, 2 workers | {sh['wall']:.1f} | {sh['ratio']:.2f} | workers (flow runs "
        f"included) {cpu['workers']:.1f} + API server {cpu['server']:.1f} + PostgreSQL "
        f"{cpu['postgres']:.1f} |",
    ]
    if single:
        lines.append(
            f"| single process (overhead row, same N) | {single['wall']:.1f} | "
            f"{single['ratio']:.2f} | flow {single['cpu_ms_per_image']:.1f} + API server "
            f"{single['server_cpu_ms_per_image']:.1f} |"
        )
    lines += [
        "",
        f"Judged from the emulator's audit and S3 (not the ledger): {sh['billable_tasks']} "
        f"billable tasks, **{sh['duplicates']} duplicates**, **{sh['wrong_images']} wrong "
        f"images**, {sh['persisted']} persisted ({sh['not_persisted']} not, "
        f"{sh['persisted_without_bytes']} without their bytes), {sh['status_lines']} lines in "
        f"status.jsonl ({sh['lines_not_exactly_once']} items not exactly once).",
        "",
    ]
    return lines
