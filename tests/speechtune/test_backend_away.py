"""A backend whose own infrastructure goes away mid-run (the Kubernetes API server, for the operator) stops the
engine; it never fails the trial. Found by tests/speechtune/k8s/test_chaos.py: kube-apiserver killed while three
Job creates were in flight failed those three trials with RunnerError (ClientOSError: Connection reset by peer),
counted toward maxFailedTrials. The backend names such errors (``unavailable``); the executor lets them stop the
study, the operator's runner restarts the engine once the API server answers, and the restarted engine re-attaches
to the run or, with no Job, records the trial ``interrupted`` and queues its configuration again.
"""

from __future__ import annotations

import asyncio
import json

import optuna
import pytest
from optuna.trial import TrialState

from speechtune import fake_trainer, record, spec
from speechtune.backend import Exit, format_value
from speechtune.executor import Executor
from speechtune.storage import WriteThroughStorage, open_rdb


class ApiAway(ConnectionError):
    """What the backend raises when its API server is away."""


class Run:
    def __init__(self, params: dict, away_at: int | None):
        self.params = {name: format_value(value) for name, value in params.items()}
        self.away_at = away_at

    async def lines(self):
        for step in (1, 2, 3):
            if step == self.away_at:
                raise ApiAway("Connection reset by peer")
            await asyncio.sleep(0.01)
            yield json.dumps({"speechtune": 1, "step": step, "wer": fake_trainer.wer(self.params, step)}).encode()

    async def wait(self) -> Exit:
        return Exit(succeeded=True, exit_code=0)

    async def stop(self) -> None:
        pass


class Backend:
    recovery_grace_seconds = 0.0
    unavailable = (ApiAway,)

    def __init__(self, away: set[int]):
        self.away = away  # trial numbers whose run meets the outage at step 2

    async def launch(self, launch) -> Run:
        return Run(launch.values, 2 if launch.number in self.away else None)

    async def attach(self, study: str, number: int, attempt: str = "") -> None:
        return None  # nothing to re-attach to: the run was never created


def test_the_backend_being_away_stops_the_engine_and_fails_no_trial(tmp_path):
    study = spec.parse_study({
        "metadata": {"name": "away"},
        "spec": {"maxTrials": 6, "parallelism": 3, "maxFailedTrials": 1, "sampler": {"type": "random", "seed": 2},
                 "pruner": {"type": "none"}, "searchSpace": [{"name": "lr", "float": {"low": 1e-5, "high": 1e-2, "log": True}}],
                 "trialTemplate": {"command": ["unused"]}, "storage": {"url": f"sqlite:///{tmp_path}/away.db"}},
    })
    first = Executor(study, WriteThroughStorage(open_rdb(study.storage.url)), Backend(away={1}))
    with pytest.raises(ApiAway):
        asyncio.run(first.run())
    stored = optuna.load_study(study_name="away", storage=study.storage.url).trials
    assert stored[1].state == TrialState.RUNNING, "the trial whose run met the outage is not failed"
    assert stored[1].intermediate_values == {1: fake_trainer.wer({"lr": format_value(stored[1].params["lr"])}, 1)}
    assert not [t for t in stored if t.state == TrialState.FAIL]

    again = Executor(study, WriteThroughStorage(open_rdb(study.storage.url)), Backend(away=set()))  # as the runner does
    outcome = asyncio.run(again.run())
    assert outcome.state == "Succeeded", outcome.message
    trials = again.trials()
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs[record.FAIL_REASON] == record.INTERRUPTED
    assert [t.user_attrs.get(record.REQUEUED_FROM) for t in trials].count(1) == 1
    assert len(trials) == 6 and not [t for t in trials if t.state == TrialState.FAIL and not record.is_interrupted(t)]
