"""Process-wide state lives in named registries with one reset (no hidden module dicts)."""

from __future__ import annotations

from prefect_eggapi.client.registry import Registry, registries, reset_process_state
from prefect_eggapi.credentials import EggAPICredentials


def test_every_shared_singleton_is_in_a_registry_that_reset_empties() -> None:
    # their registries are made at import
    import prefect_eggapi.client.board
    import prefect_eggapi.safety.ledger
    import prefect_eggapi.safety.submitter
    import prefect_eggapi.storage.store
    import prefect_eggapi.webhooks.signals  # noqa: F401

    names = {r.name for r in registries()}
    for wanted in (
        "poll boards by account",
        "submit lanes by account, model, type",
        "signal watchers by file",
        "output stores by settings",
        "default ledgers by location",
        "rate buckets and learned durations by account",
        "global-limit clients by limit name",
    ):
        assert wanted in names, names
    creds = EggAPICredentials(api_key="egg_sk_registry_key_000001", base_url="http://127.0.0.1:5")
    with creds.get_client() as a:
        with creds.get_client() as b:
            assert a.limiter is b.limiter
        reset_process_state()
        assert all(len(r) == 0 for r in registries())
        with creds.get_client() as c:
            assert c.limiter is not a.limiter  # a fresh bucket after the reset


def test_a_limited_registry_drops_the_least_recently_used() -> None:
    made: list[str] = []
    reg: Registry[str, str] = Registry("test items", limit=2)

    def make(key: str) -> str:
        made.append(key)
        return key.upper()

    assert reg.get("a", lambda: make("a")) == "A"
    assert reg.get("b", lambda: make("b")) == "B"
    assert reg.get("a", lambda: make("a")) == "A"  # a is now the most recent
    reg.get("c", lambda: make("c"))  # drops b, not a
    reg.get("a", lambda: make("a"))
    reg.get("b", lambda: make("b"))
    assert made == ["a", "b", "c", "b"]
