"""EggAPIClient and AsyncEggAPIClient against respx (mocked httpx), no network, no real sleeping.

Every behaviour is checked on both clients through :class:`Api`, which runs the same call on the
sync client or, via ``asyncio.run``, on the async one. respx is scoped to the fake API host
``https://api.test``; output files live on a separate fake CDN host ``https://cdn.test``.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import time
import types
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import respx
from PIL import Image
from pydantic import SecretStr

import prefect_eggapi.client._async as async_mod
import prefect_eggapi.client._sync as sync_mod
from prefect_eggapi.client import (
    AsyncEggAPIClient,
    DownloadResult,
    EggAPIClient,
    RetryPolicy,
)
from prefect_eggapi.client._wait import Wait
from prefect_eggapi.client.errors import (
    AmbiguousSubmitError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    APIValidationError,
    AuthenticationError,
    BadRequestError,
    ContentModerationError,
    DownloadError,
    EmptyOutputError,
    ErrorClass,
    ForbiddenError,
    InsufficientBalanceError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    OutputGoneError,
    RateLimitError,
    ServiceUnavailableError,
    TaskAbandonedError,
    TaskFailedError,
    UpstreamError,
    classify,
    describe,
    is_retryable,
)
from prefect_eggapi.client.polling import PollPolicy
from prefect_eggapi.client.pricing import parse_cost
from prefect_eggapi.client.ratelimit import RateLimiter
from prefect_eggapi.client.types import EggAPITask, GenerateRequest, TaskStatus

API = "https://api.test"
CDN = "https://cdn.test"
KEY = "egg_sk_unit_secret_9f8e7d6c5b4a3210"
TASK_ID = "gen_abc123def456"
MAX_RETRIES = 3
FAST_RETRY = RetryPolicy(max_retries=MAX_RETRIES, base_delay=0, max_delay=0)
FAST_POLL = PollPolicy(initial_interval=0.001, max_interval=0.002, min_interval=0.001)
GO_MESSAGE = (
    "Key: 'GenerateRequest.Model' Error:Field validation for 'Model' failed on the 'oneof' tag"
)


# --------------------------------------------------------------------------- helpers


def envelope(data: Any) -> dict[str, Any]:
    return {"data": data, "error": None}


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"data": None, "error": {"code": code, "message": message}}


def task_json(status: str = "pending", task_id: str = TASK_ID, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": task_id,
        "status": status,
        "model": "nanobanana",
        "type": "image_generate",
        "cost": "$0.00",
        "created_at": "2026-05-08T10:30:00Z",
    }
    if status in ("processing", "completed", "failed"):
        body["started_at"] = "2026-05-08T10:30:01Z"
    if status == "completed":
        urls = [f"{CDN}/images/{task_id}/0.png"]
        body.update(
            output={"url": urls[0], "urls": urls},
            cost="$0.0100",
            completed_at="2026-05-08T10:30:10Z",
        )
    body.update(extra)
    return body


Spec = httpx.Response | BaseException | Callable[[], httpx.Response]


def ok(data: Any, status: int = 200) -> Callable[[], httpx.Response]:
    return lambda: httpx.Response(status, json=envelope(data))


def err(status: int, code: str = "", message: str = "", **kw: Any) -> Callable[[], httpx.Response]:
    if not code:
        return lambda: httpx.Response(status, **kw)
    return lambda: httpx.Response(status, json=error_body(code, message), **kw)


def sequence(*specs: Spec) -> Callable[[httpx.Request], httpx.Response]:
    """A respx side effect answering with each spec in turn, repeating the last one."""
    items = list(specs)

    def effect(request: httpx.Request) -> httpx.Response:
        spec = items.pop(0) if len(items) > 1 else items[0]
        if isinstance(spec, BaseException):
            raise type(spec)(str(spec), request=request)  # type: ignore[call-arg]
        return spec() if callable(spec) else spec

    return effect


def make_image(fmt: str = "PNG", size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (12, 150, 200)).save(buf, fmt)
    return buf.getvalue()


def assert_no_secret(exc: BaseException) -> None:
    """The key must not appear in the exception, its args, its chain or its summary."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for text in (str(e), repr(e), repr(e.args)):
            assert KEY not in text
            assert KEY[7:] not in text
        e = e.__cause__ or e.__context__
    assert KEY not in json.dumps(describe(exc), default=str)


def raises(exc_type: type[BaseException], fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
    with pytest.raises(exc_type) as info:
        fn(*a, **kw)
    assert_no_secret(info.value)
    return info.value


class Api:
    """One client, sync or async, with the same call signatures (async calls run to completion)."""

    def __init__(self, mode: str, **options: Any) -> None:
        self.mode = mode
        opts: dict[str, Any] = {"retry": FAST_RETRY, "poll": FAST_POLL, "rate_limit": None}
        opts.update(options)
        cls = EggAPIClient if mode == "sync" else AsyncEggAPIClient
        self.client: Any = cls(KEY, API, **opts)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)
        if self.mode == "sync" or not asyncio.iscoroutinefunction(method):
            return method
        return lambda *a, **kw: asyncio.run(method(*a, **kw))

    def tasks(self, **kw: Any) -> list[EggAPITask]:
        if self.mode == "sync":
            return list(self.client.iter_tasks(**kw))

        async def collect() -> list[EggAPITask]:
            return [t async for t in self.client.iter_tasks(**kw)]

        return asyncio.run(collect())

    def fetch(self, url: str) -> tuple[bytes, DownloadResult | None]:
        """Read a whole output through stream_output."""
        if self.mode == "sync":
            with self.client.stream_output(url) as (chunks, stream):
                data = b"".join(chunks)
            return data, stream.result

        async def go() -> tuple[bytes, DownloadResult | None]:
            async with self.client.stream_output(url) as (chunks, stream):
                data = b"".join([c async for c in chunks])
            return data, stream.result

        return asyncio.run(go())

    def close(self) -> None:
        if self.mode == "sync":
            self.client.close()
        else:
            asyncio.run(self.client.aclose())


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=API, assert_all_called=False) as router:
        yield router


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def api(mode: str, mock: respx.MockRouter) -> Iterator[Api]:
    client = Api(mode)
    yield client
    client.close()


@pytest.fixture
def make_api(mode: str, mock: respx.MockRouter) -> Iterator[Callable[..., Api]]:
    made: list[Api] = []

    def factory(**options: Any) -> Api:
        made.append(Api(mode, **options))
        return made[-1]

    yield factory
    for client in made:
        client.close()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the clients' back-off sleeps instead of sleeping (their I/O loops only)."""
    recorded: list[float] = []

    def fake_sleep(seconds: float) -> None:
        recorded.append(seconds)

    async def fake_asleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(sync_mod, "time", types.SimpleNamespace(sleep=fake_sleep))
    monkeypatch.setattr(async_mod, "asyncio", types.SimpleNamespace(sleep=fake_asleep))
    return recorded


# --------------------------------------------------------------------------- configuration


