"""The FastAPI application: EggAPI routes, admin routes, envelopes and fault responses.

Why one module of ~470 lines: it is the emulator's HTTP surface, read side by side with
``docs/eggapi-api.md`` (one route per documented endpoint, then the ``/_emulator`` admin
routes); the envelope and fault helpers serve those routes only. Validation, faults, state and
images already live in their own modules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import EmulatorConfig, FaultRule, key_id
from .faults import DOWNLOAD_KINDS, POST_CREATE_KINDS, PRE_KINDS, FiredFault
from .inputs import FETCH_HEADER
from .records import COMPLETED, ApiError, Task
from .state import EmulatorState
from .validation import RequestError, parse_generate_body

logger = logging.getLogger("prefect_eggapi.testing.emulator")

ADMIN_PREFIX = "/_emulator"
_PNG_NAME = re.compile(r"^(0|[1-9][0-9]{0,3})\.png$")
_LOOPBACK = re.compile(r"^(127\.\d{1,3}\.\d{1,3}\.\d{1,3}|::1|::ffff:127\.\d+\.\d+\.\d+)$")


# --------------------------------------------------------------------------- responses


def envelope(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse({"data": data, "error": None}, status_code=status)


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"data": None, "error": {"code": code, "message": message}}, status_code=status
    )


class CutResponse(Response):
    """Declares the full ``Content-Length``, sends ``fraction`` of the body, then hangs up.

    Returning without finishing the body makes the server close the connection, so clients see
    a transport error (httpx: ``RemoteProtocolError``) rather than any valid response.
    """

    def __init__(self, body: bytes, status_code: int, media_type: str, fraction: float) -> None:
        super().__init__(content=body, status_code=status_code, media_type=media_type)
        self._partial = body[: int(len(body) * fraction)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send({"type": "http.response.body", "body": self._partial, "more_body": True})
        logger.info(
            "fault: connection cut after %d of %d bytes", len(self._partial), len(self.body)
        )


def _endpoint_of(method: str, path: str) -> str:
    if path.startswith(ADMIN_PREFIX):
        return "admin"
    if method == "POST" and path == "/v1/generate":
        return "generate"
    if method not in ("GET", "HEAD"):
        return "other"
    if path == "/v1/tasks":
        return "list_tasks"
    if path.startswith("/v1/tasks/") and path.count("/") == 3:
        return "get_task"
    if path == "/v1/usage":
        return "usage"
    if path == "/v1/usage/summary":
        return "usage_summary"
    if path.startswith("/images/"):
        return "download"
    return "other"


class AuditMiddleware:
    """Pure ASGI middleware counting requests per key and endpoint, and statuses (429s)."""

    def __init__(self, app: ASGIApp, state: EmulatorState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status_holder: list[int] = [0]
        # A request still in flight across a reset (e.g. a held-back 202) belongs to the audit it
        # started in: counting it at response time would leak into the next test's audit.
        epoch = self.state.epoch

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = int(message["status"])
            await send(message)

        own_fetch = _is_own_fetch(scope, self.state.inputs.token)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            endpoint = _endpoint_of(scope["method"], scope["path"])
            if endpoint != "admin" and not own_fetch and self.state.epoch == epoch:
                who = scope.get("state", {}).get("key_id", "anonymous")
                self.state.count_request(who, endpoint, status_holder[0] or 500)


def _is_own_fetch(scope: Scope, token: str) -> bool:
    """A request made by this emulator's input fetcher (an edit reading one of its outputs)."""
    wanted = token.encode()
    return any(
        name == FETCH_HEADER.encode() and value == wanted for name, value in scope["headers"]
    )


def _int_param(value: str | None, default: int) -> int:
    try:
        number = int(value) if value is not None else default
    except ValueError:
        return default
    return number if number >= 1 else default


def _paginate(request: Request, items: list[Any]) -> dict[str, Any]:
    page = _int_param(request.query_params.get("page"), 1)
    per_page = min(_int_param(request.query_params.get("per_page"), 20), 100)
    total = len(items)
    start = (page - 1) * per_page
    return {
        "items": items[start : start + per_page],
        "pagination": {
            "page": page,
            "per_page": per_page,
            "total": total,
            "total_pages": (total + per_page - 1) // per_page,
        },
    }


