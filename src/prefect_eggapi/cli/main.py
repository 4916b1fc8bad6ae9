"""The ``prefect-eggapi`` command: ``emulator``, ``stack``, ``demo`` and ``webhooks``.

Subcommands live beside what they run and register themselves through ``configure_parser``;
this module only dispatches, so ``prefect-eggapi --help`` stays fast (no Prefect import).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from prefect_eggapi._version import __version__

# name -> module with configure_parser(subparsers) that sets func=run(args) -> int
SUBCOMMANDS = {
    "emulator": "prefect_eggapi.cli.emulator",
    "stack": "prefect_eggapi.testing.stack",
    "demo": "prefect_eggapi.testing.demo",
    "webhooks": "prefect_eggapi.cli.receiver",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefect-eggapi",
        description="EggAPI image generation for Prefect: local emulator, local stack, demo.",
    )
    parser.add_argument("--version", action="version", version=f"prefect-eggapi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        try:
            importlib.import_module(module).configure_parser(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a missing dependency inside the module is a real error
                raise
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
