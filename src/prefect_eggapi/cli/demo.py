"""The ``demo`` command: the image pipeline end to end on the local stack (the README's job).

Options only; the demo itself is :func:`prefect_eggapi.testing.demo.run_demo`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import get_args

from prefect_eggapi.cli._args import Subparsers, add_command, add_task_timing
from prefect_eggapi.client.types import AspectRatio, Model, Resolution

__all__ = ["configure_parser", "run"]

DESCRIPTION = """\
Run the image pipeline end to end on the local stack: prompts -> EggAPI generation -> edit
rounds -> S3 (+ manifest) -> Prefect artifacts. Everything runs on this machine (emulator,
SeaweedFS, ephemeral Prefect) and is stopped at the end. Exit status 0 on success.
"""


def configure_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``subparsers`` (from ``add_subparsers()``)."""
    parser = add_command(
        subparsers,
        "demo",
        summary="Run the image pipeline end to end on the local stack (the main job).",
        description=DESCRIPTION,
        run=run,
    )
    parser.add_argument("--count", type=int, default=3, help="Prompts (default: 3).")
    parser.add_argument(
        "--rounds", type=int, default=2, choices=range(0, 3), help="Edit rounds (default: 2)."
    )
    parser.add_argument("--model", default="nanobanana-pro", choices=get_args(Model))
    parser.add_argument("--resolution", default="1k", choices=get_args(Resolution))
    parser.add_argument("--aspect-ratio", default="16:9", choices=get_args(AspectRatio))
    parser.add_argument("--seed", type=int, default=7, help="Prompt sampler seed.")
    parser.add_argument("--concurrency", type=int, default=4)
    add_task_timing(parser, pending=0.3, processing=1.5)
    parser.add_argument(
        "--presigned-inputs",
        action="store_true",
        help="Edit from presigned URLs of the stored objects instead of EggAPI output URLs.",
    )
    parser.add_argument("--no-rerun", action="store_true", help="Skip the idempotent-rerun check.")
    parser.add_argument(
        "--gallery-dir",
        type=Path,
        default=Path("eggapi-demo"),
        help="Where to write gallery.html and a copy of every image, to look at after the demo "
        "(default: ./eggapi-demo).",
    )
    parser.add_argument(
        "--no-gallery", action="store_true", help="Do not write the local gallery page."
    )
    parser.add_argument("--verbose", action="store_true", help="Show Prefect's task-level logs.")
    return parser


def run(args: argparse.Namespace) -> int:
    """The demo with these options; its exit status."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not args.verbose:
        # Quiet terminal, full run logs in the Prefect UI/API. Read when Prefect is imported,
        # so set before the import below.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    # Deferred: the demo imports Prefect (and its server), which must see the settings above,
    # and which `prefect-eggapi --help` and the other subcommands should not pay for.
    from prefect_eggapi.testing.demo import DemoOptions, run_demo

    return run_demo(
        DemoOptions(
            count=args.count,
            rounds=args.rounds,
            model=args.model,
            resolution=args.resolution,
            aspect_ratio=args.aspect_ratio,
            seed=args.seed,
            concurrency=args.concurrency,
            pending_seconds=args.pending_seconds,
            processing_seconds=args.processing_seconds,
            presigned_inputs=args.presigned_inputs,
            rerun=not args.no_rerun,
            gallery_dir=None if args.no_gallery else args.gallery_dir,
        )
    )
