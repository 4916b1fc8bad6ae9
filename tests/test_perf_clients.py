"""Issue 16: the process's TLS context is built once, even when threads ask for it at once.

``functools.cache`` does not lock: the submit threads of a batch that built their first clients
together each loaded the CA bundle. Counted, not timed.
"""

from __future__ import annotations

import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from prefect_eggapi.client import _base


def test_concurrent_first_calls_build_one_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[ssl.SSLContext] = []
    real = _base.httpx.create_ssl_context
    start = threading.Barrier(8)

    def slow_create() -> ssl.SSLContext:
        time.sleep(0.05)  # widen the window two first callers could both build in
        context = real()
        built.append(context)
        return context

    monkeypatch.setattr(_base, "_TLS", [])
    monkeypatch.setattr(_base.httpx, "create_ssl_context", slow_create)

    def first_call(_: int) -> ssl.SSLContext:
        start.wait()
        return _base.shared_ssl_context()

    with ThreadPoolExecutor(max_workers=8) as pool:
        contexts = list(pool.map(first_call, range(8)))
    assert len(built) == 1
    assert all(c is built[0] for c in contexts)
    assert _base.shared_ssl_context() is built[0]