def _fault_error(fired: FiredFault) -> ApiError:
    code, message = fired.code_and_message
    return ApiError(fired.status, code, message)


# --------------------------------------------------------------------------- app factory


def create_app(config: EmulatorConfig | None = None) -> FastAPI:
    """Build an emulator app. Its state is ``app.state.emulator`` (an :class:`EmulatorState`)."""
    state = EmulatorState(config or EmulatorConfig())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler = asyncio.create_task(state.run_scheduler())
        try:
            yield
        finally:
            scheduler.cancel()
            with suppress(asyncio.CancelledError):
                await scheduler
            await state.webhooks.aclose()
            await state.inputs.aclose()

    app = FastAPI(
        title="EggAPI emulator",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
        lifespan=lifespan,
    )
    app.state.emulator = state
    app.add_middleware(AuditMiddleware, state=state)

    def base_url(request: Request) -> str:
        return (
            state.config.public_base_url
            or state.server_base_url
            or str(request.base_url).rstrip("/")
        )

    # ------------------------------------------------------------------ error handlers

    async def api_error_handler(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message)

    async def request_error_handler(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return error_response(400, exc.code, exc.message)

    async def http_error_handler(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 405 and not request.url.path.rstrip("/").endswith("/cancel"):
            return error_response(405, "METHOD_NOT_ALLOWED", "Method not allowed")
        if exc.status_code in (404, 405):
            return error_response(404, "NOT_FOUND", "Not found")
        return error_response(exc.status_code, "BAD_REQUEST", str(exc.detail))

    async def internal_error_handler(_: Request, exc: Exception) -> Response:
        logger.exception("internal error", exc_info=exc)
        return error_response(500, "INTERNAL_ERROR", "Internal server error")

    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestError, request_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, internal_error_handler)

    # ------------------------------------------------------------------ API routes

    async def guard(request: Request, endpoint: str) -> str:
        """Auth (401/403), real rate limit (429), then pre-request faults. Returns the key."""
        state.process_due()
        api_key = state.authenticate(request.headers.get("authorization"))
        request.state.key_id = key_id(api_key)
        state.check_rate_limit(api_key)
        fired = state.faults.match(PRE_KINDS, endpoint, api_key)
        if fired is not None:
            if fired.rule.delay:
                await asyncio.sleep(fired.rule.delay)
            raise _fault_error(fired)
        return api_key

    @app.post("/v1/generate", status_code=202)
    async def generate(request: Request) -> Response:
        api_key = await guard(request, "generate")
        body = await request.body()
        generate_request = parse_generate_body(body, state.config.allowed_models)
        task = state.create_task(api_key, generate_request)
        payload = {"data": task.to_json(base_url(request)), "error": None}
        fired = state.faults.match(POST_CREATE_KINDS, "generate", api_key, task.id)
        if fired is None:
            return JSONResponse(payload, status_code=202)
        task.faults.append(fired.kind)
        if fired.rule.delay:
            await asyncio.sleep(fired.rule.delay)
        if fired.kind == "error_after_create":
            raise _fault_error(fired)
        if fired.kind == "drop_after_create":
            raw = json.dumps(payload).encode()
            return CutResponse(raw, 202, "application/json", fired.rule.fraction)
        return JSONResponse(payload, status_code=202)  # timeout_after_create: late but valid

    @app.get("/v1/tasks")
    async def list_tasks(request: Request) -> Response:
        api_key = await guard(request, "list_tasks")
        page = _paginate(request, state.list_tasks(api_key))
        page["items"] = [t.to_json(base_url(request)) for t in page["items"]]
        return envelope(page)

    @app.get("/v1/tasks/{task_id}")
    async def get_task(request: Request, task_id: str) -> Response:
        api_key = await guard(request, "get_task")
        return envelope(state.get_task(api_key, task_id).to_json(base_url(request)))

    @app.delete("/v1/tasks/{task_id}")
    async def delete_task(task_id: str) -> Response:
        return error_response(404, "NOT_FOUND", "Not found")

    @app.get("/v1/usage")
    async def usage(request: Request) -> Response:
        api_key = await guard(request, "usage")
        records = [r.to_json() for r in state.usage_records(api_key)]
        return envelope(_paginate(request, records))

    @app.get("/v1/usage/summary")
    async def usage_summary(request: Request) -> Response:
        api_key = await guard(request, "usage_summary")
        return envelope(state.usage_summary(api_key))

    @app.get("/images/{task_id}/{filename}")
    async def download(request: Request, task_id: str, filename: str) -> Response:
        state.process_due()
        # The emulator's own input fetches stand for the service reading its CDN: the faults
        # scripted for the client under test must not hit them (nor be used up by them).
        own_fetch = request.headers.get(FETCH_HEADER) == state.inputs.token
        fired = None if own_fetch else state.faults.match(PRE_KINDS, "download", None, task_id)
        if fired is not None:
            if fired.rule.delay:
                await asyncio.sleep(fired.rule.delay)
            raise _fault_error(fired)
        match = _PNG_NAME.match(filename)
        task = state.tasks.get(task_id)
        if (
            match is None
            or task is None
            or task.status != COMPLETED
            or int(match.group(1)) >= (task.num_images or 0)
        ):
            raise ApiError(404, "NOT_FOUND", "File not found")
        index = int(match.group(1))
        data = await asyncio.to_thread(state.images.get_or_render, state.render_spec(task, index))
        fired = None if own_fetch else state.faults.match(DOWNLOAD_KINDS, "download", None, task_id)
        if fired is not None and fired.kind == "truncated_download":
            if fired.rule.delay:
                await asyncio.sleep(fired.rule.delay)
            return CutResponse(data, 200, "image/png", fired.rule.fraction)
        if fired is not None:
            return StreamingResponse(
                _throttled(data, fired.rule.bytes_per_second, fired.rule.delay),
                media_type="image/png",
                headers={"content-length": str(len(data))},
            )
        return Response(
            content=data,
            media_type="image/png",
            headers={"cache-control": "public, max-age=31536000, immutable"},
        )

    # ------------------------------------------------------------------ admin routes

    def check_admin(request: Request) -> None:
        client = request.client.host if request.client else ""
        if state.config.admin_loopback_only and not (
            _LOOPBACK.match(client) or client in ("testclient", "localhost")
        ):
            raise ApiError(403, "FORBIDDEN", "Admin API is loopback only")

    async def json_body(request: Request) -> Any:
        body = await request.body()
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except ValueError as exc:
            raise ApiError(400, "BAD_REQUEST", f"Invalid JSON body: {exc}") from None

    def admin_task_json(request: Request, task: Task) -> dict[str, Any]:
        data = task.to_json(base_url(request))
        data["key_id"] = key_id(task.api_key)
        data["prompt"] = task.request.prompt
        data["faults"] = list(task.faults)
        data["image_urls"] = list(task.request.image_urls)
        data["sources"] = list(task.sources)
        data["input_fetches"] = [dict(r) for r in task.input_fetches]
        return data

    @app.get(f"{ADMIN_PREFIX}/health")
    async def health(request: Request) -> Response:
        check_admin(request)
        return envelope(
            {
                "status": "ok",
                "pid": os.getpid(),
                "base_url": base_url(request),
                "tasks": len(state.tasks),
            }
        )

    @app.get(f"{ADMIN_PREFIX}/config")
    async def get_config(request: Request) -> Response:
        check_admin(request)
        return envelope(state.config.public_dump())

    @app.patch(f"{ADMIN_PREFIX}/config")
    async def patch_config(request: Request) -> Response:
        check_admin(request)
        patch = await json_body(request)
        if not isinstance(patch, dict):
            raise ApiError(400, "BAD_REQUEST", "Body must be a JSON object")
        try:
            config = state.patch_config(patch)
        except ValidationError as exc:
            raise ApiError(400, "BAD_REQUEST", str(exc)) from None
        return envelope(config.public_dump())

    @app.get(f"{ADMIN_PREFIX}/faults")
    async def get_faults(request: Request) -> Response:
        check_admin(request)
        return envelope(state.faults.to_json())

    @app.post(f"{ADMIN_PREFIX}/faults")
    async def add_faults(request: Request) -> Response:
        check_admin(request)
        body = await json_body(request)
        raw_rules = body.get("rules") if isinstance(body, dict) and "rules" in body else body
        if isinstance(raw_rules, dict):
            raw_rules = [raw_rules]
        if not isinstance(raw_rules, list):
            raise ApiError(400, "BAD_REQUEST", "Body must be a rule, a list, or {rules: [...]}")
        try:
            rules = [FaultRule.model_validate(raw) for raw in raw_rules]
        except ValidationError as exc:
            raise ApiError(400, "BAD_REQUEST", str(exc)) from None
        added = [state.add_fault(rule).model_dump(mode="json") for rule in rules]
        return envelope(added)

    @app.delete(f"{ADMIN_PREFIX}/faults")
    async def clear_faults(request: Request) -> Response:
        check_admin(request)
        state.faults.clear()
        return envelope([])

    @app.post(f"{ADMIN_PREFIX}/faults/clear")
    async def clear_faults_post(request: Request) -> Response:
        return await clear_faults(request)

    @app.get(f"{ADMIN_PREFIX}/audit")
    async def audit(request: Request) -> Response:
        check_admin(request)
        return envelope(state.audit())

    @app.post(f"{ADMIN_PREFIX}/reset")
    async def reset(request: Request) -> Response:
        check_admin(request)
        body = await json_body(request)
        new_config = None
        if isinstance(body, dict) and body.get("config") is not None:
            try:
                new_config = EmulatorConfig.model_validate(body["config"])
            except ValidationError as exc:
                raise ApiError(400, "BAD_REQUEST", str(exc)) from None
        state.reset(new_config)
        return envelope(state.config.public_dump())

    @app.get(f"{ADMIN_PREFIX}/tasks")
    async def admin_tasks(request: Request) -> Response:
        check_admin(request)
        tasks = sorted(state.tasks.values(), key=lambda t: (t.created_at, t.seq), reverse=True)
        return envelope([admin_task_json(request, t) for t in tasks])

    @app.get(f"{ADMIN_PREFIX}/tasks/{{task_id}}")
    async def admin_task(request: Request, task_id: str) -> Response:
        check_admin(request)
        task = state.tasks.get(task_id)
        if task is None:
            raise ApiError(404, "NOT_FOUND", "Task not found")
        return envelope(admin_task_json(request, task))

    @app.post(f"{ADMIN_PREFIX}/tasks/{{task_id}}/{{action}}")
    async def admin_task_action(request: Request, task_id: str, action: str) -> Response:
        check_admin(request)
        body = await json_body(request)
        options = body if isinstance(body, dict) else {}
        if action in ("advance", "complete"):
            await state.settle_inputs(task_id)  # an edit ends only once its inputs are in
        if action == "advance":
            task = state.advance(task_id)
        elif action == "complete":
            num_images = options.get("num_images")
            if num_images is not None and (not isinstance(num_images, int) or num_images < 0):
                raise ApiError(400, "BAD_REQUEST", "num_images must be a non-negative integer")
            task = state.complete(task_id, num_images)
        elif action == "fail":
            error = options.get("error")
            task = state.fail(task_id, str(error) if error is not None else None)
        else:
            raise ApiError(404, "NOT_FOUND", f"Unknown action {action!r}")
        return envelope(admin_task_json(request, task))

    return app


async def _throttled(data: bytes, bytes_per_second: int, delay: float) -> AsyncIterator[bytes]:
    if delay:
        await asyncio.sleep(delay)
    chunk = max(1, min(65536, bytes_per_second // 20))
    for start in range(0, len(data), chunk):
        piece = data[start : start + chunk]
        yield piece
        await asyncio.sleep(len(piece) / bytes_per_second)
