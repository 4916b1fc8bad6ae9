"""Output images: real PNGs drawn with Pillow at the sizes of eggapi-api.md sections 14 and 17.3.

Each image differs per (task id, index): colours come from a hash of both and the text names them,
so checksums differ. Images render while their task processes (noisy ones on first download)
and are cached in a byte-bounded LRU.
"""

from __future__ import annotations

import hashlib
import io
import random
import threading
from collections import OrderedDict

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

_PRO_16_9 = {"1k": (1376, 768), "2k": (2752, 1536), "4k": (5504, 3072)}
_FLASH_16_9 = (1344, 768)


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


def render_png(
    task_id: str, index: int, width: int, height: int, compress_level: int = 1, noise: bool = False
) -> bytes:
    """Draw one output image and return the PNG bytes.

    ``noise`` fills the canvas with seeded random pixels so files reach realistic sizes (a 4k
    photo-like PNG is tens of MB; flat drawings compress to a few hundred KB), for memory tests.
    """
    digest = hashlib.sha256(f"{task_id}/{index}".encode()).digest()
    background = (digest[0], digest[1], digest[2])
    foreground = (255 - digest[0], 255 - digest[1], 255 - digest[2])
    if noise:
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
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont
    try:
        font = ImageFont.load_default(size=max(12, min(width, height) // 10))
    except (OSError, ValueError):  # pragma: no cover - Pillow without FreeType
        font = ImageFont.load_default()
    margin = min(width, height) // 20
    text = f"EggAPI emulator\n{task_id}\n#{index}  {width}x{height}"
    draw.multiline_text((margin, margin), text, fill=foreground, font=font)
    info = PngInfo()
    info.add_text("eggapi:task_id", task_id)
    info.add_text("eggapi:index", str(index))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=compress_level, pnginfo=info)
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

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0
            self._render_locks.clear()
            self.renders = 0

    def _lookup(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def get_or_render(
        self,
        task_id: str,
        index: int,
        width: int,
        height: int,
        compress_level: int,
        noise: bool = False,
    ) -> bytes:
        """Return the cached PNG or render it (once, even under concurrent downloads)."""
        key = (task_id, index)
        data = self._lookup(key)
        if data is not None:
            return data
        with self._lock:
            render_lock = self._render_locks.setdefault(key, threading.Lock())
        with render_lock:
            data = self._lookup(key)
            if data is not None:
                return data
            data = render_png(task_id, index, width, height, compress_level, noise)
            with self._lock:
                self.renders += 1
                self._render_locks.pop(key, None)
                if len(data) <= self.max_bytes:
                    self._items[key] = data
                    self._size += len(data)
                    while self._size > self.max_bytes and self._items:
                        _, old = self._items.popitem(last=False)
                        self._size -= len(old)
            return data
