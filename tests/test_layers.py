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


# --------------------------------------------------------------------------- typed public API

TYPED_PACKAGES = ("client", "safety", "storage", "tasks")


def _mentions_any(node: ast.expr | None) -> bool:
    if node is None:
        return False
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id == "Any":
            return True
        if isinstance(sub, ast.Attribute) and sub.attr == "Any":
            return True
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and "Any" in sub.value:
            return True  # a string annotation
    return False


def _signature_anys(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    found = [p.arg for p in params if _mentions_any(p.annotation)]
    if a.vararg is not None and _mentions_any(a.vararg.annotation):
        found.append(f"*{a.vararg.arg}")
    if a.kwarg is not None and _mentions_any(a.kwarg.annotation):
        found.append(f"**{a.kwarg.arg}")
    if _mentions_any(fn.returns):
        found.append("return")
    return found


def any_in_public_signatures(package: Path) -> list[str]:
    """``module:function(params)`` for every public function or method typed with ``Any``."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = path.relative_to(package.parent)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if not node.name.startswith("_") and (bad := _signature_anys(node)):
                    found.append(f"{where}:{node.name}({', '.join(bad)})")
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for item in node.body:
                    if not isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        continue
                    public = not item.name.startswith("_") or item.name == "__init__"
                    if public and (bad := _signature_anys(item)):
                        found.append(f"{where}:{node.name}.{item.name}({', '.join(bad)})")
    return found


@pytest.mark.parametrize("package", TYPED_PACKAGES)
def test_public_signatures_name_their_types(package: str) -> None:
    """No ``Any`` in a public signature of the lower layers and the tasks (mypy strict can't see
    what ``Any`` erases)."""
    assert any_in_public_signatures(SRC / package) == []


def test_the_any_check_can_fail(tmp_path: Path) -> None:
    pkg = tmp_path / "client"
    pkg.mkdir()
    (pkg / "x.py").write_text(
        "from typing import Any\n"
        "def f(a: int, **kw: Any) -> None: ...\n"
        "def _private(a: Any) -> Any: ...\n"
        "class C:\n    def m(self) -> 'dict[str, Any]': ...\n"
    )
    assert any_in_public_signatures(pkg) == ["client/x.py:f(**kw)", "client/x.py:C.m(return)"]


# --------------------------------------------------------------------------- one S3 surface

S3_METHODS = {
    "get_object",
    "put_object",
    "head_object",
    "head_bucket",
    "delete_object",
    "delete_objects",
    "list_objects_v2",
    "get_paginator",
    "upload_fileobj",
    "download_fileobj",
    "copy_object",
    "create_multipart_upload",
    "generate_presigned_url",
}
# Where S3 calls may be made: the storage package, the S3 ledger (itself an S3 store, below the
# storage API it would otherwise have to go through) and the local S3 server of the testing kit.
S3_CALLERS = ("storage/", "safety/ledger/s3.py", "testing/")


def s3_calls_outside_storage(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(S3_CALLERS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in S3_METHODS
            ):
                found.append(f"{rel}:{node.lineno}: {node.func.attr}")
    return found


def test_every_s3_call_goes_through_the_storage_package() -> None:
    assert s3_calls_outside_storage(SRC) == []


def test_the_s3_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "x.py").write_text("store.client.head_bucket(Bucket='b')\n")
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "y.py").write_text("s3.head_bucket(Bucket='b')\n")
    assert s3_calls_outside_storage(tmp_path) == ["flows/x.py:1: head_bucket"]


# --------------------------------------------------------------------------- small modules

MAX_LINES = 400
REASON = ("Why one module", "~400-line mark")


def long_modules_without_a_reason(root: Path) -> list[str]:
    """Modules over ~400 lines whose docstring does not say why they are one module."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(marker in doc for marker in REASON):
            found.append(f"{path.relative_to(root)}: {len(text.splitlines())} lines")
    return found


def test_long_modules_say_why() -> None:
    assert long_modules_without_a_reason(SRC) == []


def test_the_length_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text('"""Short reason missing."""\n' + "x = 1\n" * MAX_LINES)
    (tmp_path / "b.py").write_text('"""Why one module: it is one table."""\n' + "x = 1\n" * 500)
    assert long_modules_without_a_reason(tmp_path) == [f"a.py: {MAX_LINES + 1} lines"]
