"""The layers contract: each module imports only its own layer and the layers below it.

cli > testing kit > flows > Prefect tasks and the block > {safety, storage, webhooks} > client.
The three lowest layers import no Prefect at all (so the client, the ledger and the receiver
work in plain scripts and other engines). Every import counts, function-level ones included:
a lazy import does not make an upward dependency acceptable. A module that is in no layer fails
the test too, so a new module has to be placed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "prefect_eggapi"

# Lowest first. A name is a module (``client``) or a subpackage (``flows``, ``emulator``).
LAYERS: list[tuple[str, set[str]]] = [
    (
        "client",
        {
            "_version",
            "errors",
            "registry",
            "models",
            "pricing",
            "polling",
            "ratelimit",
            "imageinfo",
            "board",
            "client",
        },
    ),
    (
        "safety, storage, webhooks",
        {"storage", "ledger", "reconcile", "submission", "webhooks", "signals", "receiver"},
    ),
    ("tasks", {"credentials", "runtime", "global_limit", "artifacts", "tasks", "gallery"}),
    ("flows", {"flows", "batch_input", "prompts"}),
    ("testing kit", {"emulator", "local_s3", "stack", "demo"}),
    ("cli", {"cli", "receiver_cli", "__init__"}),
]
NO_PREFECT_BELOW = 2  # layers 0 and 1 import no Prefect

LAYER_OF = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def violations(root: Path) -> list[str]:
    """Every upward import (and every Prefect import below the task layer) under ``root``."""
    found = []
    for path in sorted(root.rglob("*.py")):
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
        ("client.py", "from prefect_eggapi.tasks import x\n", "imports prefect_eggapi.tasks"),
        ("ledger.py", "def f():\n    import prefect.events\n", "imports prefect.events"),
        ("newthing.py", "x = 1\n", "in no layer"),
    ],
)
def test_the_contract_fails_on_a_violation(
    tmp_path: Path, module: str, source: str, expected: str
) -> None:
    """The check can fail: an upward import, a lazy Prefect import, an unplaced module."""
    root = tmp_path / "prefect_eggapi"
    root.mkdir()
    (root / module).write_text(source)
    found = violations(root)
    assert len(found) == 1 and expected in found[0], found
