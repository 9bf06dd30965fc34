"""Warm workers (workers.py, protocol.serve) with the fake trainer: same values as cold, fewer processes,
and every way a run or a worker can go wrong costing only that run."""

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from optuna.trial import TrialState

from speechtune import fake_trainer, metrics, protocol, spec
from speechtune.backend import build_launch
from speechtune.executor import Executor
from speechtune.local import LocalProcessBackend
from speechtune.protocol import parse_line
from speechtune.record import FAIL_REASON
from speechtune.storage import WriteThroughStorage, open_rdb
from speechtune.workers import WarmWorkerBackend, saving

FAKE = (sys.executable, "-m", "speechtune.fake_trainer")
PARAMS = {"lr": 0.001, "num_layers": 6}


def warm(**settings) -> spec.Workers:
    return spec.Workers(mode="warm", **settings)


def launch_of(number: int, *args: str, command=FAKE):
    return build_launch("s", number, spec.TrialTemplate(command=command, args=args), PARAMS)


async def finish(run):
    """The run's values by step (the final one as step None) and how it ended."""
    values = {}
    async for raw in run.lines():
        line = parse_line(raw)
        if line is not None and "wer" in line.metrics:
            values[None if line.final else line.step] = line.metrics["wer"]
    return values, await run.wait()


def expected(epochs: int) -> dict:
    params = {name: str(value) for name, value in PARAMS.items()}
    return {**{step: fake_trainer.wer(params, step) for step in range(1, epochs + 1)}, None: fake_trainer.wer(params, epochs)}


def in_backend(tmp_path, body, **settings):
    """Run ``body(backend)`` on a fresh warm backend, closing its workers afterwards."""
    backend = WarmWorkerBackend(tmp_path / "logs", warm(**settings))

    async def main():
        try:
            return await body(backend)
        finally:
            await backend.close()

    return asyncio.run(main()), backend


def make_study(tmp_path, name, workers, *, args=("--epochs", "3"), max_trials=6, parallelism=2):
    return spec.parse_study({
        "metadata": {"name": name},
        "spec": {
            "maxTrials": max_trials, "parallelism": parallelism, "maxFailedTrials": 5,
            "sampler": {"type": "random", "seed": 7},
            "searchSpace": [
                {"name": "lr", "float": {"low": 1e-5, "high": 1e-2, "log": True}},
                {"name": "num_layers", "int": {"low": 2, "high": 12}},
            ],
            "trialTemplate": {"command": list(FAKE), "args": list(args), "workers": workers},
            "storage": {"url": f"sqlite:///{tmp_path}/{name}.db"},
        },
    })


def run_study(study, backend, during=None):
    engine = Executor(study, WriteThroughStorage(open_rdb(study.storage.url)), backend)

    async def main():
        watcher = asyncio.create_task(during(engine, backend)) if during else None
        try:
            return await engine.run()
        finally:
            if watcher is not None:
                watcher.cancel()
            if isinstance(backend, WarmWorkerBackend):
                await backend.close()

    return engine, asyncio.run(main())


def test_a_warm_study_gives_the_cold_values_with_one_process_per_slot(tmp_path):
    results = {}
    for mode in ("cold", "warm"):
        study = make_study(tmp_path, mode, {"mode": mode})
        backend = (WarmWorkerBackend(tmp_path / mode, study.trial_template.workers) if mode == "warm"
                   else LocalProcessBackend(tmp_path / mode))
        engine, outcome = run_study(study, backend)
        assert outcome.state == "Succeeded", outcome.message
        results[mode] = [(t.params, t.intermediate_values, t.value) for t in engine.trials()]
    assert results["warm"] == results["cold"]
    assert len(results["warm"]) == 6
    assert backend.started <= 2, "at most one worker per parallel slot"
    assert (tmp_path / "warm" / "trial-5.log").read_text().count('"run": "trial-5@') == 5, "3 steps, the final and the end line"


