"""The fidelity ladder with the real local backend and the fake trainer."""

import asyncio
import json
import math
import signal
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from speechtune import spec
from speechtune.executor import Executor
from speechtune.record import CORRELATIONS, VALIDATION
from speechtune.schedulers.ladder import chain_start, spearman
from speechtune.local import LocalProcessBackend
from speechtune.storage import WriteThroughStorage, open_rdb
from tests.support.studies import wait_for_trials

LEVELS = [
    {"name": "low", "overrides": {"train_hours": 1, "num_layers": 3, "epochs": 1}},
    {"name": "medium", "overrides": {"train_hours": 10, "num_layers": 6, "epochs": 2}},
    {"name": "high", "overrides": {"train_hours": 100, "num_layers": 12, "epochs": 3}},
]


def ladder_manifest(tmp_path, *, name="ladder", initial=64, eta=4, mode="synchronous", parallelism=8, args=(), seeds=0, levels=LEVELS):
    return {
        "metadata": {"name": name},
        "spec": {
            "parallelism": parallelism,
            "sampler": {"type": "tpe", "seed": 5, "startupTrials": 10},
            "searchSpace": [
                {"name": "lr", "float": {"low": 1e-5, "high": 1e-2, "log": True}},
                {"name": "n_mels", "int": {"low": 40, "high": 128, "step": 8}},
            ],
            "fidelity": {"levels": levels, "reductionFactor": eta, "initialTrials": initial, "mode": mode},
            **({"validation": {"seeds": seeds}} if seeds else {}),
            "trialTemplate": {"command": ["python", "-m", "speechtune.fake_trainer"], "args": list(args)},
            "storage": {"url": f"sqlite:///{tmp_path}/{name}.db"},
        },
    }


class CountingBackend(LocalProcessBackend):
    """The real local backend, counting level runs and the most that ran at once."""

    def __init__(self, workdir):
        super().__init__(workdir)
        self.launched = Counter()
        self.live = self.peak = 0
        self.order = []

    async def launch(self, launch):
        run = await super().launch(launch)
        self.launched[launch.attempt.split("-")[-1]] += 1
        self.order.append(("start", launch.number, launch.attempt))
        self.live += 1
        self.peak = max(self.peak, self.live)
        wait = run.wait

        async def counted_wait():
            result = await wait()
            if run.__dict__.get("counted") is None:
                run.counted = True
                self.live -= 1
                self.order.append(("end", launch.number, launch.attempt))
            return result

        run.wait = counted_wait
        return run


def run_ladder(tmp_path, manifest):
    study = spec.parse_study(manifest)
    backend = CountingBackend(tmp_path / "logs")
    events = []
    engine = Executor(study, WriteThroughStorage(open_rdb(study.storage.url)), backend, notify=events.append,
                          checkpoint_root=tmp_path / "checkpoints")
    outcome = asyncio.run(engine.run())
    return engine, backend, outcome, events


def test_synchronous_ladder_runs_64_then_16_then_4_within_parallelism_8(tmp_path):
    engine, backend, outcome, events = run_ladder(tmp_path, ladder_manifest(tmp_path, args=("--sleep", "0.5")))
    assert outcome.state == "Succeeded", outcome.message
    assert backend.launched == {"low": 64, "medium": 16, "high": 4}
    assert backend.peak == 8
    trials = engine.trials()
    assert len(trials) == 64, "one Optuna trial per configuration"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert len(complete) == 4 and len(pruned) == 60
    assert all(set(t.intermediate_values) == {0, 1, 2} for t in complete)
    assert sorted(len(t.intermediate_values) for t in pruned) == [1] * 48 + [2] * 12
    # the promoted were the best of their level
    low_values = sorted(t.intermediate_values[0] for t in trials)
    promoted = [t for t in trials if 1 in t.intermediate_values]
    assert max(t.intermediate_values[0] for t in promoted) <= low_values[15]
    assert sum(e.kind == "promoted" for e in events) == 20


def test_asynchronous_ladder_promotes_before_the_first_rung_completes(tmp_path):
    manifest = ladder_manifest(tmp_path, initial=16, eta=2, mode="asynchronous", parallelism=4, levels=LEVELS[:2])
    engine, backend, outcome, _ = run_ladder(tmp_path, manifest)
    assert outcome.state == "Succeeded"
    assert backend.launched == {"low": 16, "medium": 8}
    first_medium = next(i for i, entry in enumerate(backend.order) if entry[0] == "start" and entry[2].endswith("medium"))
    last_low_end = max(i for i, entry in enumerate(backend.order) if entry[0] == "end" and entry[2].endswith("low"))
    assert first_medium < last_low_end
    assert backend.peak <= 4


