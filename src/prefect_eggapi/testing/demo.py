"""``prefect-eggapi demo``: the whole job end to end on one machine, no account, no network.

Starts the local stack (EggAPI emulator + SeaweedFS S3 + a bucket), runs the image pipeline on
Prefect (ephemeral API server unless ``PREFECT_API_URL`` is set), checks the stored objects
(pixel size, sha256 metadata against the bytes), reruns it to show that a rerun pays nothing and
writes nothing, prints the S3 URIs, the cost and how to see the run in the Prefect UI, then stops
every process it started and checks that none is left.

The images lived in a temporary S3 server, so before stopping it the demo copies them next to a
local gallery page (``./eggapi-demo/gallery.html`` by default, ``--gallery-dir`` to choose,
``--no-gallery`` to skip) and prints its path: something to look at after the demo is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

from prefect_eggapi.client.imageinfo import sniff
from prefect_eggapi.client.pricing import format_cost
from prefect_eggapi.client.types import AspectRatio, Model, Resolution
from prefect_eggapi.flows import PipelineSummary, image_pipeline
from prefect_eggapi.tasks.gallery import write_local_gallery
from prefect_eggapi.testing._process import alive_pids
from prefect_eggapi.testing.stack import LocalStack

__all__ = ["DemoError", "DemoOptions", "run_demo", "ui_hint", "ui_url"]

DEMO_BUCKET = "eggapi-demo"
DEFAULT_GALLERY_DIR = Path("eggapi-demo")
DEMO_EDITS = (
    "turn the scene to night with warm window lights",
    "add gently falling snow",
)


@dataclass(frozen=True)
class DemoOptions:
    """What to run (``prefect-eggapi demo``'s options: :mod:`prefect_eggapi.cli.demo`)."""

    count: int = 3
    rounds: int = 2
    model: Model = "nanobanana-pro"
    resolution: Resolution = "1k"
    aspect_ratio: AspectRatio = "16:9"
    seed: int = 7
    concurrency: int = 4
    pending_seconds: float = 0.3
    processing_seconds: float = 1.5
    presigned_inputs: bool = False
    rerun: bool = True
    gallery_dir: Path | None = DEFAULT_GALLERY_DIR  # None: no local gallery


class DemoError(RuntimeError):
    """The demo ran but what it checks did not hold (objects, cost, idempotent rerun)."""


def _say(message: str = "") -> None:
    print(message, flush=True)


def _verify_objects(stack: LocalStack, summary: PipelineSummary, manifest: dict[str, Any]) -> int:
    """Download every image: sha256 of the bytes == metadata == manifest, size and pixels match."""
    client = stack.output_store().client
    checked = 0
    for item in manifest["items"]:
        obj = client.get_object(Bucket=stack.bucket, Key=item["key"])
        digest = hashlib.sha256()
        head = b""
        size = 0
        for chunk in obj["Body"].iter_chunks(1024 * 1024):
            if len(head) < 65536:
                head += chunk[: 65536 - len(head)]
            digest.update(chunk)
            size += len(chunk)
        meta = obj.get("Metadata") or {}
        info = sniff(head)
        problems = []
        if digest.hexdigest() != meta.get("sha256") or digest.hexdigest() != item["sha256"]:
            problems.append("sha256 of the bytes does not match the metadata/manifest")
        if size != item["size"]:
            problems.append(f"size {size} != manifest {item['size']}")
        if (info.width, info.height) != (item["width"], item["height"]):
            problems.append(f"pixels {info.width}x{info.height} != manifest")
        if problems:
            raise DemoError(f"{item['s3_uri']}: {'; '.join(problems)}")
        checked += 1
    if checked != len(summary.images):
        raise DemoError(f"manifest lists {checked} images, the run returned {len(summary.images)}")
    return checked


def _read_manifest(stack: LocalStack, uri: str) -> dict[str, Any]:
    key = uri.split("/", 3)[3]
    body = stack.output_store().client.get_object(Bucket=stack.bucket, Key=key)["Body"].read()
    data: dict[str, Any] = json.loads(body)
    return data


def _object_count(stack: LocalStack) -> int:
    client = stack.output_store().client
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket):
        count += len(page.get("Contents", []))
    return count


