"""The request-rate limit shared by all workers, on a real Prefect API (test harness)."""

from __future__ import annotations

import pytest

from prefect_eggapi.client.ratelimit import CombinedLimiter
from prefect_eggapi.credentials import EggAPICredentials
from prefect_eggapi.tasks.global_limit import GlobalRateLimiter, ensure_global_rate_limit

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def test_slots_are_shared_and_bounded():
    # Two slots, refilled so slowly that a third cannot be had within the test's timeout.
    ensure_global_rate_limit("eggapi-test-slow", requests_per_second=0.01, burst=2)
    a = GlobalRateLimiter("eggapi-test-slow", batch=1, timeout_seconds=1)
    b = GlobalRateLimiter("eggapi-test-slow", batch=1, timeout_seconds=1)  # another "worker"
    a.acquire()
    b.acquire()
    with pytest.raises(TimeoutError):
        a.acquire()


def test_missing_limit_is_an_error_not_unlimited():
    with pytest.raises(Exception, match="eggapi-test-missing"):
        GlobalRateLimiter("eggapi-test-missing", timeout_seconds=1).acquire()


def test_credentials_wire_the_global_limit(monkeypatch):
    monkeypatch.setenv("EGGAPI_API_KEY", "egg_sk_global_limit_test_1")
    ensure_global_rate_limit("eggapi-test-fast", requests_per_second=100)
    creds = EggAPICredentials(base_url="http://127.0.0.1:9", global_rate_limit="eggapi-test-fast")
    with creds.get_client() as client:
        assert isinstance(client.limiter, CombinedLimiter)
        kinds = [type(x).__name__ for x in client.limiter.limiters]
        assert kinds == ["RateLimiter", "GlobalRateLimiter"]
        client.limiter.acquire()  # really draws from the server-side limit


def test_bad_arguments():
    with pytest.raises(ValueError):
        ensure_global_rate_limit("x", 0)
    with pytest.raises(ValueError):
        GlobalRateLimiter("x", batch=0)
