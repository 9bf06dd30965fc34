"""The engine against the real local backend and the fake trainer (subprocesses)."""

import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import optuna
import pytest
from optuna.trial import TrialState

from speechtune import fake_trainer, spec
from speechtune.executor import Executor
from speechtune.record import FAIL_REASON, INTERRUPTED
from speechtune.local import LocalProcessBackend
from speechtune.storage import WriteThroughStorage, open_rdb
from tests.support.studies import wait_for_trials

FAKE = ("python", "-m", "speechtune.fake_trainer")


def make_study(tmp_path, *, args=("--epochs", "9"), max_trials=8, parallelism=2, pruner=None, sampler=None, failures=3):
    return spec.parse_study({
        "metadata": {"name": "s"},
        "spec": {
            "maxTrials": max_trials,
            "parallelism": parallelism,
            "maxFailedTrials": failures,
            "sampler": sampler or {"type": "tpe", "seed": 3, "startupTrials": 4},
            "pruner": pruner or {"type": "none"},
            "searchSpace": [
                {"name": "lr", "float": {"low": 1e-5, "high": 1e-2, "log": True}},
                {"name": "num_layers", "int": {"low": 2, "high": 12}},
                {"name": "n_mels", "int": {"low": 40, "high": 128, "step": 8}},
            ],
            "trialTemplate": {"command": list(FAKE), "args": list(args)},
            "storage": {"url": f"sqlite:///{tmp_path}/s.db"},
        },
    })


def run_engine(study, tmp_path, backend=None):
    storage = WriteThroughStorage(open_rdb(study.storage.url))
    events = []
    engine = Executor(study, storage, backend or LocalProcessBackend(tmp_path / "logs"), notify=events.append)
    outcome = asyncio.run(engine.run())
    return engine, outcome, events


def test_study_completes_every_trial_with_the_trainers_values(tmp_path):
    engine, outcome, _ = run_engine(make_study(tmp_path, max_trials=4), tmp_path)
    assert outcome.state == "Succeeded"
    trials = engine.trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    for trial in trials:
        params = {name: str(value) for name, value in trial.params.items()}
        assert trial.intermediate_values == {step: fake_trainer.wer(params, step) for step in range(1, 10)}
        assert trial.value == fake_trainer.wer(params, 9)


def test_trial_gets_params_as_flags_and_as_json_env(tmp_path):
    script = tmp_path / "echo_params.py"
    script.write_text(
        "import json, os, sys\n"
        "from speechtune import report\n"
        "flags = dict(a[2:].split('=', 1) for a in sys.argv[1:] if a.startswith('--') and '=' in a)\n"
        "env = json.loads(os.environ['SPEECHTUNE_PARAMS'])\n"
        "assert sys.argv[1:3] == ['--template', 'arg'], sys.argv\n"
        "assert {k: str(v) for k, v in env.items()} == flags, (env, flags)\n"
        "report(step=1, wer=float(flags['lr']))\n"
    )
    study = make_study(tmp_path, max_trials=2)
    study = replace(study, trial_template=replace(study.trial_template, command=("python", str(script)), args=("--template", "arg")))
    engine, outcome, _ = run_engine(study, tmp_path)
    assert outcome.state == "Succeeded", outcome.message
    assert all(t.value == t.params["lr"] for t in engine.trials())


def test_hyperband_prunes_and_lets_the_best_continue(tmp_path):
    study = make_study(
        tmp_path, max_trials=24, parallelism=4,
        pruner={"type": "hyperband", "minResource": 1, "maxResource": 9, "reductionFactor": 3},
    )
    engine, outcome, events = run_engine(study, tmp_path)
    pruned = engine.trials((TrialState.PRUNED,))
    complete = engine.trials((TrialState.COMPLETE,))
    assert outcome.state == "Succeeded"
    assert len(pruned) >= 5 and len(complete) >= 1
    assert all(t.last_step < 9 or t.state == TrialState.COMPLETE for t in pruned + complete if t.last_step != 9)
    best = engine.best_trial()
    assert best.last_step == 9, "the best trial ran to the end"
    assert sum(e.kind == "pruned" for e in events) == len(pruned)


def test_parallelism_is_honoured(tmp_path):
    study = make_study(tmp_path, args=("--epochs", "3", "--sleep", "0.3"), max_trials=9, parallelism=3)
    engine, outcome, _ = run_engine(study, tmp_path)
    assert outcome.state == "Succeeded"
    spans = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in engine.trials()]
    peak = max(sum(1 for s, e in spans if s <= moment < e) for moment, _ in spans)
    assert peak == 3


