"""Chaos (issue 14, "A chaos test of our own"): one study under the operator through three operator SIGKILLs, a
database outage with an operator SIGKILL inside it, and a kube-apiserver restart, all within one run of the study.
It must still end Succeeded with exactly maxTrials trials, and:

- no duplicates: no trial number ran twice (the fake trainer's --ledger counts every start);
- no lost values: every complete or pruned trial holds exactly the values its trainer printed, to its last step;
- no orphans: once the study has ended, no trainer process of it is left on the node.

Trainers that have printed everything hold while the API server is down (as in test_apiserver_outage.py), so no
pod ends during its outage: a node agent older than the fix of issue 14 item 6, still running on a shared test
cluster, loses such an end, and the study would wait for it forever. The node agent's own outage test covers that.

Bounded: under 150 s on the 2-core dev machine, most of it the study itself; marked slow (CI runs it).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from speechtune import fake_trainer
from speechtune.backend import format_value
from tests.speechtune.k8s.helpers import (
    delete_studies, free_port, healthy, small_study, start_operator, stop_operator, study_status, wait_for_study_end, wait_until,
)
from tests.support.postgres import postgres_server

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TRIALS = 16
EPOCHS = 6
BUDGET = 150  # seconds, for the whole test body
RETRYING = "study storage unreachable, retrying"  # the engine's log line while it retries a commit
HOLDING_TRAINER = ("import os, sys, time\n"
                   "from speechtune import fake_trainer\n"
                   "code = fake_trainer.main(sys.argv[1:])\n"
                   "while os.path.exists(os.environ['HOLD']): time.sleep(0.05)\n"
                   "sys.exit(code)\n")


def trainers(ledger: Path) -> list[int]:
    """Processes on this machine running a trainer of this study (the node agent runs pods as processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(ledger).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile
                pass
    return found


def runs_of(ledger: Path) -> collections.Counter:
    """Trial number -> how many times a trainer started for it."""
    return collections.Counter(int(line.split()[0]) for line in ledger.read_text().splitlines())


def counts(cluster, namespace: str) -> dict:
    status = study_status(cluster, namespace, "chaos")
    return {"state": status.get("state"), **(status.get("trials") or {})}


def test_chaos_operator_kills_database_outage_and_apiserver_restart_lose_nothing(crds, kube_namespace, postgres_url,
                                                                                  apiserver_outage, tmp_path):
    began = time.monotonic()
    cluster = crds
    ledger = tmp_path / "ledger"
    hold = tmp_path / "hold"
    log_path = tmp_path / "operator.log"
    port = free_port()
    timeline = []

    def note(what: str) -> None:
        timeline.append(f"{time.monotonic() - began:5.1f} s {what} {counts(cluster, kube_namespace)}")

    with postgres_server() as database:
        body = small_study("chaos", ["--epochs", str(EPOCHS), "--sleep", "0.3", f"--ledger={ledger}"], maxTrials=TRIALS,
                           parallelism=3, maxFailedTrials=3, pruner={"type": "median", "startupTrials": 4, "warmupSteps": 2},
                           storage={"url": database.url}, command=("python", "-c", HOLDING_TRAINER))
        body["spec"]["trialTemplate"]["env"] = [{"name": "HOLD", "value": str(hold)}]
        cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body))
        operator = start_operator(cluster, kube_namespace, postgres_url, log_path, port)

        def kill_operator() -> None:
            nonlocal operator
            os.kill(operator.pid, signal.SIGKILL)
            operator.wait()
            operator = start_operator(cluster, kube_namespace, postgres_url, log_path, port)
            note("operator SIGKILLed and started again")

        def ended() -> int:
            found = counts(cluster, kube_namespace)
            return found.get("complete", 0) + found.get("pruned", 0)

        def running() -> bool:
            return (found := counts(cluster, kube_namespace)).get("state") == "Running" and found.get("running", 0) > 0

        try:
            wait_until(lambda: healthy(port), timeout=30, what="the operator's liveness endpoint")
            wait_until(lambda: running() and counts(cluster, kube_namespace).get("complete", 0) >= 1, timeout=60,
                       what="a first complete trial")
            kill_operator()  # 1: mid-study
            finished = ended()
            wait_until(lambda: running() and ended() > finished, timeout=40, what="the restarted operator recording trial ends")
            finished = ended()
            database.stop()  # 2: the database away while trials report; the operator killed while its engine retries
            note("database stopped")
            wait_until(lambda: RETRYING in log_path.read_text(), timeout=20, what="the engine retrying a commit", interval=0.2)
            kill_operator()
            time.sleep(4)  # the new operator cannot open the study's storage: Pending, trying again every 10 s
            database.start()
            note("database started again")
            wait_until(lambda: running() and ended() > finished,
                       timeout=40, what="trials finishing again after the database outage")
            hold.touch()
            with apiserver_outage() as outage:  # 3: kube-apiserver killed and started again
                time.sleep(2)
            hold.unlink()
            note(f"kube-apiserver back after {outage.seconds:.1f} s")
            kill_operator()  # 4: once more, with the control plane still catching up
            status = wait_for_study_end(cluster, kube_namespace, "chaos", timeout=max(10.0, BUDGET - (time.monotonic() - began)))
            note("study ended")
            deadline = time.monotonic() + 15  # a pod's process ends a moment after its trial's end is recorded
            while (left := trainers(ledger)) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            hold.unlink(missing_ok=True)
            print("\n" + "\n".join(timeline))
            delete_studies(cluster, kube_namespace)
            stop_operator(operator)
        trials = optuna.load_study(study_name=status["optunaStudy"], storage=database.url).get_trials()
    elapsed = time.monotonic() - began
    print(f"chaos test body: {elapsed:.1f} s; {len(runs_of(ledger))} runs for {TRIALS} trials")

    log = log_path.read_text()
    assert status["state"] == "Succeeded", (status, log[-3000:])
    assert RETRYING in log and "cannot open the study storage" in log, "the database outage reached a running engine " \
        "and an operator that started during it"
    assert "Daemon 'run_study' failed" not in log
    assert len(trials) == TRIALS
    runs = runs_of(ledger)
    assert not [number for number, count in runs.items() if count > 1], f"trial numbers that ran twice: {runs}"
    assert set(runs) == {t.number for t in trials if t.state != TrialState.FAIL}
    for trial in trials:
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            params = {name: format_value(value) for name, value in trial.params.items()}
            printed = {step: fake_trainer.wer(params, step) for step in range(1, (trial.last_step or 0) + 1)}
            assert trial.intermediate_values == pytest.approx(printed), trial.number
            if trial.state == TrialState.COMPLETE:
                assert trial.last_step == EPOCHS and trial.value == pytest.approx(fake_trainer.wer(params, EPOCHS)), trial.number
        else:  # interrupted before its Job existed: recorded, and its configuration run again
            assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "interrupted", trial
    assert not left, f"trainer processes left after the study ended: {left}"
    assert elapsed < BUDGET, f"the chaos test took {elapsed:.0f} s"