def test_repr_masks_the_key(mode: str) -> None:
    api = Api(mode)
    text = repr(api.client)
    assert KEY not in text and KEY[7:] not in text
    assert "api.test" in text
    api.close()


@pytest.mark.parametrize(
    ("key", "base_url", "field"),
    [
        ("", API, "api_key"),
        (None, API, "api_key"),
        ("egg_sk_has space_1234567", API, "api_key"),
        ("egg_sk_trailing_newline_123\n", API, "api_key"),
        (" egg_sk_leading_space_123", API, "api_key"),
        ("egg_sk_tab\tinside_12345", API, "api_key"),
        (KEY, "ftp://api.test", "base_url"),
        (KEY, "api.eggapi.ai", "base_url"),
        (KEY, "", "base_url"),
        (KEY, "https://", "base_url"),
        (KEY, "https://api.test/ v1", "base_url"),
    ],
)
@pytest.mark.parametrize("cls", [EggAPIClient, AsyncEggAPIClient])
def test_bad_configuration_names_the_field(
    cls: type, key: str | None, base_url: str, field: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        cls(key, base_url)
    exc = info.value
    assert field in {f for f, _ in exc.problems}
    assert field in str(exc)
    if key:
        assert key not in str(exc) and key.strip() not in str(exc)
        assert all(key.strip() not in repr(a) for a in exc.args)


def test_both_problems_reported_together() -> None:
    with pytest.raises(InvalidRequestError) as info:
        EggAPIClient("", "file:///etc/passwd")
    assert {f for f, _ in info.value.problems} == {"api_key", "base_url"}


def test_secretstr_key_and_trailing_slash_are_accepted(mock: respx.MockRouter) -> None:
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(side_effect=sequence(ok(task_json())))
    with EggAPIClient(SecretStr(KEY), API + "/", rate_limit=None) as client:
        assert client.base_url == API
        client.get_task(TASK_ID)
    assert str(route.calls.last.request.url) == f"{API}/v1/tasks/{TASK_ID}"
    assert route.calls.last.request.headers["authorization"] == f"Bearer {KEY}"


def test_api_requests_carry_auth_user_agent_and_accept(api: Api, mock: respx.MockRouter) -> None:
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(side_effect=sequence(ok(task_json())))
    api.get_task(TASK_ID)
    headers = route.calls.last.request.headers
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["user-agent"].startswith("prefect-eggapi/")
    assert headers["accept"] == "application/json"


def test_every_request_passes_through_the_rate_limiter(make_api: Callable[..., Api], mock) -> None:
    class Counting(RateLimiter):
        calls = 0

        def acquire(self) -> None:
            Counting.calls += 1

        async def aacquire(self) -> None:
            Counting.calls += 1

    api = make_api(rate_limit=Counting(1000))
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(err(503, "SERVICE_UNAVAILABLE", "busy"), ok(task_json()))
    )
    api.get_task(TASK_ID)
    assert route.call_count == 2
    assert Counting.calls == 2


# --------------------------------------------------------------------------- error mapping

ERROR_TABLE = [
    (400, "BAD_REQUEST", BadRequestError, ErrorClass.TERMINAL),
    (400, "VALIDATION_ERROR", APIValidationError, ErrorClass.TERMINAL),
    (401, "UNAUTHORIZED", AuthenticationError, ErrorClass.TERMINAL),
    (403, "FORBIDDEN", ForbiddenError, ErrorClass.TERMINAL),
    (403, "INSUFFICIENT_BALANCE", InsufficientBalanceError, ErrorClass.TERMINAL),
    (404, "NOT_FOUND", NotFoundError, ErrorClass.TERMINAL),
    (429, "RATE_LIMITED", RateLimitError, ErrorClass.RETRYABLE),
    (500, "INTERNAL_ERROR", InternalServerError, ErrorClass.RETRYABLE),
    (502, "UPSTREAM_ERROR", UpstreamError, ErrorClass.RETRYABLE),
    (503, "SERVICE_UNAVAILABLE", ServiceUnavailableError, ErrorClass.RETRYABLE),
]


@pytest.mark.parametrize(("status", "code", "cls", "klass"), ERROR_TABLE)
def test_documented_error_codes_map_to_typed_exceptions(
    api: Api, mock: respx.MockRouter, status: int, code: str, cls: type, klass: ErrorClass
) -> None:
    message = f"documented {code.lower()} message"
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(side_effect=sequence(err(status, code, message)))
    exc = raises(cls, api.get_task, TASK_ID)
    assert type(exc) is cls
    assert exc.http_status == status
    assert exc.status_code == status and cls.default_status == status
    assert exc.error_code == code
    assert exc.message == message
    assert exc.task_id == TASK_ID
    assert (exc.method, exc.path) == ("GET", f"/v1/tasks/{TASK_ID}")
    assert classify(exc) is klass
    assert is_retryable(exc) is (klass is ErrorClass.RETRYABLE)
    assert message in str(exc) and code in str(exc) and TASK_ID in str(exc)
    summary = describe(exc)
    assert summary["task_id"] == TASK_ID
    assert summary["http_status"] == status
    assert summary["error_code"] == code
    assert summary["classification"] == klass.value
    expected_calls = MAX_RETRIES + 1 if klass is ErrorClass.RETRYABLE else 1
    assert route.call_count == expected_calls


def test_list_endpoint_errors_carry_no_task_id(api: Api, mock: respx.MockRouter) -> None:
    mock.get("/v1/tasks").mock(side_effect=sequence(err(401, "UNAUTHORIZED", "Missing header")))
    exc = raises(AuthenticationError, api.list_tasks)
    assert exc.task_id is None
    assert exc.path == "/v1/tasks"


@pytest.mark.parametrize(
    ("status", "kwargs", "cls", "message_part"),
    [
        (502, {"text": "<html><body>502 Bad Gateway</body></html>"}, UpstreamError, "502 Bad"),
        (503, {}, ServiceUnavailableError, "Service Unavailable"),
        (504, {"text": "upstream timed out"}, InternalServerError, "upstream timed out"),
        (500, {"text": "x" * 5000}, InternalServerError, "x" * 200),
        (401, {"text": "Unauthorized"}, AuthenticationError, "Unauthorized"),
        (429, {"json": {"message": "slow down"}}, RateLimitError, "slow down"),
        (418, {"json": error_body("TEAPOT", "short and stout")}, APIStatusError, "short and stout"),
    ],
)
def test_non_json_or_odd_error_bodies(
    api: Api,
    mock: respx.MockRouter,
    status: int,
    kwargs: dict[str, Any],
    cls: type,
    message_part: str,
) -> None:
    mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(lambda: httpx.Response(status, **kwargs))
    )
    exc = raises(cls, api.get_task, TASK_ID)
    assert type(exc) is cls
    assert exc.http_status == status
    # The status really answered, not the class's: a 504 is an InternalServerError with 504.
    assert exc.status_code == status
    assert f"HTTP {status} " in str(exc)
    assert message_part in exc.message
    assert len(exc.message) <= 200
    assert exc.task_id == TASK_ID
    if status >= 500:
        assert exc.retryable


