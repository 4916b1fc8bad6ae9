"""Pictures a person can look at for good: thumbnails, the run gallery, a local HTML gallery.

A presigned URL expires (1 h by default) and a local S3 server stops, so a link alone is a broken
picture next week. The gallery therefore embeds small thumbnails (WEBP, at most
:data:`THUMB_MAX_SIDE` px, a few KB) as ``data:`` URIs in the markdown itself and keeps the
full-size presigned link as an extra. The thumbnails come from
:mod:`prefect_eggapi.tasks.thumbnails` (the stored bytes, in bounded memory; its names are
re-exported here).

Size limits, measured (see ``tests/test_gallery.py``): a cell costs about 1–2 KB with the
emulator's images and at most ~8 KB with photo-like ones (thumbnail ≤ :data:`THUMB_MAX_BYTES`,
base64, caption and presigned link). A page holds :data:`PAGE_CELLS` cells (25 items × 3
rounds), so a page stays under ~600 KB and renders in well under a second in Chromium; a
1000-item × 3-round run is 40 pages. Cells beyond :data:`MAX_CELLS` get no thumbnail page (the
manifest lists every image).

This module has no Prefect dependency: :mod:`prefect_eggapi.tasks.artifacts` publishes the pages.
"""

from __future__ import annotations

import html
import re
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from prefect_eggapi.client.pricing import format_cost
from prefect_eggapi.storage import OutputStore
from prefect_eggapi.tasks.thumbnails import (
    MAX_CONCURRENT_DECODES,
    MAX_SOURCE_BYTES,
    THUMB_MAX_BYTES,
    THUMB_MAX_SIDE,
    Thumbnail,
    make_thumbnail,
    object_chunks,
    thumbnail_of,
)

__all__ = [
    "MAX_CELLS",
    "MAX_CONCURRENT_DECODES",
    "MAX_SOURCE_BYTES",
    "PAGE_CELLS",
    "THUMB_MAX_BYTES",
    "THUMB_MAX_SIDE",
    "GalleryCell",
    "Thumbnail",
    "make_thumbnail",
    "render_pages",
    "thumbnail_of",
    "write_local_gallery",
]

PAGE_CELLS = 75
MAX_CELLS = 3000
#: Characters per text line in a cell, and rounds per table: the page fits 1366 px.
_LINE_CHARS = 30
COLUMNS = 3


# ------------------------------------------------------------------------------------- gallery


class GalleryCell(BaseModel):
    """One stored image as the gallery shows it."""

    model_config = ConfigDict(frozen=True)

    item: int
    round: int
    prompt: str
    task_id: str
    s3_uri: str
    #: What this run paid for the image ($0 when it reconnected to a task paid earlier).
    paid: Decimal
    #: What the image cost when it was made.
    cost: Decimal
    reused: bool = False
    thumbnail: str | None = None
    link: str | None = None


_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}~|])")


def _text(value: str, limit: int | None = None) -> str:
    """Plain text for a markdown table cell: HTML-escaped, markdown specials escaped, one line."""
    flat = " ".join(value.split())
    if limit is not None and len(flat) > limit:
        flat = flat[: limit - 1].rstrip() + "…"
    return _MD_SPECIAL.sub(r"\\\1", html.escape(flat, quote=True))


def _wrapped(text: str, width: int = _LINE_CHARS, lines: int = 3) -> list[str]:
    """Short lines: the UI does not wrap table cells, and the gallery must fit a laptop."""
    out = textwrap.wrap(" ".join(text.split()), width, break_long_words=True) or [""]
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: width - 1].rstrip() + "…"
    return out


def _uri_lines(uri: str, width: int = _LINE_CHARS) -> list[str]:
    """An S3 URI split after ``/`` into lines of at most ``width`` (long segments alone)."""
    lines: list[str] = []
    for part in re.findall(r"[^/]*/|[^/]+$", uri):
        if lines and len(lines[-1]) + len(part) <= width:
            lines[-1] += part
        else:
            lines.append(part)
    return lines


