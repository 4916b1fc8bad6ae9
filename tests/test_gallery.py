"""The gallery: thumbnails from stored bytes, markdown pages within size limits, the local page.

Sizes are measured on photo-like images (blurred colour fields plus noise: they compress like
photos, unlike the emulator's flat drawings) so the limits hold for real outputs.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import random
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from lineage import png_text
from prefect_eggapi.tasks.gallery import (
    MAX_CELLS,
    PAGE_CELLS,
    THUMB_MAX_BYTES,
    THUMB_MAX_SIDE,
    GalleryCell,
    make_thumbnail,
    render_pages,
    thumbnail_of,
    write_local_gallery,
)

#: A SigV4 presigned URL as long as real ones (it goes in every cell).
LINK = (
    "http://127.0.0.1:8333/bucket/eggapi/gen_0123456789abcdef/0.png?X-Amz-Algorithm=AWS4-HMAC-"
    "SHA256&X-Amz-Credential=AKIAEXAMPLEEXAMPLE%2F20261202%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-"
    "Date=20261202T010000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=" + "a" * 64
)
#: A worst-case page must stay below this (it renders in about the time of an empty page).
MAX_PAGE_BYTES = 600 * 1024


def photo_like(seed: int, size: tuple[int, int] = (1376, 768), fmt: str = "PNG") -> bytes:
    rnd = random.Random(seed)
    field = Image.frombytes("RGB", (48, 27), rnd.randbytes(48 * 27 * 3)).resize(size)
    noise = Image.frombytes("RGB", size, rnd.randbytes(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    Image.blend(field, noise, 0.35).save(buffer, fmt, compress_level=1)
    return buffer.getvalue()


def _cells(items: int, rounds: int, thumbnail: str, **extra: Any) -> list[GalleryCell]:
    return [
        GalleryCell(
            item=i,
            round=r,
            prompt="a lighthouse at dawn on a rocky coast, in the style of a watercolour",
            task_id=f"gen_{i:06d}r{r}abcdef",
            s3_uri=f"s3://bucket/eggapi/gen_{i:06d}r{r}abcdef/0.png",
            paid=Decimal("0.016"),
            cost=Decimal("0.016"),
            thumbnail=thumbnail,
            link=LINK,
            **extra,
        )
        for i in range(items)
        for r in range(rounds)
    ]


def test_thumbnail_is_small_webp_of_the_stored_bytes():
    png = photo_like(1)
    chunks = [png[i : i + 65536] for i in range(0, len(png), 65536)]  # streamed, as from S3
    thumb = make_thumbnail(iter(chunks))
    assert thumb.mime == "image/webp" and thumb.data[8:12] == b"WEBP"
    assert max(thumb.width, thumb.height) <= THUMB_MAX_SIDE
    assert (thumb.width, thumb.height) == (128, 71)  # 16:9 kept
    assert len(thumb.data) <= THUMB_MAX_BYTES
    with Image.open(io.BytesIO(thumb.data)) as decoded:
        assert decoded.size == (thumb.width, thumb.height)
        # The picture is the image's: its mean colour matches the source's.
        with Image.open(io.BytesIO(png)) as source:
            want = source.convert("RGB").resize((1, 1)).getpixel((0, 0))
        got = decoded.convert("RGB").resize((1, 1)).getpixel((0, 0))
        assert all(abs(a - b) < 24 for a, b in zip(got, want, strict=True)), (got, want)
    assert thumb.data_uri().startswith("data:image/webp;base64,UklGR")


def test_thumbnail_of_a_4k_image_and_of_a_portrait_jpeg():
    big = make_thumbnail([photo_like(2, (5504, 3072))])
    assert (big.width, big.height) == (128, 71) and len(big.data) <= THUMB_MAX_BYTES
    portrait = make_thumbnail([photo_like(3, (768, 1376), fmt="JPEG")])
    assert (portrait.width, portrait.height) == (71, 128)


def test_not_an_image_gives_no_thumbnail_and_never_raises():
    with pytest.raises(Exception):  # noqa: B017 - Pillow's own error type
        make_thumbnail([b"this is not an image"])

    class Broken:
        bucket = "b"

        @property
        def client(self) -> Any:
            raise ConnectionError("S3 is down")

    assert thumbnail_of(Broken(), "k") is None  # type: ignore[arg-type]


def test_a_1000_item_run_is_paged_within_size_limits():
    thumb = make_thumbnail([photo_like(4)]).data_uri()
    cells = _cells(1000, 3, thumb)
    keys = ["g"] + [f"g-p{n}" for n in range(2, 41)]
    pages = render_pages(cells, title="EggAPI pipeline params-x", rounds=3, page_keys=keys)
    sizes = [len(p.encode()) for p in pages]
    print(
        f"\n1000 × 3 photo-like: {len(pages)} pages, largest {max(sizes)} B, total {sum(sizes)} B"
    )
    assert len(pages) == 40 == 3000 // PAGE_CELLS
    assert max(sizes) <= MAX_PAGE_BYTES
    assert all(p.count("data:image/webp;base64,") == PAGE_CELLS for p in pages)
    assert "Page 1 of 40; the other pages: `g-p2`" in pages[0] and "`g-p40`" in pages[0]
    assert "Page 2 of 40: items 25–49." in pages[1]
    # Every image is on exactly one page.
    uris = re.findall(r"`(gen_\d{6}r\dabcdef/0\.png)`", "".join(pages))
    assert len(uris) == len(set(uris)) == 3000


def test_the_cap_and_the_money_line():
    cells = _cells(MAX_CELLS // 3 + 10, 3, "data:image/webp;base64,AAAA", reused=True)
    cells = [c.model_copy(update={"paid": Decimal("0")}) for c in cells]
    pages = render_pages(cells, title="t", rounds=3)
    assert sum(p.count("<img ") for p in pages) == MAX_CELLS
    assert f"Thumbnails of the first {MAX_CELLS} images" in pages[0]
    assert "this run paid **$0.0000** (3030 reused" in pages[0]
    assert "paid $0.0000 (reused; cost $0.0160)" in pages[0]


def test_each_edit_sits_beside_its_source_and_text_is_escaped():
    cells = _cells(1, 6, "data:image/webp;base64,AAAA")
    cells[2] = cells[2].model_copy(update={"prompt": "a | b <script>alert(1)</script> *x*"})
    [page] = render_pages(cells, title="t <b>", rounds=6)
    headers = re.findall(r"^\| item \| (.+) \|$", page, re.M)
    # At most 3 rounds per table (fits 1366 px); each table starts with the previous one's
    # last round, so every edit is in the same row as the image it edited.
    assert headers == [
        "round 0 · generation | round 1 · edit of 0 | round 2 · edit of 1",
        "round 2 · edit of 1 | round 3 · edit of 2 | round 4 · edit of 3",
        "round 4 · edit of 3 | round 5 · edit of 4",
    ]
    assert "<script>" not in page and "&lt;script&gt;" in page and "a \\| b" in page
    assert "t &lt;b&gt;" in page
    # No text line in a cell is longer than the column allows.
    for line in re.findall(r"<br>([^<]*)", page):
        text = html.unescape(line.split(" | ")[0].strip("`")).replace("\\", "")
        if not text.startswith("[full size]("):
            assert len(text) <= 36, line


def test_local_gallery_copies_the_images_and_works_without_s3(output_store, tmp_path: Path):
    items = []
    for i, rnd in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        data = photo_like(10 * i + rnd, (320, 180))
        stored = output_store.persist_bytes(data, task_id=f"gen_t{i}{rnd}", index=0)
        items.append(
            {
                "item": i,
                "round": rnd,
                "prompt": f"prompt <{i}/{rnd}>",
                "task_id": f"gen_t{i}{rnd}",
                "s3_uri": stored.uri,
                "key": stored.key,
                "sha256": stored.sha256,
                "cost": "0.016",
            }
        )
    manifest = {"run_key": "params-x", "model": "nanobanana", "total_cost": "0.064"}
    manifest["items"] = items
    page = write_local_gallery(manifest, output_store, tmp_path / "out")
    html = page.read_text()
    images = re.findall(r'<img src="(images/[^"]+)"', html)
    assert images == [
        "images/item-0-round-0.png",
        "images/item-0-round-1.png",
        "images/item-1-round-0.png",
        "images/item-1-round-1.png",
    ]
    for item, src in zip(items, images, strict=True):
        data = (page.parent / src).read_bytes()
        assert hashlib.sha256(data).hexdigest() == item["sha256"]
        assert png_text(data) is not None
    assert "prompt &lt;0/1&gt;" in html and "edit of 0" in html
    assert json.dumps(manifest)  # untouched, still serialisable