def test_a_run_that_raises_fails_alone_and_its_worker_runs_the_next(tmp_path):
    async def body(backend):
        raised = await finish(await backend.launch(launch_of(0, "--epochs", "3", "--raise-at", "2")))
        crashed = await finish(await backend.launch(launch_of(1, "--epochs", "3", "--fail-at", "1")))
        fine = await finish(await backend.launch(launch_of(2, "--epochs", "2")))
        return raised, crashed, fine

    (raised, crashed, fine), backend = in_backend(tmp_path, body)
    values, exit = raised
    assert values == {1: expected(1)[1]}
    assert (exit.succeeded, exit.reason, exit.message) == (False, "Exception", "RuntimeError: fake trainer: simulated exception at epoch 2")
    assert "Traceback" in (tmp_path / "logs" / "trial-0.log").read_text()
    assert crashed[1].reason == "Error"
    assert crashed[1].message == "trainer exited with code 3: fake trainer: simulated crash at epoch 1", "as a cold run says it"
    assert fine == (expected(2), fine[1]) and fine[1].succeeded
    assert backend.started == 1


def test_a_run_out_of_memory_fails_alone_and_its_worker_is_replaced(tmp_path):
    async def body(backend):
        oom = await finish(await backend.launch(launch_of(0, "--epochs", "2", "--oom-at", "1")))
        return oom, await finish(await backend.launch(launch_of(1, "--epochs", "2")))

    (oom, fine), backend = in_backend(tmp_path, body)
    assert (oom[1].reason, oom[1].message) == ("OutOfMemory", "MemoryError: fake trainer: simulated out of memory at epoch 1")
    assert fine[0] == expected(2) and fine[1].succeeded
    assert backend.started == 2
    assert "worker retired: it asked to be replaced" in (tmp_path / "logs" / "worker-1.log").read_text()


async def stop_after_first_value(backend, *args):
    """Start a run, stop it at its first protocol line; how long the stop took, how the run ended, and a next run."""
    run = await backend.launch(launch_of(0, *args))
    async for line in run.lines():
        if parse_line(line) is not None:
            break
    began = time.monotonic()
    await run.stop()
    took = time.monotonic() - began
    return took, await run.wait(), await finish(await backend.launch(launch_of(1, "--epochs", "2")))


def test_a_stopped_run_ends_at_its_next_step_and_keeps_its_worker(tmp_path):
    async def body(backend):
        return await stop_after_first_value(backend, "--epochs", "100", "--sleep", "0.2")

    (took, exit, after), backend = in_backend(tmp_path, body, stop_grace_seconds=5)
    assert took < 1.0, "the run stops at its next step, long before the grace"
    assert (exit.reason, exit.exit_code) == ("Stopped", 143)
    assert after[0] == expected(2)
    assert backend.started == 1


def test_a_run_that_ignores_its_stop_costs_the_grace_and_its_worker(tmp_path):
    async def body(backend):
        return await stop_after_first_value(backend, "--epochs", "5", "--hang")

    (took, exit, after), backend = in_backend(tmp_path, body, stop_grace_seconds=0.5)
    assert 0.5 <= took < 2.0
    assert exit.reason == "Killed" and "did not stop within stopGraceSeconds=0.5" in exit.message
    assert after[0] == expected(2) and backend.started == 2


def test_a_worker_killed_mid_run_fails_its_trial_and_the_study_goes_on(tmp_path):
    study = make_study(tmp_path, "killed", {"mode": "warm"}, args=("--epochs", "4", "--sleep", "0.2"), max_trials=3, parallelism=1)
    backend = WarmWorkerBackend(tmp_path / "logs", study.trial_template.workers)

    async def kill_during_trial_1(engine, backend):
        while not any(t.number == 1 and t.intermediate_values for t in engine.trials()):
            await asyncio.sleep(0.05)
        os.kill(backend._runs[("killed", 1, "")].worker.process.pid, signal.SIGKILL)

    engine, outcome = run_study(study, backend, during=kill_during_trial_1)
    assert outcome.state == "Succeeded", outcome.message
    states = [(t.state, t.user_attrs.get(FAIL_REASON)) for t in engine.trials()]
    assert states == [(TrialState.COMPLETE, None), (TrialState.FAIL, "WorkerDied"), (TrialState.COMPLETE, None)]
    assert "was killed by SIGKILL during the run" in engine.trials()[1].user_attrs["fail_message"]
    assert backend.started == 2


def test_lines_for_another_run_are_ignored_and_counted(tmp_path):
    async def body(backend):
        victim = await backend.launch(launch_of(0, "--epochs", "3", "--sleep", "0.2"))
        forger = await backend.launch(launch_of(1, "--epochs", "3", "--forge", victim.id))
        return await asyncio.gather(finish(victim), finish(forger)), forger

    counted = metrics.WORKER_IGNORED_LINES.labels(namespace="", study="")
    before = counted._value.get()
    ((victim, forged), forger), backend = in_backend(tmp_path, body)
    assert victim[0] == expected(3), "WER 0 for the victim's id, printed by another worker, is not the victim's"
    assert forged[0] == expected(3), "nor are the forger's own untagged lines"
    assert backend.ignored_lines == forger.ignored == 6
    assert counted._value.get() - before == 6, "speechtune_worker_ignored_lines counts them"
    assert backend.started == 2