def test_status_wins_over_a_mismatched_code(api: Api, mock: respx.MockRouter) -> None:
    # A 404 claiming RATE_LIMITED must not become retryable.
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(err(404, "RATE_LIMITED", "odd"))
    )
    exc = raises(NotFoundError, api.get_task, TASK_ID)
    assert exc.error_code == "RATE_LIMITED"
    assert not exc.retryable
    assert route.call_count == 1


def test_success_status_without_envelope_is_an_error(api: Api, mock: respx.MockRouter) -> None:
    mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(lambda: httpx.Response(200, text="<html>login</html>"))
    )
    exc = raises(APIStatusError, api.get_task, TASK_ID)
    assert exc.error_code == "BAD_RESPONSE"
    assert exc.http_status == 200


# --------------------------------------------------------------------------- GET retries


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_get_retries_transient_statuses_then_succeeds(
    api: Api, mock: respx.MockRouter, status: int
) -> None:
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(err(status, "X", "a"), err(status, "X", "b"), ok(task_json()))
    )
    assert api.get_task(TASK_ID).id == TASK_ID
    assert route.call_count == 3


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (httpx.ConnectError("refused"), APIConnectionError),
        (httpx.ReadTimeout("slow"), APITimeoutError),
        (httpx.RemoteProtocolError("closed"), APIConnectionError),
    ],
)
def test_get_retries_transport_errors_up_to_max_then_raises(
    api: Api, mock: respx.MockRouter, exc: Exception, cls: type
) -> None:
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(side_effect=sequence(exc))
    error = raises(cls, api.get_task, TASK_ID)
    assert error.retryable
    assert type(exc).__name__ in str(error)
    assert route.call_count == MAX_RETRIES + 1


def test_get_transport_error_then_success(api: Api, mock: respx.MockRouter) -> None:
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(httpx.ConnectError("x"), httpx.ReadTimeout("y"), ok(task_json()))
    )
    assert api.get_task(TASK_ID).status is TaskStatus.PENDING
    assert route.call_count == 3


@pytest.mark.parametrize("max_retries", [0, 1, 5])
def test_max_retries_is_respected(
    make_api: Callable[..., Api], mock: respx.MockRouter, max_retries: int
) -> None:
    api = make_api(retry=RetryPolicy(max_retries=max_retries, base_delay=0, max_delay=0))
    route = mock.get("/v1/usage/summary").mock(
        side_effect=sequence(err(502, "UPSTREAM_ERROR", "x"))
    )
    raises(UpstreamError, api.usage_summary)
    assert route.call_count == max_retries + 1


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "BAD_REQUEST", BadRequestError),
        (401, "UNAUTHORIZED", AuthenticationError),
        (403, "FORBIDDEN", ForbiddenError),
        (404, "NOT_FOUND", NotFoundError),
    ],
)
def test_get_does_not_retry_client_errors(
    api: Api, mock: respx.MockRouter, sleeps: list[float], status: int, code: str, cls: type
) -> None:
    route = mock.get("/v1/tasks").mock(side_effect=sequence(err(status, code, "no")))
    raises(cls, api.list_tasks)
    assert route.call_count == 1
    assert sleeps == []


def test_retry_after_seconds_is_honoured(
    api: Api, mock: respx.MockRouter, sleeps: list[float]
) -> None:
    mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(
            err(429, "RATE_LIMITED", "slow", headers={"Retry-After": "2"}),
            err(503, "SERVICE_UNAVAILABLE", "x", headers={"Retry-After": "0.5"}),
            ok(task_json()),
        )
    )
    api.get_task(TASK_ID)
    assert sleeps == [2.0, 0.5]


def test_retry_after_http_date_is_honoured(
    api: Api, mock: respx.MockRouter, sleeps: list[float]
) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    http_date = when.strftime("%a, %d %b %Y %H:%M:%S GMT")
    mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(
            err(429, "RATE_LIMITED", "slow", headers={"Retry-After": http_date}), ok(task_json())
        )
    )
    api.get_task(TASK_ID)
    assert len(sleeps) == 1
    assert 27 <= sleeps[0] <= 30.5


@pytest.mark.parametrize(("header", "expected"), [("3600", 60.0), ("-5", 0.0), ("0", 0.0)])
def test_retry_after_is_clamped(
    api: Api, mock: respx.MockRouter, sleeps: list[float], header: str, expected: float
) -> None:
    mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(
            err(429, "RATE_LIMITED", "slow", headers={"Retry-After": header}), ok(task_json())
        )
    )
    api.get_task(TASK_ID)
    assert sleeps == [expected]


def test_without_retry_after_backoff_is_jittered_exponential(
    make_api: Callable[..., Api], mock: respx.MockRouter, sleeps: list[float]
) -> None:
    policy = RetryPolicy(max_retries=5, base_delay=1.0, max_delay=4.0)
    api = make_api(retry=policy)
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(err(503, "SERVICE_UNAVAILABLE", "x"))
    )
    raises(ServiceUnavailableError, api.get_task, TASK_ID)
    assert route.call_count == 6
    assert len(sleeps) == 5
    caps = [1, 2, 4, 4, 4]
    assert all(0 <= s <= cap for s, cap in zip(sleeps, caps, strict=True))


def test_retry_policy_delay_bounds() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=8.0)
    for attempt in range(10):
        cap = min(8.0, 0.5 * 2**attempt)
        samples = [policy.delay(attempt) for _ in range(200)]
        assert all(0 <= s <= cap for s in samples)
    assert policy.delay(3, retry_after=7) == 7
    assert policy.delay(0, retry_after=120) == 60
    assert policy.delay(0, retry_after=-1) == 0
    assert RetryPolicy(base_delay=0, max_delay=0).delay(4) == 0


# --------------------------------------------------------------------------- POST /v1/generate


def test_generate_posts_the_documented_minimal_body(api: Api, mock: respx.MockRouter) -> None:
    route = mock.post("/v1/generate").mock(side_effect=sequence(ok(task_json(), 202)))
    task = api.generate(model="nanobanana", prompt="a red apple")
    assert (task.id, task.status, task.type) == (TASK_ID, TaskStatus.PENDING, "image_generate")
    request = route.calls.last.request
    assert json.loads(request.content) == {
        "model": "nanobanana",
        "prompt": "a red apple",
        "aspect_ratio": "16:9",
        "num_outputs": 1,
    }
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert route.call_count == 1


def test_generate_posts_the_g2_example_exactly(api: Api, mock: respx.MockRouter) -> None:
    documented = {
        "model": "nanobanana-pro",
        "prompt": "A futuristic cityscape at night, cyberpunk style",
        "negative_prompt": "blurry, low quality",
        "aspect_ratio": "16:9",
        "resolution": "2k",
        "num_outputs": 2,
        "webhook_url": "https://webhook.site/your-webhook-id",
    }
    route = mock.post("/v1/generate").mock(
        side_effect=sequence(
            ok(
                task_json(model="nanobanana-pro", created_at="2025-12-25T21:03:47.879577+08:00"),
                202,
            )
        )
    )
    task = api.generate(GenerateRequest(**documented))
    assert json.loads(route.calls.last.request.content) == documented
    assert task.created_at is not None and task.created_at.utcoffset() == timedelta(hours=8)


