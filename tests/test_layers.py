"""The layers contract: each module imports only its own layer and the layers below it.

cli > testing kit > flows > Prefect tasks and the block > {safety, storage, webhooks} > client.
The three lowest layers import no Prefect at all (so the client, the ledger and the receiver
work in plain scripts and other engines). Every import counts, function-level ones included:
a lazy import does not make an upward dependency acceptable. A module that is in no layer fails
the test too, so a new module has to be placed. ``__main__.py`` files are entry points (like the
repo-root ``flows/`` files), not part of a layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "prefect_eggapi"

# Lowest first. A name is a top-level module (``credentials``) or a subpackage (``client``).
LAYERS: list[tuple[str, set[str]]] = [
    ("client", {"_version", "client"}),
    ("safety, storage, webhooks", {"safety", "storage", "webhooks"}),
    ("tasks", {"credentials", "tasks"}),
    ("flows", {"flows"}),
    ("testing kit", {"testing"}),
    ("cli", {"cli", "__init__"}),
]
NO_PREFECT_BELOW = 2  # layers 0 and 1 import no Prefect

LAYER_OF = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def violations(root: Path) -> list[str]:
    """Every upward import (and every Prefect import below the task layer) under ``root``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "__main__.py":
            continue  # ``python -m`` entry files: two lines that call the cli, in no layer
        me = path.relative_to(root).with_suffix("").parts[0]
        if me not in LAYER_OF:
            found.append(f"{path.relative_to(root)}: in no layer")
            continue
        mine = LAYER_OF[me]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                where = f"{path.relative_to(root)}:{node.lineno}"
                if parts[0] == root.name and len(parts) > 1:
                    theirs = LAYER_OF.get(parts[1])
                    if theirs is not None and theirs > mine:
                        found.append(
                            f"{where}: layer {LAYERS[mine][0]!r} imports {name} "
                            f"(layer {LAYERS[theirs][0]!r})"
                        )
                elif parts[0] == "prefect" and mine < NO_PREFECT_BELOW:
                    found.append(f"{where}: layer {LAYERS[mine][0]!r} imports {name}")
    return found


def test_the_package_keeps_its_layers() -> None:
    assert violations(SRC) == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        (
            "client/_client.py",
            "from prefect_eggapi.tasks import x\n",
            "imports prefect_eggapi.tasks",
        ),
        ("safety/ledger.py", "def f():\n    import prefect.events\n", "imports prefect.events"),
        ("newthing.py", "x = 1\n", "in no layer"),
    ],
)
def test_the_contract_fails_on_a_violation(
    tmp_path: Path, module: str, source: str, expected: str
) -> None:
    """The check can fail: an upward import, a lazy Prefect import, an unplaced module."""
    root = tmp_path / "prefect_eggapi"
    root.mkdir()
    (root / module).parent.mkdir(parents=True, exist_ok=True)
    (root / module).write_text(source)
    found = violations(root)
    assert len(found) == 1 and expected in found[0], found
