"""``EggAPICredentials``: the Prefect block that holds the key and builds clients.

Clients built from the same key in one process share a rate limiter and learned task durations,
so hundreds of mapped task runs stay under the account's request rate together. The bucket is
the account's (base URL + key), whatever rate each block asks for: blocks that ask for
different rates share one bucket at the lowest of them, never one bucket each.
"""

from __future__ import annotations

import hashlib
import os
from typing import TypeVar

import httpx
from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator

from prefect_eggapi.client import DEFAULT_BASE_URL, AsyncEggAPIClient, EggAPIClient, RetryPolicy
from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.client.polling import DurationStats, PollPolicy
from prefect_eggapi.client.ratelimit import CombinedLimiter, Limiter, RateLimiter
from prefect_eggapi.client.registry import Registry
from prefect_eggapi.client.types import MAX_WEBHOOK_URL_CHARS, GenerateRequest, check_http_url

API_KEY_ENV = "EGGAPI_API_KEY"
BASE_URL_ENV = "EGGAPI_BASE_URL"
RATE_ENV = "EGGAPI_REQUESTS_PER_SECOND"
WEBHOOK_URL_ENV = "EGGAPI_WEBHOOK_URL"
ClientT = TypeVar("ClientT", EggAPIClient, AsyncEggAPIClient)

_SHARED: Registry[tuple[str, str], tuple[RateLimiter, DurationStats]] = Registry(
    "rate buckets and learned durations by account"
)


def _shared_state(base_url: str, api_key: str, rate: float) -> tuple[RateLimiter, DurationStats]:
    ident = (base_url, hashlib.sha256(api_key.encode()).hexdigest())
    limiter, durations = _SHARED.get(ident, lambda: (RateLimiter(rate), DurationStats()))
    limiter.slow_to(rate)
    return limiter, durations


_GLOBAL: Registry[str, Limiter] = Registry("global-limit clients by limit name")


def _global_limiter(name: str) -> Limiter:
    """One batching limiter per limit name per process, shared by all clients."""
    # Deferred to break a cycle: importing prefect_eggapi.tasks runs its __init__, whose task
    # modules import EggAPICredentials from this module (not yet defined at our import time).
    from prefect_eggapi.tasks.global_limit import GlobalRateLimiter

    return _GLOBAL.get(name, lambda: GlobalRateLimiter(name))


class EggAPICredentials(Block):
    """Credentials and connection settings for EggAPI.

    Attributes:
        api_key: EggAPI key; falls back to the ``EGGAPI_API_KEY`` environment variable.
        base_url: API base URL; falls back to ``EGGAPI_BASE_URL``, then https://api.eggapi.ai.

    Example:
        Load stored credentials and build a client:
        ```python
        from prefect_eggapi import EggAPICredentials

        eggapi_credentials_block = EggAPICredentials.load("BLOCK_NAME")
        with eggapi_credentials_block.get_client() as client:
            task = client.generate(model="nanobanana", prompt="a lighthouse at dawn")
        ```
    """

    _block_type_name = "EggAPI Credentials"
    # EggAPI publishes no logo we could verify; the UI falls back to its default icon.
    _logo_url = None
    _documentation_url = "https://docs.eggapi.ai/docs/en/api-reference/introduction"  # type: ignore[assignment]
    _description = "Credentials and connection settings for EggAPI's asynchronous image models."

    api_key: SecretStr | None = Field(
        default=None,
        description="EggAPI key (egg_sk_...); falls back to the EGGAPI_API_KEY variable.",
    )
    base_url: str | None = Field(
        default=None,
        description="API base URL; falls back to EGGAPI_BASE_URL, then https://api.eggapi.ai.",
    )
    timeout_seconds: float = Field(
        default=30.0, gt=0, description="Read/write timeout of each HTTP request, in seconds."
    )
    connect_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Connect timeout of each HTTP request, in seconds."
    )
    max_retries: int = Field(
        default=4, ge=0, le=20, description="Retries of reads on 429, 5xx and network errors."
    )
    requests_per_second: float = Field(
        default_factory=lambda: float(os.environ.get(RATE_ENV) or 20.0),
        gt=0,
        description=(
            "Client-side request rate shared by every client of this key in a process; "
            "falls back to EGGAPI_REQUESTS_PER_SECOND, then 20."
        ),
    )
    global_rate_limit: str | None = Field(
        default=None,
        description=(
            "Name of a Prefect global concurrency limit with slot decay that every worker draws "
            "request slots from (see ensure_global_rate_limit)."
        ),
    )
    submits_in_flight: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "POSTs of one model and type in flight at once in a process. 1 keeps every lost "
            "202 attributable; more submits faster, but lost answers that overlap then fail "
            "with ReconciliationError (never a duplicate or a wrong image)."
        ),
    )
    webhook_secrets: list[SecretStr] = Field(
        default_factory=list,
        description="Webhook signing secrets; two are accepted while a secret is rotated.",
    )
    webhook_url: str | None = Field(
        default_factory=lambda: os.environ.get(WEBHOOK_URL_ENV) or None,
        max_length=MAX_WEBHOOK_URL_CHARS,
        description=(
            "Public URL of your `prefect-eggapi webhooks` receiver; falls back to "
            "EGGAPI_WEBHOOK_URL. When set, every submit made with these credentials that has no "
            "webhook_url of its own sends this one, with its own /s/<nonce>, so a lost 202 is "
            "attributed exactly by its delivery."
        ),
    )

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        return None if not value else check_http_url(value, field="webhook_url")

    def with_webhook(self, request: GenerateRequest) -> GenerateRequest:
        """``request`` with this block's ``webhook_url`` unless it names its own."""
        if request.webhook_url or not self.webhook_url:
            return request
        return request.model_copy(update={"webhook_url": self.webhook_url})

    def resolved_api_key(self) -> SecretStr:
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key
        env = os.environ.get(API_KEY_ENV, "")
        if not env:
            raise InvalidRequestError(
                [("api_key", f"is not set on the block and {API_KEY_ENV} is empty")],
                what="EggAPI credentials",
            )
        return SecretStr(env)

    def resolved_base_url(self) -> str:
        return self.base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL

    def _connection(self) -> tuple[SecretStr, str, Limiter, DurationStats]:
        """Key, base URL, and the account's shared limiter and learned durations."""
        key = self.resolved_api_key()
        base_url = self.resolved_base_url()
        limiter, durations = _shared_state(
            base_url, key.get_secret_value(), self.requests_per_second
        )
        rate: Limiter = limiter
        if self.global_rate_limit:
            rate = CombinedLimiter(limiter, _global_limiter(self.global_rate_limit))
        return key, base_url, rate, durations

    @property
    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout_seconds, connect=self.connect_timeout_seconds)

    def _build(self, cls: type[ClientT], poll: PollPolicy | None) -> ClientT:
        key, base_url, rate, durations = self._connection()
        return cls(
            key,
            base_url,
            timeout=self._timeout,
            retry=RetryPolicy(max_retries=self.max_retries),
            poll=poll,
            rate_limit=rate,
            durations=durations,
        )

    def get_client(self, poll: PollPolicy | None = None) -> EggAPIClient:
        """A synchronous client; close it (or use ``with``) when done."""
        return self._build(EggAPIClient, poll)

    def get_async_client(self, poll: PollPolicy | None = None) -> AsyncEggAPIClient:
        """An async client; create it inside the task that uses it (prefect#9412)."""
        return self._build(AsyncEggAPIClient, poll)
