"""Issue 14, item 3: no commit or retry runs on the event loop. Two studies share one loop (as in the operator),
each on its own real PostgreSQL server; one server is stopped. The loop stays responsive, the other study keeps
starting and finishing trials, and the affected study rides out an outage shorter than its retry window and fails
with StorageUnavailable exactly one window after the first failed commit of a longer one, losing nothing it
committed.

Before: ``storage._commit`` slept with ``time.sleep`` on the loop (0.5 s, 1 s, 2 s, 4 s, ...): the loop stood still
for each retry sleep, and with it the other study and this test's own restart of the database, so even the short
outage ran out the window.
"""

from __future__ import annotations

import asyncio
import json
import time

import optuna
import pytest
from optuna.trial import TrialState

from speechtune import fake_trainer, spec
from speechtune.backend import Exit, format_value
from speechtune.executor import Executor
from speechtune.storage import StorageUnavailable, WriteThroughStorage, open_rdb
from tests.support.postgres import postgres_server

WINDOW = 8.0  # the affected study's retry window, seconds
EPOCHS = 4
PACE = 0.05  # seconds between a trainer's lines


class PacedRun:
    """The fake trainer's lines, in-process, one every PACE seconds, each stamped with when it was printed. Records
    how late each line was taken by the engine (the next one is asked for only once the last one is handled)."""

    def __init__(self, backend: PacedBackend, params: dict):
        self.backend = backend
        self.params = {name: format_value(value) for name, value in params.items()}
        self.stopped = False

    async def lines(self):
        for step in range(1, EPOCHS + 1):
            await asyncio.sleep(PACE)
            if self.stopped:
                return
            printed = time.time()
            yield json.dumps({"speechtune": 1, "step": step, "wer": fake_trainer.wer(self.params, step), "time": printed}).encode()
            self.backend.lags.append((time.monotonic(), time.time() - printed))

    async def wait(self) -> Exit:
        return Exit(succeeded=True, exit_code=0)

    async def stop(self) -> None:
        self.stopped = True


class PacedBackend:
    recovery_grace_seconds = 0.0

    def __init__(self):
        self.lags: list[tuple[float, float]] = []  # (when, seconds from printed to handled)
        self.launched: list[float] = []

    async def launch(self, launch) -> PacedRun:
        self.launched.append(time.monotonic())
        return PacedRun(self, launch.values)

    async def attach(self, study: str, number: int, attempt: str = "") -> None:
        return None


def make_study(name: str, url: str) -> spec.Study:
    return spec.parse_study({
        "metadata": {"name": name},
        "spec": {
            "maxTrials": 100000, "parallelism": 3, "maxFailedTrials": 1,
            "sampler": {"type": "random", "seed": 1}, "pruner": {"type": "none"},
            "searchSpace": [{"name": "lr", "float": {"low": 1e-5, "high": 1e-2, "log": True}},
                            {"name": "num_layers", "int": {"low": 2, "high": 12}}],
            "trialTemplate": {"command": ["unused"]},
            "storage": {"url": url},
        },
    })


def printed(trial) -> dict[int, float]:
    params = {name: format_value(value) for name, value in trial.params.items()}
    return {step: fake_trainer.wer(params, step) for step in range(1, EPOCHS + 1)}