def _write_gallery(stack: LocalStack, manifest: dict[str, Any], directory: Path) -> Path:
    """The run's images copied next to a local HTML page, while the S3 server still runs."""
    page = write_local_gallery(manifest, stack.output_store(), directory)
    return page.resolve()


def ui_url(api_url: str) -> str:
    """The Prefect UI address for the API at ``api_url``.

    Prefect's own ``PREFECT_UI_URL`` setting when it has one (set explicitly, or derived from
    ``PREFECT_API_URL``: ``/api`` stripped, Prefect Cloud's app address), else ``api_url`` without
    a trailing ``/api``.
    """
    ui: str | None = None
    if (PREFECT_API_URL.value() or "").rstrip("/") == api_url.rstrip("/"):
        ui = PREFECT_UI_URL.value()
    if not ui:
        ui = api_url.rstrip("/").removesuffix("/api")
    return ui.rstrip("/")


def ui_hint(api_url: str | None) -> list[str]:
    """Where to see the demo's runs: the UI of ``api_url``, or how to start a server with one."""
    if api_url:
        return [f"  open {ui_url(api_url)} -> Runs -> eggapi-image-pipeline (artifacts tab)"]
    return [
        "  prefect server start                      # in another shell, then:",
        "  PREFECT_API_URL=http://127.0.0.1:4200/api prefect-eggapi demo",
        "  open http://127.0.0.1:4200 -> Runs -> eggapi-image-pipeline (artifacts tab)",
    ]


def _stop_ephemeral_prefect() -> list[int]:
    """Stop Prefect's ephemeral API server(s) now (not at interpreter exit); their PIDs."""
    pids: list[int] = []
    for server in list(getattr(SubprocessASGIServer, "_instances", {}).values()):
        process = getattr(server, "server_process", None)
        if process is not None:
            pids.append(int(process.pid))
        with contextlib.suppress(Exception):
            server.stop()
    return pids


