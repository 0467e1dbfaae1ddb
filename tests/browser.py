"""Open an HTML file in headless Chromium and report what a person's browser would show wrong.

Chromium is driven over the DevTools protocol (https://chromedevtools.github.io/devtools-protocol/)
with a small stdlib WebSocket client (RFC 6455: text frames, client-side masking), so the tests
need no browser-automation package. :func:`inspect_page` loads a ``file://`` page and returns
every console error and uncaught exception, every image that did not decode, every request that
is not ``file:`` or ``data:``, and a full-page PNG screenshot. The browser's own network is also
cut (``--host-resolver-rules``) so that a page that asks for something outside fails loudly
instead of fetching it.

    python -m tests.browser PAGE.html SHOT.png [WIDTH]   # a screenshot for the docs
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
         "--host-resolver-rules=MAP * ~NOTFOUND")
LOCAL_SCHEMES = ("file:", "data:", "about:", "chrome-error:", "devtools:")
IMAGES_BROKEN_JS = ("JSON.stringify(Array.from(document.images)"
                    ".filter(i => !(i.complete && i.naturalWidth > 0))"
                    ".map(i => i.alt || i.src.slice(0, 60)))")


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageReport:
    console_errors: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    image_count: int = 0
    title: str = ""
    text: str = ""  # what a person reads: document.body.innerText
    screenshot: bytes = b""

    @property
    def problems(self) -> list[str]:
        return ([f"console: {m}" for m in self.console_errors]
                + [f"broken image: {m}" for m in self.broken_images]
                + [f"external request: {m}" for m in self.external_requests])


class WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol: masked text frames out, text in."""

    def __init__(self, url: str, timeout: float) -> None:
        rest = url.split("://", 1)[1]
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"DevTools refused the WebSocket: {head[:200]!r}")
        self.buffer = head.split(b"\r\n\r\n", 1)[1]

    def send(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else
                                  bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else
                                  bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def recv(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            if opcode in (0x9, 0xA):  # ping/pong: not used by DevTools, skipped
                continue
            message += payload
            if first & 0x80:
                return message.decode()

    def close(self) -> None:
        self.sock.close()


class DevTools:
    """One page target: ``call`` waits for its reply and keeps the events that came before."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result") or {}
            if "method" in message:
                self.events.append(message)

    def wait_for(self, method: str, deadline: float) -> None:
        if any(e["method"] == method for e in self.events):
            return
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            if "method" in message:
                self.events.append(message)
                if message["method"] == method:
                    return
        raise TimeoutError(f"no {method} from Chromium")


def _devtools_port(profile: Path, proc: subprocess.Popen, deadline: float) -> int:
    marker = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if marker.is_file():
            lines = marker.read_text().splitlines()
            if lines and lines[0].isdigit():
                return int(lines[0])
        if proc.poll() is not None:
            raise RuntimeError(f"Chromium exited with {proc.returncode} before DevTools started")
        time.sleep(0.05)
    raise TimeoutError("Chromium's DevTools did not start")


def _summarise(report: PageReport, events: list[dict[str, Any]]) -> None:
    for event in events:
        method, params = event["method"], event.get("params") or {}
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            report.console_errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                                  for a in params.get("args") or []))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails") or {}
            report.console_errors.append((details.get("exception") or {}).get("description")
                                         or details.get("text", "exception"))
        elif method == "Log.entryAdded" and (params.get("entry") or {}).get("level") == "error":
            entry = params["entry"]
            report.console_errors.append(f"{entry.get('text')} {entry.get('url') or ''}".strip())
        elif method == "Network.requestWillBeSent":
            url = (params.get("request") or {}).get("url", "")
            if not url.startswith(LOCAL_SCHEMES):
                report.external_requests.append(url)


def inspect_page(page: Path, *, width: int = 1200, timeout: float = 60.0,
                 binary: str | None = None) -> PageReport:
    """Load ``page`` in a fresh headless Chromium; see the module docstring."""
    binary = binary or chromium_binary()
    if binary is None:
        raise FileNotFoundError("no chromium binary on PATH")
    deadline = time.monotonic() + timeout
    # Chromium's helpers (zygote, renderers, crashpad) can outlive the browser process for a
    # moment and still write into the profile: the whole group is ended, and a profile file that
    # appears during the clean-up does not fail the check.
    with tempfile.TemporaryDirectory(prefix="flux-remote-chromium-",
                                     ignore_cleanup_errors=True) as tmp:
        profile = Path(tmp)
        proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}",
                                 "--remote-debugging-port=0", f"--window-size={width},900",
                                 "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            port = _devtools_port(profile, proc, deadline)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
                targets = json.load(resp)
            page_target = next(t for t in targets if t.get("type") == "page")
            ws = WebSocket(page_target["webSocketDebuggerUrl"], timeout=max(deadline - time.monotonic(), 1))
            try:
                return _drive(DevTools(ws), page, width, deadline)
            finally:
                ws.close()
        finally:
            _end_group(proc)


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to Chromium's whole process group, SIGKILL after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _drive(cdp: DevTools, page: Path, width: int, deadline: float) -> PageReport:
    for domain in ("Page", "Runtime", "Log", "Network"):
        cdp.call(f"{domain}.enable")
    cdp.call("Page.navigate", url=page.resolve().as_uri())
    cdp.wait_for("Page.loadEventFired", deadline)
    report = PageReport()
    report.title = cdp.call("Runtime.evaluate", expression="document.title",
                            returnByValue=True)["result"].get("value", "")
    report.text = cdp.call("Runtime.evaluate", expression="document.body.innerText",
                           returnByValue=True)["result"].get("value", "")
    report.broken_images = json.loads(cdp.call("Runtime.evaluate", expression=IMAGES_BROKEN_JS,
                                               returnByValue=True)["result"]["value"])
    report.image_count = cdp.call("Runtime.evaluate", expression="document.images.length",
                                  returnByValue=True)["result"]["value"]
    height = cdp.call("Runtime.evaluate", expression="document.documentElement.scrollHeight",
                      returnByValue=True)["result"]["value"]
    cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=int(height),
             deviceScaleFactor=1, mobile=False)
    shot = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    report.screenshot = base64.b64decode(shot["data"])
    _summarise(report, cdp.events)
    return report


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m tests.browser PAGE.html SHOT.png [WIDTH]", file=sys.stderr)
        return 2
    report = inspect_page(Path(argv[0]), width=int(argv[2]) if len(argv) == 3 else 1200)
    Path(argv[1]).write_bytes(report.screenshot)
    for problem in report.problems:
        print(problem, file=sys.stderr)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