def test_budget_change_takes_effect_while_running(tmp_path):
    study = make_study(tmp_path, args=("--epochs", "2", "--sleep", "0.2"), max_trials=20, parallelism=2)
    storage = WriteThroughStorage(open_rdb(study.storage.url))
    engine = Executor(study, storage, LocalProcessBackend(tmp_path / "logs"))

    async def run_and_shrink():
        task = asyncio.create_task(engine.run())
        await asyncio.sleep(1.0)
        engine.update_budget(max_trials=5)
        return await task

    outcome = asyncio.run(run_and_shrink())
    assert outcome.state == "Succeeded"
    assert len(engine.trials()) <= 5 + 2  # at most the running ones were already started


def test_junk_output_is_ignored(tmp_path):
    engine, outcome, _ = run_engine(make_study(tmp_path, args=("--epochs", "3", "--junk"), max_trials=2), tmp_path)
    assert outcome.state == "Succeeded"
    for trial in engine.trials():
        params = {name: str(value) for name, value in trial.params.items()}
        assert trial.intermediate_values == {step: fake_trainer.wer(params, step) for step in (1, 2, 3)}


@pytest.mark.parametrize(
    "args, reason, message",
    [
        (("--nan-at", "2"), "NaN", "objective wer is nan at step 2"),
        (("--fail-at", "2"), "Error", "exited with code 3: fake trainer: simulated crash at epoch 2"),
        (("--no-metrics",), "NoMetrics", "printed no protocol line with 'wer'"),
    ],
)
def test_failed_trials_record_the_reason(tmp_path, args, reason, message):
    study = make_study(tmp_path, args=("--epochs", "3", *args), max_trials=2, parallelism=1, failures=5)
    engine, outcome, _ = run_engine(study, tmp_path)
    assert outcome.state == "Succeeded"
    for trial in engine.trials():
        assert trial.state == TrialState.FAIL
        assert trial.user_attrs[FAIL_REASON] == reason
        assert message in trial.user_attrs["fail_message"]


def test_max_failed_trials_fails_the_study_and_stops_the_rest(tmp_path):
    study = make_study(tmp_path, args=("--epochs", "3", "--fail-at", "1"), max_trials=10, parallelism=2, failures=2)
    engine, outcome, events = run_engine(study, tmp_path)
    assert outcome.state == "Failed"
    assert "reaching spec.maxFailedTrials=2" in outcome.message and "simulated crash" in outcome.message
    assert len(engine.trials()) < 10
    assert not engine.trials((TrialState.RUNNING,))
    assert events[-1].kind == "study-failed"


def test_missing_command_is_a_launch_failure(tmp_path):
    study = make_study(tmp_path, max_trials=3, failures=1)
    study = replace(study, trial_template=replace(study.trial_template, command=("no-such-trainer-xyz",)))
    engine, outcome, _ = run_engine(study, tmp_path)
    assert outcome.state == "Failed"
    assert engine.trials()[0].user_attrs[FAIL_REASON] == "LaunchError"
    assert "no-such-trainer-xyz" in outcome.message


def test_sigkill_and_rerun_resumes_without_running_a_trial_number_twice(tmp_path):
    ledger = tmp_path / "ledger"
    study_file = tmp_path / "study.yaml"
    study_file.write_text(json.dumps({
        "metadata": {"name": "killed"},
        "spec": {
            "maxTrials": 12, "parallelism": 3,
            "sampler": {"type": "tpe", "seed": 1, "startupTrials": 4},
            "searchSpace": [{"name": "lr", "float": {"low": 1e-5, "high": 1e-2, "log": True}}],
            "trialTemplate": {"command": list(FAKE), "args": ["--epochs", "4", "--sleep", "0.25", "--ledger", str(ledger)]},
            "storage": {"url": f"sqlite:///{tmp_path}/killed.db"},
        },
    }))
    command = [sys.executable, "-m", "speechtune.cli", "run", str(study_file), "--workdir", str(tmp_path / "logs")]
    runner = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage_url = f"sqlite:///{tmp_path}/killed.db"
    wait_for_trials(storage_url, "killed", lambda trials: sum(t.state == TrialState.COMPLETE for t in trials) >= 4)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    time.sleep(0.5)  # the trials die with their runner (PDEATHSIG)
    first_run = ledger.read_text().split()

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr

    trials = optuna.load_study(study_name="killed", storage=storage_url).get_trials()
    launched = ledger.read_text().split()
    assert len(trials) == 12
    assert len(launched) == len(set(launched)), f"a trial number ran twice: {launched}"
    interrupted = [t for t in trials if t.user_attrs.get(FAIL_REASON) == INTERRUPTED]
    assert interrupted, "the kill landed while trials were running"
    assert not {t.number for t in interrupted} & set(map(int, launched[len(first_run):])), "an interrupted number ran again"
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
    assert len(trials) - len(interrupted) == len([t for t in trials if t.state == TrialState.COMPLETE])
    requeued = [t for t in trials if "requeued_from" in t.user_attrs]
    assert {t.user_attrs["requeued_from"] for t in requeued} == {t.number for t in interrupted}
    assert all(t.params == trials[t.user_attrs["requeued_from"]].params for t in requeued)


