"""A study's status write that the API server does not take is sent again, never raised (issue 14, item 4).

Before, the PATCH's exception escaped StudyRunner.run to kopf, which restarted the study's daemon 60 s
later. The cluster test (test_apiserver_outage.py) kills kube-apiserver; these pin the rules without one.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from speechtune.k8s import runner as k8s_runner
from speechtune.k8s.api import ApiError
from speechtune.k8s.runner import StudyRunner


class FlakyApi:
    """Fails the first ``failures`` status PATCHes (the API server away), then takes them."""

    def __init__(self, failures: int, error: Exception | None = None):
        self.failures = failures
        self.error = error or aiohttp.ClientConnectionError("Cannot connect to host 127.0.0.1:16443")
        self.attempts = 0
        self.taken: list[dict] = []

    async def patch(self, path: str, body: dict) -> dict:
        self.attempts += 1
        await asyncio.sleep(0)
        if self.failures:
            self.failures -= 1
            raise self.error
        self.taken.append(body["status"])
        return {}


def study_runner(api: FlakyApi) -> StudyRunner:
    body = {"metadata": {"namespace": "ns", "name": "s", "uid": "0123456789", "generation": 1}, "status": {}}
    return StudyRunner(api, body, lambda *_: None)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(k8s_runner, "STATUS_RETRY_SECONDS", (0.02, 0.1))


@pytest.mark.parametrize("error", [aiohttp.ClientConnectionError("refused"), asyncio.TimeoutError(),
                                   ApiError(503, "ServiceUnavailable", "etcd is away")], ids=["refused", "timeout", "503"])
def test_a_failed_status_write_is_sent_again_until_it_is_taken(error):
    async def scenario():
        api = FlakyApi(failures=3, error=error)
        runner = study_runner(api)
        await runner._set_state("Failed", "InvalidSpec", "spec.x: bad", 1)  # no exception: the daemon lives on
        assert api.taken == []
        for _ in range(200):
            if api.taken:
                break
            await asyncio.sleep(0.01)
        return api, runner

    api, runner = asyncio.run(scenario())
    assert [(taken["state"], taken["message"]) for taken in api.taken] == [("Failed", "spec.x: bad")]
    assert api.attempts == 4 and runner._unwritten is None


def test_a_newer_status_replaces_the_one_waiting_and_an_older_one_never_lands_after_it():
    async def scenario():
        api = FlakyApi(failures=2)
        runner = study_runner(api)
        await runner._set_state("Running", "Running", "trials are running", 1, counts={"total": 1})
        await runner._set_state("Running", "Running", "trials are running", 1, counts={"total": 2})
        for _ in range(200):
            if runner._unwritten is None:
                break
            await asyncio.sleep(0.01)
        return api

    api = asyncio.run(scenario())
    assert [taken["trials"] for taken in api.taken] == [{"total": 2}]


def test_the_same_status_waiting_to_be_sent_again_costs_no_request_per_sync(monkeypatch):
    monkeypatch.setattr(k8s_runner, "STATUS_RETRY_SECONDS", (5.0, 5.0))

    async def scenario():
        api = FlakyApi(failures=100)
        runner = study_runner(api)
        for _ in range(5):  # what _sync does every second while the API server is away
            await runner._set_state("Running", "Running", "trials are running", 1)
        runner._status_retry.cancel()
        return api

    assert asyncio.run(scenario()).attempts == 1


def test_going_back_to_the_status_last_written_still_sends_it():
    """Written A, then B failed (it may have landed): A again must be sent, not taken as already there."""
    async def scenario():
        api = FlakyApi(failures=0)
        runner = study_runner(api)
        await runner._set_state("Running", "Running", "a", 1)
        api.failures = 1
        await runner._set_state("Running", "Running", "b", 1)
        await runner._set_state("Running", "Running", "a", 1)
        await asyncio.sleep(0.1)
        return api, runner

    api, runner = asyncio.run(scenario())
    assert [taken["message"] for taken in api.taken] == ["a", "a"]
    assert runner._unwritten is None
