"""speechtune.podworker, the process of a worker pod, against the operator's real dispatch endpoint
(speechtune.k8s.dispatch) on loopback and the fake trainer as its warm trainer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from speechtune.k8s.dispatch import Dispatch
from speechtune.podworker import NOT_A_WORKER_EXIT, token_hash
from tests.speechtune.k8s.helpers import free_port


class ScriptedWorker:
    """A worker as the operator sees it, reduced to a queue of instructions and the polls it got.

    An instruction with "at": (current, last) waits for a poll from a pod in that state.
    """

    def __init__(self, instructions: list[dict]):
        self.instructions = instructions
        self.polls: list[tuple[str, str]] = []

    async def instruction(self, current: str, last: str, rss_mib: float | None, hold: float) -> dict:
        self.polls.append((current, last))
        if self.instructions and tuple(self.instructions[0].get("at", (current, last))) == (current, last):
            answer = dict(self.instructions.pop(0))
            answer.pop("at", None)
            return answer
        await asyncio.sleep(0.05)
        return {}


def run_pod_worker(instructions: list[dict], command: list[str], token: str = "secret-token", timeout: float = 60,
                   known: bool = True) -> tuple[subprocess.CompletedProcess, ScriptedWorker, Dispatch]:
    async def main():
        port = free_port()
        dispatch = Dispatch(f"http://127.0.0.1:{port}")
        worker = ScriptedWorker(instructions)
        if known:
            dispatch.register(token_hash("secret-token"), worker)
        await dispatch.start(port, "127.0.0.1")
        env = dict(os.environ, SPEECHTUNE_DISPATCH_URL=dispatch.url, SPEECHTUNE_WORKER_TOKEN=token)
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "speechtune.podworker", "--", *command, env=env,
                                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except asyncio.TimeoutError:
            process.kill()
            out, err = await process.communicate()
        finally:
            await dispatch.close()
        return subprocess.CompletedProcess([], process.returncode, out.decode(), err.decode()), worker, dispatch

    return asyncio.run(main())


FAKE = [sys.executable, "-m", "speechtune.fake_trainer"]


def run(run_id: str, *argv: str) -> dict:
    return {"run": {"run": run_id, "argv": list(argv), "env": {"SPEECHTUNE_TRIAL": "0"}}}


def lines_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_runs_come_from_the_dispatch_endpoint_and_their_tagged_lines_go_to_the_pod_log():
    done, worker, _ = run_pod_worker([run("a#1", "--epochs", "2", "--lr=0.001"), {"at": ("", "a#1"), **run("b#2", "--epochs", "1")},
                                      {"at": ("", "b#2"), "retire": True}], FAKE)
    assert done.returncode == 0, done.stderr
    ends = [line["run"] for line in lines_of(done.stdout) if "end" in line]
    assert ends == ["a#1", "b#2"]
    steps = [(line["run"], line["step"]) for line in lines_of(done.stdout) if "step" in line]
    assert steps == [("a#1", 1), ("a#1", 2), ("b#2", 1)]
    assert ("a#1", "a#1") in worker.polls, "a poll says which run the pod executes and which it was given last"


def test_a_run_sent_again_is_not_executed_twice():
    again = run("a#1", "--epochs", "1")
    done, _, _ = run_pod_worker([again, {"at": ("a#1", "a#1"), **again}, {"at": ("", "a#1"), "retire": True}], FAKE)
    assert [line["run"] for line in lines_of(done.stdout) if "end" in line] == ["a#1"]


def test_a_stop_reaches_the_run_at_its_next_step():
    done, _, _ = run_pod_worker([run("slow#1", "--epochs", "50", "--sleep", "0.2"), {"at": ("slow#1", "slow#1"), "stop": "slow#1"},
                                 {"at": ("", "slow#1"), "retire": True}], FAKE)
    end = next(line["end"] for line in lines_of(done.stdout) if "end" in line)
    assert end["reason"] == "Stopped"
    assert len([line for line in lines_of(done.stdout) if "step" in line]) < 10


def test_an_unknown_token_gets_no_run_and_the_pod_keeps_asking():
    done, worker, dispatch = run_pod_worker([run("a#1")], FAKE, token="forged", timeout=4)
    assert done.returncode != 0  # still waiting when the test gave up on it
    assert not [line for line in lines_of(done.stdout) if "run" in line]
    assert dispatch.refused >= 1 and not worker.polls


def test_a_trainer_that_does_not_speak_the_worker_protocol_ends_the_pod_with_its_own_exit_code(tmp_path):
    script = tmp_path / "cold.py"
    script.write_text("from speechtune import report\nreport(step=1, wer=0.5)\n")
    done, worker, _ = run_pod_worker([run("a#1")], [sys.executable, str(script)])
    assert done.returncode == NOT_A_WORKER_EXIT
    assert "does not speak the worker protocol" in done.stderr
    assert not worker.polls, "a pod whose trainer is no worker never asks for a run"


@pytest.mark.parametrize("missing", ["SPEECHTUNE_DISPATCH_URL", "SPEECHTUNE_WORKER_TOKEN"])
def test_without_its_endpoint_or_token_the_pod_says_what_is_missing(missing):
    env = dict(os.environ, SPEECHTUNE_DISPATCH_URL="http://127.0.0.1:9", SPEECHTUNE_WORKER_TOKEN="x")
    del env[missing]
    done = subprocess.run([sys.executable, "-m", "speechtune.podworker", "--", *FAKE], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and missing in done.stderr