def run_demo(args: DemoOptions) -> int:
    """The whole demo; returns the exit status (0: everything ran and checked out).

    How loud Prefect is was decided when it was imported (``prefect-eggapi demo`` keeps the
    terminal quiet unless ``--verbose``: :mod:`prefect_eggapi.cli.demo`)."""
    started = time.monotonic()
    ledger_dir = tempfile.mkdtemp(prefix="eggapi-demo-ledger-")
    saved_env = {
        k: os.environ.get(k)
        for k in (
            "EGGAPI_LEDGER_DIR",
            "EGGAPI_API_KEY",
            "EGGAPI_BASE_URL",
            "EGGAPI_S3_BUCKET",
            "EGGAPI_S3_PREFIX",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL_S3",
            "AWS_ENDPOINT_URL",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
        )
    }
    # A fresh emulator knows no earlier task: the ledger must be fresh too.
    os.environ["EGGAPI_LEDGER_DIR"] = ledger_dir
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(k, None)

    stack = LocalStack(
        bucket=DEMO_BUCKET,
        pending_seconds=args.pending_seconds,
        processing_seconds=args.processing_seconds,
    )
    timings: dict[str, float] = {}
    prefect_pids: list[int] = []
    status = 1
    rounds = args.rounds
    _say(
        f"prefect-eggapi demo: {args.count} prompt(s) × (1 generation + {rounds} edit round(s)) "
        f"with {args.model} {args.resolution} {args.aspect_ratio}, on the local stack"
    )
    try:
        t = time.monotonic()
        _say("Starting the local stack (EggAPI emulator + SeaweedFS S3) ...")
        stack.start()
        timings["stack start"] = time.monotonic() - t
        _say(
            f"  emulator  {stack.base_url}  (pid {stack.pids[0]})\n"
            f"  S3        {stack.s3_endpoint_url}  (SeaweedFS, pid {stack.pids[-1]}), "
            f"bucket s3://{stack.bucket}\n"
            f"  up in {timings['stack start']:.1f} s"
        )
        os.environ.update(stack.env())
        api_url = PREFECT_API_URL.value()
        where = api_url or "an ephemeral Prefect API server (started now, stopped at the end)"
        _say(f"Running the pipeline on {where} ...")
        params: dict[str, Any] = dict(
            model=args.model,
            resolution=args.resolution,
            aspect_ratio=args.aspect_ratio,
            count=args.count,
            seed=args.seed,
            edit_instructions=list(DEMO_EDITS[:rounds]),
            concurrency=args.concurrency,
            use_presigned_inputs=args.presigned_inputs,
            wait_timeout=120.0,
        )
        t = time.monotonic()
        summary: PipelineSummary = asyncio.run(image_pipeline(**params))
        timings["pipeline"] = time.monotonic() - t
        assert stack.emulator is not None
        audit = stack.emulator.created_tasks()
        billed = sum((Decimal(str(a.get("billed", "0"))) for a in audit), Decimal("0"))
        manifest = _read_manifest(stack, summary.manifest_uri)
        _verify_objects(stack, summary, manifest)

        _say(f"\nImages ({len(summary.images)}), verified in S3 (sha256 metadata = bytes):")
        for item in manifest["items"]:
            _say(
                f"  {item['s3_uri']}  {item['width']}x{item['height']}  "
                f"{item['size'] / 1024:.0f} KiB  item {item['item']} round {item['round']}: "
                f"{item['prompt'][:60]}"
            )
        _say(f"Manifest: {summary.manifest_uri}")
        _say(
            f"Total cost: {format_cost(summary.total_cost)} for "
            f"{summary.submitted_tasks} billable task(s) "
            f"(the emulator billed {format_cost(billed)} for {len(audit)})"
        )
        if billed != summary.total_cost:
            raise DemoError(f"report total {summary.total_cost} != emulator billed {billed}")
        if args.gallery_dir is not None:
            page = _write_gallery(stack, manifest, args.gallery_dir)
            _say(f"Gallery (works after the demo stopped S3): {page}")

        if args.rerun:
            objects_before = _object_count(stack)
            t = time.monotonic()
            again: PipelineSummary = asyncio.run(image_pipeline(**params))
            timings["rerun"] = time.monotonic() - t
            new_tasks = len(stack.emulator.created_tasks()) - len(audit)
            new_objects = _object_count(stack) - objects_before
            _say(
                f"Rerun with the same parameters: {new_tasks} new billable task(s), "
                f"{new_objects} new S3 object(s), new cost {format_cost(again.new_cost)} "
                f"({again.reused_tasks} task(s) reconnected through the ledger)"
            )
            if new_tasks or new_objects or again.manifest_uri != summary.manifest_uri:
                raise DemoError("the rerun was not idempotent")

        _say("\nSee it in the Prefect UI:")
        for line in ui_hint(api_url):
            _say(line)
        status = 0
    except KeyboardInterrupt:
        _say("\nInterrupted.")
        status = 130
    except Exception as exc:
        print(f"\ndemo failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        status = 1
    finally:
        t = time.monotonic()
        pids = stack.pids
        stack.stop()
        prefect_pids = _stop_ephemeral_prefect()
        timings["stop"] = time.monotonic() - t
        left = alive_pids(pids + prefect_pids)
        names = ", ".join(
            f"{n} {p}"
            for n, p in zip(
                ["emulator", "SeaweedFS"] + ["Prefect server"] * len(prefect_pids),
                pids + prefect_pids,
                strict=False,
            )
        )
        if left:
            print(f"demo: processes still alive: {left}", file=sys.stderr, flush=True)
            status = status or 1
        else:
            _say(f"Stopped every process the demo started ({names or 'none'}); none left.")
        shutil.rmtree(ledger_dir, ignore_errors=True)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        timings["total"] = time.monotonic() - started
        _say("Timing: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return status
