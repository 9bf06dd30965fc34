"""A stage's handoff (seed sections 5 and 11): its own trainer and search space, and the best
checkpoint or the reported parameters of earlier stages, with the real local backend and the fake trainer."""

import json
import sys
from pathlib import Path

import optuna
import pytest

from speechtune import record, spec
from tests.speechtune.schedulers.test_stages import run_study

FAKE = [sys.executable, "-m", "speechtune.fake_trainer"]
ACOUSTIC_SPACE = [
    {"name": "lr", "float": {"low": 1e-5, "high": 1e-2, "log": True}},
    {"name": "num_layers", "int": {"low": 2, "high": 16}},
]
VOCODER_SPACE = [{"name": "x", "float": {"low": -1.0, "high": 1.0}}]


def manifest(tmp_path, name, stages, space=ACOUSTIC_SPACE, keep_best=1, **extra):
    return {
        "metadata": {"name": name},
        "spec": {
            "parallelism": 2, "searchSpace": space, "stages": stages, "checkpoints": {"keepBest": keep_best},
            "trialTemplate": {"command": FAKE, "args": ["--epochs", "3"]},
            "storage": {"url": f"sqlite:///{tmp_path}/{name}.db"}, **extra,
        },
    }


TWO_STAGES = [
    {"name": "acoustic-default", "kind": "baseline"},
    {"name": "acoustic", "kind": "search", "maxTrials": 4, "sampler": {"type": "random", "seed": 3}},
    {"name": "vocoder", "kind": "search", "maxTrials": 3, "sampler": {"type": "random", "seed": 4},
     "trialTemplate": {"command": FAKE, "args": ["--epochs", "2"]}, "searchSpace": VOCODER_SPACE,
     "handoff": {"from": ["acoustic-default", "acoustic"], "checkpointFlag": "acoustic_checkpoint"}},
    {"name": "validate", "kind": "validate", "seeds": 1},
]


def loaded(checkpoint: str) -> dict:
    return json.loads(Path(checkpoint).read_text())["loaded"]


def test_a_stage_with_its_own_trainer_loads_the_best_checkpoint_of_the_stages_it_names(tmp_path):
    engine, outcome, events = run_study(tmp_path, manifest(tmp_path, "tts", TWO_STAGES))
    assert outcome.state == "Succeeded", outcome.message
    trials = engine.study.trials
    first = [t for t in trials if record.stage(t) in ("acoustic-default", "acoustic")]
    best_first = min((t for t in first if t.value is not None), key=lambda t: (t.value, t.number))
    vocoder = [t for t in trials if record.stage(t) == "vocoder"]
    assert len(vocoder) == 3 and all(set(t.params) == {"x"} for t in vocoder), "the stage samples its own space only"
    taken = record.stages(engine.study.user_attrs)["vocoder"]["handoff"]
    assert taken["trial"] == best_first.number and taken["flag"] == "acoustic_checkpoint"
    assert taken["checkpoint"] == record.checkpoint(best_first)
    # What the vocoder runs loaded, as the trainer itself recorded it in its checkpoint (keepBest 1 left the best one's):
    kept = [tmp_path / "checkpoints" / f"trial-{t.number}" / "last.ckpt" for t in vocoder]
    kept = [json.loads(path.read_text()) for path in kept if path.is_file()]
    assert kept and all(ran["loaded"] == {"acoustic_checkpoint": taken["checkpoint"]} for ran in kept)
    assert all(ran["epoch"] == 2 for ran in kept), "the stage's own trainer args (--epochs 2) ran"
    handoffs = [e for e in events if e.kind == "handoff"]
    assert len(handoffs) == 1 and f"--acoustic_checkpoint={taken['checkpoint']}" in handoffs[0].message
    # keepBest 1 keeps the study's best (a vocoder trial, started 3 epochs ahead) and the checkpoint handed on.
    assert Path(taken["checkpoint"]).is_file()
    assert set(record.kept_checkpoints(engine.study.user_attrs)) == {str(engine.study.best_trial.number), str(best_first.number)}
    # validate retrains the best (a vocoder trial) with its stage's trainer and handoff: the same value, not a cold start's.
    assert record.stage(engine.study.best_trial) == "vocoder"
    validation = engine.study.user_attrs[record.VALIDATION]
    assert abs(validation["mean"] - engine.study.best_value) < 0.02, (validation, engine.study.best_value)


