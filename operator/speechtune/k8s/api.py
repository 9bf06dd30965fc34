"""A small asyncio client for the Kubernetes API, on aiohttp (which kopf already depends on).

One aiohttp session carries every request, watch and log stream of the operator,
so hundreds of trials cost open sockets, not threads. Credentials come from
kopf's own login helpers: the pod's service account, else the kubeconfig.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kopf

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


class ApiError(RuntimeError):
    """A non-2xx answer; ``status`` is the HTTP code, ``reason`` the API's reason (e.g. AlreadyExists)."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason


class Api:
    """Raw JSON requests against one API server."""

    def __init__(self, info: kopf.ConnectionInfo):
        self.server = info.server.rstrip("/")
        self.session = aiohttp.ClientSession(
            headers=info.as_http_headers(),
            connector=aiohttp.TCPConnector(ssl=info.as_ssl_context(), limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )

    @classmethod
    def from_environment(cls) -> "Api":
        """In a pod: its service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
        settings = kopf.OperatorSettings()
        info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
        if info is None:
            raise RuntimeError("no Kubernetes credentials: not in a pod, and no KUBECONFIG or ~/.kube/config")
        return cls(info)

    async def close(self) -> None:
        await self.session.close()

    async def request(self, method: str, path: str, *, params: dict | None = None, body: Any = None,
                      content_type: str = "application/json", timeout: float = 30) -> dict:
        data = None if body is None else json.dumps(body)
        async with self.session.request(
            method, self.server + path, params=_query(params), data=data,
            headers={"Content-Type": content_type}, timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            payload = await response.read()
            if response.status >= 300:
                raise _error(response.status, payload)
            return json.loads(payload) if payload else {}

    async def get(self, path: str, **params: Any) -> dict | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path, params=params)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def create(self, path: str, body: dict) -> dict | None:
        """The created object, or None when one of that name already exists."""
        try:
            return await self.request("POST", path, body=body)
        except ApiError as error:
            if error.status == 409 and error.reason == "AlreadyExists":
                return None
            raise

    async def patch(self, path: str, body: dict) -> dict | None:
        """A JSON merge patch; None when the object is gone."""
        try:
            return await self.request("PATCH", path, body=body, content_type=MERGE_PATCH)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def delete(self, path: str, propagation: str = "Background", grace_period: int | None = None,
                     uid: str | None = None) -> bool:
        """Delete; False when it was already gone, or (``uid`` given) when the object of that name is another one.

        ``grace_period`` 0 kills a pod at once.
        """
        body: dict[str, Any] = {"propagationPolicy": propagation}
        if grace_period is not None:
            body["gracePeriodSeconds"] = grace_period
        if uid is not None:
            body["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", path, body=body)
            return True
        except ApiError as error:
            if error.status == 404 or (error.status == 409 and uid is not None):
                return False
            raise

    async def stream(self, path: str, params: dict, idle_timeout: float = 330) -> AsyncIterator[bytes]:
        """The raw lines of a streaming GET (pod logs, watches), until the server closes it.

        Silence longer than ``idle_timeout`` raises asyncio.TimeoutError: a
        connection that died without a word must not hang its reader forever.
        """
        async with self.session.get(self.server + path, params=_query(params),
                                    timeout=aiohttp.ClientTimeout(total=None, sock_read=idle_timeout)) as response:
            if response.status >= 300:
                raise _error(response.status, await response.read())
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    yield line
            if buffer:
                yield buffer

    async def watch(self, path: str, params: dict) -> AsyncIterator[tuple[str, dict]]:
        """List, then watch, forever: yields ("SYNCED", list) after each (re)list, then (type, object) events.

        A watch the server ends is resumed from the last resourceVersion; an
        expired one (410 Gone) is listed again, so the caller rebuilds its view.
        """
        version = None
        while True:
            try:
                if version is None:
                    listing = await self.request("GET", path, params=params)
                    version = listing["metadata"]["resourceVersion"]
                    yield "SYNCED", listing
                watch_params = {**params, "watch": "true", "resourceVersion": version,
                                "allowWatchBookmarks": "true", "timeoutSeconds": 300}
                async for line in self.stream(path, watch_params):
                    event = json.loads(line)
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            version = None
                            break
                        raise ApiError(obj.get("code", 500), obj.get("reason", ""), obj.get("message", ""))
                    version = obj["metadata"]["resourceVersion"]
                    if kind != "BOOKMARK":
                        yield kind, obj
            except ApiError as error:
                if error.status == 410:
                    version = None
                    continue
                log.warning("watch %s failed, retrying: %s", path, error)
                await asyncio.sleep(1)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
                log.info("watch %s dropped, resuming: %s", path, error)
                await asyncio.sleep(0.5)


def _query(params: dict | None) -> dict | None:
    if not params:
        return None
    return {key: ("true" if value is True else "false" if value is False else str(value))
            for key, value in params.items() if value is not None}


def _error(status: int, payload: bytes) -> ApiError:
    try:
        obj = json.loads(payload)
        return ApiError(status, obj.get("reason", ""), obj.get("message", payload.decode(errors="replace")))
    except ValueError:
        return ApiError(status, "", payload.decode(errors="replace")[:500])


# -- paths ---------------------------------------------------------------------
GROUP, VERSION = "speechtune.io", "v1alpha1"


def path(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    """The URL path of a namespaced collection or object, e.g. path("jobs", "ns", "j1")."""
    base = {
        "pods": "/api/v1", "secrets": "/api/v1", "events": "/api/v1", "services": "/api/v1",
        "jobs": "/apis/batch/v1",
        "speechtuningstudies": f"/apis/{GROUP}/{VERSION}", "speechtuningtrials": f"/apis/{GROUP}/{VERSION}",
    }[kind]
    result = f"{base}/namespaces/{namespace}/{kind}"
    if name:
        result += f"/{name}"
    if subresource:
        result += f"/{subresource}"
    return result