def test_a_database_outage_holds_up_only_its_own_study_never_the_loop():
    with postgres_server() as down, postgres_server() as healthy:
        affected_storage = WriteThroughStorage(open_rdb(down.url), retry_seconds=WINDOW)
        affected_backend, other_backend = PacedBackend(), PacedBackend()
        affected = Executor(make_study("affected", down.url), affected_storage, affected_backend)
        other = Executor(make_study("other", healthy.url), WriteThroughStorage(open_rdb(healthy.url)), other_backend)
        late: list[tuple[float, float]] = []  # (when, how late a 10 ms sleep woke up)

        async def heartbeat():
            while True:
                began = time.monotonic()
                await asyncio.sleep(0.01)
                late.append((time.monotonic(), time.monotonic() - began - 0.01))

        async def scenario():
            beat = asyncio.create_task(heartbeat())
            affected_run = asyncio.create_task(affected.run())
            other_run = asyncio.create_task(other.run())
            await asyncio.sleep(1.5)
            # 1. An outage shorter than the window: ridden out.
            short = time.monotonic()
            await asyncio.to_thread(down.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(down.start)
            short_back = time.monotonic()
            while not any(moment > short_back for moment in affected_backend.launched):  # retried 2 s apart at most
                assert time.monotonic() < short_back + 3, "the affected study did not go on after the outage"
                assert not affected_run.done(), affected_run.exception()
                await asyncio.sleep(0.05)
            resumed = max(affected_backend.launched) - short_back
            await asyncio.sleep(1.0)
            # 2. An outage longer than the window: the study fails one window after its first failed commit.
            complete_before = {t.number for t in affected.trials((TrialState.COMPLETE,))}
            long = time.monotonic()
            await asyncio.to_thread(down.stop)
            with pytest.raises(StorageUnavailable, match=f"unreachable for {WINDOW:.0f} s") as caught:
                await affected_run
            failed = time.monotonic()
            first_failure = affected_storage._outage_since
            assert first_failure is not None
            await asyncio.sleep(0.5)  # the other study, still going after the affected one failed
            other.update_budget(max_trials=len(other.trials()))
            outcome = await other_run
            beat.cancel()
            return short, short_back, resumed, long, first_failure, failed, complete_before, caught.value, outcome

        short, short_back, resumed, long, first_failure, failed, complete_before, error, outcome = asyncio.run(scenario())
        down.start()

        # The loop never stalled: not during either outage, nor while the affected study retried.
        worst = max(delay for _, delay in late)
        during = [delay for moment, delay in late if short <= moment <= failed]
        print(f"heartbeat: worst delay {worst * 1000:.1f} ms over {len(late)} beats ({len(during)} during the outages); "
              f"affected study failed {failed - first_failure:.2f} s after its first failed commit "
              f"({failed - long:.2f} s after the server stopped); after the short outage ({short_back - short:.1f} s) "
              f"a new trial {resumed:.2f} s after the server was back")
        assert worst < 0.2, f"the event loop stalled for {worst:.2f} s"
        # The affected study waited exactly its window, from the first failure, then failed.
        assert WINDOW <= failed - first_failure < WINDOW + 0.5
        assert f"unreachable for {WINDOW:.0f} s" in str(error) and "127.0.0.1" in str(error)
        # The other study kept starting trials and taking their values through both outages, promptly.
        for began, ended in ((short, short_back), (long, failed)):
            assert sum(began < moment < ended for moment in other_backend.launched) >= 3
            lags = sorted(lag for moment, lag in other_backend.lags if began < moment < ended)
            assert len(lags) >= 10 and lags[int(0.95 * (len(lags) - 1))] < 0.5, lags
        assert outcome.state == "Succeeded", outcome.message
        stored = optuna.load_study(study_name="other", storage=healthy.url).trials
        assert [(t.number, t.state, t.intermediate_values) for t in stored] == \
            [(t.number, t.state, t.intermediate_values) for t in other.trials()]
        # Nothing the affected study committed is lost; what is stored is what the trainers printed.
        kept = {t.number: t for t in optuna.load_study(study_name="affected", storage=down.url).trials}
        assert complete_before <= {number for number, t in kept.items() if t.state == TrialState.COMPLETE}
        mirror = {t.number: t for t in affected.trials()}
        for number, trial in kept.items():
            assert trial.params == mirror[number].params
            assert trial.intermediate_values.items() <= printed(trial).items()
            if trial.state == TrialState.COMPLETE:
                assert trial.intermediate_values == printed(trial) and trial.value == printed(trial)[EPOCHS]
        assert len(kept) >= len(complete_before) + 1
