import asyncio
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState, create_trial

from speechtune import leaderboard, record, search, spec
from speechtune.executor import Executor
from speechtune.schedulers.region import RegionSampler
from speechtune.search import BoundedHistorySampler
from speechtune.storage import WriteThroughStorage, open_rdb
from tests.speechtune.k8s.test_manifests import RecordingBackend  # the in-process fake trainer, keeping every launch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def grown_study(n, best_at):
    """A study grown one trial at a time, the way the sampler sees it between asks."""
    sampler = BoundedHistorySampler(optuna.samplers.TPESampler(seed=0), window=40, elite=10)
    trials, windows = [], []
    for number in range(n):
        value = 0.01 if number == best_at else 0.5 + (number % 7) / 100
        trial = create_trial(params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)}, value=value)
        trial.number = number
        trials.append(trial)
        windows.append(sampler.select(list(trials), StudyDirection.MINIMIZE))
    return trials, windows


def test_small_studies_are_seen_whole():
    trials, windows = grown_study(30, best_at=3)
    assert windows[-1] == trials


def test_large_studies_are_cut_to_the_window_but_keep_the_best():
    trials, windows = grown_study(500, best_at=17)
    last = windows[-1]
    assert len(last) <= 40
    assert 17 in {t.number for t in last}, "the best trial stays in the window long after it left the tail"
    assert {t.number for t in last} >= set(range(470, 500)), "the most recent trials are in the window"


def test_running_trials_near_the_end_stay_visible():
    sampler = BoundedHistorySampler(optuna.samplers.TPESampler(seed=0), window=40, elite=10)
    trials = []
    for number in range(200):
        state = TrialState.RUNNING if number >= 195 else TrialState.COMPLETE
        trial = create_trial(params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)},
                             value=None if state == TrialState.RUNNING else 0.5, state=state)
        trial.number = number
        trials.append(trial)
    window = sampler.select(trials, StudyDirection.MINIMIZE)
    assert [t.number for t in window if t.state == TrialState.RUNNING] == [195, 196, 197, 198, 199]


# Conditional search spaces (issue 16): a parameter with `when` is sampled, and passed to the trainer, only where
# its parents took one of the listed choices; a chain (a conditional parent) needs the parent active too.
CONDITIONAL_SPACE = [
    {"name": "encoder", "categorical": ["conformer", "transformer", "lstm", "gru"]},
    {"name": "decoder", "categorical": ["ctc", "rnnt"]},
    {"name": "lr", "float": {"low": 1e-5, "high": 1e-2, "log": True}},
    {"name": "attention_heads", "int": {"low": 2, "high": 8, "step": 2}, "when": {"encoder": ["conformer", "transformer"]}},
    {"name": "attention_kind", "categorical": ["abs", "rel"], "when": {"encoder": ["conformer", "transformer"]}},
    {"name": "rel_window", "int": {"low": 8, "high": 64}, "when": {"attention_kind": ["rel"]}},  # a chain
    {"name": "conv_kernel", "categorical": [15, 31], "when": {"encoder": ["conformer"], "decoder": ["rnnt"]}},  # two parents
    {"name": "rnn_hidden", "int": {"low": 64, "high": 256, "log": True}, "when": {"encoder": ["lstm", "gru"]}},
]


def expected_flags(values: dict) -> set[str]:
    """The parameters that must reach the trainer, from the conditions written out by hand."""
    attention = values["encoder"] in ("conformer", "transformer")
    expected = {"encoder", "decoder", "lr"}
    if attention:
        expected |= {"attention_heads", "attention_kind"}
        if values["attention_kind"] == "rel":
            expected.add("rel_window")
    if values["encoder"] == "conformer" and values["decoder"] == "rnnt":
        expected.add("conv_kernel")
    if values["encoder"] in ("lstm", "gru"):
        expected.add("rnn_hidden")
    return expected


def conditional_study(tmp_path, sampler, trials, **extra):
    return spec.parse_study({"metadata": {"name": f"conditional-{sampler}"}, "spec": {
        "maxTrials": trials, "parallelism": 4, "sampler": {"type": sampler, "seed": 3, "startupTrials": 10},
        "searchSpace": CONDITIONAL_SPACE, "trialTemplate": {"command": ["trainer"], "args": ["--epochs=2"]},
        "storage": {"url": f"sqlite:///{tmp_path}/{sampler}.db"}, **extra}})


