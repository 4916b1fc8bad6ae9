"""Output images: real PNGs drawn with Pillow at the sizes of eggapi-api.md sections 14 and 17.3.

Every image shows its prompt (so a person looking at a gallery sees what was asked) and carries
it in PNG text chunks:

- ``eggapi:task_id``, ``eggapi:index``, ``eggapi:type`` (``image_generate`` / ``image_edit``);
- ``eggapi:prompt``: the request's prompt (``tEXt``; ``iTXt`` when it is not Latin-1);
- ``eggapi:sources``: for edits, the sha256 (lower-case hex) of the exact bytes fetched from each
  ``image_urls`` entry, in input order, comma-separated; empty for generations.

These chunk names are a contract (lineage tests read them from stored objects): never rename
them.

A generation differs per (task id, index): colours come from a hash of both. An edit is drawn
*from its inputs*: the first input, scaled into the canvas, tinted and framed, with the edit
prompt below it, so the output is visibly derived from what it edited. To keep memory flat, a task
keeps only a small copy of its first input (:func:`prepare_sources`), and the output is always
rendered from that copy, so re-rendering after an LRU eviction gives the same bytes.

Images render while their task processes (noisy ones on first download) and are cached in a
byte-bounded LRU.
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
import textwrap
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

_PRO_16_9 = {"1k": (1376, 768), "2k": (2752, 1536), "4k": (5504, 3072)}
_FLASH_16_9 = (1344, 768)

#: Formats an edit input may have (what the Gemini image models accept).
INPUT_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})

#: Longest side of the copy a task keeps of its first input (bounds memory per edit task).
SOURCE_COPY_MAX = 640
SOURCES_CHUNK = "eggapi:sources"
PROMPT_CHUNK = "eggapi:prompt"

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def output_size(model: str, aspect_ratio: str, resolution: str) -> tuple[int, int]:
    """Pixel size (width, height) of one output image.

    ``nanobanana-pro`` (Gemini 3 Pro Image) follows Google's table; ``nanobanana`` (Gemini 2.5
    Flash Image) and any other model ignore ``resolution`` (assumption 17.3).
    """
    if model == "nanobanana-pro":
        width, height = _PRO_16_9.get(resolution, _PRO_16_9["1k"])
    else:
        width, height = _FLASH_16_9
    if aspect_ratio == "9:16":
        return height, width
    return width, height


@dataclass(frozen=True)
class RenderSpec:
    """Everything one output image is a function of (the same spec always gives the same bytes).

    ``source_image`` is the compact copy of the first edit input (:func:`prepare_sources`);
    ``sources`` the sha256 hex digests of every fetched input, in order.
    """

    task_id: str
    index: int
    width: int
    height: int
    prompt: str = ""
    compress_level: int = 1
    noise: bool = False
    task_type: str = "image_generate"
    sources: tuple[str, ...] = ()
    source_image: bytes | None = None


class InputImageError(ValueError):
    """Input ``index`` is not an image an edit can use (``reason``: ``format`` or ``pixels``)."""

    def __init__(self, reason: str, index: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.index = index


@functools.lru_cache(maxsize=32)
def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ValueError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def _layout(width: int, height: int) -> tuple[int, int, tuple[int, int, int, int]]:
    """(border, caption band height, picture box) of an edit canvas."""
    short = min(width, height)
    border = max(6, short // 24)
    band = max(24, short // 5)
    return border, band, (border, border, width - border, height - border - band)


def _open_checked(data: bytes, index: int) -> Image.Image:
    """Open and fully decode one input; :class:`InputImageError` if it is not a usable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in INPUT_FORMATS:
                raise InputImageError("format", index, f"format {image.format}")
            image.load()
    except InputImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputImageError("pixels", index, str(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputImageError("format", index, str(exc)) from None
    return image


def prepare_sources(inputs: list[bytes], width: int, height: int) -> tuple[list[str], bytes]:
    """Check every input is a PNG/JPEG/WEBP image; return their sha256s and the first's copy.

    The copy is the first input in RGB, shrunk to fit half of the edit's picture box (at most
    ``SOURCE_COPY_MAX`` px a side), as PNG or JPEG, whichever is smaller: a few tens of KB
    whatever the input size. Runs in a worker thread (Pillow releases the GIL
    while decoding), never on the event loop.
    """
    if not inputs:
        raise ValueError("an edit needs at least one input")
    sources = [hashlib.sha256(data).hexdigest() for data in inputs]
    first: bytes | None = None
    for index, data in enumerate(inputs):
        image = _open_checked(data, index)
        try:
            if index == 0:
                _, _, (x0, y0, x1, y1) = _layout(width, height)
                rgb = image.convert("RGB")
                box = (min(SOURCE_COPY_MAX, (x1 - x0) // 2), min(SOURCE_COPY_MAX, (y1 - y0) // 2))
                rgb.thumbnail((max(1, box[0]), max(1, box[1])))
                first = _smallest_encoding(rgb)
        finally:
            image.close()
    assert first is not None
    return sources, first


def _smallest_encoding(image: Image.Image) -> bytes:
    """PNG for drawings (exact, tiny), JPEG for photo-like noise (a tenth of the PNG's size)."""
    png, jpeg = io.BytesIO(), io.BytesIO()
    image.save(png, "PNG", compress_level=1)
    image.save(jpeg, "JPEG", quality=90)
    return min(png.getvalue(), jpeg.getvalue(), key=len)


def _wrapped(text: str, font: Font, max_width: int, max_lines: int) -> str:
    average = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
    columns = max(8, int(max_width / average))
    flat = " ".join(text.split())
    lines = textwrap.wrap(flat, width=columns, max_lines=max_lines, placeholder=" …")
    return "\n".join(lines) or " "


def _colours(spec: RenderSpec) -> tuple[bytes, tuple[int, int, int], tuple[int, int, int]]:
    digest = hashlib.sha256(f"{spec.task_id}/{spec.index}".encode()).digest()
    background = (digest[0], digest[1], digest[2])
    foreground = (255 - digest[0], 255 - digest[1], 255 - digest[2])
    return digest, background, foreground


def _draw_generation(spec: RenderSpec) -> Image.Image:
    width, height = spec.width, spec.height
    digest, background, foreground = _colours(spec)
    if spec.noise:
        pixels = random.Random(digest).randbytes(width * height * 3)
        image = Image.frombytes("RGB", (width, height), pixels)
        del pixels
    else:
        image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for i in range(8):
        colour = (digest[3 + i], digest[11 + i], digest[19 + i])
        x0 = digest[i] * width // 256
        y0 = digest[i + 8] * height // 256
        draw.rectangle((x0, y0, x0 + width // 5, y0 + height // 5), fill=colour)
    short = min(width, height)
    margin = short // 20
    font = _font(max(12, short // 10))
    text = f"EggAPI emulator\n{spec.task_id}\n#{spec.index}  {width}x{height}"
    draw.multiline_text((margin, margin), text, fill=foreground, font=font)
    _draw_caption(draw, spec, max(24, short // 5), foreground, background)
    return image


def _draw_caption(
    draw: ImageDraw.ImageDraw,
    spec: RenderSpec,
    band: int,
    fill: tuple[int, int, int],
    text_colour: tuple[int, int, int],
    label: str | None = None,
) -> None:
    """The prompt (and an optional small label under it), in a band along the bottom edge."""
    width, height = spec.width, spec.height
    top = height - band
    draw.rectangle((0, top, width, height), fill=fill)
    font = _font(max(10, band // 5))
    pad = max(4, band // 10)
    text = _wrapped(spec.prompt, font, width - 2 * pad, 2 if label else 3)
    draw.multiline_text((pad, top + pad), text, fill=text_colour, font=font, spacing=2)
    if label:
        small = _font(max(8, band // 8))
        draw.text((pad, height - pad - max(8, band // 8)), label, fill=text_colour, font=small)


def _draw_edit(spec: RenderSpec) -> Image.Image:
    assert spec.source_image is not None
    width, height = spec.width, spec.height
    digest, tint, frame = _colours(spec)
    border, band, (x0, y0, x1, y1) = _layout(width, height)
    image = Image.new("RGB", (width, height), tint)
    with Image.open(io.BytesIO(spec.source_image)) as source:
        rgb = source.convert("RGB")
    box_w, box_h = x1 - x0, y1 - y0
    scale = min(box_w / rgb.width, box_h / rgb.height)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    # NEAREST keeps flat areas flat: edit outputs compress like generations do.
    picture = rgb.resize(size, Image.Resampling.NEAREST)
    picture = Image.blend(picture, Image.new("RGB", size, tint), 0.3)
    left, top = x0 + (box_w - size[0]) // 2, y0 + (box_h - size[1]) // 2
    image.paste(picture, (left, top))
    draw = ImageDraw.Draw(image)
    line = max(2, border // 3)
    draw.rectangle((left - line, top - line, left + size[0] + line, top + size[1] + line),
                   outline=frame, width=line)  # fmt: skip
    first = spec.sources[0][:16] if spec.sources else "?"
    more = f" (+{len(spec.sources) - 1} more)" if len(spec.sources) > 1 else ""
    label = f"EggAPI emulator edit {spec.task_id} #{spec.index} of sha256 {first}…{more}"
    _draw_caption(draw, spec, band, frame, tint, label)
    if spec.noise:
        noise = Image.frombytes(
            "RGB", (width, height), random.Random(digest).randbytes(width * height * 3)
        )
        image = Image.blend(image, noise, 0.2)
    return image


def render_png(spec: RenderSpec) -> bytes:
    """Draw one output image and return the PNG bytes.

    ``noise`` fills the canvas with seeded random pixels so files reach realistic sizes (a 4k
    photo-like PNG is tens of MB; flat drawings compress to a few hundred KB), for memory tests.
    """
    image = _draw_edit(spec) if spec.source_image is not None else _draw_generation(spec)
    info = PngInfo()
    info.add_text("eggapi:task_id", spec.task_id)
    info.add_text("eggapi:index", str(spec.index))
    info.add_text("eggapi:type", spec.task_type)
    info.add_text(PROMPT_CHUNK, spec.prompt.replace("\x00", " "))
    info.add_text(SOURCES_CHUNK, ",".join(spec.sources))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=spec.compress_level, pnginfo=info)
    return buffer.getvalue()


class ImageCache:
    """Thread-safe LRU of rendered PNGs, bounded by total bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self._render_locks: dict[tuple[str, int], threading.Lock] = {}
        self.renders = 0
        # Bumped by clear(): a render that began before a reset must not be cached after it
        # (with a seed, the next test's tasks reuse the same ids).
        self._generation = 0

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0
            self._render_locks.clear()
            self.renders = 0
            self._generation += 1

    def _lookup(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def get_or_render(self, spec: RenderSpec) -> bytes:
        """Return the cached PNG or render it (once, even under concurrent downloads)."""
        key = (spec.task_id, spec.index)
        data = self._lookup(key)
        if data is not None:
            return data
        with self._lock:
            generation = self._generation
            render_lock = self._render_locks.setdefault(key, threading.Lock())
        with render_lock:
            data = self._lookup(key)
            if data is not None:
                return data
            data = render_png(spec)
            with self._lock:
                self.renders += 1
                self._render_locks.pop(key, None)
                if generation == self._generation and len(data) <= self.max_bytes:
                    self._items[key] = data
                    self._size += len(data)
                    while self._size > self.max_bytes and self._items:
                        _, old = self._items.popitem(last=False)
                        self._size -= len(old)
            return data