def best_of(sampler_type, seed, tmp_path):
    study = make_study(tmp_path / f"{sampler_type}{seed}", max_trials=40, parallelism=1,
                       sampler={"type": sampler_type, "seed": seed, "startupTrials": 10})
    (tmp_path / f"{sampler_type}{seed}").mkdir()
    engine, outcome, _ = run_engine(study, tmp_path, backend=fake_trainer.InProcessBackend(epochs=3))
    assert outcome.state == "Succeeded"
    return engine.best_trial().value


def test_tpe_beats_random_at_equal_budget_over_several_seeds(tmp_path):
    seeds = range(6)
    tpe = [best_of("tpe", seed, tmp_path) for seed in seeds]
    random = [best_of("random", seed, tmp_path) for seed in seeds]
    wins = sum(t < r for t, r in zip(tpe, random))
    assert statistics.mean(tpe) < statistics.mean(random), (tpe, random)
    assert wins >= 4, (tpe, random)


def test_hostile_numbers_fail_only_their_own_trial_and_never_the_runner(tmp_path):
    """Issue 14: a 400-digit WER or a step past SQL's INTEGER crashed `speechtune run` and left every trial RUNNING."""
    script = tmp_path / "hostile.py"
    script.write_text(
        "import sys\n"
        "from speechtune import report\n"
        "flags = dict(a[2:].split('=', 1) for a in sys.argv[1:] if a.startswith('--') and '=' in a)\n"
        "if int(flags['num_layers']) % 2:\n"
        "    print('{\"speechtune\": 1, \"step\": 2, \"wer\": ' + '9' * 400 + '}')\n"
        "    print('{\"speechtune\": 1, \"step\": 100000000000000000000, \"wer\": 0.5}', flush=True)\n"
        "else:\n"
        "    report(step=1, wer=0.4)\n"
    )
    study = make_study(tmp_path, max_trials=6, failures=10)
    study = replace(study, trial_template=replace(study.trial_template, command=("python", str(script)), args=()))
    engine, outcome, _ = run_engine(study, tmp_path)
    assert outcome.state == "Succeeded", outcome.message
    for trial in engine.trials():
        if trial.params["num_layers"] % 2:
            assert (trial.state, trial.user_attrs[FAIL_REASON]) == (TrialState.FAIL, "NoMetrics")
        else:
            assert (trial.state, trial.value) == (TrialState.COMPLETE, 0.4)


def test_an_error_inside_the_runner_fails_that_trial_with_the_exception_and_no_other(tmp_path, monkeypatch):
    from speechtune.schedulers.plain import PlainSearch

    real = PlainSearch.on_value

    def broken_for_trial_1(self, run, step, value):
        if run.trial.number == 1:
            raise ZeroDivisionError("a bug that only trial 1's output reaches")
        return real(self, run, step, value)

    monkeypatch.setattr(PlainSearch, "on_value", broken_for_trial_1)
    engine, outcome, _ = run_engine(make_study(tmp_path, args=("--epochs", "2"), max_trials=4), tmp_path)
    assert outcome.state == "Succeeded"
    states = {t.number: (t.state, t.user_attrs.get(FAIL_REASON), t.user_attrs.get("fail_message")) for t in engine.trials()}
    assert states[1] == (TrialState.FAIL, "RunnerError", "ZeroDivisionError: a bug that only trial 1's output reaches")
    assert all(state == TrialState.COMPLETE for number, (state, _, _) in states.items() if number != 1)


def test_a_grid_study_that_runs_its_whole_grid_succeeds(tmp_path):
    study = spec.parse_study({"metadata": {"name": "grid"}, "spec": {
        "maxTrials": 4, "parallelism": 2, "sampler": {"type": "grid"},
        "searchSpace": [{"name": "num_layers", "categorical": [2, 8]}, {"name": "n_mels", "categorical": [40, 80]}],
        "trialTemplate": {"command": list(FAKE), "args": ["--epochs", "2"]},
        "storage": {"url": f"sqlite:///{tmp_path}/grid.db"}}})
    engine, outcome, _ = run_engine(study, tmp_path)
    assert outcome.state == "Succeeded", outcome.message
    assert sorted((t.params["num_layers"], t.params["n_mels"]) for t in engine.trials()) == [(2, 40), (2, 80), (8, 40), (8, 80)]
