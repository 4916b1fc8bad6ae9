"""Pictures a person can look at for good: thumbnails, the run gallery, a local HTML gallery.

A presigned URL expires (1 h by default) and a local S3 server stops, so a link alone is a broken
picture next week. The gallery therefore embeds small thumbnails (WEBP, at most
:data:`THUMB_MAX_SIDE` px, a few KB) as ``data:`` URIs in the markdown itself and keeps the
full-size presigned link as an extra. Thumbnails are made from the *stored* bytes (what is really
in the bucket), streamed through a spool file, with at most :data:`MAX_CONCURRENT_DECODES`
images decoded at a time, so memory stays bounded whatever the batch size or resolution.

Size limits, measured (see ``tests/test_gallery.py``): a cell costs about 1–2 KB with the
emulator's images and at most ~8 KB with photo-like ones (thumbnail ≤ :data:`THUMB_MAX_BYTES`,
base64, caption and presigned link). A page holds :data:`PAGE_CELLS` cells (25 items × 3
rounds), so a page stays under ~600 KB and renders in well under a second in Chromium; a
1000-item × 3-round run is 40 pages. Cells beyond :data:`MAX_CELLS` get no thumbnail page (the
manifest lists every image).

This module has no Prefect dependency: :mod:`prefect_eggapi.tasks.artifacts` publishes the pages.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
import shutil
import tempfile
import textwrap
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from prefect_eggapi.client.pricing import format_cost

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from prefect_eggapi.storage import OutputStore

__all__ = [
    "MAX_CELLS",
    "PAGE_CELLS",
    "THUMB_MAX_SIDE",
    "GalleryCell",
    "Thumbnail",
    "make_thumbnail",
    "render_pages",
    "thumbnail_of",
    "write_local_gallery",
]

log = logging.getLogger(__name__)

THUMB_MAX_SIDE = 128
#: A thumbnail is re-encoded at lower quality (then smaller) until it fits.
THUMB_MAX_BYTES = 6 * 1024
#: Images decoded at once in this process: a 4k RGBA PNG is ~68 MB of pixels.
MAX_CONCURRENT_DECODES = 2
#: Stored objects larger than this are not thumbnailed (never a memory or time sink).
MAX_SOURCE_BYTES = 256 * 1024 * 1024
PAGE_CELLS = 75
MAX_CELLS = 3000
_SPOOL_IN_MEMORY = 8 * 1024 * 1024
_CHUNK = 1024 * 1024
#: Characters per text line in a cell, and rounds per table: the page fits 1366 px.
_LINE_CHARS = 30
COLUMNS = 3
_DECODES = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)


# ----------------------------------------------------------------------------------- thumbnails


@dataclass(frozen=True)
class Thumbnail:
    """A small encoded image, ready to embed."""

    data: bytes
    mime: str
    width: int
    height: int

    def data_uri(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


def _encode(image: PILImage) -> Thumbnail:
    """WEBP at falling quality (then 3/4 size) until it fits :data:`THUMB_MAX_BYTES`."""
    data = b""
    for scale, quality in ((1.0, 70), (1.0, 50), (1.0, 35), (0.75, 35)):
        candidate = image
        if scale != 1.0:
            size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
            candidate = image.resize(size)
        buffer = io.BytesIO()
        candidate.save(buffer, "WEBP", quality=quality, method=4)
        data = buffer.getvalue()
        if len(data) <= THUMB_MAX_BYTES:
            return Thumbnail(data, "image/webp", candidate.width, candidate.height)
    return Thumbnail(data, "image/webp", candidate.width, candidate.height)


def _decode_small(fh: IO[bytes], max_side: int) -> PILImage:
    from PIL import Image

    with Image.open(fh) as image:
        image.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2..1/8 scale
        image.thumbnail((max_side, max_side), reducing_gap=3.0)
        return image.convert("RGB")


def make_thumbnail(chunks: Iterable[bytes], *, max_side: int = THUMB_MAX_SIDE) -> Thumbnail:
    """A thumbnail of the image whose bytes ``chunks`` yields: spooled (at most
    :data:`_SPOOL_IN_MEMORY` in RAM, the rest on disk), then decoded; at most
    :data:`MAX_CONCURRENT_DECODES` of these run at once in a process, however many items are in
    flight, so memory stays bounded (about 70 MB per slot for a 4k image)."""
    with _DECODES, tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > MAX_SOURCE_BYTES:
                raise ValueError(f"image larger than {MAX_SOURCE_BYTES} bytes")
            spool.write(chunk)
        spool.seek(0)
        return _encode(_decode_small(spool, max_side))


def _object_chunks(store: OutputStore, key: str) -> Iterator[bytes]:
    body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"]
    try:
        yield from body.iter_chunks(_CHUNK)
    finally:
        body.close()


def thumbnail_of(store: OutputStore, key: str) -> Thumbnail | None:
    """The thumbnail of a stored object, or None when it cannot be read or decoded: the gallery
    is telemetry, and a missing picture must not fail (or re-bill) the work it shows."""
    try:
        return make_thumbnail(_object_chunks(store, key))
    except Exception:
        log.debug("no thumbnail for s3://%s/%s", store.bucket, key, exc_info=True)
        return None


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
        for chunk in _object_chunks(store, key):
            fh.write(chunk)
    tmp.replace(target)


def _html_cell(item: dict[str, Any], image: str) -> str:
    e = html.escape
    return (
        f'<td><a href="{e(image)}"><img src="{e(image)}" alt="item {item["item"]} round '
        f'{item["round"]}"></a><div class="prompt">{e(item["prompt"])}</div>'
        f'<div class="meta">cost {e(format_cost(Decimal(str(item["cost"]))))} · '
        f"{e(item['task_id'])}<br>{e(item['s3_uri'])}<br>sha256 {e(item['sha256'][:16])}…"
        "</div></td>"
    )


def write_local_gallery(manifest: dict[str, Any], store: OutputStore, directory: Path) -> Path:
    """Copy every image of a pipeline manifest into ``directory/images/`` and write
    ``directory/gallery.html`` showing them (items × rounds), so the run can be looked at after
    the S3 server is gone. Returns the HTML file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    images = directory / "images"
    if images.exists():
        shutil.rmtree(images)  # a gallery shows one run: no stale pictures of an earlier one
    images.mkdir()
    items: list[dict[str, Any]] = sorted(manifest["items"], key=lambda i: (i["item"], i["round"]))
    rounds = 1 + max((int(i["round"]) for i in items), default=0)
    rows: dict[int, dict[int, str]] = {}
    for item in items:
        suffix = Path(item["key"]).suffix or ".img"
        name = f"item-{item['item']}-round-{item['round']}{suffix}"
        _copy_object(store, item["key"], images / name)
        rows.setdefault(item["item"], {})[item["round"]] = _html_cell(item, f"images/{name}")
    title = f"EggAPI pipeline {manifest.get('run_key', '')}"
    summary = (
        f"{len(rows)} item(s) × {rounds} round(s) of {manifest.get('model', '')} "
        f"{manifest.get('resolution', '')} {manifest.get('aspect_ratio', '')}; total cost "
        f"{format_cost(Decimal(str(manifest.get('total_cost', '0'))))}. Round k edits round k−1."
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
    if manifest.get("failed"):
        parts.append("<h2>Failed</h2><ul>")
        parts.extend(f"<li>{html.escape(str(f))}</li>" for f in manifest["failed"])
        parts.append("</ul>")
    parts.append("</body></html>\n")
    page = directory / "gallery.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
