"""`prefect-eggapi`: the top-level help lists every subcommand; running one imports only it.

Only the chosen subcommand is imported, so what it sets up before importing Prefect holds: the
demo keeps Prefect's console quiet unless ``--verbose``, which needs Prefect's logging to be
configured after it sets ``PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from prefect_eggapi.cli.main import SUBCOMMANDS, build_parser, main


def test_the_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"    {name} " in out, out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_has_its_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: prefect-eggapi {name}" in capsys.readouterr().out


def test_choosing_a_subcommand_imports_only_it():
    code = (
        "import sys; from prefect_eggapi.cli.main import build_parser; build_parser('demo'); "
        "print('prefect' in sys.modules, 'prefect_eggapi.cli.receiver' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.split() == ["False", "False"]
    # Without a subcommand (or with an unknown one) every subcommand is registered.
    names = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert names == set(SUBCOMMANDS)
