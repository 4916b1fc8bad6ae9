"""Thumbnails made from stored bytes, in bounded memory, for the gallery.

A thumbnail is WEBP, at most :data:`THUMB_MAX_SIDE` px and :data:`THUMB_MAX_BYTES`, made from
the *stored* object (what is really in the bucket), streamed through a spool file, with at most
:data:`MAX_CONCURRENT_DECODES` images decoded at a time in a process, so memory stays bounded
whatever the batch size or resolution. No Prefect here.
"""

from __future__ import annotations

import base64
import io
import logging
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from prefect_eggapi.storage import OutputStore, stream_object

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage  # Pillow is optional: see _decode_small

__all__ = [
    "MAX_CONCURRENT_DECODES",
    "MAX_SOURCE_BYTES",
    "THUMB_MAX_BYTES",
    "THUMB_MAX_SIDE",
    "Thumbnail",
    "make_thumbnail",
    "object_chunks",
    "thumbnail_of",
]

log = logging.getLogger(__name__)

THUMB_MAX_SIDE = 128
#: A thumbnail is re-encoded at lower quality (then smaller) until it fits.
THUMB_MAX_BYTES = 6 * 1024
#: Images decoded at once in this process: a 4k RGBA PNG is ~68 MB of pixels.
MAX_CONCURRENT_DECODES = 2
#: Stored objects larger than this are not thumbnailed (never a memory or time sink).
MAX_SOURCE_BYTES = 256 * 1024 * 1024
_SPOOL_IN_MEMORY = 8 * 1024 * 1024
_CHUNK = 1024 * 1024
_DECODES = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)


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
    # Deferred: Pillow is an optional dependency (the ``local`` extra); without it the gallery
    # shows no thumbnails (``thumbnail_of`` returns None) instead of failing the import.
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


def object_chunks(store: OutputStore, key: str) -> Iterator[bytes]:
    """The bytes of a stored object, a chunk at a time (closed when the caller is done)."""
    return stream_object(store.client, store.bucket, key, _CHUNK)


def thumbnail_of(store: OutputStore, key: str) -> Thumbnail | None:
    """The thumbnail of a stored object, or None when it cannot be read or decoded: the gallery
    is telemetry, and a missing picture must not fail (or re-bill) the work it shows."""
    try:
        return make_thumbnail(object_chunks(store, key))
    except Exception:
        log.debug("no thumbnail for s3://%s/%s", store.bucket, key, exc_info=True)
        return None