def test_edit_sends_image_urls(api: Api, mock: respx.MockRouter) -> None:
    route = mock.post("/v1/generate").mock(
        side_effect=sequence(ok(task_json(type="image_edit", task_id="gen_edit123456"), 202))
    )
    task = api.edit(["https://example.com/in.png"], model="nanobanana", prompt="make it blue")
    body = json.loads(route.calls.last.request.content)
    assert body["image_urls"] == ["https://example.com/in.png"]
    assert task.type == "image_edit" and task.id == "gen_edit123456"


def test_edit_without_images_is_rejected_before_http(api: Api, mock: respx.MockRouter) -> None:
    route = mock.post("/v1/generate").mock(side_effect=sequence(ok(task_json(), 202)))
    exc = raises(InvalidRequestError, api.edit, [], model="nanobanana", prompt="x")
    assert "image_urls" in str(exc)
    assert route.call_count == 0


def test_generate_rejects_request_plus_fields(api: Api, mock: respx.MockRouter) -> None:
    route = mock.post("/v1/generate").mock(side_effect=sequence(ok(task_json(), 202)))
    req = GenerateRequest(model="nanobanana", prompt="x")
    with pytest.raises(TypeError):
        api.generate(req, prompt="y")
    with pytest.raises(TypeError):
        api.generate({"model": "nanobanana", "prompt": "x"})
    assert route.call_count == 0


def test_generate_learns_the_server_clock_offset(api: Api, mock: respx.MockRouter) -> None:
    server_now = datetime.now(UTC) + timedelta(seconds=100)
    mock.post("/v1/generate").mock(
        side_effect=sequence(ok(task_json(created_at=server_now.isoformat()), 202))
    )
    api.generate(model="nanobanana", prompt="x")
    assert api.client.clock_offset == pytest.approx(100, abs=2)


@pytest.mark.parametrize(
    ("status", "code", "cause_cls"),
    [
        (500, "INTERNAL_ERROR", InternalServerError),
        (502, "UPSTREAM_ERROR", UpstreamError),
        (503, "SERVICE_UNAVAILABLE", ServiceUnavailableError),
        (504, "", InternalServerError),
    ],
)
def test_generate_5xx_is_ambiguous_after_one_call(
    api: Api, mock: respx.MockRouter, sleeps: list[float], status: int, code: str, cause_cls: type
) -> None:
    route = mock.post("/v1/generate").mock(side_effect=sequence(err(status, code, "boom")))
    before = datetime.now(UTC)
    exc = raises(AmbiguousSubmitError, api.generate, model="nanobanana-pro", prompt="a cat")
    assert route.call_count == 1
    assert sleeps == []
    assert classify(exc) is ErrorClass.AMBIGUOUS
    assert not exc.retryable
    assert (exc.model, exc.prompt, exc.task_type) == ("nanobanana-pro", "a cat", "image_generate")
    assert before <= exc.sent_at <= exc.failed_at <= datetime.now(UTC)
    assert isinstance(exc.cause, cause_cls)
    assert exc.cause.http_status == status
    assert "not retried" in str(exc)


