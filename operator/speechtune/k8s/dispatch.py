"""The operator's dispatch endpoint: where worker pods ask for their next run.

One HTTP server per operator, ``GET /v1/next`` only. A worker pod authenticates with its own
token (a Secret made for that worker); the server keeps only the tokens' SHA-256 and answers for
the one worker a token belongs to, through the backend that owns it. A poll says what the
worker executes now and what it was given last; the answer is an instruction ({"run": ...},
{"stop": id}, {"retire": true}) or {} after up to ``HOLD_SECONDS``. Nothing here reads or writes
storage: values travel only through pod logs, as with one Job per run.
"""

from __future__ import annotations

import logging
from typing import Protocol

from aiohttp import web

from speechtune.podworker import token_hash

log = logging.getLogger(__name__)

PORT_ENV = "SPEECHTUNE_DISPATCH_PORT"
ADDRESS_ENV = "SPEECHTUNE_DISPATCH_ADDRESS"  # loopback unless told (the chart says 0.0.0.0)
URL_ENV = "SPEECHTUNE_DISPATCH_URL"  # how worker pods reach this server (the chart: its Service)
HOLD_SECONDS = 15.0  # under the pod's POLL_SECONDS


class Poller(Protocol):
    async def instruction(self, current: str, last: str, rss_mib: float | None, hold: float) -> dict:
        """The worker's next instruction, waiting up to ``hold`` seconds for one."""


class Dispatch:
    """Token hash -> the worker it opens; the server itself."""

    def __init__(self, url: str):
        self.url = url
        self.workers: dict[str, Poller] = {}
        self.refused = 0  # polls with no token or one nobody issued
        self._runner: web.AppRunner | None = None

    def register(self, token_sha256: str, worker: Poller) -> None:
        self.workers[token_sha256] = worker

    def unregister(self, token_sha256: str) -> None:
        self.workers.pop(token_sha256, None)

    async def next(self, request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        worker = self.workers.get(token_hash(token)) if scheme == "Bearer" and token else None
        if worker is None:
            # Unknown: a forged token, or a worker whose study's backend has not started yet (an
            # operator restarting). The pod retries either way; only a known token gets an answer.
            self.refused += 1
            return web.json_response({"error": "unknown worker token"}, status=404)
        query = request.query
        try:
            rss = float(query["rss_mib"]) if query.get("rss_mib") else None
        except ValueError:
            rss = None
        answer = await worker.instruction(query.get("current", ""), query.get("last", ""), rss, HOLD_SECONDS)
        return web.json_response(answer)

    async def start(self, port: int, address: str) -> None:
        app = web.Application()
        app.router.add_get("/v1/next", self.next)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, address, port).start()
        log.info("dispatch endpoint for warm worker pods on %s:%d (pods use %s)", address, port, self.url)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
