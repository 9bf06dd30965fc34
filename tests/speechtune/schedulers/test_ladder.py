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


# -- per-level rank metrics and Hyperband brackets, on an in-process trainer --------------------------------------

class MetricsRun:
    """A level run whose WER is the same for every configuration (a proxy where WER has not moved yet) while
    val_loss and cer do move: val_loss with the distance of lr from 3e-4, cer in coarse steps of n_mels."""

    def __init__(self, launch, flat_wer: bool, final_metrics: tuple[str, ...], delay: float = 0.0,
                 reported: tuple[str, ...] = ("wer", "cer", "val_loss")):
        self.level, self.delay = launch.rung, delay
        lr, n_mels = float(launch.params["lr"]), int(launch.params["n_mels"])
        self.val_loss = round(abs(math.log10(lr) - math.log10(3e-4)), 6)
        self.cer = 0.1 * (n_mels // 48)  # 40..128 in 2 steps: many ties
        self.wer = 1.0 if flat_wer and self.level == 0 else round(0.2 + self.val_loss / 10, 6)
        self.final_metrics, self.reported = final_metrics, reported

    async def lines(self):
        metrics = {name: value for name, value in {"wer": self.wer, "cer": self.cer, "val_loss": self.val_loss}.items()
                   if name in self.reported}
        await asyncio.sleep(self.delay)
        yield json.dumps({"speechtune": 1, "step": 1, **metrics}).encode()
        yield json.dumps({"speechtune": 1, "final": True, **{name: metrics[name] for name in self.final_metrics if name in metrics}}).encode()

    async def wait(self):
        from speechtune.backend import Exit

        return Exit(succeeded=True, exit_code=0)

    async def stop(self) -> None:
        pass


class MetricsBackend:
    """In-process level runs (MetricsRun), recording each launch's trial number and level."""

    recovery_grace_seconds = 0.0

    def __init__(self, flat_wer=True, final_metrics=("wer", "cer", "val_loss"), delay=lambda number: 0.0,
                 reported=("wer", "cer", "val_loss")):
        self.flat_wer, self.final_metrics, self.delay, self.reported = flat_wer, final_metrics, delay, reported
        self.launches = []

    async def launch(self, launch):
        self.launches.append((launch.number, launch.rung))
        return MetricsRun(launch, self.flat_wer, self.final_metrics, self.delay(launch.number), self.reported)

    async def attach(self, study, number, attempt=""):
        return None


def run_in_process(tmp_path, manifest, backend):
    study = spec.parse_study(manifest)
    events = []
    engine = Executor(study, WriteThroughStorage(open_rdb(study.storage.url)), backend, notify=events.append)
    outcome = asyncio.run(engine.run())
    return engine, outcome, events


def ranked_levels(low_rank=None, high_rank=None):
    return [dict(LEVELS[0], **({"rank": low_rank} if low_rank else {})), dict(LEVELS[2], **({"rank": high_rank} if high_rank else {}))]


def promoted(engine):
    return {t.number for t in engine.trials() if 1 in t.intermediate_values}


def best_by(engine, metric, count):
    """The trial numbers of the ``count`` best level-0 runs by a metric; asserts the cut is not a tie."""
    values = sorted((t.user_attrs["metrics_low"][metric], t.number) for t in engine.trials())
    assert values[count - 1][0] < values[count][0], "the test needs a strict cut"
    return {number for _, number in values[:count]}


@pytest.mark.parametrize("mode", ["synchronous", "asynchronous"])
def test_a_constant_objective_promotes_by_the_levels_rank_metric(tmp_path, mode):
    manifest = ladder_manifest(tmp_path, name=f"rank-{mode}", initial=16, eta=4, mode=mode, parallelism=4,
                               levels=ranked_levels({"metric": "val_loss", "direction": "minimize"}))
    engine, outcome, events = run_in_process(tmp_path, manifest, MetricsBackend())
    assert outcome.state == "Succeeded", outcome.message
    assert {t.intermediate_values[0] for t in engine.trials()} == {1.0}, "WER is the same for every configuration at low"
    assert any(e.kind == "promoted" and "val_loss" in e.message for e in events)
    if mode == "synchronous":
        assert promoted(engine) == best_by(engine, "val_loss", 4)
        return
    # ASHA: each promotion is in the top 1/4 by val_loss of the low results so far, or, once all 16 are in,
    # the best by val_loss of those not promoted yet
    loss = {t.number: t.user_attrs["metrics_low"]["val_loss"] for t in engine.trials()}
    done, moved = [], []
    for event in events:
        if event.kind == "level-done" and event.message.startswith("low:"):
            done.append(event.number)
        elif event.kind == "promoted":
            ranked = sorted(done, key=loss.__getitem__)
            fill = [n for n in ranked if n not in moved][: 4 - len(moved)] if len(done) == 16 else []
            assert event.number in ranked[: len(done) // 4] or event.number in fill, (event, ranked)
            moved.append(event.number)
    assert len(moved) == 4


def test_ties_of_the_rank_metric_are_broken_by_the_tie_break_metric_not_the_trial_number(tmp_path):
    # cer takes 2 values over 16 configurations: the 4 promoted are the best cer, then the lowest val_loss among them
    manifest = ladder_manifest(tmp_path, name="tie-break", initial=16, eta=4, parallelism=4, levels=ranked_levels(
        {"metric": "cer", "tieBreak": {"metric": "val_loss", "direction": "minimize"}}))
    engine, outcome, _ = run_in_process(tmp_path, manifest, MetricsBackend())
    assert outcome.state == "Succeeded", outcome.message
    trials = engine.trials()
    order = sorted(trials, key=lambda t: (t.user_attrs["metrics_low"]["cer"], t.user_attrs["metrics_low"]["val_loss"]))
    cut = [(t.user_attrs["metrics_low"]["cer"], t.user_attrs["metrics_low"]["val_loss"]) for t in order[3:5]]
    assert cut[0] < cut[1], "the test needs a strict cut"
    assert promoted(engine) == {t.number for t in order[:4]}
    best_cer = min(t.user_attrs["metrics_low"]["cer"] for t in trials)
    assert sum(t.user_attrs["metrics_low"]["cer"] == best_cer for t in trials) > 4, "cer alone ties at the cut"


def test_without_a_tie_break_metric_ties_go_to_the_run_that_finished_first(tmp_path):
    # every low WER is 1.0; later trials run shorter, so the first to finish are not the first numbers
    manifest = ladder_manifest(tmp_path, name="first-finished", initial=16, eta=4, parallelism=8, levels=ranked_levels(
        {"metric": "wer"}))
    engine, outcome, _ = run_in_process(tmp_path, manifest, MetricsBackend(delay=lambda number: 0.05 * (16 - number)))
    assert outcome.state == "Succeeded", outcome.message
    by_finish = sorted(engine.trials(), key=lambda t: t.user_attrs["finished_low"])
    assert {t.number for t in by_finish[:4]} != {0, 1, 2, 3}
    assert promoted(engine) == {t.number for t in by_finish[:4]}


def test_the_proxy_correlation_compares_each_levels_rank_metric(tmp_path):
    # low ranks by val_loss and high by WER, which follows val_loss at high: the proxy ranks perfectly
    manifest = ladder_manifest(tmp_path, name="rank-rho", initial=32, eta=2, parallelism=4,
                               levels=ranked_levels({"metric": "val_loss"}))
    engine, outcome, events = run_in_process(tmp_path, manifest, MetricsBackend())
    assert outcome.state == "Succeeded", outcome.message
    assert engine.study.user_attrs[CORRELATIONS]["low->high"] == {"rho": 1.0, "pairs": 16, "unreliable": False}
    # by the objective alone the same proxy ranks nothing (every low WER is 1.0)
    flat, outcome, events = run_in_process(tmp_path, ladder_manifest(tmp_path, name="objective-rho", initial=32, eta=2, parallelism=4,
                                                                     levels=ranked_levels()), MetricsBackend())
    assert flat.study.user_attrs[CORRELATIONS]["low->high"] == {"rho": 0.0, "pairs": 16, "unreliable": True}
    assert any(e.kind == "proxy-unreliable" and "(by wer)" in e.message for e in events)


def test_a_run_that_never_reports_its_levels_rank_metric_fails_naming_it(tmp_path):
    manifest = ladder_manifest(tmp_path, name="no-val-loss", initial=4, eta=2, parallelism=2,
                               levels=ranked_levels({"metric": "val_loss"}))
    manifest["spec"]["maxFailedTrials"] = 10
    engine, outcome, _ = run_in_process(tmp_path, manifest, MetricsBackend(reported=("wer", "cer")))
    failed = [t for t in engine.trials() if t.state == TrialState.FAIL]
    assert len(failed) == 4
    assert failed[0].user_attrs["fail_reason"] == "NoMetrics"
    assert "level low ranks by val_loss, but the run reported no val_loss (it reported cer, wer)" in failed[0].user_attrs["fail_message"]


def test_a_level_ranks_by_its_metrics_last_value_when_the_final_line_omits_it(tmp_path):
    manifest = ladder_manifest(tmp_path, name="final-wer-only", initial=8, eta=2, parallelism=2,
                               levels=ranked_levels({"metric": "val_loss"}))
    engine, outcome, _ = run_in_process(tmp_path, manifest, MetricsBackend(final_metrics=("wer",)))
    assert outcome.state == "Succeeded", outcome.message
    assert promoted(engine) == best_by(engine, "val_loss", 4)


@pytest.mark.parametrize("mode", ["synchronous", "asynchronous"])
def test_hyperband_brackets_start_their_configurations_at_higher_levels(tmp_path, mode):
    manifest = ladder_manifest(tmp_path, name=f"brackets-{mode}", initial=16, eta=2, mode=mode, parallelism=4)
    manifest["spec"]["fidelity"]["brackets"] = 3
    study = spec.parse_study(manifest)
    assert study.fidelity.bracket_sizes() == [[16, 8, 4], [0, 12, 6], [0, 0, 12]]
    backend = MetricsBackend(flat_wer=False)
    engine, outcome, events = run_in_process(tmp_path, manifest, backend)
    assert outcome.state == "Succeeded", outcome.message
    trials = engine.trials()
    assert len(trials) == 16 + 12 + 12 == engine.scheduler.total_trials()
    assert Counter(level for _, level in backend.launches) == {0: 16, 1: 8 + 12, 2: 4 + 6 + 12}
    assert len(backend.launches) == len(set(backend.launches)), "no level of a configuration runs twice"
    by_bracket = {b: [t for t in trials if t.user_attrs.get("bracket", 0) == b] for b in range(3)}
    assert [min(t.intermediate_values) for t in by_bracket[1]] == [1] * 12, "bracket 1 starts at medium"
    assert [set(t.intermediate_values) for t in by_bracket[2]] == [{2}] * 12
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: 22, TrialState.PRUNED: 18}
    # promotions stay in their bracket: 6 of bracket 1's 12 medium runs go on (synchronous: exactly its best half by WER;
    # ASHA promotes the top 1/eta of the results so far, which depends on the order runs end in)
    medium = sorted(by_bracket[1], key=lambda t: (t.intermediate_values[1], t.user_attrs["finished_medium"]))
    promoted_in_bracket_1 = {t.number for t in by_bracket[1] if 2 in t.intermediate_values}
    assert len(promoted_in_bracket_1) == 6
    if mode == "synchronous":
        assert promoted_in_bracket_1 == {t.number for t in medium[:6]}
    # correlation pairs come from every bracket that ran both levels
    assert engine.study.user_attrs[CORRELATIONS]["medium->high"]["pairs"] == 4 + 6
    statuses = engine.scheduler.bracket_status()
    assert [(b["startLevel"], b["sizes"], b["sampled"]) for b in statuses] == [
        ("low", [16, 8, 4], 16), ("medium", [12, 6], 12), ("high", [12], 12)]
    assert [rung["size"] for rung in engine.scheduler.rungs()] == [16, 20, 22]
