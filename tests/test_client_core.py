"""The clients' decision core without any server: operations are generators of actions.

Each operation yields what it needs done (send, sleep, ...) and is answered by the test, which
plays the network; sync and async clients only carry the same actions out. So the submit rules —
retry only when provably nothing was created — are checked here once for both.
"""

from __future__ import annotations

import inspect
from collections.abc import Generator
from typing import Any

import httpx
import pytest

from prefect_eggapi.client import (
    DEFAULT_WAIT_TIMEOUT,
    AsyncEggAPIClient,
    EggAPIClient,
    RetryPolicy,
)
from prefect_eggapi.client._core import Driver, Send, Sleep
from prefect_eggapi.client.errors import AmbiguousSubmitError, APIValidationError
from prefect_eggapi.client.types import GenerateRequest

REQ = GenerateRequest(model="nanobanana", prompt="a quiet harbour")
TASK = {
    "id": "gen_core0001",
    "status": "pending",
    "model": "nanobanana",
    "type": "image_generate",
    "created_at": "2026-12-01T00:00:00Z",
}


def answer(status: int, body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
    request = httpx.Request("POST", "http://api.test/v1/generate")
    return httpx.Response(status, json=body, headers=headers, request=request)


@pytest.fixture
def client() -> Any:
    with EggAPIClient(
        "egg_sk_core_test_key_0001", "http://api.test", retry=RetryPolicy(max_retries=2)
    ) as c:
        yield c


def test_a_202_ends_the_submit_with_its_task(client: Any) -> None:
    op = client._generate_op(REQ)
    send = next(op)
    assert isinstance(send, Send) and (send.method, send.path) == ("POST", "/v1/generate")
    assert send.json == REQ.to_payload()
    with pytest.raises(StopIteration) as done:
        op.send(answer(202, {"data": TASK, "error": None}))
    assert done.value.value.id == "gen_core0001"


def test_a_429_sleeps_and_posts_again_because_nothing_was_created(client: Any) -> None:
    op = client._generate_op(REQ)
    next(op)
    busy = {"data": None, "error": {"code": "RATE_LIMITED", "message": "slow down"}}
    sleep = op.send(answer(429, busy, **{"Retry-After": "3"}))
    assert isinstance(sleep, Sleep) and sleep.seconds >= 3
    assert isinstance(op.send(None), Send)  # the second POST


def test_a_502_after_sending_is_ambiguous_and_never_posted_again(client: Any) -> None:
    op = client._generate_op(REQ)
    next(op)
    failed = {"data": None, "error": {"code": "UPSTREAM_ERROR", "message": "bad gateway"}}
    with pytest.raises(AmbiguousSubmitError):
        op.send(answer(502, failed))


def test_a_timeout_after_sending_is_ambiguous_but_a_refused_connect_is_retried(
    client: Any,
) -> None:
    op = client._generate_op(REQ)
    next(op)
    with pytest.raises(AmbiguousSubmitError):
        op.throw(httpx.ReadTimeout("read timed out"))
    op = client._generate_op(REQ)
    next(op)
    assert isinstance(op.throw(httpx.ConnectError("refused")), Sleep)


def test_a_400_is_final(client: Any) -> None:
    op = client._generate_op(REQ)
    next(op)
    invalid = {"data": None, "error": {"code": "VALIDATION_ERROR", "message": "bad prompt"}}
    with pytest.raises(APIValidationError):
        op.send(answer(400, invalid))


def test_a_get_retries_5xx_up_to_the_policy_then_raises(client: Any) -> None:
    op = client._get_task_op("gen_core0001")
    failed = {"data": None, "error": {"code": "INTERNAL_ERROR", "message": "oops"}}
    actions = [next(op)]
    for _ in range(2):
        actions.append(op.send(answer(500, failed)))  # -> sleep
        actions.append(op.send(None))  # -> GET again
    assert [type(a) for a in actions] == [Send, Sleep, Send, Sleep, Send]
    with pytest.raises(Exception, match="HTTP 500"):
        op.send(answer(500, failed))


def test_the_driver_closes_its_operation_however_the_loop_ends() -> None:
    """An I/O loop that dies mid-operation (a cancelled await) still closes it, at once: a
    wait's ``finally`` is where it leaves the account's poll board."""
    closed: list[str] = []

    def op() -> Generator[Sleep, object, str]:
        try:
            yield Sleep(1.0)
            return "never"
        finally:
            closed.append("closed")

    with pytest.raises(KeyboardInterrupt), Driver(op()) as driver:
        for _ in driver:
            raise KeyboardInterrupt  # a BaseException: not thrown into the operation
    assert closed == ["closed"]


def test_the_driver_throws_a_failed_action_into_the_operation_and_returns_its_value() -> None:
    seen: list[object] = []

    def op() -> Generator[Sleep, object, str]:
        try:
            yield Sleep(1.0)
        except httpx.ConnectError as exc:
            seen.append(exc)
        seen.append((yield Sleep(2.0)))
        return "done"

    with Driver(op()) as driver:
        for action in driver:
            assert isinstance(action, Sleep)
            if action.seconds == 1.0:
                driver.fail(httpx.ConnectError("refused"))
            else:
                driver.answer(True)
    assert driver.result == "done"
    assert isinstance(seen[0], httpx.ConnectError) and seen[1] is True


@pytest.mark.parametrize("client_class", [EggAPIClient, AsyncEggAPIClient])
def test_both_clients_wait_by_the_one_default_timeout(client_class: type) -> None:
    """The tasks layer imports the default from the client package, so there is one."""
    params = inspect.signature(client_class.wait_for_task).parameters
    assert params["timeout"].default == DEFAULT_WAIT_TIMEOUT == 300.0
