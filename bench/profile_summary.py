"""Where the CPU goes, per process, from a ``py-spy record --format speedscope`` file.

    py-spy record --subprocesses --nonblocking --rate 50 --format speedscope -o p.json -- \
        python bench/overhead.py --n 1000
    python bench/profile_summary.py p.json [--cpu-ms flow=61.4 server=55.0] [--top 30]

py-spy writes one profile per thread, named ``Process PID Thread TID "name"``. This groups
them by process, names each process from its stacks (the flow process runs ``batch_generate``,
the API server runs ``prefect/server``, the script ``baseline_script``, the emulator
``testing/emulator``), and splits each process's samples into causes: a sample counts for the
first cause (in ``CAUSES`` order) one of its frames matches, so the shares add up to 100 %.
With ``--cpu-ms ROLE=MS`` (the measured CPU per image of that process, e.g. from overhead.py),
each share is also shown as milliseconds per image, which is what can be compared between two
runs at different N on a loaded machine (py-spy falls behind under load and samples fewer
times, so raw sample counts cannot be compared between runs; shares can).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# (cause, regex on "file:function" of any frame). First match wins, most specific first.
STARTUP = "start-up imports"
CAUSES: list[tuple[str, str]] = [
    # Before the timed batch (overhead.py measures CPU from the batch's start): imports, the
    # API server's lifespan start-up (migrations, block registration) and the flow process
    # waiting for it. On a loaded machine this is a large and variable part of a profile.
    (
        STARTUP,
        r"<frozen importlib\._bootstrap>|Router\.lifespan|uvicorn/lifespan|_migrations/|alembic/"
        r"|prefect/server/api/server\.py:(create_app|SubprocessASGIServer)",
    ),
    # flow process: the library's per-item work, then the Prefect machinery it drives
    ("progress artifact updates", r"artifacts\.py:Progress\.update|update_progress_artifact"),
    ("other artifacts", r"prefect/artifacts\.py|prefect_eggapi/tasks/(artifacts|gallery)"),
    ("events", r"prefect/events/(?!schemas)|emit_task_event|websockets/"),
    ("logs (console + API)", r"prefect/logging/|logging/__init__\.py|rich/"),
    (
        "per-item status objects",
        r"batch\.py:(_Batch\.record|record_item_status|_delete_status"
        r"|_write_status)|flows/status",
    ),
    ("S3 check before download", r"OutputStore\.find_existing"),
    ("EggAPI download", r"_client\.py:(EggAPIClient\.stream_output|DownloadStream)"),
    # s3transfer runs each upload_fileobj on threads of its own (no library frame on them)
    ("S3 upload", r"prefect_eggapi/storage/|_tasks\.py:_persist|s3transfer/"),
    ("ledger and submit lanes", r"prefect_eggapi/safety/"),
    ("poll board", r"prefect_eggapi/client/board"),
    ("EggAPI client (submit, polls, client set-up)", r"prefect_eggapi/client/"),
    (
        "Prefect results / transactions",
        r"prefect/results\.py|prefect/transactions\.py"
        r"|prefect/cache_policies\.py",
    ),
    (
        "Prefect task engine (task runs, states)",
        r"prefect/task_engine\.py|prefect/tasks\.py"
        r"|prefect/client/|prefect/states\.py|prefect/context\.py|prefect/utilities/",
    ),
    ("Prefect flow engine", r"prefect/flow_engine\.py|prefect/flows\.py"),
    # API server
    ("server: task_run_recorder", r"prefect/server/services/task_run_recorder"),
    ("server: event persister", r"prefect/server/events/services/event_persister"),
    ("server: triggers (automations)", r"prefect/server/events/(triggers|actions)"),
    ("server: events in (websocket)", r"prefect/server/api/events\.py"),
    ("server: other API routes", r"prefect/server/api/(?!server\.py)"),
    ("server: database (SQLAlchemy / aiosqlite / asyncpg)", r"sqlalchemy/|aiosqlite/|asyncpg/"),
    ("server: HTTP stack (uvicorn / starlette / fastapi)", r"uvicorn/|starlette/|fastapi/|h11/"),
    ("server: other", r"prefect/server/"),
    # anywhere
    ("emulator", r"prefect_eggapi/testing/emulator"),
    ("S3 (boto3) elsewhere", r"botocore/|boto3/|s3transfer/"),
    ("httpx elsewhere", r"httpx/|httpcore/"),
    ("pydantic", r"pydantic"),
    ("asyncio loop / threads", r"asyncio/|threading\.py|concurrent/futures"),
]
ROLES: list[tuple[str, str]] = [
    ("flow", r"prefect_eggapi/flows/|bench/overhead\.py:child"),
    ("script", r"baseline_script\.py:"),
    ("server", r"prefect/server/api/"),
    ("emulator", r"prefect_eggapi/testing/emulator/app"),
]
# A thread sampled in one of these (top of its stack) is waiting, not computing: py-spy's own
# idle detection misses them with --nonblocking. They are counted apart, not as CPU.
IDLE = re.compile(
    r"(selectors\.py:\w*Selector\.select|threading\.py:(Condition\.wait|Thread\._wait_for_tstate)"
    r"|concurrent/futures/thread\.py:_worker|subprocess\.py:Popen\._wait|SyncStream\.read"
    r"|socket\.py:SocketIO\.readinto|wait\.py:poll_wait_for_socket|time\.sleep"
    r"|threading\.py:Thread\._bootstrap)$"
)
_NAME = re.compile(r"Process (\d+) Thread (\d+) \"(.*)\"")


def _frame_keys(frames: Sequence[dict[str, Any]]) -> list[str]:
    return [f"{f.get('file', '')}:{f.get('name', '')}" for f in frames]


def load(path: Path) -> dict[int, dict[str, Any]]:
    """Per process: its threads' names, its samples (lists of frame keys, root first)."""
    doc = json.loads(path.read_text())
    keys = _frame_keys(doc["shared"]["frames"])
    procs: dict[int, dict[str, Any]] = defaultdict(lambda: {"threads": Counter(), "stacks": []})
    for prof in doc["profiles"]:
        match = _NAME.match(prof.get("name", ""))
        pid = int(match.group(1)) if match else -1
        samples = prof.get("samples", [])
        # A thread's name without its pool index: "eggapi-io_7" and "eggapi-io_9" are one pool.
        thread = re.sub(r"[_-]\d+$", "", match.group(3) if match else "?") or "(unnamed)"
        stacks = [[keys[i] for i in stack] for stack in samples]
        procs[pid]["threads"][thread] += len(busy(stacks))
        procs[pid]["stacks"].extend(stacks)
    return dict(procs)


