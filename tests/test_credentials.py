"""The credentials block: Prefect's standard block checks, registration, env fallbacks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.credentials import EggAPICredentials


class TestEggAPICredentialsStandard(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return EggAPICredentials

    @pytest.mark.skip(reason="fetches the logo over the network; these machines are offline")
    def test_has_a_valid_image(self, block: type[Block]) -> None:  # pragma: no cover
        pass


def test_env_fallbacks(monkeypatch):
    monkeypatch.setenv("EGGAPI_API_KEY", "egg_sk_from_environment_01")
    monkeypatch.setenv("EGGAPI_BASE_URL", "http://127.0.0.1:9")
    creds = EggAPICredentials()
    assert creds.resolved_api_key().get_secret_value() == "egg_sk_from_environment_01"
    with creds.get_client() as client:
        assert client.base_url == "http://127.0.0.1:9"
        assert "egg_sk_from_environment_01" not in repr(client)
    # An explicit value wins over the environment.
    explicit = EggAPICredentials(api_key="egg_sk_explicit_value_0002", base_url="https://x.test")
    assert explicit.resolved_api_key().get_secret_value() == "egg_sk_explicit_value_0002"
    assert explicit.resolved_base_url() == "https://x.test"
    assert "egg_sk_explicit_value_0002" not in repr(explicit)


def test_bad_base_url_names_the_field(monkeypatch):
    monkeypatch.setenv("EGGAPI_API_KEY", "egg_sk_from_environment_01")
    with pytest.raises(InvalidRequestError, match="base_url"):
        EggAPICredentials(base_url="ftp://nope").get_client()


def test_clients_of_one_key_share_rate_limiter(monkeypatch):
    monkeypatch.setenv("EGGAPI_API_KEY", "egg_sk_from_environment_01")
    creds = EggAPICredentials(base_url="http://127.0.0.1:9")
    with creds.get_client() as a, creds.get_client() as b:
        assert a.limiter is b.limiter and a.durations is b.durations
    other = EggAPICredentials(api_key="egg_sk_another_key_000003", base_url="http://127.0.0.1:9")
    with other.get_client() as c, creds.get_client() as d:
        assert c.limiter is not d.limiter


def test_blocks_with_different_rates_share_one_bucket_at_the_lowest(monkeypatch):
    """Two blocks for one account must not get a bucket each (together over the limit)."""
    key = "egg_sk_rate_sharing_key_0004"
    fast = EggAPICredentials(api_key=key, base_url="http://127.0.0.1:7", requests_per_second=50)
    slow = EggAPICredentials(api_key=key, base_url="http://127.0.0.1:7", requests_per_second=5)
    c = fast.get_async_client()
    with fast.get_client() as a, slow.get_client() as b:
        assert a.limiter is b.limiter is c.limiter
        assert a.limiter is not None and a.limiter.rate == 5.0  # type: ignore[attr-defined]
        assert a.durations is b.durations is c.durations
    asyncio.run(c.aclose())


def test_clients_spell_out_their_options():
    """No ``**options``: every setting is a named keyword (timeout, retry, poll, ...)."""
    import inspect

    from prefect_eggapi.client import AsyncEggAPIClient, EggAPIClient

    for cls in (EggAPIClient, AsyncEggAPIClient):
        params = inspect.signature(cls.__init__).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), cls
        assert {"timeout", "retry", "poll", "rate_limit", "user_agent", "durations"} <= set(params)


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_harness")
def test_prefect_block_register_finds_the_block():
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    run = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "prefect_eggapi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "EggAPI Credentials" in run.stdout
