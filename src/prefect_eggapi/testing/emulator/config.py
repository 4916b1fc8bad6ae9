"""Configuration of the EggAPI emulator: one pydantic model, serialisable to JSON.

The same model travels to the emulator subprocess (as JSON in an environment variable), is shown
and patched by the admin endpoints, and is built by the ``emulator`` CLI subcommand.
"""

from __future__ import annotations

import hashlib
import re
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_API_KEY = "egg_sk_local_emulator_key"
"""The documented, non-secret key the emulator accepts when no key is configured explicitly."""

FaultKind = Literal[
    "error_before_create",
    "error_after_create",
    "drop_after_create",
    "timeout_after_create",
    "http_error",
    "rate_limit_burst",
    "upstream_failure",
    "empty_output",
    "slow_download",
    "truncated_download",
    "webhook_lost",
    "webhook_duplicate",
    "webhook_delayed",
    "webhook_out_of_order",
    "webhook_bad_signature",
]
FaultEndpoint = Literal["generate", "get_task", "list_tasks", "download", "usage", "webhook", "any"]

# Where a fault kind is evaluated; also the default endpoint of each kind.
FAULT_DEFAULT_ENDPOINT: dict[str, FaultEndpoint] = {
    "error_before_create": "generate",
    "error_after_create": "generate",
    "drop_after_create": "generate",
    "timeout_after_create": "generate",
    "http_error": "any",
    "rate_limit_burst": "any",
    "upstream_failure": "generate",
    "empty_output": "generate",
    "slow_download": "download",
    "truncated_download": "download",
    "webhook_lost": "webhook",
    "webhook_duplicate": "webhook",
    "webhook_delayed": "webhook",
    "webhook_out_of_order": "webhook",
    "webhook_bad_signature": "webhook",
}

DEFAULT_WEBHOOK_ALLOWED_HOSTS = ["localhost", "127.0.0.0/8", "::1/128"]
DEFAULT_INPUT_ALLOWED_HOSTS = ["localhost", "127.0.0.0/8", "::1/128"]
DEFAULT_INPUT_MAX_BYTES = 20 * 1024 * 1024