SUPERNET = {"name": "supernet", "kind": "baseline",
            "trialTemplate": {"command": FAKE, "args": ["--epochs", "2", "--derive", "num_layers=4|8|12", "--derive", "encoder=conformer|lstm"]}}


def test_the_parameters_a_trial_reports_are_handed_on_and_held_in_every_run_of_the_next_stage(tmp_path):
    stages = [SUPERNET, {"name": "retrain", "kind": "search", "maxTrials": 3, "handoff": {"from": ["supernet"], "params": True}}]
    space = [{"name": "lr", "float": {"low": 1e-5, "high": 1e-2, "log": True}}]
    engine, outcome, events = run_study(tmp_path, manifest(tmp_path, "darts", stages, space=space, keep_best=5))
    assert outcome.state == "Succeeded", outcome.message
    supernet = next(t for t in engine.study.trials if record.stage(t) == "supernet")
    derived = supernet.user_attrs[record.REPORTED_PARAMS]
    assert set(derived) == {"num_layers", "encoder"} and derived["num_layers"] in (4, 8, 12)
    retrain = [t for t in engine.study.trials if record.stage(t) == "retrain"]
    assert len(retrain) == 3 and all(set(t.params) == {"lr"} for t in retrain)
    for trial in retrain:
        ran = json.loads((tmp_path / "checkpoints" / f"trial-{trial.number}" / "last.ckpt").read_text())["params"]
        assert {name: ran[name] for name in derived} == {name: str(value) for name, value in derived.items()}
    assert record.stages(engine.study.user_attrs)["retrain"]["handoff"]["params"] == derived
    assert any(e.kind == "handoff" and f"num_layers={derived['num_layers']}" in e.message for e in events)


def test_a_handoff_with_nothing_to_hand_on_fails_the_study_naming_the_field_and_starts_nothing(tmp_path):
    stages = [{**SUPERNET, "trialTemplate": {"command": FAKE, "args": ["--epochs", "2"]}},
              {"name": "retrain", "kind": "search", "maxTrials": 3, "handoff": {"from": ["supernet"], "params": True}}]
    engine, outcome, _ = run_study(tmp_path, manifest(tmp_path, "nothing", stages))
    assert outcome.state == "Failed"
    assert "spec.stages[1].handoff.params" in outcome.message and "reported no params" in outcome.message
    assert [record.stage(t) for t in engine.study.trials] == ["supernet"]


def test_a_trial_whose_final_line_reports_bad_params_fails_naming_them(tmp_path):
    line = json.dumps({"speechtune": 1, "final": True, "wer": 0.5, "params": {"num layers": 3}})
    stages = [{"name": "only", "kind": "baseline", "trialTemplate": {"command": [sys.executable, "-c", f"print({line!r})"]}}]
    engine, outcome, _ = run_study(tmp_path, manifest(tmp_path, "bad", stages, maxFailedTrials=0))
    trial = engine.study.trials[0]
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.user_attrs[record.FAIL_REASON] == "BadParams" and "num layers" in trial.user_attrs[record.FAIL_MESSAGE]


OWN = {"command": FAKE}