def run_engine(study):
    backend = RecordingBackend()
    engine = Executor(study, WriteThroughStorage(open_rdb(study.storage.url)), backend)
    assert asyncio.run(engine.run()).state == "Succeeded"
    return engine, backend


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_trial_gets_a_conditional_parameter_exactly_when_its_condition_holds(tmp_path, sampler):
    """200 trials through the engine (the scheduler asks, the backend gets the argv): each trial's command line
    carries a conditional parameter if and only if its condition holds, and every branch is explored."""
    engine, backend = run_engine(conditional_study(tmp_path, sampler, 200))
    assert len(backend.launches) == 200
    seen = Counter()
    for launch in backend.launches:
        flags = dict(arg[2:].split("=", 1) for arg in launch.argv if arg.startswith("--") and arg != "--epochs=2")
        assert set(flags) == expected_flags(flags), launch.argv
        assert set(launch.params) == set(flags)
        seen.update(flags.keys())
    assert all(seen[name] > 5 for name in ("attention_heads", "rel_window", "conv_kernel", "rnn_hidden")), seen
    for trial in engine.trials():  # what storage (status, optuna-dashboard) shows: the same parameters per trial
        assert set(trial.params) == expected_flags(trial.params)


def test_tpe_models_a_conditional_space_by_groups_and_a_flat_one_as_before():
    flat = search.build_sampler(spec.Sampler("tpe", 1), spec.parse_study(manifest_with([CONDITIONAL_SPACE[2]])).search_space)
    conditional = search.build_sampler(spec.Sampler("tpe", 1), spec.parse_study(manifest_with(CONDITIONAL_SPACE)).search_space)
    assert not flat.base._group and conditional.base._group and conditional.base._multivariate


def manifest_with(space, **fields):
    return {"metadata": {"name": "s"}, "spec": {"searchSpace": space, "trialTemplate": {"command": ["t"]}, **fields}}


def test_a_flat_space_samples_what_study_ask_with_fixed_distributions_did():
    """search.ask on a space without conditions suggests the same values, in the same order, as Optuna's own
    study.ask(distributions): existing studies and their seeds behave as before."""
    space = spec.parse_study(manifest_with(CONDITIONAL_SPACE[:3])).search_space
    dists = search.distributions(space)
    ours = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=5, n_startup_trials=3))
    theirs = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=5, n_startup_trials=3))
    for number in range(8):
        mine, other = search.ask(ours, dists, space), theirs.ask(dists)
        assert mine.params == other.params
        ours.tell(mine, number % 3)
        theirs.tell(other, number % 3)


def test_a_queued_configuration_keeps_only_its_active_parameters():
    """An enqueued configuration (warm start, a lost trial queued again) that names an inactive parameter runs
    without it: the condition decides, not the queue."""
    space = spec.parse_study(manifest_with(CONDITIONAL_SPACE)).search_space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"encoder": "lstm", "decoder": "ctc", "lr": 1e-3, "attention_heads": 4, "rnn_hidden": 128})
    trial = search.ask(study, search.distributions(space), space)
    assert trial.params == {"encoder": "lstm", "decoder": "ctc", "lr": 1e-3, "rnn_hidden": 128}


def test_a_region_bounds_group_tpe_too():
    """TPE with group=True samples a group from its own decomposition's distributions, not the narrowed ones
    the region sampler gives it: values outside the region are dropped and sampled again inside it."""
    space = spec.parse_study(manifest_with(CONDITIONAL_SPACE)).search_space
    dists = search.distributions(space)
    region = {"lr": FloatDistribution(1e-4, 2e-4, log=True), "rnn_hidden": IntDistribution(100, 120, log=True)}
    study = optuna.create_study(sampler=RegionSampler(search.build_sampler(spec.Sampler("tpe", 0, startup_trials=2), space), region))
    for number in range(40):
        trial = search.ask(study, dists, space)
        assert 1e-4 <= trial.params["lr"] <= 2e-4 and 100 <= trial.params.get("rnn_hidden", 100) <= 120, trial.params
        study.tell(trial, trial.params["lr"] * 1000 + number % 5)