@pytest.mark.parametrize(
    "transport_error",
    [
        httpx.ReadTimeout("read timed out"),
        httpx.RemoteProtocolError("server disconnected"),
        httpx.ReadError("connection reset"),
        httpx.WriteTimeout("write timed out"),
        httpx.WriteError("broken pipe"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_generate_transport_error_after_sending_is_ambiguous(
    api: Api, mock: respx.MockRouter, sleeps: list[float], transport_error: Exception
) -> None:
    route = mock.post("/v1/generate").mock(side_effect=sequence(transport_error))
    exc = raises(AmbiguousSubmitError, api.generate, model="nanobanana", prompt="x")
    assert route.call_count == 1
    assert sleeps == []
    assert isinstance(exc.cause, type(transport_error))
    assert type(transport_error).__name__ in str(exc)


@pytest.mark.parametrize(
    "response",
    [
        lambda: httpx.Response(202, text="<html>accepted</html>"),
        lambda: httpx.Response(202, text=""),
        lambda: httpx.Response(202, text='{"data": {"id": "gen_1", "sta'),
        lambda: httpx.Response(202, json={"result": "ok"}),
        lambda: httpx.Response(202, json={"data": None, "error": None}),
        lambda: httpx.Response(202, json={"data": {"status": "pending"}, "error": None}),
        lambda: httpx.Response(202, json={"data": [task_json()], "error": None}),
        lambda: httpx.Response(202, json=envelope(task_json(created_at="yesterday"))),
        lambda: httpx.Response(200, json=["not", "an", "envelope"]),
    ],
    ids=[
        "html",
        "empty",
        "truncated-json",
        "no-data-key",
        "data-null",
        "data-without-id",
        "data-list",
        "bad-timestamp",
        "json-list",
    ],
)
def test_generate_unreadable_success_is_ambiguous(
    api: Api, mock: respx.MockRouter, response: Callable[[], httpx.Response]
) -> None:
    route = mock.post("/v1/generate").mock(side_effect=sequence(response))
    exc = raises(AmbiguousSubmitError, api.generate, model="nanobanana", prompt="x")
    assert route.call_count == 1
    assert classify(exc) is ErrorClass.AMBIGUOUS


def test_generate_202_with_undecodable_body_is_ambiguous(api: Api, mock: respx.MockRouter) -> None:
    route = mock.post("/v1/generate").mock(
        side_effect=sequence(
            lambda: httpx.Response(
                202, stream=httpx.ByteStream(b"not gzip"), headers={"Content-Encoding": "gzip"}
            )
        )
    )
    with pytest.raises(AmbiguousSubmitError):
        api.generate(model="nanobanana", prompt="x")
    assert route.call_count == 1


def test_generate_202_with_naive_timestamp_returns_the_task(
    api: Api, mock: respx.MockRouter
) -> None:
    mock.post("/v1/generate").mock(
        side_effect=sequence(ok(task_json(created_at="2026-05-08T10:30:00"), 202))
    )
    task = api.generate(model="nanobanana", prompt="x")
    assert task.id == TASK_ID


@pytest.mark.parametrize(
    "transport_error",
    [httpx.ConnectError("refused"), httpx.ConnectTimeout("no SYN-ACK"), httpx.PoolTimeout("busy")],
    ids=lambda e: type(e).__name__,
)
def test_generate_retries_when_the_request_never_left(
    api: Api, mock: respx.MockRouter, transport_error: Exception
) -> None:
    route = mock.post("/v1/generate").mock(
        side_effect=sequence(transport_error, transport_error, ok(task_json(), 202))
    )
    assert api.generate(model="nanobanana", prompt="x").id == TASK_ID
    assert route.call_count == 3


def test_generate_connect_error_exhausts_retries(api: Api, mock: respx.MockRouter) -> None:
    route = mock.post("/v1/generate").mock(side_effect=sequence(httpx.ConnectError("refused")))
    exc = raises(APIConnectionError, api.generate, model="nanobanana", prompt="x")
    assert not isinstance(exc, AmbiguousSubmitError)
    assert exc.retryable
    assert route.call_count == MAX_RETRIES + 1


def test_generate_retries_429_honouring_retry_after(
    api: Api, mock: respx.MockRouter, sleeps: list[float]
) -> None:
    route = mock.post("/v1/generate").mock(
        side_effect=sequence(
            err(429, "RATE_LIMITED", "slow down", headers={"Retry-After": "1.5"}),
            ok(task_json(), 202),
        )
    )
    assert api.generate(model="nanobanana", prompt="x").id == TASK_ID
    assert route.call_count == 2
    assert sleeps == [1.5]
    bodies = [json.loads(call.request.content) for call in route.calls]
    assert bodies[0] == bodies[1]


def test_generate_429_forever_raises_rate_limit_error(api: Api, mock: respx.MockRouter) -> None:
    route = mock.post("/v1/generate").mock(side_effect=sequence(err(429, "RATE_LIMITED", "no")))
    exc = raises(RateLimitError, api.generate, model="nanobanana", prompt="x")
    assert exc.retryable
    assert route.call_count == MAX_RETRIES + 1


def test_generate_429_then_503_stops_at_the_ambiguous_answer(
    api: Api, mock: respx.MockRouter
) -> None:
    route = mock.post("/v1/generate").mock(
        side_effect=sequence(err(429, "RATE_LIMITED", "a"), err(503, "SERVICE_UNAVAILABLE", "b"))
    )
    raises(AmbiguousSubmitError, api.generate, model="nanobanana", prompt="x")
    assert route.call_count == 2


@pytest.mark.parametrize(
    ("status", "code", "message", "cls"),
    [
        (400, "VALIDATION_ERROR", GO_MESSAGE, APIValidationError),
        (400, "BAD_REQUEST", "malformed JSON", BadRequestError),
        (401, "UNAUTHORIZED", "Missing Authorization header", AuthenticationError),
        (403, "INSUFFICIENT_BALANCE", "insufficient balance", InsufficientBalanceError),
        (403, "FORBIDDEN", "account suspended", ForbiddenError),
        (404, "NOT_FOUND", "not found", NotFoundError),
    ],
)
def test_generate_client_errors_raise_once_terminal(
    api: Api,
    mock: respx.MockRouter,
    sleeps: list[float],
    status: int,
    code: str,
    message: str,
    cls: type,
) -> None:
    route = mock.post("/v1/generate").mock(side_effect=sequence(err(status, code, message)))
    exc = raises(cls, api.generate, model="nanobanana-pro", prompt="x")
    assert type(exc) is cls
    assert (exc.http_status, exc.error_code, exc.message) == (status, code, message)
    assert (exc.method, exc.path, exc.task_id) == ("POST", "/v1/generate", None)
    assert classify(exc) is ErrorClass.TERMINAL
    assert route.call_count == 1
    assert sleeps == []


# --------------------------------------------------------------------------- task ids


@pytest.mark.parametrize("bad", ["", "a/b", " gen_1", "gen_1\n", None, 42])
def test_bad_task_ids_are_rejected_before_http(
    api: Api, mock: respx.MockRouter, bad: object
) -> None:
    anything = mock.route().mock(side_effect=sequence(ok(task_json())))
    exc = raises(InvalidRequestError, api.get_task, bad)
    assert "task_id" in str(exc)
    assert anything.call_count == 0


@pytest.mark.parametrize("task_id", ["abc#frag", "abc?page=2", ".", ".."])
def test_task_id_cannot_escape_its_path_segment(
    api: Api, mock: respx.MockRouter, task_id: str
) -> None:
    anything = mock.route().mock(side_effect=sequence(err(404, "NOT_FOUND", "no such task")))
    try:
        api.get_task(task_id)
    except InvalidRequestError:
        assert anything.call_count == 0
        return
    except NotFoundError:
        pass
    assert anything.calls.last.request.url.raw_path.decode() == "/v1/tasks/" + quote(
        task_id, safe=""
    )


# --------------------------------------------------------------------------- wait_for_task


def test_wait_pending_processing_completed(api: Api, mock: respx.MockRouter) -> None:
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(
            ok(task_json("pending")), ok(task_json("processing")), ok(task_json("completed"))
        )
    )
    seen: list[TaskStatus] = []
    task = api.wait_for_task(TASK_ID, timeout=5, on_poll=lambda t: seen.append(t.status))
    assert task.status is TaskStatus.COMPLETED
    assert task.output_urls == [f"{CDN}/images/{TASK_ID}/0.png"]
    assert task.cost_amount == Decimal("0.01")
    assert seen == [TaskStatus.PENDING, TaskStatus.PROCESSING, TaskStatus.COMPLETED]
    assert route.call_count == 3
    # Completed tasks teach the client how long phases take.
    assert api.client.durations.queue == 1.0
    assert api.client.durations.processing == 9.0


def test_wait_accepts_the_task_from_generate(api: Api, mock: respx.MockRouter) -> None:
    mock.post("/v1/generate").mock(side_effect=sequence(ok(task_json(), 202)))
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(side_effect=sequence(ok(task_json("completed"))))
    created = api.generate(model="nanobanana", prompt="x")
    assert api.wait_for_task(created, timeout=5).status is TaskStatus.COMPLETED
    assert route.call_count == 1


def test_wait_on_an_already_terminal_task_makes_no_call(api: Api, mock: respx.MockRouter) -> None:
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(side_effect=sequence(ok(task_json())))
    done = EggAPITask.model_validate(task_json("completed"))
    assert api.wait_for_task(done) is done
    assert route.call_count == 0


def test_wait_content_moderation_is_terminal(api: Api, mock: respx.MockRouter) -> None:
    failed = task_json("failed", error="Content moderation: prompt contains prohibited content")
    mock.get(f"/v1/tasks/{TASK_ID}").mock(side_effect=sequence(ok(task_json()), ok(failed)))
    exc = raises(ContentModerationError, api.wait_for_task, TASK_ID, timeout=5)
    assert exc.task_id == TASK_ID
    assert classify(exc) is ErrorClass.TERMINAL
    assert "prohibited content" in str(exc)
    assert exc.task.status is TaskStatus.FAILED


@pytest.mark.parametrize("reason", ["upstream provider error", None])
def test_wait_other_failure_is_retryable(
    api: Api, mock: respx.MockRouter, reason: str | None
) -> None:
    failed = task_json("failed", error=reason)
    mock.get(f"/v1/tasks/{TASK_ID}").mock(side_effect=sequence(ok(failed)))
    exc = raises(TaskFailedError, api.wait_for_task, TASK_ID, timeout=5)
    assert type(exc) is TaskFailedError
    assert exc.retryable
    assert exc.task_id == TASK_ID
    assert (reason or "no reason given") in str(exc)


@pytest.mark.parametrize(
    "output", [None, {"url": None, "urls": []}, {}], ids=["missing", "empty", "blank"]
)
def test_wait_completed_without_urls_is_empty_output(
    api: Api, mock: respx.MockRouter, output: dict[str, Any] | None
) -> None:
    body = task_json("completed")
    if output is None:
        del body["output"]
    else:
        body["output"] = output
    mock.get(f"/v1/tasks/{TASK_ID}").mock(side_effect=sequence(ok(body)))
    exc = raises(EmptyOutputError, api.wait_for_task, TASK_ID, timeout=5)
    assert exc.retryable
    assert exc.task_id == TASK_ID


def test_wait_raise_on_failure_false_returns_the_failed_task(
    api: Api, mock: respx.MockRouter
) -> None:
    failed = task_json("failed", error="Content moderation: no")
    mock.get(f"/v1/tasks/{TASK_ID}").mock(side_effect=sequence(ok(failed)))
    task = api.wait_for_task(TASK_ID, timeout=5, raise_on_failure=False)
    assert task.status is TaskStatus.FAILED
    assert task.error == "Content moderation: no"


def test_wait_survives_a_transient_503(api: Api, mock: respx.MockRouter) -> None:
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(
            ok(task_json("processing")),
            err(503, "SERVICE_UNAVAILABLE", "blip"),
            ok(task_json("completed")),
        )
    )
    assert api.wait_for_task(TASK_ID, timeout=5).status is TaskStatus.COMPLETED
    assert route.call_count == 3


def test_wait_survives_polls_that_exhaust_their_retries(
    make_api: Callable[..., Api], mock: respx.MockRouter
) -> None:
    # No retries inside get_task: each 503/timeout reaches the wait loop, which keeps going.
    api = make_api(retry=RetryPolicy(max_retries=0, base_delay=0, max_delay=0))
    seen: list[TaskStatus] = []
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(
            err(503, "SERVICE_UNAVAILABLE", "a"),
            ok(task_json("processing")),
            err(502, "UPSTREAM_ERROR", "b"),
            httpx.ReadTimeout("slow"),
            err(429, "RATE_LIMITED", "c"),
            ok(task_json("completed")),
        )
    )
    task = api.wait_for_task(TASK_ID, timeout=5, on_poll=lambda t: seen.append(t.status))
    assert task.status is TaskStatus.COMPLETED
    assert route.call_count == 6
    assert seen == [TaskStatus.PROCESSING, TaskStatus.COMPLETED]  # once per successful poll


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [(404, "NOT_FOUND", NotFoundError), (401, "UNAUTHORIZED", AuthenticationError)],
)
def test_wait_ends_on_terminal_poll_errors(
    api: Api, mock: respx.MockRouter, status: int, code: str, cls: type
) -> None:
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(ok(task_json("processing")), err(status, code, "gone"))
    )
    exc = raises(cls, api.wait_for_task, TASK_ID, timeout=5)
    assert exc.task_id == TASK_ID
    assert route.call_count == 2