@pytest.mark.parametrize("stages, extra, field, words", [
    ([{"name": "a", "kind": "search", "maxTrials": 2, "handoff": {"from": ["b"], "params": True}}], {}, "spec.stages[0].handoff.from", "earlier"),
    ([{"name": "a", "kind": "search", "maxTrials": 2}, {"name": "v", "kind": "validate"},
      {"name": "b", "kind": "search", "maxTrials": 2, "handoff": {"from": ["v"], "params": True}}], {}, "spec.stages[2].handoff.from", "earlier"),
    ([{"name": "a", "kind": "search", "maxTrials": 2},
      {"name": "b", "kind": "search", "maxTrials": 2, "handoff": {"from": "a", "params": True}}], {}, "spec.stages[1].handoff.from", "a list"),
    ([{"name": "a", "kind": "search", "maxTrials": 2},
      {"name": "b", "kind": "search", "maxTrials": 2, "handoff": {"from": ["a"]}}], {}, "spec.stages[1].handoff", "does nothing"),
    ([{"name": "a", "kind": "search", "maxTrials": 2},
      {"name": "b", "kind": "search", "maxTrials": 2, "handoff": {"from": ["a"], "checkpointFlag": "lr"}}], {},
     "spec.stages[1].handoff.checkpointFlag", "also a parameter"),
    ([{"name": "a", "kind": "search", "maxTrials": 2},
      {"name": "b", "kind": "search", "maxTrials": 2, "handoff": {"from": ["a"], "checkpointFlag": "acoustic-checkpoint"}}], {},
     "spec.stages[1].handoff.checkpointFlag", "flag name"),
    ([{"name": "a", "kind": "search", "maxTrials": 2},
      {"name": "b", "kind": "search", "maxTrials": 2, "handoff": {"from": ["a"], "checkpointFlag": "ckpt"}}], {"checkpoints": {}},
     "spec.stages[1].handoff.checkpointFlag", "keepBest"),
    ([{"name": "a", "kind": "search", "maxTrials": 2, "trialTemplate": OWN}], {}, "spec.stages[0].searchSpace", "is required"),
    ([{"name": "a", "kind": "search", "maxTrials": 2, "trialTemplate": {"args": ["--x"]}, "searchSpace": VOCODER_SPACE}], {},
     "spec.stages[0].trialTemplate.command", "is required"),
    ([{"name": "a", "kind": "search", "maxTrials": 2, "trialTemplate": {**OWN, "resources": {}}, "searchSpace": VOCODER_SPACE}], {},
     "spec.stages[0].trialTemplate.resources", "unknown field"),
    ([{"name": "a", "kind": "search", "trialTemplate": OWN, "searchSpace": VOCODER_SPACE,
       "fidelity": {"levels": [{"name": "l", "overrides": {}}, {"name": "h", "overrides": {}}], "initialTrials": 4}}],
     {"pruner": {"type": "none"}}, "spec.stages[0].fidelity", "own trialTemplate"),
    ([{"name": "a", "kind": "search", "maxTrials": 2, "trialTemplate": OWN, "searchSpace": VOCODER_SPACE}],
     {"trialTemplate": {"command": FAKE, "workers": {"mode": "warm"}}}, "spec.stages[0].trialTemplate", "warm"),
    ([{"name": "a", "kind": "baseline", "searchSpace": VOCODER_SPACE}], {}, "spec.stages[0].searchSpace", "own trialTemplate"),
])
def test_a_bad_handoff_or_stage_trainer_is_rejected_naming_its_field(tmp_path, stages, extra, field, words):
    document = manifest(tmp_path, "bad", stages)
    document["spec"].update(extra)
    with pytest.raises(spec.SpecError) as error:
        spec.parse_study(document)
    assert any(path == field and words in message for path, message in error.value.problems), error.value.problems


def test_a_stage_with_its_own_trainer_has_its_own_conditional_space_outside_the_studys(tmp_path):
    own_space = [{"name": "generator", "categorical": ["small", "large"]},
                 {"name": "channels", "int": {"low": 32, "high": 128}, "when": {"generator": ["large"]}}]
    stages = [{"name": "a", "kind": "search", "maxTrials": 2},
              {"name": "b", "kind": "search", "maxTrials": 2, "trialTemplate": OWN, "searchSpace": own_space}]
    study = spec.parse_study(manifest(tmp_path, "own", stages))
    assert [p.name for p in study.stages[1].space(study.search_space)] == ["generator", "channels"]
    assert study.template_of(study.stages[1]).command == tuple(FAKE) and study.template_of(study.stages[1]).args == ()
    assert study.template_of(study.stages[0]) is study.trial_template
