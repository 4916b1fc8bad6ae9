"""Edit inputs: the emulator fetches every ``image_urls`` entry while the task processes (17.21).

The real service must download an image to edit it, so the emulator does too, on its event loop
(``httpx.AsyncClient``: other tasks, polls and downloads go on meanwhile), after the task has
left ``pending``, never at ``POST`` time: the API accepts the request and the *task* fails later.

An input fails the task (``failed``, ``cost "$0.00"``, not billed) when it is

- unreachable: connection refused, DNS failure, a timeout (``input_fetch_timeout_seconds`` per
  input), a broken transfer, more than 5 redirects, or a host not on ``input_allowed_hosts``;
- refused: any HTTP answer other than 2xx (an expired or tampered presigned S3 URL is a 403; the
  S3 ``<Code>``/``<Message>`` is quoted when the body has one);
- too large: more than ``input_max_bytes`` (20 MiB), by ``Content-Length`` or while streaming
  (the body is never read whole first);
- not an image: bytes Pillow cannot decode as PNG, JPEG or WEBP.

Error messages follow the emulator's upstream-failure style and always start with
``Upstream provider error: input image image_urls[i] (URL without its query) ...``, e.g.
``... could not be fetched: HTTP 403 Forbidden (AccessDenied: Request has expired)``,
``... is larger than the 20 MiB input limit``, ``... is not a supported image (PNG, JPEG or
WEBP)``. The query string is left out because presigned URLs carry signatures there.

Loopback inputs are allowed only because the emulator itself runs on loopback (the real API
fetches public URLs); ``input_allowed_hosts`` defaults to loopback, so by default the emulator
never calls out to any other machine. The emulator's own requests carry ``X-EggAPI-Emulator-Fetch``
with a per-instance token: its ``/images/`` route then applies no download faults and the audit
does not count them as client downloads (faults script the client under test, not the CDN).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from .config import EmulatorConfig
from .images import InputImageError, prepare_sources
from .webhooks import host_allowed

logger = logging.getLogger("prefect_eggapi.testing.emulator.inputs")

FETCH_HEADER = "x-eggapi-emulator-fetch"
USER_AGENT = "EggAPI-ImageFetcher/1.0 (emulator)"
MAX_REDIRECTS = 5
_S3_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_S3_MESSAGE = re.compile(rb"<Message>([^<]{1,200})</Message>")
PREFIX = "Upstream provider error: "


@dataclass
class FetchedInputs:
    """What fetching one task's inputs gave: either ``error``, or sources and the compact copy."""

    sources: list[str] = field(default_factory=list)
    source_image: bytes | None = None
    error: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)


class _InputFailed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def display_url(url: str) -> str:
    """``scheme://host[:port]/path``: presigned query strings (signatures) are never shown."""
    try:
        parts = urlsplit(url)
        shown = f"{parts.scheme}://{parts.netloc}{parts.path}"
    except ValueError:
        shown = url.split("?", 1)[0]
    return shown if len(shown) <= 200 else shown[:199] + "…"


