"""Output downloads, checked while they stream: size, sha256 and image format.

Both clients stream an output the same way; only reading the chunks is blocking or awaitable, so
everything that decides whether a download is whole lives here, written once. Output URLs are
plain CDN URLs on another host: they are fetched without the API key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from prefect_eggapi.client.errors import DownloadError, OutputGoneError
from prefect_eggapi.client.imageinfo import ImageInfo, ImageSniffer
from prefect_eggapi.client.types import check_http_url

DOWNLOAD_CHUNK = 64 * 1024


@dataclass
class DownloadResult:
    """What was fetched: checksum, size and format read from the bytes themselves."""

    url: str
    size: int
    sha256: str
    info: ImageInfo


class DownloadStream:
    """Checks a download as it streams: size against Content-Length, sha256, format.

    The check runs when the last chunk has been read, *inside* the iteration, so a consumer that
    uploads only after exhausting the chunks never stores a truncated file.
    """

    def __init__(self, url: str, response: httpx.Response) -> None:
        self.url = url
        encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
        self._expected = (
            int(response.headers["content-length"])
            # With Content-Encoding the length counts encoded bytes; httpx yields decoded ones.
            if response.headers.get("content-length", "").isdigit() and not encoded
            else None
        )
        self._hash = hashlib.sha256()
        self._sniffer = ImageSniffer()
        self.size = 0
        self.result: DownloadResult | None = None

    @classmethod
    def answered(cls, url: str, response: httpx.Response) -> DownloadStream:
        """The stream of a response that has its headers; an error status raises instead."""
        if response.status_code != 200:
            gone = response.status_code in (403, 404, 410)
            raise (OutputGoneError if gone else DownloadError)(
                f"HTTP {response.status_code} downloading output",
                url=url,
                status_code=response.status_code,
            )
        return cls(url, response)

    def take(self, chunk: bytes) -> bytes:
        self._hash.update(chunk)
        self._sniffer.feed(chunk)
        self.size += len(chunk)
        return chunk

    def finish(self) -> DownloadResult:
        if self._expected is not None and self.size != self._expected:
            raise DownloadError(
                f"truncated download: got {self.size} of {self._expected} bytes", url=self.url
            )
        info = self._sniffer.info
        if info.format is None:
            raise DownloadError("downloaded file is not a recognised image", url=self.url)
        self.result = DownloadResult(self.url, self.size, self._hash.hexdigest(), info)
        return self.result

    def checked(self, response: httpx.Response) -> Iterator[bytes]:
        """The response's chunks; asking for one past the last checks the whole download."""
        for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
            yield self.take(chunk)
        self.finish()

    async def achecked(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """Async twin of :meth:`checked`."""
        async for chunk in response.aiter_bytes(DOWNLOAD_CHUNK):
            yield self.take(chunk)
        self.finish()


@contextmanager
def fetching(url: str) -> Iterator[None]:
    """Around one download: ``url`` must be http(s); a transport failure while fetching it is
    raised as the :class:`DownloadError` it is."""
    check_http_url(url)
    try:
        yield
    except httpx.RequestError as exc:
        raise DownloadError(f"{type(exc).__name__} while downloading", url=url) from exc


@contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A temporary sibling of ``path``, renamed to it only when the block ends without error."""
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