@pytest.mark.parametrize("limit", [{"max_runs_per_worker": 2}, {"max_rss_mib": 1}], ids=lambda limit: next(iter(limit)))
def test_a_worn_worker_is_replaced(tmp_path, limit):
    async def body(backend):
        return [await finish(await backend.launch(launch_of(number, "--epochs", "1"))) for number in range(5)]

    results, backend = in_backend(tmp_path, body, **limit)
    assert all(values == expected(1) and exit.succeeded for values, exit in results)
    assert backend.started == (3 if "max_runs_per_worker" in limit else 5)


def test_a_trainer_that_is_no_worker_runs_cold(tmp_path):
    script = tmp_path / "cold_only.py"
    script.write_text(
        "import sys\n"
        "from speechtune import report\n"
        "flags = dict(a[2:].split('=', 1) for a in sys.argv[1:] if a.startswith('--') and '=' in a)\n"
        "report(step=1, wer=float(flags.get('lr', 1.0)))\n"
    )

    async def body(backend):
        return [await finish(await backend.launch(launch_of(number, command=(sys.executable, str(script))))) for number in range(3)]

    results, backend = in_backend(tmp_path, body)
    assert [values for values, _ in results] == [{1: PARAMS["lr"]}] * 3
    assert backend.started == 1, "one try, then every run in its own process"


def test_speechtune_run_uses_warm_workers_when_the_spec_asks(tmp_path):
    study_file = tmp_path / "study.yaml"
    study_file.write_text(json.dumps({
        "metadata": {"name": "warm-cli"},
        "spec": {"maxTrials": 3, "parallelism": 1,
                 "searchSpace": [{"name": "lr", "float": {"low": 1e-5, "high": 1e-2, "log": True}}],
                 "trialTemplate": {"command": list(FAKE), "args": ["--epochs", "2"], "workers": {"mode": "warm"}},
                 "storage": {"url": f"sqlite:///{tmp_path}/warm.db"}},
    }))
    result = subprocess.run([sys.executable, "-m", "speechtune.cli", "run", str(study_file), "--workdir", str(tmp_path / "logs")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "in warm workers" in result.stdout
    assert sorted(path.name for path in (tmp_path / "logs").iterdir()) == [
        "report", "trial-0.log", "trial-1.log", "trial-2.log", "worker-1.log"]  # the study's report, and one worker for 3 runs


def test_a_report_from_a_thread_a_run_left_behind_names_no_run(monkeypatch):
    """The race warm reuse is known for: a run's leftover thread reporting while the next run executes."""
    out = io.StringIO()
    release = threading.Event()
    leftovers = []

    def run(argv):
        if argv == ["first"]:
            leftover = threading.Thread(target=lambda: (release.wait(5), protocol.report(step=1, wer=0.0)))
            leftover.start()
            leftovers.append(leftover)
        else:
            release.set()
            leftovers[0].join()
            protocol.report(step=1, wer=0.5)
        return 0

    requests = "".join(json.dumps({"run": name, "argv": [name]}) + "\n" for name in ("first", "second"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(requests))
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "argv", ["worker"])
    monkeypatch.setattr(protocol, "_inbox", None)
    assert protocol.serve(run) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    reports = [line for line in lines if "step" in line]
    assert [(line.get("run"), line["wer"]) for line in reports] == [(None, 0.0), ("second", 0.5)]
    assert [line["end"]["exit_code"] for line in lines if "end" in line] == [0, 0]


def test_the_study_is_told_whether_warm_workers_paid_off(tmp_path):
    backend = WarmWorkerBackend(tmp_path, spec.Workers(mode="warm"))
    assert saving(backend) == "", "nothing to say before any run"
    backend.started, backend.runs, backend.startup_seconds = 2, 8, [17.0, 19.0]
    backend.run_seconds = 8 * 30.0  # short runs: 6 start-ups of ~18 s against 240 s of runs
    assert "pays off" in saving(backend) and "6 avoided" in saving(backend)
    backend.run_seconds = 8 * 600.0  # long runs: the start-ups are noise
    assert "gains little" in saving(backend)
