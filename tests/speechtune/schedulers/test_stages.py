"""Stages (seed section 13) with the real local backend and the fake trainer."""

import asyncio
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from speechtune import record, spec
from speechtune.executor import Executor
from speechtune.local import LocalProcessBackend
from speechtune.schedulers import region as regions
from speechtune.search import distributions
from speechtune.storage import WriteThroughStorage, open_rdb
from tests.support.studies import wait_for_trials

REPO = Path(__file__).resolve().parents[3]
SPACE = [
    {"name": "lr", "float": {"low": 1e-5, "high": 1e-2, "log": True}},
    {"name": "num_layers", "int": {"low": 2, "high": 16}},
    {"name": "encoder", "categorical": ["conformer", "transformer", "lstm", "gru"]},
]
STAGES = [
    {"name": "baseline", "kind": "baseline", "params": {"lr": 1e-3, "num_layers": 4, "encoder": "lstm"}, "seeds": 2},
    {"name": "coarse", "kind": "search", "maxTrials": 10, "sampler": {"type": "random", "seed": 1}},
    {"name": "fine", "kind": "refine", "maxTrials": 8, "sampler": {"type": "tpe", "seed": 2, "startupTrials": 3}, "topK": 3},
    {"name": "validate", "kind": "validate", "seeds": 2},
]


def staged_manifest(tmp_path, name="staged", stages=STAGES, args=("--epochs", "4"), **extra):
    return {
        "metadata": {"name": name},
        "spec": {
            "parallelism": 3, "searchSpace": SPACE, "stages": stages,
            "trialTemplate": {"command": [sys.executable, "-m", "speechtune.fake_trainer"], "args": list(args)},
            "storage": {"url": f"sqlite:///{tmp_path}/{name}.db"}, **extra,
        },
    }


class StopWatchingBackend(LocalProcessBackend):
    """The real local backend; each stop() looks the trial up in the database (a fresh connection) first."""

    def __init__(self, workdir, url, study):
        super().__init__(workdir)
        self.url, self.study, self.seen_at_stop = url, study, []

    async def launch(self, launch):
        run = await super().launch(launch)
        stop = run.stop

        async def watched_stop():
            trial = optuna.load_study(study_name=self.study, storage=self.url).trials[launch.number]
            self.seen_at_stop.append((launch.number, launch.attempt, trial.state))
            await stop()

        run.stop = watched_stop
        return run


def run_study(tmp_path, manifest, backend=None):
    study = spec.parse_study(manifest)
    events = []
    engine = Executor(study, WriteThroughStorage(open_rdb(study.storage.url)), backend or LocalProcessBackend(tmp_path / "logs"),
                      notify=events.append, checkpoint_root=tmp_path / "checkpoints")
    outcome = asyncio.run(engine.run())
    return engine, outcome, events


def test_stages_run_in_order_each_to_its_budget_and_tag_their_trials(tmp_path):
    engine, outcome, events = run_study(tmp_path, staged_manifest(tmp_path))
    assert outcome.state == "Succeeded", outcome.message
    trials = engine.trials()
    assert Counter(record.stage(t) for t in trials) == {"baseline": 2, "coarse": 10, "fine": 8}
    order = [record.stage(t) for t in sorted(trials, key=lambda t: t.datetime_start)]
    assert order == sorted(order, key=["baseline", "coarse", "fine"].index), "a stage started before the one before it ended"
    assert sorted(t.user_attrs[record.SEED] for t in trials if record.stage(t) == "baseline") == [0, 1]
    assert all(t.params == {"lr": 1e-3, "num_layers": 4, "encoder": "lstm"} for t in trials if record.stage(t) == "baseline")
    stages = record.stages(engine.study.user_attrs)
    assert list(stages) == ["baseline", "coarse", "fine", "validate"]
    assert all(found["state"] == "Succeeded" for found in stages.values())
    assert stages["baseline"]["std"] > 0, "two seeds of the baseline differ"
    assert stages["validate"]["seeds"] == 2 and stages["validate"]["trial"] == engine.best_trial().number
    kinds = [(e.kind, e.message.split()[1]) for e in events if e.kind.startswith("stage-")]
    assert kinds == [(kind, name) for name in ("baseline", "coarse", "fine", "validate") for kind in ("stage-started", "stage-finished")]


def test_refine_samples_only_inside_the_region_around_the_earlier_top_k(tmp_path):
    engine, outcome, _ = run_study(tmp_path, staged_manifest(tmp_path, stages=STAGES[:3]))
    assert outcome.state == "Succeeded"
    trials = engine.trials()
    earlier = sorted((t for t in trials if record.stage(t) in ("baseline", "coarse")), key=lambda t: t.value)[:3]
    expected = regions.narrow(distributions(spec.parse_study(staged_manifest(tmp_path)).search_space), [t.params for t in earlier], 0.1)
    assert record.stages(engine.study.user_attrs)["fine"]["region"] == regions.describe(expected)
    assert len(expected["encoder"].choices) < 4 or expected["lr"].high - expected["lr"].low < 1e-2 - 1e-5, "the region is narrower"
    fine = [t for t in trials if record.stage(t) == "fine"]
    assert fine and all(regions.contains(expected, t.params) for t in fine)
    # Storage keeps the study's full distributions: optuna-dashboard and importances see one consistent space.
    assert {t.distributions["encoder"].choices for t in fine} == {("conformer", "transformer", "lstm", "gru")}


