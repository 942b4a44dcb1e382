"""Headless Chromium driven through the DevTools protocol, for the portal's test: a page
opened with a session cookie, screenshots taken until a plot is on screen.

Debian's Chromium draws WebGL (h5web's plots) with SwiftShader, on the CPU.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.conftest import CHROMIUM_FLAGS

FLAGS = [
    *(f for f in CHROMIUM_FLAGS if not f.startswith("--virtual-time-budget")),
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]


class Browser:
    """One Chromium with one page, talked to over its DevTools websocket."""

    def __init__(self, binary: str, profile: Path) -> None:
        from websockets.sync.client import connect

        active = profile / "DevToolsActivePort"
        active.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not active.is_file() or not active.read_text().strip():
            assert time.monotonic() < deadline, "Chromium's DevTools did not start"
            time.sleep(0.1)
        port = active.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
            [target] = [t for t in json.load(response) if t["type"] == "page"]
        self.socket = connect(target["webSocketDebuggerUrl"], max_size=None)
        self._id = 0

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self.socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            answer = json.loads(self.socket.recv())
            if answer.get("id") == self._id:
                assert "error" not in answer, (method, answer["error"])
                return answer.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def set_cookie(self, url: str, name: str, value: str) -> None:
        self.call("Network.setCookie", url=url, name=name, value=value, httpOnly=True)

    def open(self, url: str) -> float:
        """Navigate; the monotonic time the navigation was asked for."""
        self.call("Page.enable")
        started = time.monotonic()
        self.call("Page.navigate", url=url)
        return started

    def screenshot(self, clip: dict | None = None):
        """The page as an RGB array (PNG decoded with Pillow)."""
        import numpy as np
        from PIL import Image

        params = {"format": "png"} | ({"clip": clip | {"scale": 1}} if clip else {})
        data = base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already gone
            self.call("Browser.close")
        self.socket.close()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def coloured(image) -> tuple[int, float]:
    """Pixels of strong colour (a heatmap's colour map, a curve), and the fraction of the
    columns that hold any: a plot spans its axes, a spinner or an icon does not."""
    import numpy as np

    channels = image.astype(int)
    strong = (channels.max(axis=2) - channels.min(axis=2)) > 60
    return int(strong.sum()), float(np.mean(strong.any(axis=0)))


_PLOT_CANVAS = (
    "(() => { const all = [...document.querySelectorAll('#viewer canvas')]"
    ".map(c => c.getBoundingClientRect()).filter(r => r.width > 100);"
    " all.sort((a, b) => b.width * b.height - a.width * a.height);"
    " const r = all[0]; return r ? {x: r.x, y: r.y, width: r.width,"
    " height: r.height} : null; })()"
)


def loading(browser: Browser) -> str:
    """When the page's parts arrived, from the navigation's start (the browser's clock):
    the viewer's script, the last h5grove answer."""
    times = browser.evaluate(
        "(() => { const r = performance.getEntriesByType('resource');"
        " const js = r.filter(e => e.name.endsWith('viewer.js')).map(e => e.responseEnd);"
        " const h5 = r.filter(e => e.name.includes('/h5grove/')).map(e => e.responseEnd);"
        " return {js: Math.max(0, ...js), h5: Math.max(0, ...h5), n: h5.length}; })()"
    )
    return (
        f"viewer.js loaded at {times['js'] / 1000:.2f} s, {times['n']} h5grove answers, "
        f"the last at {times['h5'] / 1000:.2f} s"
    )


def first_plot_s(browser: Browser, url: str, timeout: float = 30) -> float | None:
    """Seconds from asking for ``url`` until a plot is on screen: the plot's canvas (the
    largest in the viewer) holds a curve or a colour map across its width, on a
    screenshot (polled, so the figure is late by up to one screenshot, ~0.1 s)."""
    browser.call("Page.navigate", url="about:blank")  # no plot left from the last page
    while browser.evaluate("location.href") != "about:blank":
        time.sleep(0.02)
    started = browser.open(url)
    deadline = started + timeout
    while time.monotonic() < deadline:
        clip = browser.evaluate(_PLOT_CANVAS)
        if clip is not None:
            count, spread = coloured(browser.screenshot(clip))
            if count > 1000 and spread > 0.5:
                return time.monotonic() - started
        time.sleep(0.05)
    return None