def test_wait_deadline_abandons_with_task_id_and_last_status(
    api: Api, mock: respx.MockRouter
) -> None:
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(side_effect=sequence(ok(task_json("processing"))))
    started = time.monotonic()
    exc = raises(TaskAbandonedError, api.wait_for_task, TASK_ID, timeout=0.05)
    elapsed = time.monotonic() - started
    assert exc.task_id == TASK_ID
    assert exc.last_status == "processing"
    assert exc.waited_seconds >= 0.05
    assert elapsed < 2
    assert route.call_count >= 2
    assert "may still complete and bill" in str(exc)
    assert classify(exc) is ErrorClass.TERMINAL


def test_wait_deadline_with_only_failed_polls_has_no_status(
    make_api: Callable[..., Api], mock: respx.MockRouter
) -> None:
    api = make_api(retry=RetryPolicy(max_retries=0, base_delay=0, max_delay=0))
    mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=lambda request: (time.sleep(0.002), httpx.Response(503))[1]
    )
    exc = raises(TaskAbandonedError, api.wait_for_task, TASK_ID, timeout=0.03)
    assert exc.last_status is None
    assert "last status: unknown" in str(exc)


def test_wait_unknown_status_keeps_polling(api: Api, mock: respx.MockRouter) -> None:
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(ok(task_json("queued")), ok(task_json("completed")))
    )
    assert api.wait_for_task(TASK_ID, timeout=5).status is TaskStatus.COMPLETED
    assert route.call_count == 2


@pytest.mark.parametrize("timeout", [0, -1])
def test_wait_rejects_non_positive_timeout(
    api: Api, mock: respx.MockRouter, timeout: float
) -> None:
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(side_effect=sequence(ok(task_json())))
    exc = raises(InvalidRequestError, api.wait_for_task, TASK_ID, timeout=timeout)
    assert "timeout" in str(exc)
    assert route.call_count == 0


def test_wait_signals_wake_the_poll_early(mode: str, mock: respx.MockRouter) -> None:
    class Signals:
        def __init__(self) -> None:
            self.waits: list[float] = []

        def wait(self, task_id: str, timeout: float) -> bool:
            self.waits.append(timeout)
            return True

        async def await_signal(self, task_id: str, timeout: float) -> bool:
            self.waits.append(timeout)
            return True

    slow = PollPolicy(initial_interval=30, max_interval=60, min_interval=1, jitter=0)
    api = Api(mode, poll=slow)
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(ok(task_json("processing")), ok(task_json("completed")))
    )
    signals = Signals()
    started = time.monotonic()
    assert api.wait_for_task(TASK_ID, timeout=100, signals=signals).is_terminal
    assert time.monotonic() - started < 2
    assert route.call_count == 2
    assert signals.waits == [30]  # the first poll is immediate; then one signal wait
    api.close()


def test_a_recorded_signal_wakes_once_then_the_schedule_decides(
    mode: str, mock: respx.MockRouter, sleeps: list[float]
) -> None:
    class AlwaysSignalled:
        def __init__(self) -> None:
            self.waits = 0

        def wait(self, task_id: str, timeout: float) -> bool:
            self.waits += 1
            return True

        async def await_signal(self, task_id: str, timeout: float) -> bool:
            self.waits += 1
            return True

    policy = PollPolicy(initial_interval=0.5, max_interval=0.5, min_interval=0.5, jitter=0)
    api = Api(mode, poll=policy)
    route = mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(
            ok(task_json("processing")),
            ok(task_json("processing")),  # the signal arrived before the API caught up
            ok(task_json("processing")),
            ok(task_json("completed")),
        )
    )
    signals = AlwaysSignalled()
    assert api.wait_for_task(TASK_ID, timeout=100, signals=signals).is_terminal
    assert route.call_count == 4
    assert signals.waits == 1  # not a busy loop on a signal that stays recorded
    assert sleeps == [0.0, 0.5, 0.5]  # first poll at once, then the schedule, not the signal
    api.close()