def key_id(api_key: str) -> str:
    """A stable, non-reversible identifier of an API key (first 16 hex digits of its sha256)."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]


def mask_key(api_key: str) -> str:
    """A display form of an API key that never reveals it: ``egg_sk_…abcd``."""
    if len(api_key) <= 10:
        return "…" + api_key[-2:]
    prefix = api_key[:7] if api_key.startswith("egg_sk_") else api_key[:3]
    return f"{prefix}…{api_key[-4:]}"


class ApiKeyConfig(BaseModel):
    """One accepted API key (the key itself is the dict key in ``EmulatorConfig.api_keys``)."""

    model_config = ConfigDict(extra="forbid")

    balance: Decimal = Field(Decimal("100"), description="Starting balance in USD.")
    suspended: bool = Field(False, description="Every request with this key gets 403 FORBIDDEN.")
    name: str | None = Field(None, description="Label shown in the audit instead of the mask.")


class FaultRule(BaseModel):
    """A scripted fault. Rules are deterministic: counted per opportunity, in insertion order.

    An *opportunity* is a point where the rule's kind could apply to a request on a matching
    endpoint (and key, if ``api_key`` is set). The first ``skip`` opportunities pass untouched,
    the next ``times`` fire (``times: null`` fires forever), then the rule is exhausted.
    """

    model_config = ConfigDict(extra="forbid")

    kind: FaultKind
    endpoint: FaultEndpoint | None = Field(
        None, description="Defaults per kind: generate, download, or any (http_error, 429 burst)."
    )
    status: int | None = Field(None, ge=100, le=599, description="HTTP status of error kinds.")
    code: str | None = Field(None, description="error.code; derived from status if omitted.")
    message: str | None = Field(None, description="error.message / task error text.")
    times: int | None = Field(1, ge=0, description="How many times to fire; null = forever.")
    skip: int = Field(0, ge=0, description="Opportunities to let pass before firing.")
    delay: float = Field(0.0, ge=0, description="Seconds to wait before the faulty response.")
    bytes_per_second: int = Field(65536, gt=0, description="slow_download throughput.")
    fraction: float = Field(
        0.5, ge=0, lt=1, description="Share of the body sent before the connection is cut."
    )
    api_key: str | None = Field(None, description="Only requests with this key match.")
    rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Fire with this probability at each opportunity past skip, drawn from a "
        "per-rule RNG seeded by fault_seed (else seed); null fires every time. A rule with a "
        "rate fires forever unless times is given.",
    )
    id: str | None = Field(None, description="Assigned by the emulator.")

    @model_validator(mode="after")
    def _rate_defaults(self) -> FaultRule:
        if self.rate is not None and "times" not in self.model_fields_set:
            self.times = None
        return self

    @property
    def effective_endpoint(self) -> FaultEndpoint:
        return self.endpoint or FAULT_DEFAULT_ENDPOINT[self.kind]


#: Named fault rates besides the plain kind names (``{"upstream_failure": 0.1}``).
RATE_ALIASES: dict[str, dict[str, Any]] = {
    "late_answer": {"kind": "timeout_after_create", "delay": 60.0},
}
_POST_STATUS = re.compile(r"^post_([1-5][0-9]{2})_(before|after)_create$")
_ENDPOINT_STATUS = re.compile(
    r"^(generate|get_task|list_tasks|download|usage|any)_([1-5][0-9]{2})$"
)


def rate_rule(name: str, spec: float | dict[str, Any]) -> FaultRule:
    """The :class:`FaultRule` behind one entry of ``EmulatorConfig.fault_rates``.

    Names: any fault kind (``upstream_failure``, ``drop_after_create``, ``webhook_lost`` ...);
    ``post_NNN_before_create`` / ``post_NNN_after_create`` (``error_before_create`` /
    ``error_after_create`` with status NNN); ``ENDPOINT_NNN`` (``http_error`` with status NNN on
    ``generate``, ``get_task``, ``list_tasks``, ``download``, ``usage`` or ``any``);
    ``late_answer`` (``timeout_after_create``: the 202 comes 60 s late unless ``delay`` says).
    The value is the rate, or a rule's fields with a ``rate``: ``{"rate": 0.1, "delay": 5}``.
    The rule id is ``rate_<name>``, so its draws do not depend on other rules.
    """
    fields: dict[str, Any] = {"rate": spec} if not isinstance(spec, dict) else dict(spec)
    if "rate" not in fields:
        raise ValueError(f"fault_rates[{name!r}]: a rate is required")
    base: dict[str, Any]
    post = _POST_STATUS.match(name)
    endpoint = _ENDPOINT_STATUS.match(name)
    if name in RATE_ALIASES:
        base = dict(RATE_ALIASES[name])
    elif post is not None:
        kind = "error_before_create" if post.group(2) == "before" else "error_after_create"
        base = {"kind": kind, "status": int(post.group(1))}
    elif endpoint is not None:
        base = {
            "kind": "http_error",
            "endpoint": endpoint.group(1),
            "status": int(endpoint.group(2)),
        }
    elif name in FAULT_DEFAULT_ENDPOINT:
        base = {"kind": name}
    else:
        raise ValueError(
            f"fault_rates: unknown name {name!r} (a fault kind, post_502_before_create, "
            "post_502_after_create, get_task_500, late_answer ...)"
        )
    return FaultRule.model_validate({**base, **fields, "id": f"rate_{name}"})


def _default_prices() -> dict[str, dict[str, Decimal]]:
    return {
        "nanobanana": {"default": Decimal("0.01")},
        "nanobanana-pro": {"default": Decimal("0.016"), "4k": Decimal("0.032")},
    }


class EmulatorConfig(BaseModel):
    """Everything that makes one emulator instance behave the way a test or demo needs."""

    model_config = ConfigDict(extra="forbid")

    api_keys: dict[str, ApiKeyConfig] = Field(
        default_factory=lambda: {DEFAULT_API_KEY: ApiKeyConfig()},
        description="Accepted keys (full key -> settings).",
    )
    pending_seconds: float = Field(0.05, ge=0, description="Time a task stays pending.")
    processing_seconds: float = Field(0.2, ge=0, description="Time a task stays processing.")
    manual: bool = Field(
        False, description="New tasks stay pending until advanced through the admin API."
    )
    rate_limit_per_second: float | None = Field(
        100.0, ge=0, description="Per-key token-bucket rate; null or 0 disables."
    )
    rate_limit_burst: int | None = Field(
        None, ge=1, description="Bucket size; defaults to max(1, rate_limit_per_second)."
    )
    allowed_models: list[str] = Field(
        default_factory=lambda: ["nanobanana", "nanobanana-pro"],
        description="The 'oneof' allow-list of the model field.",
    )
    moderation_word: str | None = Field(
        "forbidden", description="A prompt containing this word (any case) fails moderation."
    )
    upstream_error_message: str = "Upstream provider error: provider returned 502 Bad Gateway"
    public_base_url: str | None = Field(
        None, description="Host of output file URLs; defaults to the server's own base URL."
    )
    seed: int | None = Field(None, description="Seed for task ids (deterministic ids).")
    fault_seed: int | None = Field(
        None,
        description="Seed of fault rates (rules with a rate); defaults to seed. The same seed "
        "and the same order of calls give the same faults.",
    )
    fault_rates: dict[str, float | dict[str, Any]] = Field(
        default_factory=dict,
        description="Seeded fault rates, e.g. {'post_502_before_create': 0.1, "
        "'drop_after_create': 0.05, 'upstream_failure': 0.1}: see rate_rule() for the names.",
    )
    fetch_inputs: bool = Field(
        True,
        description="Edits fetch their image_urls while processing and are drawn from them; "
        "false skips fetching (edits are drawn like generations, with no sources).",
    )
    input_allowed_hosts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_INPUT_ALLOWED_HOSTS),
        description="Hosts edit inputs are fetched from: host names, IP networks (CIDR) or '*'. "
        "Inputs elsewhere fail the task (unreachable) without any network traffic.",
    )
    input_fetch_timeout_seconds: float = Field(
        10.0, gt=0, description="Timeout of fetching one edit input (connect to last byte)."
    )
    input_max_bytes: int = Field(
        DEFAULT_INPUT_MAX_BYTES, gt=0, description="Largest accepted edit input (20 MiB)."
    )
    prices: dict[str, dict[str, Decimal]] = Field(
        default_factory=_default_prices,
        description="USD per returned image: model -> {resolution|'default': price}.",
    )
    default_price: Decimal = Field(Decimal("0.01"), description="Price of models not in prices.")
    faults: list[FaultRule] = Field(default_factory=list)
    image_cache_bytes: int = Field(256 * 1024 * 1024, ge=0)
    png_compress_level: int = Field(1, ge=0, le=9)
    png_noise: bool = Field(
        False, description="Fill outputs with random pixels: realistic (large) file sizes."
    )
    admin_loopback_only: bool = Field(True, description="Admin API answers loopback clients only.")
    webhook_secret: str | None = Field(
        None,
        description="Signs webhooks (X-EggAPI-Signature); null sends them unsigned, like the "
        "real API before a secret is generated in the dashboard.",
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="Timeout of one delivery.")
    webhook_retries: int = Field(
        0, ge=0, le=10, description="Retries after a failed delivery (5xx, 429, network error)."
    )
    webhook_backoff_seconds: float = Field(
        1.0, ge=0, description="First retry delay; doubles each retry (1 s, 2 s, 4 s ...)."
    )
    webhook_allowed_hosts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_ALLOWED_HOSTS),
        description="Hosts webhooks are delivered to: exact host names or IP networks (CIDR). "
        "Any valid http(s) webhook_url is accepted at create time; deliveries to other hosts are "
        "skipped and recorded, never sent.",
    )

    @model_validator(mode="after")
    def _check(self) -> EmulatorConfig:
        if self.public_base_url is not None:
            self.public_base_url = self.public_base_url.rstrip("/")
        self.rate_rules()  # unknown names or bad rates fail here, at config time
        return self

    def rate_rules(self) -> list[FaultRule]:
        """The rules behind ``fault_rates``, in the dict's order."""
        return [rate_rule(name, spec) for name, spec in self.fault_rates.items()]

    def effective_fault_seed(self) -> int | None:
        return self.fault_seed if self.fault_seed is not None else self.seed

    def unit_price(self, model: str, resolution: str) -> Decimal:
        table = self.prices.get(model)
        if table is None:
            return self.default_price
        return table.get(resolution, table.get("default", self.default_price))

    def burst(self) -> int:
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1, int(self.rate_limit_per_second or 1))

    def public_dump(self) -> dict[str, object]:
        """The config as JSON, with API keys replaced by their masked forms."""
        data = self.model_dump(mode="json")
        data["api_keys"] = {
            mask_key(k): {**v.model_dump(mode="json"), "key_id": key_id(k)}
            for k, v in self.api_keys.items()
        }
        if self.webhook_secret:
            data["webhook_secret"] = mask_key(self.webhook_secret)
        for rule in [*data["faults"], *data["fault_rates"].values()]:
            if isinstance(rule, dict) and rule.get("api_key"):
                rule["api_key"] = mask_key(rule["api_key"])
        return data
