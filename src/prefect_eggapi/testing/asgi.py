"""Serve an ASGI app (the webhook receiver, a capture app) on a free loopback port in a thread.

Tests and benchmarks need a real HTTP endpoint for the emulator to POST webhooks to, in the
same process as the code that reads what arrived (no subprocess to start, no port to guess).
uvicorn runs in a daemon thread with its own event loop; ``serve_asgi`` returns only once it
accepts connections and stops it on exit. No Prefect import: the receiver works without it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

__all__ = ["free_port", "serve_asgi"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_asgi(app: ASGIApp, startup_timeout: float = 15.0) -> Iterator[str]:
    """Yield the base URL (``http://127.0.0.1:PORT``) once uvicorn accepts connections; stop it
    on exit. Raise RuntimeError when it is not up within ``startup_timeout`` seconds."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
