"""The tests' name for :mod:`prefect_eggapi.testing.asgi` (uvicorn in a thread on a free port)."""

from prefect_eggapi.testing.asgi import free_port, serve_asgi

__all__ = ["free_port", "serve_asgi"]
