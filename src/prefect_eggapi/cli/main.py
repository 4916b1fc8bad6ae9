"""The ``prefect-eggapi`` command: ``emulator``, ``stack``, ``demo`` and ``webhooks``.

Each subcommand is a module of this package that registers itself through ``configure_parser``
(its options; what it runs lives in the testing kit or the webhooks package); this module only
dispatches.
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
    "stack": "prefect_eggapi.cli.stack",
    "demo": "prefect_eggapi.cli.demo",
    "webhooks": "prefect_eggapi.cli.receiver",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command's parser; with ``only``, just that subcommand is imported and registered
    (what it runs may depend on settings it makes before importing Prefect, e.g. the demo's
    quiet console)."""
    parser = argparse.ArgumentParser(
        prog="prefect-eggapi",
        description="EggAPI image generation for Prefect: local emulator, local stack, demo.",
    )
    parser.add_argument("--version", action="version", version=f"prefect-eggapi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            importlib.import_module(module).configure_parser(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a missing dependency inside the module is a real error
                raise
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in given if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(given)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