def _cell(cell: GalleryCell) -> str:
    alt = f"item {cell.item} round {cell.round}"
    if cell.thumbnail:
        picture = f'<img src="{cell.thumbnail}" alt="{alt}" title="{alt}">'
    else:
        picture = "*(no preview)*"
    money = f"paid {format_cost(cell.paid)}"
    if cell.reused:
        money += f" (reused; cost {format_cost(cell.cost)})"
    parts = [picture]
    parts.extend(_text(line) for line in _wrapped(cell.prompt))
    parts.append(_text(money))
    parts.append(f"`{cell.task_id}`")
    parts.extend(f"`{line}`" for line in _uri_lines(cell.s3_uri))
    if cell.link:
        parts.append(f"[full size]({cell.link})")
    return "<br>".join(parts)


def _round_header(rnd: int) -> str:
    return "round 0 · generation" if rnd == 0 else f"round {rnd} · edit of {rnd - 1}"


def _column_groups(rounds: int) -> list[range]:
    """Rounds per table: at most :data:`COLUMNS` wide, each group starting with the last round
    of the previous one, so every edit is shown beside the image it edited."""
    if rounds <= COLUMNS:
        return [range(rounds)]
    groups = []
    start = 0
    while start < rounds - 1:
        stop = min(rounds, start + COLUMNS)
        groups.append(range(start, stop))
        start = stop - 1
    return groups


def _table(cells: Sequence[GalleryCell], rounds: int) -> list[str]:
    """Items as rows, rounds as columns: each edit sits right of the image it edited."""
    by_item: dict[int, dict[int, GalleryCell]] = {}
    for c in cells:
        by_item.setdefault(c.item, {}).setdefault(c.round, c)
    lines: list[str] = []
    for group in _column_groups(rounds):
        lines += [
            "| item | " + " | ".join(_round_header(r) for r in group) + " |",
            "|---|" + "---|" * len(group),
        ]
        for item in sorted(by_item):
            row = by_item[item]
            lines.append(
                f"| **{item}** | "
                + " | ".join(_cell(row[r]) if r in row else "—" for r in group)
                + " |"
            )
        lines.append("")
    return lines


