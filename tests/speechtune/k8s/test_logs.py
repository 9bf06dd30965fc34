"""Pod-log streams reopen with a bounded exponential backoff (issue 14, item 5): a pod whose status lags
behind its end must not cost a log request in a loop (measured before: about 150 requests/s)."""

from __future__ import annotations

import asyncio
import time

import pytest

from speechtune.k8s import backend as k8s_backend
from speechtune.k8s.backend import KubernetesJobBackend, KubernetesRun
from speechtune.k8s.logs import Backoff
from speechtune.k8s.manifests import API_VERSION, STUDY_KIND, TRIAL_LABEL, Owner

POD = "lagging-0-x1"
KEY = (0, "")


def test_backoff_doubles_up_to_its_bound_and_resets():
    backoff = Backoff()
    assert [backoff.next() for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    backoff.reset()
    assert [backoff.next() for _ in range(3)] == [0.5, 1.0, 2.0]
    custom = Backoff(first=0.1, limit=0.25)
    assert [custom.next() for _ in range(4)] == [0.1, 0.2, 0.25, 0.25]


def pod(version: int, *, terminated: bool = False) -> dict:
    state = {"terminated": {"exitCode": 0, "reason": "Completed"}} if terminated else {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    return {"metadata": {"name": POD, "resourceVersion": str(version), "labels": {TRIAL_LABEL: "0"},
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Succeeded" if terminated else "Running", "containerStatuses": [{"name": "trainer", "state": state}]}}


class EmptyStreams:
    """An API whose log streams end at once (``lines[i]`` is what the i-th stream sends), counting them."""

    def __init__(self, lines: dict[int, list[bytes]] | None = None):
        self.calls: list[tuple[float, dict]] = []
        self.lines = lines or {}

    async def stream(self, path: str, params: dict, idle_timeout: float = 330):
        self.calls.append((time.monotonic(), dict(params)))
        await asyncio.sleep(0.001)  # a real stream awaits the server
        for line in self.lines.get(len(self.calls) - 1, []):
            yield line


def following(api: EmptyStreams) -> tuple[KubernetesJobBackend, KubernetesRun]:
    backend = KubernetesJobBackend(api, "ns", Owner(API_VERSION, STUDY_KIND, "lagging", "uid"), None)
    backend._on_pod("ADDED", pod(1))
    return backend, KubernetesRun(backend, KEY, "lagging-0")


async def read(run: KubernetesRun, into: list[bytes]) -> None:
    async for line in run._follow(POD):
        into.append(line)


def test_a_log_stream_that_ends_while_the_pod_still_runs_is_reopened_with_backoff():
    """The pod's status says running for 3.2 s after its log ended: a handful of requests, not hundreds."""
    async def scenario():
        api = EmptyStreams()
        backend, run = following(api)
        lines: list[bytes] = []
        reader = asyncio.create_task(read(run, lines))
        await asyncio.sleep(3.2)
        lagging = len(api.calls)
        backend._on_pod("MODIFIED", pod(2, terminated=True))  # the status catches up: read once more, without follow
        await asyncio.wait_for(reader, 1)
        return api.calls, lagging

    calls, lagging = asyncio.run(scenario())
    gaps = [later - earlier for (earlier, _), (later, _) in zip(calls, calls[1:lagging])]
    assert 3 <= lagging <= 4, f"{lagging} log requests in 3.2 s (0.5 s doubling to 10 s allows 3: at 0, 0.5 and 1.5 s)"
    assert gaps[:2] == pytest.approx([0.5, 1.0], abs=0.25)
    assert all(params["follow"] for _, params in calls[:lagging])
    # The pod's end, seen in the pods' watch, cuts the backoff short: one last read at once, without follow.
    assert len(calls) == lagging + 1 and calls[-1][1]["follow"] is False
    assert calls[-1][0] - calls[lagging - 1][0] < 3.2


def test_new_lines_reset_the_backoff(monkeypatch):
    monkeypatch.setattr(k8s_backend, "Backoff", lambda: Backoff(first=0.1, limit=0.8))
    stamp = "2026-01-01T00:00:0{}.000000Z "
    sends = {2: [(stamp.format(1) + "epoch 1").encode()], 5: [(stamp.format(2) + "epoch 2").encode()]}

    async def scenario():
        api = EmptyStreams(sends)
        backend, run = following(api)
        lines: list[bytes] = []
        reader = asyncio.create_task(read(run, lines))
        while len(api.calls) < 8:
            await asyncio.sleep(0.01)
        run._stopped = True
        backend.changed(KEY).set()
        await asyncio.wait_for(reader, 1)
        return api.calls, lines

    calls, lines = asyncio.run(scenario())
    assert lines == [b"epoch 1", b"epoch 2"]
    gaps = [later - earlier for (earlier, _), (later, _) in zip(calls, calls[1:8])]
    # 0.1, 0.2, a line (reset): 0.1, 0.2, 0.4, a line (reset): 0.1, 0.2
    expected = [0.1, 0.2, 0.1, 0.2, 0.4, 0.1, 0.2]
    assert all(want - 0.02 <= gap <= want + 0.08 for gap, want in zip(gaps, expected)), gaps
    assert calls[3][1]["sinceTime"] == "2026-01-01T00:00:01Z"  # resumed where the last line was


def test_a_pod_that_ends_while_its_log_is_read_gets_its_last_read_at_once():
    """The usual end of a trial: the pod's end arrives while the stream still runs; no backoff before the last read."""
    class EndsWhileStreaming(EmptyStreams):
        async def stream(self, path: str, params: dict, idle_timeout: float = 330):
            async for line in super().stream(path, params, idle_timeout):
                yield line
            if len(self.calls) == 1:
                self.backend._on_pod("MODIFIED", pod(2, terminated=True))

    async def scenario():
        api = EndsWhileStreaming({0: [b"2026-01-01T00:00:01.000000Z epoch 1"]})
        backend, run = following(api)
        api.backend = backend
        lines: list[bytes] = []
        await asyncio.wait_for(read(run, lines), 1)
        return api.calls, lines

    calls, lines = asyncio.run(scenario())
    assert lines == [b"epoch 1"]
    assert [params["follow"] for _, params in calls] == [True, False]
    assert calls[1][0] - calls[0][0] < 0.2