def test_signals_without_a_chosen_policy_poll_slowly(mode: str, mock: respx.MockRouter) -> None:
    class NeverSignalled:
        def __init__(self) -> None:
            self.timeouts: list[float] = []

        def wait(self, task_id: str, timeout: float) -> bool:
            self.timeouts.append(timeout)
            return False

        async def await_signal(self, task_id: str, timeout: float) -> bool:
            self.timeouts.append(timeout)
            return False

    api = Api(mode)
    api.client._custom_poll = False  # as built without poll=: the defaults apply
    mock.get(f"/v1/tasks/{TASK_ID}").mock(
        side_effect=sequence(ok(task_json("processing")), ok(task_json("completed")))
    )
    signals = NeverSignalled()
    assert api.wait_for_task(TASK_ID, timeout=100, signals=signals).is_terminal
    assert len(signals.timeouts) == 1 and signals.timeouts[0] >= 13  # the 15 s backstop
    api.close()


# --------------------------------------------------------------------------- list / usage


def page_body(page: int, total_pages: int, per_page: int = 2) -> dict[str, Any]:
    items = [task_json("completed", task_id=f"gen_p{page}_{i}") for i in range(per_page)]
    return {
        "items": items,
        "pagination": {
            "page": page,
            "per_page": per_page,
            "total": total_pages * per_page,
            "total_pages": total_pages,
        },
    }


