"""The replay backend (speechtune.replay): recorded curves as protocol lines, recorded costs charged,
the real engine on top. Uses bench/results/curves_fake.json, a recording of the fake trainer
(`bench/record_curves.py --trainer fake`): no NeMo."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
from pathlib import Path, PurePath

import pytest

from speechtune import spec
from speechtune.backend import build_launch
from speechtune.executor import Executor
from speechtune.local import LaunchError
from speechtune.protocol import parse_line
from speechtune.replay import Recording, ReplayBackend, ReplayStorage, VirtualClockLoop, run_virtual

RECORDING = Path(__file__).resolve().parents[2] / "bench" / "results" / "curves_fake.json"
TEMPLATE = spec.TrialTemplate(command=("replay",))


@pytest.fixture(scope="module")
def recording() -> Recording:
    return Recording.load(RECORDING)


def raw_run(recording: Recording, config_id: int, kind: str) -> dict:
    """The recording's own entry for a run, straight from the JSON (following same_as)."""
    runs = next(entry for entry in json.loads(RECORDING.read_text())["configs"] if entry["id"] == config_id)["runs"]
    while "same_as" in runs[kind]:
        kind = runs[kind]["same_as"]
    return runs[kind]


async def read(backend: ReplayBackend, launch) -> list:
    run = await backend.launch(launch)
    lines = [parse_line(raw) async for raw in run.lines()]
    assert (await run.wait()).succeeded
    return lines


@pytest.mark.parametrize("kind", ["full", "data", "model", "data-model"])
def test_the_replay_backend_reproduces_a_recorded_curve_exactly(recording, kind):
    config = recording.configs[3]
    recorded = raw_run(recording, config.id, kind)
    backend = ReplayBackend(recording)
    launch = build_launch("s", 0, TEMPLATE, config.params, overrides=recording.kinds[kind])
    lines = run_virtual(read(backend, launch))
    steps = [line for line in lines if not line.final]
    assert [line.step for line in steps] == list(range(1, recording.epochs + 1))
    assert [line.metrics for line in steps] == recorded["steps"]  # every value, as recorded
    final = lines[-1]
    assert final.final and {k: v for k, v in final.metrics.items() if not k.startswith("run_")} == recorded["steps"][-1]
    [charge] = backend.ledger
    assert (charge.config, charge.kind, charge.first, charge.last, charge.stopped) == (config.id, kind, 1, recording.epochs, False)
    assert charge.cpu_s == pytest.approx(recorded["run_cpu_s"], abs=1e-9)
    assert charge.wall_s == pytest.approx(recorded["run_wall_s"], abs=1e-9)


def test_fewer_epochs_print_the_first_epochs_and_a_resumed_run_continues_where_the_checkpoint_is(recording):
    config = recording.configs[5]
    recorded = raw_run(recording, config.id, "full")
    backend = ReplayBackend(recording)
    folder = {"checkpoint_dir": "/ckpt/trial-0/from-level-0"}
    low = run_virtual(read(backend, build_launch("s", 0, TEMPLATE, config.params, overrides={"epochs": 2, **folder}, attempt="L0")))
    assert [line.metrics for line in low if not line.final] == recorded["steps"][:2]
    high = run_virtual(read(backend, build_launch("s", 0, TEMPLATE, config.params, overrides={"epochs": 5, **folder}, attempt="L1")))
    assert [line.step for line in high if not line.final] == [3, 4, 5]
    assert [line.metrics for line in high if not line.final] == recorded["steps"][2:]
    first, second = backend.ledger
    assert not first.full_fidelity and second.full_fidelity  # only a full-kind run to the last epoch is a result
    cpu, wall = recorded["cpu_s"], recorded["wall_s"]
    tail = recorded["run_wall_s"] - wall[-1]
    assert first.wall_s == pytest.approx(wall[1] + tail)  # set-up + 2 epochs + the tail
    assert second.wall_s == pytest.approx(recorded["setup_wall_s"] + wall[4] - wall[1] + tail)  # set-up again, epochs 3-5
    assert second.cpu_s == pytest.approx(recorded["setup_cpu_s"] + cpu[4] - cpu[1] + recorded["run_cpu_s"] - cpu[-1])


