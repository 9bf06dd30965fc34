"""`speechtune-trainer asr` as a warm worker, through the engine's warm backend: a warm run trains exactly
what a cold one does, a bad run fails alone, a stop lands at the next batch.

One worker serves the module (NeMo's import is paid once); the cold run is a process of its own.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speechtune import spec
from speechtune.backend import build_launch
from speechtune.protocol import parse_line
from speechtune.workers import WarmWorkerBackend
from speechtune_trainer import cli

TRAINER = str(Path(sys.executable).with_name("speechtune-trainer"))  # the virtualenv's, whatever PATH holds

pytestmark = pytest.mark.trainer

TINY = ["--accelerator", "cpu", "--threads", "1", "--num-layers", "1", "--d-model", "64", "--n-mels", "40", "--epochs", "1"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    assert cli.main(["make-data", "--out", str(out), "--hours", "0.01", "--seed", "1", "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """An event loop and a warm backend, whose first run starts the module's one worker."""
    loop = asyncio.new_event_loop()
    backend = WarmWorkerBackend(tmp_path_factory.mktemp("warm"), spec.Workers(mode="warm"))
    yield loop, backend
    loop.run_until_complete(backend.close())
    loop.close()


def run_warm(worker, number: int, *args: str, stop_after_first_line: bool = False):
    """The run's protocol lines and its Exit (and, when stopped, how long the stop took)."""
    loop, backend = worker
    template = spec.TrialTemplate(command=(TRAINER, "asr"), args=args)

    async def go():
        run = await backend.launch(build_launch("nemo", number, template, {}))
        lines = []
        async for raw in run.lines():
            if (line := parse_line(raw)) is not None:
                lines.append(line)
                if stop_after_first_line:
                    began = time.monotonic()
                    await run.stop()
                    return lines, await run.wait(), time.monotonic() - began
        return lines, await run.wait()

    return loop.run_until_complete(go())


def metrics(lines) -> list[tuple]:
    return [(line.step, line.final, line.metrics["wer"], line.metrics["cer"]) for line in lines]


def weights(checkpoint: Path) -> dict:
    import torch

    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def test_invalid_flags_fail_their_run_with_exit_2_and_the_worker_runs_the_next(worker, digits):
    lines, exit = run_warm(worker, 0, "--data", str(digits), *TINY, "--d_model=100", "--attention_heads=8")
    assert (lines, exit.succeeded, exit.exit_code, exit.reason) == ([], False, 2, "Error")
    assert "--d-model (100) is not divisible by --attention-heads (8)" in exit.message
    lines, exit = run_warm(worker, 1, "--data", str(digits), *TINY, "--train-hours", "0.004")
    assert exit.succeeded and [line.step for line in lines] == [1, None]
    assert worker[1].started == 1


def test_a_warm_run_trains_exactly_what_a_cold_run_does(worker, digits, tmp_path):
    """After another run in the same worker, the same flags and seed give the same WER and CER,
    and bit-identical weights."""
    flags = ["--data", str(digits), *TINY, "--seed", "3"]
    run_warm(worker, 2, "--data", str(digits), *TINY, "--seed", "5", "--encoder", "lstm")
    lines, exit = run_warm(worker, 3, *flags, "--checkpoint-dir", str(tmp_path / "warm"))
    assert exit.succeeded
    cold = subprocess.run([TRAINER, "asr", *flags, "--checkpoint-dir", str(tmp_path / "cold")],
                          capture_output=True, text=True, timeout=600)
    assert cold.returncode == 0, cold.stderr[-2000:]
    cold_lines = [line for line in map(parse_line, cold.stdout.splitlines()) if line is not None]
    assert metrics(lines) == metrics(cold_lines)
    warm_weights, cold_weights = weights(tmp_path / "warm" / "last.ckpt"), weights(tmp_path / "cold" / "last.ckpt")
    assert warm_weights.keys() == cold_weights.keys()
    assert all(warm_weights[name].equal(cold_weights[name]) for name in warm_weights)
    assert worker[1].started == 1


def test_a_stopped_run_ends_at_the_next_batch_and_keeps_its_worker(worker, digits):
    lines, exit, took = run_warm(worker, 4, "--data", str(digits), *TINY, "--epochs", "50", stop_after_first_line=True)
    assert [line.step for line in lines] == [1]
    assert (exit.reason, exit.exit_code) == ("Stopped", 143)
    assert took < 5, "one batch of a tiny model, far inside stopGraceSeconds"
    assert worker[1].started == 1
