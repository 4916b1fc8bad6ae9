"""The ``stack`` command: the emulator and a real S3 server until Ctrl-C, with the env to export.

Options only; the stack and its serving loop are :mod:`prefect_eggapi.testing.stack`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect_eggapi.cli._args import Subparsers, add_command, add_task_timing
from prefect_eggapi.testing.stack import DEFAULT_BUCKET, DEFAULT_PREFIX, LocalStack, serve_stack

__all__ = ["configure_parser", "run"]

DESCRIPTION = """\
Start the local stack: the EggAPI emulator and a real S3 server (SeaweedFS) on free loopback
ports, with a bucket. Prints the environment to export in another shell (then run flows, e.g.
python flows/image_pipeline.py), and stops both cleanly on Ctrl-C or SIGTERM.
"""


def configure_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add the ``stack`` subcommand to ``subparsers`` (from ``add_subparsers()``)."""
    parser = add_command(
        subparsers,
        "stack",
        summary="Run the emulator + local S3 (SeaweedFS) until Ctrl-C; print the env to export.",
        description=DESCRIPTION,
        run=run,
    )
    parser.add_argument("--bucket", default=DEFAULT_BUCKET, help="Bucket to create.")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="EGGAPI_S3_PREFIX to export.")
    add_task_timing(parser, pending=1.0, processing=3.0)
    parser.add_argument(
        "--api-key",
        type=_api_key,
        default=None,
        metavar="KEY",
        help="The API key the emulator accepts and EGGAPI_API_KEY exports (default: the public "
        "test key). Use it to run the testing kit with the key your code or CI already has.",
    )
    parser.add_argument("--balance", default="100", help="Emulator key balance in USD.")
    parser.add_argument(
        "--png-noise",
        action="store_true",
        help="Emulator: random-pixel outputs (realistic, large files).",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="Keep S3 data here (default: a temporary directory removed on stop).",
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        default=None,
        help="Also write the export lines to this file (mode 600), e.g. to `source` it.",
    )
    return parser


def _api_key(value: str) -> str:
    """A key the emulator can authenticate: sent as ``Bearer KEY``, so no spaces and not empty."""
    if not value or any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise argparse.ArgumentTypeError("the API key must be non-empty, without spaces")
    return value


def run(args: argparse.Namespace) -> int:
    """Start, print the exports, wait for Ctrl-C/SIGTERM, stop. Returns the exit status."""
    try:
        stack = LocalStack(
            bucket=args.bucket,
            prefix=args.prefix,
            api_key=args.api_key,
            balance=args.balance,
            pending_seconds=args.pending_seconds,
            processing_seconds=args.processing_seconds,
            png_noise=args.png_noise,
            data_dir=args.data_dir,
        )
    except Exception as exc:  # a bad bucket or prefix: said like a start-up failure
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    return serve_stack(stack, env_file=args.env_file)