def _mib(value: int) -> str:
    mib = value / (1024 * 1024)
    return f"{mib:g} MiB" if mib >= 1 else f"{value} bytes"


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _transport_reason(exc: httpx.HTTPError, timeout: float) -> str:
    """A short reason a person recognises: refused, DNS, timeout, or a broken transfer."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out after {timeout:g} s"
    if isinstance(exc, httpx.ConnectError):
        chain = _causes(exc)
        if any(isinstance(c, socket.gaierror) for c in chain):
            return "DNS lookup failed"
        if any(isinstance(c, ConnectionRefusedError) for c in chain):
            return "connection refused"
        return f"connection failed ({exc or type(exc).__name__})"
    return f"transfer failed ({type(exc).__name__})"


def _status_reason(response: httpx.Response, body: bytes) -> str:
    reason = f"HTTP {response.status_code}"
    if response.reason_phrase:
        reason += f" {response.reason_phrase}"
    code = _S3_CODE.search(body)
    if code is not None:
        detail = code.group(1).decode("utf-8", "replace")
        message = _S3_MESSAGE.search(body)
        if message is not None:
            detail += ": " + message.group(1).decode("utf-8", "replace")
        reason += f" ({detail})"
    return reason


class InputFetcher:
    """Fetches the inputs of edit tasks for one emulator, on its event loop."""

    def __init__(
        self,
        config: Callable[[], EmulatorConfig],
        executor: Executor,
    ) -> None:
        self._config = config
        self._executor = executor
        self._client: httpx.AsyncClient | None = None
        self.token = secrets.token_hex(16)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                trust_env=False,
                follow_redirects=False,
                headers={"User-Agent": USER_AGENT, FETCH_HEADER: self.token},
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def fetch(self, urls: list[str], width: int, height: int) -> FetchedInputs:
        """Fetch every URL in order (stopping at the first failure), then check the images."""
        result = FetchedInputs()
        payloads: list[bytes] = []
        try:
            for index, url in enumerate(urls):
                payloads.append(await self._fetch_one(index, url, result.records))
            loop = asyncio.get_running_loop()
            try:
                sources, copy = await loop.run_in_executor(
                    self._executor, prepare_sources, payloads, width, height
                )
            except InputImageError as exc:
                where = f"input image image_urls[{exc.index}] ({display_url(urls[exc.index])})"
                if exc.reason == "pixels":
                    raise _InputFailed(f"{PREFIX}{where} has too many pixels") from None
                raise _InputFailed(
                    f"{PREFIX}{where} is not a supported image (PNG, JPEG or WEBP)"
                ) from None
        except _InputFailed as failure:
            result.error = failure.message
            return result
        for record, digest in zip(result.records, sources, strict=True):
            record["sha256"] = digest
        result.sources = sources
        result.source_image = copy
        return result

    async def _fetch_one(self, index: int, url: str, records: list[dict[str, Any]]) -> bytes:
        cfg = self._config()
        where = f"input image image_urls[{index}] ({display_url(url)})"
        record: dict[str, Any] = {
            "index": index,
            "url": display_url(url),
            "started_at": time.time(),
        }
        records.append(record)

        def fail(reason: str, *, fetched: bool = True) -> _InputFailed:
            record["error"] = reason
            verb = "could not be fetched: " if fetched else ""
            return _InputFailed(f"{PREFIX}{where} {verb}{reason}")

        current = url
        for _ in range(MAX_REDIRECTS + 1):
            allowed, why = host_allowed(current, cfg.input_allowed_hosts, "input_allowed_hosts")
            if not allowed:
                raise fail(why)
            try:
                async with asyncio.timeout(cfg.input_fetch_timeout_seconds):
                    data = await self._get(
                        current, cfg.input_max_bytes, cfg.input_fetch_timeout_seconds, record
                    )
            except TimeoutError:
                raise fail(f"timed out after {cfg.input_fetch_timeout_seconds:g} s") from None
            except httpx.HTTPError as exc:
                raise fail(_transport_reason(exc, cfg.input_fetch_timeout_seconds)) from None
            except _TooLarge:
                limit = f"is larger than the {_mib(cfg.input_max_bytes)} input limit"
                raise fail(limit, fetched=False) from None
            except _Refused as refused:
                raise fail(refused.reason) from None
            if isinstance(data, _Redirect):
                current = urljoin(current, data.location)
                continue
            record["bytes"] = len(data)
            return data
        raise fail(f"more than {MAX_REDIRECTS} redirects")

    async def _get(
        self, url: str, cap: int, timeout: float, record: dict[str, Any]
    ) -> bytes | _Redirect:
        async with self._http().stream("GET", url, timeout=timeout) as response:
            record["http_status"] = response.status_code
            if response.is_redirect and response.headers.get("location"):
                return _Redirect(response.headers["location"])
            if not 200 <= response.status_code < 300:
                body = b""
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) >= 4096:
                        break
                raise _Refused(_status_reason(response, body))
            length = response.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > cap:
                raise _TooLarge
            buffer = bytearray()
            async for chunk in response.aiter_bytes():
                buffer += chunk
                if len(buffer) > cap:
                    raise _TooLarge
            return bytes(buffer)


@dataclass
class _Redirect:
    location: str


class _TooLarge(Exception):
    pass


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
