"""A headless Debian chromium driven over the DevTools protocol (websocket-client), for the report tests.

The browser is started with `--remote-debugging-port=0` (it picks a free port and writes it to
DevToolsActivePort in its profile folder), so parallel test runs never race for a port."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    env = os.environ.get("SAFETYHEADS_CHROMIUM")
    if env:
        return env
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Page:
    """One browser tab: send DevTools commands, and collect console errors and exceptions."""

    def __init__(self, ws_url: str) -> None:
        import websocket  # websocket-client (pinned in requirements.lock)

        # Our own loopback socket: websocket-client would otherwise route through an http_proxy
        # from the environment (its no-proxy option only applies to an explicit proxy).
        host, port = urllib.parse.urlsplit(ws_url).hostname, urllib.parse.urlsplit(ws_url).port
        sock = socket.create_connection((host, port), timeout=30)
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True, socket=sock)
        self._ids = itertools.count(1)
        self.errors: list[str] = []
        self.events: list[dict] = []

    def _handle_event(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append("exception: " + str(details.get("exception", {}).get("description", details.get("text"))))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        self.events.append(msg)

    def send(self, method: str, **params):
        call_id = next(self._ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == call_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._handle_event(msg)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        seen = next((e for e in self.events if e.get("method") == method), None)
        deadline = time.monotonic() + timeout
        while seen is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout} s")
            msg = json.loads(self.ws.recv())
            self._handle_event(msg)
            if msg.get("method") == method:
                seen = msg
        return seen

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0):
        """Poll a JS expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"still false after {timeout} s: {expression}")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))


class Chromium:
    def __init__(self, binary: str, profile: Path) -> None:
        self.profile = profile
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--window-size=1300,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError("chromium did not open its DevTools port within 60 s")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])

    def new_page(self) -> Page:
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
        with no_proxy.open(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        page = next(t for t in targets if t.get("type") == "page")
        return Page(page["webSocketDebuggerUrl"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium; or set SAFETYHEADS_CHROMIUM)")
    browser = Chromium(binary, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield browser
    finally:
        browser.close()