def trainer_problems(argv) -> list[str]:
    """What the real trainer's flag check (speechtune-trainer asr, before it imports NeMo) says of a command line,
    but for the data, which is not made here."""
    trainer = pytest.importorskip("speechtune_trainer.cli")
    args = trainer.build_parser().parse_args(trainer.with_dashes(list(argv[1:])))
    return [found for found in trainer.config.problems(args) if not found.startswith("--data ")]


@pytest.mark.parametrize("flat", [False, True], ids=["conditional", "flat"])
def test_every_nas_blackbox_trial_passes_the_trainers_flag_check_only_with_the_conditions(tmp_path, flat):
    """examples/nas-blackbox.yaml, 60 trials sampled through the engine (the trainer itself not run): every command
    line passes the real trainer's flag check. The same space without its conditions sends --ctc_weight and
    --decoder_layers to trials of other decoders, which the trainer refuses."""
    document = yaml.safe_load((EXAMPLES / "nas-blackbox.yaml").read_text())
    document["spec"].update(maxTrials=60, storage={"url": f"sqlite:///{tmp_path}/nas.db"})
    if flat:
        for param in document["spec"]["searchSpace"]:
            param.pop("when", None)
    _, backend = run_engine(spec.parse_study(document))
    refused = {launch.number: trainer_problems(launch.argv) for launch in backend.launches}
    refused = {number: found for number, found in refused.items() if found}
    if flat:
        assert refused and all(problem.startswith(("--ctc-weight only applies to --decoder hybrid",
                                                   "--decoder-layers only applies to --decoder attention"))
                               for found in refused.values() for problem in found), refused
    else:
        assert not refused, refused


def test_the_leaderboard_shows_a_parameter_a_trial_does_not_have_as_a_blank(tmp_path):
    """Trials of a conditional space have different parameters: `speechtune status` (leaderboard.table) has a
    column for every parameter any row has, blank where a row's trial did not have it."""
    engine, _ = run_engine(conditional_study(tmp_path, "random", 16))
    board = leaderboard.rows(engine.study, 16)
    table = leaderboard.table(engine.study, "wer", 16)
    columns = {column.header: list(column._cells) for column in table.columns}
    assert {"attention_heads", "rnn_hidden", "conv_kernel"} <= set(columns)
    for index, row in enumerate(board):
        for name in ("attention_heads", "rel_window", "conv_kernel", "rnn_hidden"):
            assert (columns[name][index] == "") == (name not in row.params), (name, row.params)
    assert any(cell == "" for cell in columns["attention_heads"]) and any(cell != "" for cell in columns["attention_heads"])


LADDER = {"pruner": {"type": "none"}, "fidelity": {"levels": [{"name": "low", "overrides": {"epochs": 1}},
                                                              {"name": "high", "overrides": {"epochs": 2}}],
                                                   "reductionFactor": 2, "initialTrials": 16}}
STAGES = {"stages": [
    {"name": "baseline", "kind": "baseline", "params": {"encoder": "lstm", "decoder": "ctc", "lr": 1e-3, "rnn_hidden": 128}},
    {"name": "coarse", "kind": "search", "maxTrials": 12, "sampler": {"type": "random", "seed": 1}},
    {"name": "fine", "kind": "refine", "maxTrials": 12, "sampler": {"type": "tpe", "seed": 2, "startupTrials": 4}, "topK": 4},
    {"name": "fixed", "kind": "search", "maxTrials": 6, "fixed": {"encoder": "conformer"}},
]}


@pytest.mark.parametrize("shape", [LADDER, STAGES], ids=["ladder", "stages"])
def test_the_ladder_and_stages_ask_conditional_parameters_alike(tmp_path, shape):
    """Every scheduler asks through search.ask: a ladder's level runs, a baseline's given parameters, a refine
    stage's region (TPE with group=True inside it) and a stage's fixed parent all keep the conditions."""
    study = conditional_study(tmp_path, "tpe", 1, **shape)
    engine, backend = run_engine(study)
    assert len(backend.launches) >= 24
    for launch in backend.launches:
        assert set(launch.params) == expected_flags(launch.params), launch.argv
    if shape is STAGES:
        fixed = [t for t in engine.trials() if record.stage(t) == "fixed"]
        assert fixed and all(t.params["encoder"] == "conformer" and "attention_heads" in t.params for t in fixed)
