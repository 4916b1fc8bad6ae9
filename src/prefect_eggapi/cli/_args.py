"""What every ``prefect-eggapi`` subcommand registers the same way: its parser and its ``run``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias

__all__ = ["Run", "Subparsers", "add_command", "add_task_timing"]

# A string: argparse's class is not subscriptable at runtime, only in its stubs.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
# A subcommand's body: the parsed options in, the exit status out.
Run = Callable[[argparse.Namespace], int]


def add_command(
    subparsers: Subparsers, name: str, *, summary: str, description: str, run: Run
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` (``summary`` in ``--help``, ``description`` kept as written in
    its own help) that dispatches to ``run``; the caller adds its options."""
    parser = subparsers.add_parser(
        name,
        help=summary,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run)
    return parser


def add_task_timing(parser: argparse.ArgumentParser, *, pending: float, processing: float) -> None:
    """``--pending-seconds`` / ``--processing-seconds``: how long an emulator task stays in each
    state, for the commands that start an emulator."""
    parser.add_argument(
        "--pending-seconds",
        type=float,
        default=pending,
        help="Emulator: time a task stays pending.",
    )
    parser.add_argument(
        "--processing-seconds",
        type=float,
        default=processing,
        help="Emulator: time a task stays processing.",
    )
