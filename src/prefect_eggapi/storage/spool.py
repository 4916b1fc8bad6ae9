"""Stream bytes into a bounded-memory temp file while learning what they are.

A few MiB stay in RAM, the rest goes to disk (:class:`~tempfile.SpooledTemporaryFile`); sha256,
size, format and pixel size are computed on the way, so nothing is read twice and an upload can
be refused (not an image) before a byte is sent.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from prefect_eggapi.client.errors import NotAnImageError
from prefect_eggapi.client.imageinfo import ImageInfo, ImageSniffer

_READ_CHUNK = 1024 * 1024


class Spooled:
    """A finished spool: bytes on disk/RAM plus what was learnt while writing them."""

    def __init__(self, fh: IO[bytes], sha256: str, size: int, info: ImageInfo) -> None:
        self.fh = fh
        self.sha256 = sha256
        self.size = size
        self.info = info

    def close(self) -> None:
        self.fh.close()


def spool(chunks: Iterable[bytes], what: str, *, max_memory: int) -> Spooled:
    """Copy the stream into a spooled temp file, hashing and sniffing on the way.

    Exceptions from the iterator propagate unchanged (the download's own error types),
    after the spool is closed. Raises NotAnImageError for unknown magic bytes.
    """
    fh = tempfile.SpooledTemporaryFile(max_size=max_memory)  # noqa: SIM115
    try:
        digest = hashlib.sha256()
        sniffer = ImageSniffer()
        size = 0
        head = b""
        for chunk in chunks:
            if not chunk:
                continue
            view = bytes(chunk) if not isinstance(chunk, bytes) else chunk
            if len(head) < 16:
                head += view[: 16 - len(head)]
            digest.update(view)
            sniffer.feed(view)
            fh.write(view)
            size += len(view)
        info = sniffer.info
        if info.format is None:
            raise NotAnImageError(
                f"{what} is not an image (PNG, JPEG, WebP or GIF by magic bytes): "
                f"{size} bytes starting {head[:16]!r}",
                head=head,
                size=size,
            )
        fh.seek(0)
        return Spooled(fh, digest.hexdigest(), size, info)
    except BaseException:
        fh.close()
        raise


def iter_file(path: Path) -> Iterator[bytes]:
    """A local file in 1 MiB chunks."""
    with path.open("rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            yield chunk
