"""Warm start and transfer (seed section 12): a study that starts from another, with the fake trainer."""

import asyncio
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from speechtune import record, spec
from speechtune.executor import Executor
from speechtune.local import LocalProcessBackend
from speechtune.schedulers import region as regions
from speechtune.storage import WriteThroughStorage, open_rdb

SPACE = [
    {"name": "lr", "float": {"low": 1e-5, "high": 1e-2, "log": True}},
    {"name": "num_layers", "int": {"low": 2, "high": 16}},
    {"name": "encoder", "categorical": ["conformer", "transformer", "lstm", "gru"]},
]


def manifest(tmp_path, name, *, max_trials=8, warm=None, keep=0, sampler=None):
    return {
        "metadata": {"name": name},
        "spec": {
            "maxTrials": max_trials, "parallelism": 2, "searchSpace": SPACE,
            "sampler": sampler or {"type": "random", "seed": 7},
            "trialTemplate": {"command": [sys.executable, "-m", "speechtune.fake_trainer"], "args": ["--epochs", "3"]},
            "storage": {"url": f"sqlite:///{tmp_path}/shared.db"},
            **({"warmStart": warm} if warm else {}), **({"checkpoints": {"keepBest": keep}} if keep else {}),
        },
    }


class RecordingBackend(LocalProcessBackend):
    def __init__(self, workdir):
        super().__init__(workdir)
        self.argvs = []

    async def launch(self, launch):
        self.argvs.append(launch.argv)
        return await super().launch(launch)


def run(tmp_path, body, check_files=True):
    study = spec.parse_study(body)
    events = []
    engine = Executor(study, WriteThroughStorage(open_rdb(study.storage.url)), RecordingBackend(tmp_path / study.name),
                      checkpoint_root=tmp_path / "checkpoints" / study.name, checkpoint_files_here=check_files, notify=events.append)
    engine.events = events
    return engine, asyncio.run(engine.run())


@pytest.fixture
def source(tmp_path):
    engine, outcome = run(tmp_path, manifest(tmp_path, "english", max_trials=10, keep=2))
    assert outcome.state == "Succeeded"
    return engine


def best_first(engine):
    return sorted(engine.trials((TrialState.COMPLETE,)), key=lambda t: t.value)


def test_top_k_enqueues_the_sources_best_configurations_first_and_the_end_says_how_they_did(tmp_path, source):
    engine, outcome = run(tmp_path, manifest(tmp_path, "spanish", warm={"study": "english", "topK": 3}))
    assert outcome.state == "Succeeded"
    queued = min(t.value for t in engine.trials()[:3])
    own = min(t.value for t in engine.trials()[3:])
    said = [e.message for e in engine.events if e.kind == "warm-start-report"]
    assert said == [f"warm start from english; its 3 configurations scored best {queued:.4g} here; this study's own 5 trials "
                    f"best {own:.4g}; " + ("the source's configurations stayed ahead" if queued <= own else "the search here found better than the source's")]
    first = engine.trials()[:3]
    assert [t.params for t in first] == [t.params for t in best_first(source)[:3]]
    assert [t.user_attrs[record.WARM_START_FROM] for t in first] == [f"english#{t.number}" for t in best_first(source)[:3]]


def test_fixed_holds_parameters_at_the_sources_best_and_narrow_bounds_the_rest(tmp_path, source):
    warm = {"study": "english", "fixed": ["encoder", "num_layers"], "narrow": {"topK": 3, "margin": 0.0}, "topK": 2}
    engine, outcome = run(tmp_path, manifest(tmp_path, "spanish", warm=warm))
    assert outcome.state == "Succeeded"
    best = best_first(source)[0]
    top = [t.params["lr"] for t in best_first(source)[:3]]
    for trial in engine.trials():
        assert (trial.params["encoder"], trial.params["num_layers"]) == (best.params["encoder"], best.params["num_layers"])
        assert min(top) * (1 - 1e-9) <= trial.params["lr"] <= max(top) * (1 + 1e-9)
    assert [t.params["lr"] for t in engine.trials()[:2]] == [t.params["lr"] for t in best_first(source)[:2]], "topK first"


