"""`speechtune` as a user runs it: a subprocess, real files, real exit codes."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def speechtune(*args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "speechtune.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def write_study(path, name="cli-study", max_trials=6, extra_args=(), storage=None):
    path.write_text(json.dumps({
        "apiVersion": "speechtune.io/v1alpha1", "kind": "SpeechTuningStudy", "metadata": {"name": name},
        "spec": {
            "maxTrials": max_trials, "parallelism": 2,
            "sampler": {"type": "tpe", "seed": 7, "startupTrials": 3},
            "pruner": {"type": "median", "startupTrials": 2},
            "searchSpace": [
                {"name": "lr", "float": {"low": 1e-5, "high": 1e-2, "log": True}},
                {"name": "encoder", "categorical": ["conformer", "lstm"]},
            ],
            "trialTemplate": {"command": ["python", "-m", "speechtune.fake_trainer"], "args": ["--epochs", "4", *extra_args]},
            **({"storage": {"url": storage}} if storage else {}),
        },
    }))
    return path


def test_validate_lists_every_problem_and_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("metadata: {name: x}\nspec:\n  parallelism: 0\n  sampler: {type: bayes}\n  searchSpace: [{name: lr, float: {low: 1, high: 0.1}}]\n")
    result = speechtune("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    for expected in ("spec.parallelism: must be >= 1", "spec.sampler.type: unknown value 'bayes'",
                     "spec.searchSpace[0].float.low: must be <= high", "spec.trialTemplate.command: is required"):
        assert expected in result.stdout


def test_validate_accepts_the_examples(tmp_path):
    for example in ("fake-study.yaml", "asr-digits-local.yaml"):
        result = speechtune("validate", str(EXAMPLES / example), cwd=tmp_path)
        assert result.returncode == 0, result.stdout


def test_run_prints_a_leaderboard_and_status_shows_it_again_from_storage(tmp_path):
    study = write_study(tmp_path / "study.yaml")
    run = speechtune("run", str(study), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Succeeded: " in run.stdout and "cli-study: top" in run.stdout
    assert (tmp_path / "speechtune.db").exists(), "the default storage is sqlite:///speechtune.db"
    status = speechtune("status", "cli-study", "--storage", "sqlite:///speechtune.db", cwd=tmp_path)
    assert status.returncode == 0
    assert "cli-study: top 6 of 6 trials" in status.stdout and "wer" in status.stdout


def test_cli_overrides_change_the_budget(tmp_path):
    study = write_study(tmp_path / "study.yaml", max_trials=50)
    run = speechtune("run", str(study), "--max-trials", "3", "--parallelism", "1", cwd=tmp_path)
    assert run.returncode == 0
    assert "top 3 of 3 trials" in run.stdout


def test_failed_study_exits_1_with_the_reason(tmp_path):
    study = write_study(tmp_path / "study.yaml", extra_args=("--fail-at", "1"))
    run = speechtune("run", str(study), cwd=tmp_path)
    assert run.returncode == 1
    assert "Failed: " in run.stdout and "simulated crash at epoch 1" in run.stdout


def test_status_of_unknown_study_names_the_ones_there(tmp_path):
    run = speechtune("run", str(write_study(tmp_path / "study.yaml", max_trials=1)), cwd=tmp_path)
    assert run.returncode == 0
    status = speechtune("status", "nope", "--storage", "sqlite:///speechtune.db", cwd=tmp_path)
    assert status.returncode == 1 and "no study 'nope'" in status.stdout and "cli-study" in status.stdout


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_metrics_endpoint_serves_study_metrics_while_running(tmp_path):
    port = free_port()
    study = write_study(tmp_path / "study.yaml", max_trials=4, extra_args=("--sleep", "0.4"))
    runner = subprocess.Popen([sys.executable, "-m", "speechtune.cli", "run", str(study), "--metrics-port", str(port)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and "speechtune_trials_finished_total{" not in seen:
            time.sleep(0.3)
            try:
                seen = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                continue
    finally:
        runner.wait(timeout=60)
    for name in ("speechtune_trials{", "speechtune_suggest_seconds_count{", "speechtune_reported_value_bucket{",
                 "speechtune_metric_lag_seconds_count{", "speechtune_trials_finished_total{"):
        assert any(line.startswith(name) and 'namespace="local"' in line and 'study="cli-study"' in line
                   for line in seen.splitlines()), name
    assert "trial=" not in seen and "number=" not in seen, "no per-trial labels"
    assert runner.returncode == 0