def paged(total_pages: int) -> Callable[[httpx.Request], httpx.Response]:
    def effect(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        assert page <= total_pages, "asked for a page past total_pages"
        return httpx.Response(200, json=envelope(page_body(page, total_pages)))

    return effect


def test_list_tasks_sends_page_params_and_parses(api: Api, mock: respx.MockRouter) -> None:
    route = mock.get("/v1/tasks").mock(side_effect=paged(5))
    page = api.list_tasks(page=2, per_page=2)
    params = route.calls.last.request.url.params
    assert (params["page"], params["per_page"]) == ("2", "2")
    assert [t.id for t in page.items] == ["gen_p2_0", "gen_p2_1"]
    assert page.pagination.total_pages == 5
    assert page.items[0].cost_amount == Decimal("0.0100")


def test_iter_tasks_stops_at_total_pages(api: Api, mock: respx.MockRouter) -> None:
    route = mock.get("/v1/tasks").mock(side_effect=paged(3))
    tasks = api.tasks(per_page=2)
    assert [t.id for t in tasks] == [f"gen_p{p}_{i}" for p in (1, 2, 3) for i in (0, 1)]
    assert route.call_count == 3
    assert [c.request.url.params["page"] for c in route.calls] == ["1", "2", "3"]


def test_iter_tasks_respects_max_pages(api: Api, mock: respx.MockRouter) -> None:
    route = mock.get("/v1/tasks").mock(side_effect=paged(10))
    assert len(api.tasks(per_page=2, max_pages=2)) == 4
    assert route.call_count == 2


def test_iter_tasks_stops_on_an_empty_page(api: Api, mock: respx.MockRouter) -> None:
    empty = {"items": [], "pagination": {"page": 1, "per_page": 100, "total": 0, "total_pages": 9}}
    route = mock.get("/v1/tasks").mock(side_effect=sequence(ok(empty)))
    assert api.tasks() == []
    assert route.call_count == 1


@pytest.mark.parametrize(
    ("page", "per_page", "field"),
    [
        (0, 20, "page"),
        (-1, 20, "page"),
        (1, 0, "per_page"),
        (1, 101, "per_page"),
        ("1", 20, "page"),
    ],
)
def test_list_params_are_validated_before_http(
    api: Api, mock: respx.MockRouter, page: Any, per_page: Any, field: str
) -> None:
    route = mock.get("/v1/tasks").mock(side_effect=paged(1))
    usage = mock.get("/v1/usage").mock(side_effect=paged(1))
    exc = raises(InvalidRequestError, api.list_tasks, page, per_page)
    assert field in {f for f, _ in exc.problems}
    raises(InvalidRequestError, api.usage, page, per_page)
    assert route.call_count == 0 and usage.call_count == 0


def test_usage_records_parse(api: Api, mock: respx.MockRouter) -> None:
    body = {
        "items": [
            {
                "task_id": "gen_1",
                "model": "nanobanana-pro",
                "type": "image_generate",
                "units": 2,
                "cost": "$0.0320",
                "created_at": "2026-05-08T10:30:10Z",
            }
        ],
        "pagination": {"page": 1, "per_page": 20, "total": 1, "total_pages": 1},
    }
    route = mock.get("/v1/usage").mock(side_effect=sequence(ok(body)))
    usage = api.usage()
    assert route.calls.last.request.url.params["per_page"] == "20"
    record = usage.items[0]
    assert (record.task_id, record.units) == ("gen_1", 2)
    assert parse_cost(record.cost) == Decimal("0.032")
    assert record.created_at is not None and record.created_at.tzinfo is not None


def test_usage_summary_parses_the_data_array(api: Api, mock: respx.MockRouter) -> None:
    data = [
        {"model": "nanobanana", "total_units": 1, "total_cost": "$0.0100", "request_count": 1},
        {"model": "nanobanana-pro", "total_units": 4, "total_cost": "$0.0960", "request_count": 2},
    ]
    mock.get("/v1/usage/summary").mock(side_effect=sequence(ok(data)))
    summary = api.usage_summary()
    assert [s.model for s in summary] == ["nanobanana", "nanobanana-pro"]
    assert [s.total_cost_amount for s in summary] == [Decimal("0.01"), Decimal("0.096")]
    assert sum(s.total_cost_amount for s in summary) == Decimal("0.106")
    assert all(isinstance(s.total_cost_amount, Decimal) for s in summary)
    assert summary[1].request_count == 2


# --------------------------------------------------------------------------- downloads

OUT_URL = f"{CDN}/images/{TASK_ID}/0.png"


def test_download_reads_format_from_magic_bytes(api: Api, mock: respx.MockRouter) -> None:
    jpeg = make_image("JPEG", (1376, 768))
    route = mock.get(OUT_URL).respond(200, content=jpeg, headers={"Content-Type": "image/png"})
    data, result = api.fetch(OUT_URL)
    assert data == jpeg
    assert result is not None
    assert result.info.format == "jpeg"
    assert (result.info.width, result.info.height) == (1376, 768)
    assert result.size == len(jpeg)
    assert result.sha256 == hashlib.sha256(jpeg).hexdigest()
    assert result.url == OUT_URL
    request = route.calls.last.request
    assert "authorization" not in request.headers
    assert KEY not in str(request.headers)


def test_download_to_file_and_path(api: Api, mock: respx.MockRouter, tmp_path: Path) -> None:
    png = make_image("PNG", (300, 200))
    route = mock.get(OUT_URL).respond(200, content=png)
    buf = io.BytesIO()
    result = api.download(OUT_URL, buf)
    assert buf.getvalue() == png
    assert (result.info.format, result.info.width, result.info.height) == ("png", 300, 200)
    dest = tmp_path / "0.png"
    again = api.download(OUT_URL, dest)
    assert dest.read_bytes() == png
    assert again.sha256 == result.sha256 == hashlib.sha256(png).hexdigest()
    assert all("authorization" not in c.request.headers for c in route.calls)


def test_download_large_file_streams_in_chunks(api: Api, mock: respx.MockRouter) -> None:
    png = make_image("PNG") + b"\0" * (3 * 64 * 1024 + 17)  # trailing bytes: several chunks
    mock.get(OUT_URL).respond(200, content=png)
    data, result = api.fetch(OUT_URL)
    assert result is not None and result.size == len(png) == len(data)


def test_redirected_download_never_carries_the_key(api: Api, mock: respx.MockRouter) -> None:
    png = make_image("PNG")
    first = mock.get(OUT_URL).respond(302, headers={"Location": "https://r2.test/bucket/0.png"})
    final = mock.get("https://r2.test/bucket/0.png").respond(200, content=png)
    _, result = api.fetch(OUT_URL)
    assert result is not None and result.info.format == "png"
    assert first.call_count == final.call_count == 1
    for route in (first, final):
        assert "authorization" not in route.calls.last.request.headers


def test_truncated_download_is_an_error(api: Api, mock: respx.MockRouter) -> None:
    png = make_image("PNG")
    mock.get(OUT_URL).respond(200, content=png, headers={"Content-Length": str(len(png) + 1000)})
    exc = raises(DownloadError, api.fetch, OUT_URL)
    assert type(exc) is DownloadError
    assert "truncated" in str(exc)
    assert exc.url == OUT_URL
    assert exc.retryable


@pytest.mark.parametrize("status", [403, 404, 410])
def test_gone_outputs_are_terminal(api: Api, mock: respx.MockRouter, status: int) -> None:
    mock.get(OUT_URL).respond(status, text="NoSuchKey")
    exc = raises(OutputGoneError, api.fetch, OUT_URL)
    assert exc.status_code == status
    assert classify(exc) is ErrorClass.TERMINAL
    raises(OutputGoneError, api.download, OUT_URL, io.BytesIO())


@pytest.mark.parametrize("status", [500, 503, 204])
def test_other_download_statuses_are_retryable(
    api: Api, mock: respx.MockRouter, status: int
) -> None:
    mock.get(OUT_URL).respond(status)
    exc = raises(DownloadError, api.fetch, OUT_URL)
    assert not isinstance(exc, OutputGoneError)
    assert exc.status_code == status
    assert exc.retryable


def test_download_of_a_non_image_is_an_error(api: Api, mock: respx.MockRouter) -> None:
    mock.get(OUT_URL).respond(200, text="<html>error page</html>")
    exc = raises(DownloadError, api.fetch, OUT_URL)
    assert "not a recognised image" in str(exc)


def test_download_transport_error_is_a_download_error(api: Api, mock: respx.MockRouter) -> None:
    mock.get(OUT_URL).mock(side_effect=httpx.ReadError("reset"))
    exc = raises(DownloadError, api.fetch, OUT_URL)
    assert "ReadError" in str(exc)
    assert exc.retryable


@pytest.mark.parametrize("url", ["ftp://cdn.test/a.png", "/images/a.png", "https://cdn.test/a b"])
def test_download_rejects_bad_urls_before_http(api: Api, mock: respx.MockRouter, url: str) -> None:
    anything = mock.route().respond(200)
    raises(ValueError, api.fetch, url)
    assert anything.call_count == 0


def test_partially_read_stream_has_no_result(mock: respx.MockRouter) -> None:
    png = make_image("PNG") + b"\0" * (2 * 64 * 1024)
    mock.get(OUT_URL).respond(200, content=png)
    with (
        EggAPIClient(KEY, API, rate_limit=None) as client,
        client.stream_output(OUT_URL) as (chunks, stream),
    ):
        next(iter(chunks))
        assert stream.result is None


def test_download_with_content_encoding_is_not_truncated(api: Api, mock: respx.MockRouter) -> None:
    png = make_image("PNG", (400, 300))
    body = gzip.compress(png)
    mock.get(OUT_URL).mock(
        side_effect=lambda request: httpx.Response(
            200,
            stream=httpx.ByteStream(body),
            headers={"Content-Encoding": "gzip", "Content-Length": str(len(body))},
        )
    )
    data, result = api.fetch(OUT_URL)
    assert data == png
    assert result is not None and result.info.format == "png"


def test_download_of_non_image_with_embedded_png_is_rejected(
    api: Api, mock: respx.MockRouter
) -> None:
    body = b"<" * (64 * 1024) + make_image("PNG")
    mock.get(OUT_URL).respond(200, content=body)
    with pytest.raises(DownloadError):
        api.fetch(OUT_URL)


@pytest.mark.parametrize("failure", ["truncated", "gone"])
def test_failed_download_to_path_leaves_no_file(
    mock: respx.MockRouter, tmp_path: Path, failure: str
) -> None:
    png = make_image("PNG")
    if failure == "truncated":
        mock.get(OUT_URL).respond(200, content=png, headers={"Content-Length": str(len(png) + 9)})
    else:
        mock.get(OUT_URL).respond(404)
    dest = tmp_path / "0.png"
    with EggAPIClient(KEY, API, rate_limit=None) as client, pytest.raises(DownloadError):
        client.download(OUT_URL, dest)
    assert not dest.exists()


# --------------------------------------------------------------------------- task age for polling


def _aged(seconds: float, *, whole: bool) -> EggAPITask:
    created = datetime.now(UTC) - timedelta(seconds=seconds)
    if whole:  # the emulator (and G3 examples) stamp whole seconds
        created = created.replace(microsecond=0)
    return EggAPITask(id="gen_age000000001", status=TaskStatus.PENDING, created_at=created)


def test_a_just_created_task_is_aged_by_our_clock_not_its_truncated_timestamp() -> None:
    with EggAPIClient("egg_sk_age_test_000001", "http://127.0.0.1:9") as api:
        # created 0.1 s ago, stamped up to a second earlier: the wait ages it from its own start
        wait = Wait(api, _aged(0.1, whole=True), 60, None, None)
        age = wait._age()
        assert age is not None and age < 0.05
        old = Wait(api, _aged(100, whole=False), 60, None, None)
        assert old._age() == pytest.approx(100, abs=0.5)
        api.clock_offset = -30.0  # the server's clock runs 30 s behind ours
        assert api.durations.clock_offset == -30.0  # shared with every client of the key
        behind = Wait(api, _aged(100, whole=False), 60, None, None)
        assert behind._age() == pytest.approx(70, abs=0.5)