def _pages_of(cells: Sequence[GalleryCell], rounds: int, page_cells: int) -> list[list[int]]:
    """Item numbers per page: whole items only, about ``page_cells`` cells a page."""
    items = sorted({c.item for c in cells})
    per_page = max(1, page_cells // max(1, rounds))
    return [items[i : i + per_page] for i in range(0, len(items), per_page)]


def render_pages(
    cells: Sequence[GalleryCell],
    *,
    title: str,
    rounds: int,
    failed: Sequence[str] = (),
    page_cells: int = PAGE_CELLS,
    max_cells: int = MAX_CELLS,
    page_keys: Sequence[str] = (),
) -> list[str]:
    """The gallery as markdown pages (page 1 also summarises the run and names the others).

    ``page_keys`` are the artifact keys of the pages, when published under keys, so page 1 can
    say where the rest is.
    """
    ordered = sorted(cells, key=lambda c: (c.item, c.round))
    shown = ordered[:max_cells]
    pages = _pages_of(shown, rounds, page_cells) or [[]]
    paid = sum((c.paid for c in ordered), Decimal("0"))
    worth = sum((c.cost for c in ordered), Decimal("0"))
    reused = sum(c.reused for c in ordered)
    items = len({c.item for c in ordered})
    out: list[str] = []
    for number, page_items in enumerate(pages, start=1):
        wanted = set(page_items)
        lines = [f"## {_text(title)}", ""]
        if number == 1:
            lines.append(
                f"{items} item(s) × {rounds} round(s), {len(ordered)} image(s): this run paid "
                f"**{format_cost(paid)}** ({reused} reused from earlier runs; the images cost "
                f"{format_cost(worth)} when made)."
            )
            if len(ordered) > len(shown):
                lines.append(
                    f"Thumbnails of the first {len(shown)} images; the manifest lists all "
                    f"{len(ordered)}."
                )
            if len(pages) > 1:
                others = ", ".join(f"`{k}`" for k in page_keys[1:]) or "the Artifacts tab"
                lines.append(f"Page 1 of {len(pages)}; the other pages: {others}.")
            lines.extend(f"- failed: {_text(f, 300)}" for f in failed[:50])
        else:
            lines.append(f"Page {number} of {len(pages)}: items {page_items[0]}–{page_items[-1]}.")
        lines.append("")
        lines.extend(_table([c for c in shown if c.item in wanted], rounds))
        out.append("\n".join(lines) + "\n")
    return out


# -------------------------------------------------------------------------- local HTML gallery

_HTML_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ddd; padding: .5rem; vertical-align: top; background: #fff; }}
th {{ background: #f0f0f0; text-align: left; }}
img {{ width: 320px; height: auto; display: block; }}
.meta {{ font-size: 12px; color: #555; max-width: 320px; word-break: break-all; }}
.prompt {{ max-width: 320px; }}
</style></head><body>
<h1>{title}</h1>
<p>{summary}</p>
"""


def _copy_object(store: OutputStore, key: str, target: Path) -> None:
    """Stream one stored object to a local file (bounded memory)."""
    tmp = target.with_suffix(target.suffix + ".part")
    with tmp.open("wb") as fh:
        for chunk in object_chunks(store, key):
            fh.write(chunk)
    tmp.replace(target)


class _ManifestImage(BaseModel):
    """What the local gallery reads of one image of a pipeline manifest (other fields ignored)."""

    item: int
    round: int
    key: str
    prompt: str = ""
    cost: Decimal = Decimal("0")
    task_id: str = ""
    s3_uri: str = ""
    sha256: str = ""


class _Manifest(BaseModel):
    """What the local gallery reads of a pipeline manifest (see ``flows.pipeline``)."""

    items: list[_ManifestImage]
    run_key: str = ""
    model: str = ""
    resolution: str | None = ""
    aspect_ratio: str | None = ""
    total_cost: Decimal = Decimal("0")
    failed: list[str] = []


def _html_cell(item: _ManifestImage, image: str) -> str:
    e = html.escape
    return (
        f'<td><a href="{e(image)}"><img src="{e(image)}" alt="item {item.item} round '
        f'{item.round}"></a><div class="prompt">{e(item.prompt)}</div>'
        f'<div class="meta">cost {e(format_cost(item.cost))} · '
        f"{e(item.task_id)}<br>{e(item.s3_uri)}<br>sha256 {e(item.sha256[:16])}…"
        "</div></td>"
    )


def write_local_gallery(
    manifest: Mapping[str, object], store: OutputStore, directory: Path
) -> Path:
    """Copy every image of a pipeline manifest into ``directory/images/`` and write
    ``directory/gallery.html`` showing them (items × rounds), so the run can be looked at after
    the S3 server is gone. Returns the HTML file's path.

    ``manifest`` is the manifest's JSON object; a malformed one raises pydantic's
    ``ValidationError`` naming the field, before anything is written."""
    run = _Manifest.model_validate(manifest)
    directory.mkdir(parents=True, exist_ok=True)
    images = directory / "images"
    if images.exists():
        shutil.rmtree(images)  # a gallery shows one run: no stale pictures of an earlier one
    images.mkdir()
    items = sorted(run.items, key=lambda i: (i.item, i.round))
    rounds = 1 + max((i.round for i in items), default=0)
    rows: dict[int, dict[int, str]] = {}
    for item in items:
        suffix = Path(item.key).suffix or ".img"
        name = f"item-{item.item}-round-{item.round}{suffix}"
        _copy_object(store, item.key, images / name)
        rows.setdefault(item.item, {})[item.round] = _html_cell(item, f"images/{name}")
    title = f"EggAPI pipeline {run.run_key}"
    summary = (
        f"{len(rows)} item(s) × {rounds} round(s) of {run.model} "
        f"{run.resolution or ''} {run.aspect_ratio or ''}; total cost "
        f"{format_cost(run.total_cost)}. Round k edits round k−1."
    )
    parts = [_HTML_HEAD.format(title=html.escape(title), summary=html.escape(summary))]
    parts.append(
        "<table><tr><th>item</th>"
        + "".join(f"<th>{html.escape(_round_header(r))}</th>" for r in range(rounds))
        + "</tr>"
    )
    for number in sorted(rows):
        cells = "".join(rows[number].get(r, "<td>—</td>") for r in range(rounds))
        parts.append(f"<tr><th>{number}</th>{cells}</tr>")
    parts.append("</table>")
    if run.failed:
        parts.append("<h2>Failed</h2><ul>")
        parts.extend(f"<li>{html.escape(f)}</li>" for f in run.failed)
        parts.append("</ul>")
    parts.append("</body></html>\n")
    page = directory / "gallery.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