def test_sampled_parameters_snap_to_the_nearest_recorded_configuration(recording):
    config = recording.configs[7]
    assert recording.snap(config.params) is config
    nudged = {**config.params, "lr": config.params["lr"] * 1.01, "dropout": min(0.3, config.params["dropout"] + 0.001)}
    assert recording.snap(nudged) is config
    with pytest.raises(LaunchError, match="no run with the overrides"):
        recording.kind_of({"train_hours": 123})
    with pytest.raises(LaunchError, match="epochs=9"):
        recording.epochs_of({"epochs": 9})


def test_the_virtual_clock_orders_runs_by_cost_and_takes_no_real_time(recording):
    async def main():
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualClockLoop)
        began = loop.time()
        await asyncio.sleep(3600)
        return loop.time() - began

    assert run_virtual(main()) == pytest.approx(3600)


def ladder_study(tmp_path: Path, levels: list[dict], mode: str, initial: int) -> spec.Study:
    return spec.parse_study({
        "metadata": {"name": "replayed-ladder"},
        "spec": {
            "objective": {"metric": "wer"}, "parallelism": 3, "maxFailedTrials": 0,
            "sampler": {"type": "tpe", "seed": 3, "startupTrials": 3},
            "searchSpace": json.loads(RECORDING.read_text())["meta"]["space"],
            "trialTemplate": {"command": ["replay"]},
            "fidelity": {"levels": levels, "reductionFactor": 3, "initialTrials": initial, "mode": mode,
                         "checkpointVolume": "/replay-checkpoints"},
            "storage": {"url": f"sqlite:///{tmp_path}/replay.db"},
        },
    })


@pytest.mark.parametrize("levels, mode", [
    ([{"name": "low", "overrides": {"train_hours": 0.02, "num_layers": 1}}, {"name": "mid", "overrides": {"epochs": 2}},
      {"name": "full", "overrides": {"epochs": 5}}], "synchronous"),
    ([{"name": "low", "overrides": {"train_hours": 0.02}}, {"name": "full", "overrides": {}}], "asynchronous"),
])
def test_a_replayed_ladder_study_with_the_real_engine_spends_exactly_the_recorded_cost_of_its_runs(recording, tmp_path, levels, mode):
    study = ladder_study(tmp_path, levels, mode, initial=9)
    backend = ReplayBackend(recording)
    engine = Executor(study, ReplayStorage.open(study.storage.url), backend,
                      checkpoint_root=PurePath("/replay-checkpoints"), checkpoint_files_here=False)
    outcome = run_virtual(engine.run())
    assert outcome.state == "Succeeded", outcome.message
    # What the engine stored: every configuration's levels, with the value each level reported.
    expected_cpu = expected_wall = 0.0
    runs = 0
    for trial in engine.trials():
        config = recording.snap(trial.params)
        done = sorted(trial.intermediate_values)
        assert done == list(range(len(done))) and done, trial
        previous = None
        for index in done:
            overrides = study.fidelity.levels[index].overrides
            kind, epochs = recording.kind_of(overrides), recording.epochs_of(overrides)
            curve = config.curves[kind]
            first = previous[1] + 1 if previous is not None and previous[0] == kind else 1  # resumed: only epochs changed
            expected_cpu += curve.cost(first, epochs, "cpu")
            expected_wall += curve.cost(first, epochs, "wall")
            assert trial.intermediate_values[index] == curve.steps[epochs - 1]["wer"]
            previous = (kind, epochs)
            runs += 1
    assert len(backend.ledger) == runs == sum(study.fidelity.rung_sizes())
    assert sum(charge.cpu_s for charge in backend.ledger) == pytest.approx(expected_cpu, abs=1e-9)
    assert sum(charge.wall_s for charge in backend.ledger) == pytest.approx(expected_wall, abs=1e-9)
    assert "fidelity_correlations" in engine.study.user_attrs  # the proxy check ran on the replayed values


