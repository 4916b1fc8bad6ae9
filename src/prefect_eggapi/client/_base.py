"""What the sync and async clients share besides the operations: configuration and requests.

One constructor for both twins: it checks the key and base URL, builds the headers, the rate
limiter and the two connection pools (the API's, with the key; the CDN's, without), typed by the
twin's httpx classes (``_BaseClient[httpx.BaseTransport, httpx.Client]`` for the sync one).
"""

from __future__ import annotations

import hashlib
import ssl
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import httpx
from pydantic import SecretStr

from prefect_eggapi._version import __version__
from prefect_eggapi.client._core import Op, RetryPolicy
from prefect_eggapi.client._ops import Operations
from prefect_eggapi.client.board import PollBoard, RawTaskPage, board_for
from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.client.polling import DurationStats, PollPolicy
from prefect_eggapi.client.ratelimit import Limiter, RateLimiter
from prefect_eggapi.client.types import EditFields, GenerateFields, GenerateRequest, check_http_url

DEFAULT_BASE_URL = "https://api.eggapi.ai"
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=30.0)

TransportT = TypeVar("TransportT", httpx.BaseTransport, httpx.AsyncBaseTransport)
PoolT = TypeVar("PoolT", httpx.Client, httpx.AsyncClient)
T = TypeVar("T")


_TLS_LOCK = threading.Lock()
_TLS: list[ssl.SSLContext] = []


def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context per process: building one loads the CA bundle, which measured as 41 % of
    a batch's CPU when every client made its own (two per client, three clients per image).

    Built under a lock: ``functools.cache`` lets threads that call it at once each build (and
    load the CA bundle into) a context of their own, which the submit threads of a batch do.
    """
    with _TLS_LOCK:
        if not _TLS:
            _TLS.append(httpx.create_ssl_context())
        return _TLS[0]


def _mask(key: str) -> str:
    return f"{key[:7]}…{key[-2:]}" if len(key) > 12 else "***"


def _check_credentials(api_key: str | SecretStr, base_url: str) -> tuple[SecretStr, str]:
    secret = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key or "")
    raw = secret.get_secret_value()
    problems: list[tuple[str, str]] = []
    if not raw:
        problems.append(("api_key", "is required (set EGGAPI_API_KEY or pass api_key)"))
    elif raw != raw.strip() or any(c.isspace() for c in raw):
        problems.append(("api_key", "must not contain whitespace"))
    try:
        check_http_url(base_url, field="base_url")
    except ValueError as exc:
        problems.append(("base_url", str(exc)))
    if problems:
        raise InvalidRequestError(problems, what="client configuration")
    return secret, base_url.rstrip("/")


def coerce_request(request: GenerateRequest | None, fields: GenerateFields) -> GenerateRequest:
    """``generate(request)`` or ``generate(**fields)``, never both."""
    if request is not None and fields:
        raise TypeError("pass either a GenerateRequest or keyword fields, not both")
    if request is None:
        return GenerateRequest(**fields)
    if not isinstance(request, GenerateRequest):
        raise TypeError("request must be a GenerateRequest")
    return request


def edit_request(image_urls: list[str] | tuple[str, ...], fields: EditFields) -> GenerateRequest:
    """An edit is a generate with input images (``type: image_edit``)."""
    if not image_urls:
        raise InvalidRequestError([("image_urls", "an edit needs at least one input image URL")])
    return GenerateRequest(image_urls=tuple(image_urls), **fields)


class _BaseClient(Operations, Generic[TransportT, PoolT]):
    """Configuration shared by the sync and async clients; ``_pool`` is the twin's httpx class."""

    _pool: Callable[..., PoolT]

    def __init__(
        self,
        api_key: str | SecretStr,
        base_url: str = DEFAULT_BASE_URL,
        *,
        transport: TransportT | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
        rate_limit: float | Limiter | None = 20.0,
        user_agent: str | None = None,
        durations: DurationStats | None = None,
    ) -> None:
        self._api_key, self.base_url = _check_credentials(api_key, base_url)
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.retry = retry or RetryPolicy()
        self.poll = poll or PollPolicy()
        self._custom_poll = poll is not None
        self.limiter: Limiter | None = (
            RateLimiter(rate_limit) if isinstance(rate_limit, int | float) else rate_limit
        )
        self.durations = durations or DurationStats()
        self._custom_transport = transport is not None  # a board could not reach a mock
        self._headers = {
            "Authorization": f"Bearer {self._api_key.get_secret_value()}",
            "User-Agent": user_agent or f"prefect-eggapi/{__version__}",
            "Accept": "application/json",
        }
        tls = shared_ssl_context()
        self._http: PoolT = self._pool(
            base_url=self.base_url,
            headers=self._headers,
            timeout=self.timeout,
            transport=transport,
            verify=tls,
        )
        # Separate pool without credentials: output URLs live on a CDN host.
        self._files: PoolT = self._pool(
            timeout=self.timeout, transport=transport, follow_redirects=True, verify=tls
        )

    @property
    def account(self) -> str:
        """Who gets billed: the base URL plus a hash of the key (never the key itself)."""
        digest = hashlib.sha256(self._api_key.get_secret_value().encode()).hexdigest()[:16]
        return f"{self.base_url}#{digest}"

    def __repr__(self) -> str:
        key = _mask(self._api_key.get_secret_value())
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_key={key!r})"

    def _poll_board(self) -> PollBoard | None:
        """The account's shared board; None when this client talks to a custom transport."""
        if self._custom_transport:
            return None
        return board_for(
            self.account, lambda: PollBoard(lambda: _BoardLister(self._board_lister()))
        )

    def _board_lister(self) -> _PageRunner:
        """The client the board's thread lists pages with (a sync one, for either twin)."""
        raise NotImplementedError


class _PageRunner(Protocol):
    """What :class:`_BoardLister` uses of the sync client it wraps."""

    def _run(self, op: Op[T]) -> T: ...

    def _task_dicts_op(self, page: int, per_page: int) -> Op[RawTaskPage]: ...

    def close(self) -> None: ...


class _BoardLister:
    """The board's :class:`~prefect_eggapi.client.board.Lister` on a sync client: list pages
    whose items stay JSON until the board wants one (``list_tasks`` validates them all)."""

    def __init__(self, client: _PageRunner) -> None:
        self._client = client

    def list_task_dicts(self, page: int, per_page: int) -> RawTaskPage:
        return self._client._run(self._client._task_dicts_op(page, per_page))

    def close(self) -> None:
        self._client.close()
