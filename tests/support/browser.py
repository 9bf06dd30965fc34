"""A real browser for tests: Debian's headless chromium, driven over the Chrome DevTools protocol.

``open_page(url, screenshot)`` starts chromium on 127.0.0.1 with a fresh profile, opens ``url``,
and records every network request (``Network.requestWillBeSent``), every console call
(``Runtime.consoleAPICalled``), log entry (``Log.entryAdded``) and uncaught exception
(``Runtime.exceptionThrown``); it evaluates ``script`` in the loaded page and saves a full-page
screenshot. The websocket client is aiohttp's (a dependency of the operator already).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium")


@dataclass
class Page:
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, the document included
    console: list[dict[str, Any]] = field(default_factory=list)  # {"level", "text"} of console calls and log entries
    exceptions: list[str] = field(default_factory=list)
    result: Any = None  # what the script returned

    def errors(self) -> list[dict[str, Any]]:
        return [entry for entry in self.console if entry["level"] in ("error", "assert")] + [
            {"level": "exception", "text": text} for text in self.exceptions]


def open_page(url: str, screenshot: Path, script: str = "null", timeout: float = 60) -> Page:
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed (bin/setup installs Debian's chromium)")
    with tempfile.TemporaryDirectory(prefix="speechtune-chromium-") as profile:
        process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            endpoint = _devtools_endpoint(process, timeout=30)
            return asyncio.run(asyncio.wait_for(_drive(endpoint, url, screenshot, script), timeout))
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _devtools_endpoint(process: subprocess.Popen, timeout: float) -> str:
    """The browser's websocket URL, from the line chromium prints on stderr."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        found = re.search(r"DevTools listening on (ws://\S+)", line)
        if found:
            assert found.group(1).startswith("ws://127.0.0.1:"), found.group(1)
            return found.group(1)
    raise RuntimeError("chromium did not start its DevTools endpoint:\n" + "".join(seen[-20:]))


async def _drive(endpoint: str, url: str, screenshot: Path, script: str) -> Page:
    page = Page()
    loaded = asyncio.Event()
    pending: dict[int, asyncio.Future] = {}
    ids = iter(range(1, 1_000_000))
    async with aiohttp.ClientSession() as http, http.ws_connect(endpoint, max_msg_size=0) as ws:

        async def reader() -> None:
            async for message in ws:
                data = json.loads(message.data)
                if "id" in data and data["id"] in pending:
                    pending.pop(data["id"]).set_result(data)
                    continue
                method, params = data.get("method"), data.get("params", {})
                if method == "Network.requestWillBeSent":
                    page.requests.append(params["request"]["url"])
                elif method == "Runtime.consoleAPICalled":
                    text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
                    page.console.append({"level": params["type"], "text": text})
                elif method == "Log.entryAdded":
                    page.console.append({"level": params["entry"]["level"], "text": params["entry"]["text"]})
                elif method == "Runtime.exceptionThrown":
                    page.exceptions.append(params["exceptionDetails"].get("text", "") + " "
                                           + str(params["exceptionDetails"].get("exception", {}).get("description", "")))
                elif method == "Page.loadEventFired":
                    loaded.set()

        task = asyncio.create_task(reader())

        async def call(method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
            number = next(ids)
            future = asyncio.get_running_loop().create_future()
            pending[number] = future
            await ws.send_str(json.dumps({"id": number, "method": method, "params": params,
                                          **({"sessionId": session} if session else {})}))
            reply = await future
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply.get("result", {})

        target = (await call("Target.createTarget", url="about:blank"))["targetId"]
        session = (await call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
        for domain in ("Network", "Runtime", "Log", "Page"):
            await call(f"{domain}.enable", session)
        await call("Page.navigate", session, url=url)
        await loaded.wait()
        await asyncio.sleep(0.5)  # late requests and console calls of the loaded page
        evaluated = await call("Runtime.evaluate", session, expression=script, returnByValue=True, awaitPromise=True)
        page.result = evaluated.get("result", {}).get("value")
        shot = await call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        task.cancel()
    return page