def test_a_pruned_run_pays_only_for_the_epochs_it_reported(recording, tmp_path):
    study = spec.parse_study({
        "metadata": {"name": "replayed-median"},
        "spec": {
            "objective": {"metric": "wer"}, "parallelism": 2, "maxTrials": 12,
            "sampler": {"type": "random", "seed": 1}, "pruner": {"type": "median", "startupTrials": 2},
            "searchSpace": json.loads(RECORDING.read_text())["meta"]["space"],
            "trialTemplate": {"command": ["replay"]}, "storage": {"url": f"sqlite:///{tmp_path}/median.db"},
        },
    })
    backend = ReplayBackend(recording)
    engine = Executor(study, ReplayStorage.open(study.storage.url), backend)
    assert run_virtual(engine.run()).state == "Succeeded"
    pruned = [charge for charge in backend.ledger if charge.stopped]
    assert pruned, "the median pruner stopped nothing: pick another seed"
    for charge in backend.ledger:
        curve = recording.config(charge.config).curves["full"]
        assert charge.wall_s == pytest.approx(curve.cost(1, charge.last, "wall", finished=not charge.stopped))
    by_number = {charge.number: charge for charge in backend.ledger}
    for trial in engine.trials():
        assert max(trial.intermediate_values) == by_number[trial.number].last


