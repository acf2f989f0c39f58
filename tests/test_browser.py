"""The leaderboard site and a report.html in a real browser: Debian's chromium, headless, driven over
the DevTools protocol (a minimal websocket client from Python's standard library). Checks that the
tables and images are present, that clicking a column header sorts the table, that nothing fails
to load and the console stays clean; screenshots go to runs/browser-test/ (printed).

Skips, saying why, only where no chromium binary can be found (.ci/run installs it)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # ~25 s: a leaderboard build and a browser (CI runs the slow tests)

ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("BASTION_SCREENSHOTS", ROOT / "runs" / "browser-test"))

CONFIG = """
name = "browser"
dataset = "digits"
threats = ["linf:0.1"]
curve_eps = { linf = [0.05, 0.2] }
protocol = "fast"
steps = 3
max = 10
batch_size = 5
[train.std]
objective = "standard"
epochs = 1
[train.gauss]
objective = "gaussian"
sigma = 0.25
epochs = 1
[[entry]]
name = "standard"
train = "std"
[[entry]]
name = "gauss"
train = "gauss"
defense = "smoothed"
sigma = 0.25
num_noise = 2
eot_iter = 2
certify = { n0 = 10, n = 40, alpha = 0.01 }
"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CDP:
    """A DevTools-protocol session over one websocket (RFC 6455 client frames, masked)."""

    def __init__(self, ws_url: str):
        m = re.match(r"ws://([^:/]+):(\d+)(/.*)", ws_url)
        assert m, ws_url
        self.sock = socket.create_connection((m.group(1), int(m.group(2))), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {m.group(3)} HTTP/1.1\r\nHost: {m.group(1)}:{m.group(2)}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.next_id = 0
        self.events: list[dict] = []

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("devtools websocket closed")
            buf += chunk
        return buf

    def _recv_message(self) -> dict:
        data = b""
        while True:
            b0, b1 = self._recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._recv_exact(8))[0]
            payload = self._recv_exact(n)
            if b0 & 0x0F == 0x9:          # ping: the browser does not send them to clients, but be safe
                continue
            data += payload
            if b0 & 0x80:
                return json.loads(data.decode("utf-8"))

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        msg = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        n = len(msg)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
        while True:
            reply = self._recv_message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def evaluate(self, expr: str):
        r = self.send("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.evaluate("document.readyState") == "complete" and \
                    self.evaluate("Array.from(document.images).every(i => i.complete)"):
                return
            time.sleep(0.1)
        raise TimeoutError(url)

    def screenshot(self, path: Path) -> None:
        r = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(r["data"]))

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: {p.get('args')}")
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Network.loadingFailed":
                out.append(f"failed load: {p.get('errorText')}")
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = chromium()
    if exe is None:
        pytest.skip("no chromium binary on PATH (install Debian's chromium: apt-get install -y chromium; "
                    ".ci/run does this when it runs as root)")
    prof = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             f"--user-data-dir={prof}", "--remote-debugging-port=0", "--window-size=1200,900",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = None
    deadline = time.time() + 60
    while time.time() < deadline and port is None:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if m:
            port = int(m.group(1))
    if port is None:
        proc.kill()
        pytest.fail("chromium started but printed no DevTools address")
    pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
    page = next(p for p in pages if p.get("type") == "page")
    cdp = CDP(page["webSocketDebuggerUrl"])
    for domain in ("Page", "Runtime", "Log", "Network"):
        cdp.send(f"{domain}.enable")
    yield cdp
    cdp.close()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    import tomllib

    from experiments.leaderboard import Execution, parse_config, run_leaderboard

    folder = tmp_path_factory.mktemp("site")
    cfg = parse_config(tomllib.loads(CONFIG), "browser test config", folder)
    run_leaderboard(cfg, folder / "out", Execution(quiet=True), log=lambda m: None)
    SHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots: {SHOTS}")
    return folder / "out"


def test_index_renders_sorts_and_loads_everything(browser, site):
    browser.events.clear()
    browser.open((site / "site" / "index.html").as_uri())
    assert browser.evaluate("document.querySelectorAll('table.leaderboard tbody tr').length") == 2
    names = "Array.from(document.querySelectorAll('table.leaderboard tbody tr td:nth-child(2)')).map(t => t.innerText)"
    clean = ("Array.from(document.querySelectorAll('table.leaderboard tbody tr td:nth-child(6)'))"
             ".map(t => parseFloat(t.innerText))")
    header = "document.querySelectorAll('table.leaderboard th')[5]"          # clean accuracy
    browser.evaluate(f"{header}.click()")
    up = browser.evaluate(clean)
    assert up == sorted(up) and browser.evaluate(f"{header}.className").endswith("asc")
    browser.evaluate(f"{header}.click()")
    down = browser.evaluate(clean)
    assert down == sorted(up, reverse=True)
    browser.evaluate("document.querySelectorAll('table.leaderboard th')[1].click()")   # by name
    assert browser.evaluate(names) == ["gauss", "standard"]
    browser.screenshot(SHOTS / "index.png")
    assert browser.problems() == []


def test_detail_page_has_tables_and_charts(browser, site):
    browser.events.clear()
    browser.open((site / "site" / "gauss-linf-0.1.html").as_uri())
    assert browser.evaluate("document.querySelectorAll('table').length") >= 3
    assert browser.evaluate("document.querySelectorAll('svg').length") == 2             # per-class bars, curve
    assert browser.evaluate("document.querySelectorAll('svg rect').length") > 10
    assert browser.evaluate("document.querySelectorAll('svg polyline').length") == 1
    assert "smoothadv" in browser.evaluate("document.body.innerText")
    # the link to the evaluator's report resolves to a file that exists
    href = browser.evaluate("Array.from(document.links).find(a => a.innerText === 'report.html').href")
    assert Path(urllib.request.url2pathname(href.removeprefix("file://"))).is_file()
    browser.screenshot(SHOTS / "detail.png")
    assert browser.problems() == []


def test_report_html_renders_with_images(browser, site):
    browser.events.clear()
    browser.open((site / "runs" / "gauss" / "linf-0.1" / "report.html").as_uri())
    assert browser.evaluate("document.querySelectorAll('table').length") >= 1
    n = browser.evaluate("document.images.length")
    assert n >= 1
    assert browser.evaluate("Array.from(document.images).every(i => i.naturalWidth > 0)")
    browser.screenshot(SHOTS / "report.png")
    assert browser.problems() == []
