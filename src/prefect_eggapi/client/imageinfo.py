"""Image format and pixel size from the first bytes of a stream.

Upstream may send JPEG bytes behind a `.png` URL (eggapi-api.md §14.3), so the format is read from
magic bytes, never from the extension or the Content-Type. Only headers are parsed: no decoder, no
Pillow, bounded memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# JPEG dimensions can sit behind large EXIF/ICC segments; give up after this much.
MAX_HEADER_BYTES = 1024 * 1024

_MIME = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
}
_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp", "gif": "gif"}


@dataclass(frozen=True)
class ImageInfo:
    """What the bytes are, whatever the URL or server claimed."""

    format: str | None
    width: int | None = None
    height: int | None = None

    @property
    def mime_type(self) -> str:
        return _MIME.get(self.format or "", "application/octet-stream")

    @property
    def extension(self) -> str:
        return _EXT.get(self.format or "", "bin")


def detect_format(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def _png_size(head: bytes) -> tuple[int, int] | None:
    if len(head) >= 24 and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return w, h
    return None


def _gif_size(head: bytes) -> tuple[int, int] | None:
    if len(head) >= 10:
        w, h = struct.unpack("<HH", head[6:10])
        return w, h
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30:
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(head) >= 30:
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return w, h
    return None


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    i = 2
    n = len(head)
    while i + 4 <= n:
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", head[i + 2 : i + 4])
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", head[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None


_SIZERS = {"png": _png_size, "gif": _gif_size, "webp": _webp_size, "jpeg": _jpeg_size}


def sniff(head: bytes) -> ImageInfo:
    """Format and size from a prefix of the file; size is None if the prefix is too short."""
    fmt = detect_format(head)
    if fmt is None:
        return ImageInfo(None)
    size = _SIZERS[fmt](head)
    return ImageInfo(fmt, *size) if size else ImageInfo(fmt)


class ImageSniffer:
    """Feed chunks as they stream past; keeps at most MAX_HEADER_BYTES until the size is known."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._info: ImageInfo | None = None

    def feed(self, chunk: bytes) -> None:
        if self._info is not None:  # decided: a size, or "not an image" (never re-sniffed)
            return
        if len(self._head) >= MAX_HEADER_BYTES:
            return
        self._head += chunk[: MAX_HEADER_BYTES - len(self._head)]
        info = sniff(bytes(self._head))
        if info.width is not None or (info.format is None and len(self._head) >= 16):
            self._info = info
            self._head = bytearray()

    @property
    def info(self) -> ImageInfo:
        if self._info is not None:
            return self._info
        return sniff(bytes(self._head))