def test_the_replay_benchmark_runs_on_a_recording_and_ends_with_its_json_line(tmp_path):
    bench = RECORDING.parents[1] / "ladder_replay.py"
    done = subprocess.run([sys.executable, str(bench), "--recording", str(RECORDING), "--cost", "wall", "--seeds", "2", "--jobs", "1",
                           "--arms", "random", "tpe", "ladder-data", "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["best_arm"] == "ladder-data" and last["seeds"] == 2
    assert {"share_of_budget_to_random_final", "best_wer_at_budget", "tpe_best_wer_at_budget"} <= set(last)
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["arms"]) == {"random", "tpe", "ladder-data"}
    assert report["arms"]["ladder-data"]["spec"]["initialTrials"] >= 3


def test_a_replayed_study_is_the_same_every_time(recording, tmp_path):
    """The engine commits on a writer thread; a replay must not depend on how fast those commits are."""
    def once(folder: Path) -> list[tuple]:
        folder.mkdir()
        study = spec.parse_study({
            "metadata": {"name": "replayed-twice"},
            "spec": {
                "objective": {"metric": "wer"}, "parallelism": 2, "maxTrials": 16,
                "sampler": {"type": "tpe", "seed": 5, "startupTrials": 3}, "pruner": {"type": "median", "startupTrials": 2},
                "searchSpace": json.loads(RECORDING.read_text())["meta"]["space"],
                "trialTemplate": {"command": ["replay"]}, "storage": {"url": f"sqlite:///{folder}/twice.db"},
            },
        })
        backend = ReplayBackend(recording)
        run_virtual(Executor(study, ReplayStorage.open(study.storage.url), backend).run())
        return [(round(c.end, 9), c.number, c.config, c.last) for c in backend.ledger]

    assert once(tmp_path / "a") == once(tmp_path / "b")



NEMO_RECORDING = RECORDING.with_name("curves.json")  # real NeMo costs (bench/record_curves.py), warm and cold


@pytest.mark.parametrize("start", ["warm", "cold"])
def test_each_level_run_records_its_charged_cost_and_the_ladder_flags_levels_that_cost_too_much(tmp_path, start):
    nemo = Recording.load(NEMO_RECORDING)
    levels = [{"name": "low", "overrides": {"epochs": 1}}, {"name": "mid", "overrides": {"epochs": 2}},
              {"name": "full", "overrides": {"epochs": nemo.epochs}}]
    study = spec.parse_study({
        "metadata": {"name": "costed-ladder"},
        "spec": {
            "objective": {"metric": "wer"}, "parallelism": 2,
            "sampler": {"type": "random", "seed": 1},
            "searchSpace": json.loads(NEMO_RECORDING.read_text())["meta"]["space"],
            "trialTemplate": {"command": ["replay"]},
            "fidelity": {"levels": levels, "reductionFactor": 3, "initialTrials": 9, "mode": "asynchronous",
                         "checkpointVolume": "/replay-checkpoints"},
            "storage": {"url": f"sqlite:///{tmp_path}/replay.db"},
        },
    })
    backend = ReplayBackend(nemo, start=start)
    events = []
    engine = Executor(study, ReplayStorage.open(study.storage.url), backend, notify=events.append,
                      checkpoint_root=PurePath("/replay-checkpoints"), checkpoint_files_here=False)
    assert run_virtual(engine.run()).state == "Succeeded"
    # each trial's seconds_<level> is what its run was charged (on the virtual clock, CPU-s)
    stored = sorted(t.user_attrs[f"seconds_{level['name']}"] for t in engine.trials() for level in levels
                    if f"seconds_{level['name']}" in t.user_attrs)
    assert stored == pytest.approx(sorted(charge.cpu_s for charge in backend.ledger), abs=1e-6)
    # levels that differ only in epochs resume: reaching mid costs low's run plus mid's
    reach: dict[str, list[float]] = {level["name"]: [] for level in levels}
    for trial in engine.trials():
        total = 0.0
        for level in levels:
            if f"seconds_{level['name']}" not in trial.user_attrs:
                break
            total += trial.user_attrs[f"seconds_{level['name']}"]
            reach[level["name"]].append(total)
    shares = engine.study.user_attrs["fidelity_costs"]
    for name in ("low", "mid"):
        assert shares[name]["share"] == pytest.approx(statistics.median(reach[name]) / statistics.median(reach["full"]), abs=1e-3)
    # what a run spends before its first epoch (its first report less the gap to its second) is the recording's set-up,
    # plus the import start-up when cold: within the difference of two epochs' costs
    rungs = {rung["name"]: rung for rung in engine.scheduler.rungs()}
    setup = statistics.median(nemo.snap(t.params).curves["full"].setup_cpu_s for t in engine.trials())
    expected = setup + (nemo.startup_cpu_s if start == "cold" else 0.0)
    assert rungs["full"]["startupSeconds"] == pytest.approx(expected, abs=1.0)
    assert (shares["low"]["runs"], shares["mid"]["runs"]) == (9, 3)
    # the ladder's spend in full runs' worth: every charged run over the median cost of reaching the top
    spend = engine.study.user_attrs["fidelity_spend"]
    full_runs = sum(charge.cpu_s for charge in backend.ledger) / statistics.median(reach["full"])
    assert (spend["fullRuns"], spend["configurations"], spend["atTop"]) == (pytest.approx(full_runs, abs=0.01), 9, 1)
    rungs = {rung["name"]: rung for rung in engine.scheduler.rungs()}
    assert rungs["full"]["costShare"] == 1.0 and rungs["low"]["costShare"] == shares["low"]["share"]
    # flagged exactly when above costWarning 0.5: one NeMo epoch of four is cheap warm, not cold (14 CPU-s of imports a run)
    costly = [e for e in events if e.kind == "proxy-costly"]
    assert [e.message.split()[2] for e in costly] == [name for name in ("low", "mid") if shares[name]["costly"]]
    assert [name for name in ("low", "mid") if shares[name]["costly"]] == (["low", "mid"] if start == "cold" else ["mid"])
    assert all("warm workers" in e.message for e in costly)  # the study runs cold processes: the hint applies
    # cold, start-up is why low costs too much: the imports take most of a 1-epoch run
    assert (shares["low"]["startupShare"] > 0.5) == (start == "cold")
    assert all(("start-up, not training" in e.message) == (start == "cold") for e in costly)
