"""A headless Chromium driven over the DevTools protocol (websockets + httpx; no Playwright).

``chromium_path()`` finds Debian's ``chromium`` (or ``chromium-browser``/``google-chrome``);
``Browser`` starts it in its own session with a temporary profile, opens pages and evaluates
JavaScript in them. Waits poll with deadlines; nothing sleeps for a fixed time to "let it load".
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    """The browser binary, or None when no Chromium is installed."""
    for name in _NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _wait(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Page:
    """One tab: navigate, evaluate, screenshot."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        self._ws.send(json.dumps({"id": request_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=60))
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        return _wait(lambda: self.evaluate(expression), timeout, expression)

    def screenshot(self, path: Path) -> Path:
        shot = self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


class Browser:
    """Headless Chromium with a DevTools port, stopped (its process group) on exit."""

    def __init__(self, binary: str, width: int = 1366, height: int = 900) -> None:
        self.binary = binary
        self.size = (width, height)
        self.profile = Path(tempfile.mkdtemp(prefix="eggapi-chromium-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> Browser:
        log = (self.profile / "chromium.log").open("wb")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--headless=new",
                "--no-sandbox",  # root in CI
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={self.profile}",
                f"--window-size={self.size[0]},{self.size[1]}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        port_file = self.profile / "DevToolsActivePort"

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    "chromium exited: "
                    + (self.profile / "chromium.log").read_text(errors="replace")[-2000:]
                )
            return port_file.exists() and bool(port_file.read_text().strip())

        _wait(ready, 30, "chromium's DevTools port")
        self.port = int(port_file.read_text().split()[0])
        return self

    @contextlib.contextmanager
    def page(self) -> Iterator[Page]:
        target = httpx.put(f"http://127.0.0.1:{self.port}/json/new?about:blank", timeout=10)
        target.raise_for_status()
        info = target.json()
        with connect(info["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
            yield Page(ws)
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{self.port}/json/close/{info['id']}", timeout=5)

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)  # its renderer/zygote children too
        shutil.rmtree(self.profile, ignore_errors=True)


#: JavaScript: every <img> of the page as [src prefix, complete, naturalWidth].
IMAGES_JS = (
    "JSON.stringify(Array.from(document.images).map("
    "i => [i.getAttribute('src').slice(0, 30), i.complete, i.naturalWidth]))"
)