def test_init_from_best_gives_every_run_the_sources_kept_checkpoint_and_pins_it(tmp_path, source):
    best = best_first(source)[0]
    kept = record.kept_checkpoints(source.study.user_attrs)
    assert set(kept) == {str(t.number) for t in best_first(source)[:2]}, "keepBest 2 keeps the two best"
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "english").iterdir()) == sorted(f"trial-{n}" for n in kept)
    engine, outcome = run(tmp_path, manifest(tmp_path, "spanish", warm={"study": "english", "initFrom": "best"}))
    assert outcome.state == "Succeeded"
    argvs = engine.backend.argvs
    assert len(argvs) == 8 and all(f"--init_from={kept[str(best.number)]}" in argv for argv in argvs)
    source_after = optuna.load_study(study_name="english", storage=f"sqlite:///{tmp_path}/shared.db")
    assert source_after.user_attrs[record.CHECKPOINT_PINS] == {"spanish": best.number}


def test_a_pinned_checkpoint_survives_the_sources_own_cleanup(tmp_path, source):
    best = best_first(source)[0]
    run(tmp_path, manifest(tmp_path, "spanish", max_trials=2, warm={"study": "english", "initFrom": "best"}))
    # The source runs on with a bigger budget; better trials would push the pinned one out of its best 2.
    more = manifest(tmp_path, "english", max_trials=30, keep=1, sampler={"type": "tpe", "seed": 1, "startupTrials": 3})
    run(tmp_path, more)
    kept = record.kept_checkpoints(optuna.load_study(study_name="english", storage=f"sqlite:///{tmp_path}/shared.db").user_attrs)
    assert str(best.number) in kept and Path(kept[str(best.number)]).is_file()


@pytest.mark.parametrize("warm, field, words", [
    ({"study": "nobody", "topK": 2}, "spec.warmStart.study", "no study 'nobody'"),
    ({"study": "english", "fixed": ["dropout"]}, "spec.warmStart.fixed", "has no parameter 'dropout'"),
])
def test_a_bad_source_is_rejected_before_any_trial_naming_the_field(tmp_path, source, warm, field, words):
    with pytest.raises(spec.SpecError) as error:
        run(tmp_path, manifest(tmp_path, "spanish", warm=warm))
    assert error.value.problems[0][0] == field and words in error.value.problems[0][1]
    assert "spanish" not in [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/shared.db")
                             if s.n_trials]


def test_a_source_without_kept_checkpoints_or_of_another_objective_is_rejected(tmp_path):
    run(tmp_path, manifest(tmp_path, "plain", max_trials=2))
    with pytest.raises(spec.SpecError, match="kept no checkpoint"):
        run(tmp_path, manifest(tmp_path, "spanish", warm={"study": "plain", "initFrom": "best"}))
    other = manifest(tmp_path, "spanish2", warm={"study": "plain", "topK": 1})
    other["spec"]["objective"] = {"metric": "cer", "direction": "minimize"}
    with pytest.raises(spec.SpecError, match="do not transfer"):
        run(tmp_path, other)
    optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path}/shared.db")
    with pytest.raises(spec.SpecError, match="no complete trial"):
        run(tmp_path, manifest(tmp_path, "spanish3", warm={"study": "empty", "topK": 1}))


def test_narrow_keeps_ranges_on_their_grid_and_categoricals_to_the_choices_seen():
    space = {"lr": FloatDistribution(1e-5, 1e-1, log=True), "layers": IntDistribution(2, 16, step=2),
             "encoder": CategoricalDistribution(["a", "b", "c"])}
    region = regions.narrow(space, [{"lr": 1e-3, "layers": 6, "encoder": "b"}, {"lr": 1e-2, "layers": 10, "encoder": "b"}], 0.1)
    assert region["encoder"].choices == ("b",)
    assert (region["layers"].low, region["layers"].high, region["layers"].step) == (4, 12, 2)
    assert region["lr"].low == pytest.approx(10 ** -3.4) and region["lr"].high == pytest.approx(10 ** -1.6)
    assert regions.contains(region, {"lr": 5e-3, "encoder": "b"}) and not regions.contains(region, {"encoder": "a"})


def test_warm_start_needs_something_to_do_and_init_from_is_best_only(tmp_path):
    with pytest.raises(spec.SpecError) as error:
        spec.parse_study(manifest(tmp_path, "x", warm={"study": "english", "initFrom": "last"}))
    assert {path for path, _ in error.value.problems} == {"spec.warmStart.initFrom", "spec.warmStart"}