def role_of(stacks: Iterable[list[str]]) -> str:
    """What a process is, from the first role whose pattern appears in its stacks."""
    text = "\n".join({k for stack in stacks for k in stack})
    for role, pattern in ROLES:
        if re.search(pattern, text):
            return role
    return "other"


def busy(stacks: Sequence[list[str]]) -> list[list[str]]:
    """The samples that were computing: with a Python frame below the ``process ...`` root
    frames py-spy adds (a sample without one was read mid-change under ``--nonblocking``) and
    not waiting in one of ``IDLE``."""
    return [s for s in stacks if not s[-1].startswith(":process ") and not IDLE.search(s[-1])]


def causes(stacks: Sequence[list[str]]) -> Counter[str]:
    """Samples per cause (each sample counted once, for the first matching cause)."""
    compiled = [(name, re.compile(p)) for name, p in CAUSES]
    found: Counter[str] = Counter()
    for stack in stacks:
        joined = "\n".join(stack)
        found[next((n for n, rx in compiled if rx.search(joined)), "other")] += 1
    return found


def leaves(stacks: Sequence[list[str]], top: int) -> list[tuple[str, int]]:
    """The functions most often on top of the stack (self time)."""
    return Counter(stack[-1] for stack in stacks if stack).most_common(top)


def summarize(path: Path, cpu_ms: dict[str, float], top: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pid, proc in sorted(load(path).items()):
        stacks = busy(proc["stacks"])
        if len(stacks) < 50:
            continue
        role = role_of(stacks)
        total = len(stacks)
        shares = {k: v / total for k, v in causes(stacks).most_common()}
        entry = {
            "pid": pid,
            "samples": total,
            "idle_samples": len(proc["stacks"]) - total,
            "shares": shares,
            "leaves": leaves(stacks, top),
            "threads": dict(proc["threads"].most_common(8)),
        }
        if role in cpu_ms:
            # The measured CPU covers the timed batch only, not the start-up the profile saw.
            timed = 1.0 - shares.get(STARTUP, 0.0)
            entry["ms_per_image"] = {
                k: v / timed * cpu_ms[role] for k, v in shares.items() if k != STARTUP
            }
        out[f"{role} (pid {pid})"] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("speedscope", type=Path)
    parser.add_argument("--cpu-ms", nargs="*", default=[], help="ROLE=MS per image")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cpu = {k: float(v) for k, v in (x.split("=", 1) for x in args.cpu_ms)}
    summary = summarize(args.speedscope, cpu, args.top)
    for name, entry in summary.items():
        print(
            f"\n== {name}: {entry['samples']} busy samples ({entry['idle_samples']} waiting); "
            f"busy samples by thread (pool) {entry['threads']}"
        )
        for cause, share in entry["shares"].items():
            ms = entry.get("ms_per_image", {}).get(cause)
            print(f"  {100 * share:5.1f} %  {'' if ms is None else f'{ms:5.1f} ms/img  '}{cause}")
        print("  top self:")
        for key, count in entry["leaves"]:
            print(f"    {100 * count / entry['samples']:5.1f} %  {key[-110:]}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