def test_correlation_is_published_and_a_misleading_proxy_raises_proxy_unreliable(tmp_path):
    good, _, outcome, events = run_ladder(tmp_path, ladder_manifest(tmp_path, name="good", initial=32, eta=2, levels=LEVELS[:2]))
    assert outcome.state == "Succeeded"
    found = good.study.user_attrs[CORRELATIONS]["low->medium"]
    assert found["pairs"] == 16 and found["rho"] > 0.5 and not found["unreliable"]
    assert not any(e.kind == "proxy-unreliable" for e in events)

    misleading, _, outcome, events = run_ladder(
        tmp_path, ladder_manifest(tmp_path, name="misleading", initial=32, eta=2, levels=LEVELS[:2], args=("--misleading-below-hours", "5")),
    )
    found = misleading.study.user_attrs[CORRELATIONS]["low->medium"]
    assert found["unreliable"] and found["rho"] < 0.5
    assert any(e.kind == "proxy-unreliable" for e in events)


def test_a_proxy_that_scores_every_configuration_alike_is_unreliable(tmp_path):
    flat, _, outcome, events = run_ladder(
        tmp_path, ladder_manifest(tmp_path, name="flat", initial=16, eta=2, levels=LEVELS[:2], args=("--flat-below-hours", "5")),
    )
    assert outcome.state == "Succeeded"
    found = flat.study.user_attrs[CORRELATIONS]["low->medium"]
    assert found == {"rho": 0.0, "pairs": 8, "unreliable": True}
    assert any(e.kind == "proxy-unreliable" for e in events)


def test_validation_retrains_the_best_with_other_seeds(tmp_path):
    engine, backend, outcome, _ = run_ladder(tmp_path, ladder_manifest(tmp_path, initial=4, eta=2, levels=LEVELS[:2], seeds=3))
    assert outcome.state == "Succeeded"
    record = engine.study.user_attrs[VALIDATION]
    assert record["trial"] == engine.best_trial().number
    assert len(record["values"]) == 3
    values = list(record["values"].values())
    assert math.isclose(record["mean"], sum(values) / 3)
    assert backend.launched["seed1"] == backend.launched["seed2"] == backend.launched["seed3"] == 1


def test_spearman_matches_known_values():
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([0.1, 0.4, 0.2, 0.3, 0.5, 0.6], [1, 4, 2, 3, 6, 5]) == pytest.approx(1 - 6 * 2 / (6 * 35))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_checkpoints_are_shared_only_between_levels_that_differ_in_epochs():
    fidelity = spec.parse_study(ladder_manifest("/tmp", levels=[
        {"name": "a", "overrides": {"epochs": 1, "train_hours": 1}},
        {"name": "b", "overrides": {"epochs": 3, "train_hours": 1}},
        {"name": "c", "overrides": {"epochs": 9, "train_hours": 10}},
    ], initial=16)).fidelity
    assert [chain_start(fidelity, level) for level in range(3)] == [0, 0, 2]


def test_sigkill_mid_ladder_resumes_without_rerunning_a_finished_level(tmp_path):
    ledger = tmp_path / "ledger"
    manifest = ladder_manifest(tmp_path, name="killed", initial=16, eta=2, parallelism=4, levels=LEVELS[:2],
                               args=("--sleep", "0.3", "--ledger", str(ledger)))
    study_file = tmp_path / "study.yaml"
    study_file.write_text(json.dumps(manifest))
    command = [sys.executable, "-m", "speechtune.cli", "run", str(study_file), "--workdir", str(tmp_path / "logs")]
    runner = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"sqlite:///{tmp_path}/killed.db"
    # kill once a promoted (level 1) run has started: finished level-0 runs exist, a level-1 run is mid-way
    wait_for_trials(url, "killed", lambda trials: ledger.exists() and " L1-" in ledger.read_text())
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    time.sleep(0.5)
    started_before = len(ledger.read_text().splitlines())
    finished_before = {(t.number, level) for t in optuna.load_study(study_name="killed", storage=url).trials
                       for level in t.intermediate_values}
    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    trials = optuna.load_study(study_name="killed", storage=url).trials
    assert len(trials) == 16
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: 8, TrialState.PRUNED: 8}
    runs = [(int(number), int(attempt[1:].split("-")[0])) for number, attempt in map(str.split, ledger.read_text().splitlines())]
    finished_runs = [run for run in runs if run in finished_before]
    assert len(finished_runs) == len(set(finished_runs)), "a finished level ran again"
    assert any(level == 1 for _, level in runs[:started_before]), "the kill landed after a promotion"
    assert any(level == 0 for _, level in finished_before)