def test_every_run_is_recorded_before_it_is_stopped(tmp_path):
    """A runner killed between stop and record would call a trial that ran 'interrupted': the order is checked
    at each stop() against the database, for pruned plain-search trials and for a ladder level that fails."""
    stages = [
        {"name": "coarse", "kind": "search", "maxTrials": 8, "sampler": {"type": "random", "seed": 3},
         "pruner": {"type": "median", "startupTrials": 2, "warmupSteps": 1}},
        {"name": "ladder", "kind": "search", "sampler": {"type": "random", "seed": 4},
         "fidelity": {"levels": [{"name": "low", "overrides": {"epochs": 1}}, {"name": "high", "overrides": {"epochs": 3}}],
                      "reductionFactor": 2, "initialTrials": 4, "resumeFromCheckpoint": False}},
    ]
    manifest = staged_manifest(tmp_path, stages=stages, args=("--epochs", "6", "--fail-at", "2"), maxFailedTrials=10)
    manifest["spec"]["stages"][0]["pruner"] = {"type": "median", "startupTrials": 1, "warmupSteps": 0}
    study = spec.parse_study(manifest)
    backend = StopWatchingBackend(tmp_path / "logs", study.storage.url, study.name)
    engine, outcome, _ = run_study(tmp_path, manifest, backend)
    ladder_failures = [t for t in engine.trials() if record.stage(t) == "ladder" and t.state == TrialState.FAIL]
    assert ladder_failures and all("at level high" in t.user_attrs[record.FAIL_MESSAGE] for t in ladder_failures)
    stopped = {number: state for number, _, state in backend.seen_at_stop}
    assert {t.number for t in ladder_failures} <= set(stopped)
    assert all(state.is_finished() for state in stopped.values()), backend.seen_at_stop


def test_sigkill_at_a_stage_transition_resumes_without_rerunning_a_stage(tmp_path):
    manifest = staged_manifest(tmp_path, name="killed", args=("--epochs", "3", "--sleep", "0.2"))
    path = tmp_path / "killed.yaml"
    import yaml

    path.write_text(yaml.safe_dump(manifest))
    command = [sys.executable, "-m", "speechtune.cli", "run", str(path), "--workdir", str(tmp_path / "work")]
    runner = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = manifest["spec"]["storage"]["url"]

    def coarse_done(_trials):
        found = record.stages(optuna.load_study(study_name="killed", storage=url).user_attrs)
        return found.get("coarse", {}).get("state") == "Succeeded"

    wait_for_trials(url, "killed", coarse_done)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    before = record.stages(optuna.load_study(study_name="killed", storage=url).user_attrs)
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    study = optuna.load_study(study_name="killed", storage=url)
    after = record.stages(study.user_attrs)
    # Each stage to its budget; a trial the kill interrupted counts toward it and runs again as a new trial.
    assert Counter(record.stage(t) for t in study.trials) == {"baseline": 2, "coarse": 10, "fine": 8}
    interrupted = {t.number for t in study.trials if record.is_interrupted(t)}
    assert interrupted == {t.user_attrs[record.REQUEUED_FROM] for t in study.trials if record.REQUEUED_FROM in t.user_attrs}
    assert all(record.stage(t) == "fine" for t in study.trials if t.number in interrupted)
    assert after["coarse"] == before["coarse"], "a finished stage was not run or recorded again"
    assert all(found["state"] == "Succeeded" for found in after.values())


@pytest.mark.parametrize("stages, field, words", [
    ([{"name": "x", "kind": "validate"}], "spec.stages[0].kind", "needs an earlier"),
    ([{"name": "a", "kind": "search"}], "spec.stages[0].maxTrials", "is required"),
    ([{"name": "a", "kind": "search", "maxTrials": 2}, {"name": "a", "kind": "refine", "maxTrials": 2}], "spec.stages[1].name", "duplicate"),
    ([{"name": "a", "kind": "search", "maxTrials": 2, "topK": 3}], "spec.stages[0].topK", "unknown field"),
    ([{"name": "a", "kind": "search", "maxTrials": 2, "searchSpace": [{"name": "lr", "float": {"low": 1e-6, "high": 1e-3}}]}],
     "spec.stages[0].searchSpace[0]", "inside spec.searchSpace"),
    ([{"name": "a", "kind": "bake", "maxTrials": 2}], "spec.stages[0].kind", "one of"),
    ([{"name": "a", "kind": "search", "maxTrials": 2}, {"name": "b", "kind": "refine", "maxTrials": 2, "margin": 2}],
     "spec.stages[1].margin", "[0, 1]"),
])
def test_a_bad_stage_is_rejected_naming_its_field(tmp_path, stages, field, words):
    with pytest.raises(spec.SpecError) as error:
        spec.parse_study(staged_manifest(tmp_path, stages=stages))
    assert any(path == field and words in message for path, message in error.value.problems), error.value.problems


def test_validation_seeds_and_a_top_level_ladder_are_rejected_with_stages(tmp_path):
    manifest = staged_manifest(tmp_path, validation={"seeds": 2},
                               fidelity={"levels": [{"name": "a", "overrides": {}}, {"name": "b", "overrides": {}}], "initialTrials": 4})
    with pytest.raises(spec.SpecError) as error:
        spec.parse_study(manifest)
    assert {"spec.validation.seeds", "spec.fidelity"} <= {path for path, _ in error.value.problems}


def test_the_fake_staged_example_is_valid_and_sums_its_budget():
    study = spec.load_study(REPO / "examples" / "fake-staged.yaml")
    assert [stage.kind for stage in study.stages] == ["baseline", "search", "refine", "validate"]
    assert study.max_trials == 1 + 20 + 30
