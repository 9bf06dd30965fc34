"""`asr` on CPU: every encoder and decoder trains a step, reporting, resuming, schedules.

One tiny digits corpus serves every test. Runs are in-process (NeMo's import is paid once),
except the console-script run, which checks the installed entry point end to end.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from speechtune.protocol import parse_line
from speechtune_trainer import cli, config

pytestmark = pytest.mark.trainer

TINY = ["--accelerator", "cpu", "--threads", "1", "--num-layers", "1", "--d-model", "64", "--n-mels", "40"]


def protocol_lines(stdout: str) -> list:
    return [parsed for parsed in map(parse_line, stdout.splitlines()) if parsed is not None]


def run_in_process(capsys, *argv: str) -> list:
    capsys.readouterr()
    assert cli.main(["asr", *argv]) == 0
    return protocol_lines(capsys.readouterr().out)


@pytest.mark.parametrize("decoder", config.DECODERS)
@pytest.mark.parametrize("encoder", config.ENCODERS)
def test_each_encoder_and_decoder_trains_one_step(digits, capsys, encoder, decoder):
    # About 12 utterances in one batch: one optimiser step, then one validation.
    # (Small because NeMo's CPU transducer loss loops in Python.)
    lines = run_in_process(
        capsys, "--data", str(digits), *TINY, "--encoder", encoder, "--decoder", decoder,
        "--epochs", "1", "--train-hours", "0.004", "--batch-size", "64",
    )
    assert [line.step for line in lines if not line.final] == [1]
    assert lines[-1].final and lines[-1].metrics["wer"] >= 0 and lines[-1].metrics["cer"] >= 0


@pytest.mark.parametrize(
    ("encoder", "connections"),
    [("conformer", ["--residual-scale", "1.0", "--skip-connections", "residual"]), ("gru", ["--skip-connections", "long"])],
)
def test_connection_options_train_one_step(digits, capsys, encoder, connections):
    """Our connected encoders through NeMo's config instantiation (test_connections.py checks what they change)."""
    lines = run_in_process(
        capsys, "--data", str(digits), *TINY, "--encoder", encoder, *connections,
        "--epochs", "1", "--train-hours", "0.004", "--batch-size", "64",
    )
    assert [line.step for line in lines if not line.final] == [1]
    assert lines[-1].final and lines[-1].metrics["wer"] >= 0


@pytest.mark.parametrize("schedule", config.SCHEDULES)
def test_lr_flag_is_the_peak_learning_rate_of_every_schedule(schedule):
    """Builds each schedule the way the model does and checks the lr at the end of warmup."""
    import torch

    from nemo.core.optim.lr_scheduler import prepare_lr_scheduler
    from speechtune_trainer import schedules

    schedules.register()
    args = cli.build_parser().parse_args(
        ["asr", "--data", "d", "--schedule", schedule, "--lr", "0.002", "--d-model", "144", "--warmup-steps", "10"]
    )
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.lr_for_optimizer(args))
    scheduler = prepare_lr_scheduler(optimizer, config.schedule_config(args, max_steps=100))["scheduler"]
    peak = 0.0
    for _ in range(40):
        optimizer.step()
        if schedule == "plateau":
            scheduler.step(1.0)
        else:
            scheduler.step()
        peak = max(peak, optimizer.param_groups[0]["lr"])
    assert peak == pytest.approx(0.002, rel=0.1)


@pytest.mark.slow
def test_two_epochs_print_two_lines_and_a_final_then_resume_at_epoch_3(digits, capsys, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    common = ["--data", str(digits), *TINY, "--batch-size", "16", "--checkpoint-dir", str(checkpoints)]
    console_script = Path(sys.executable).with_name("speechtune-trainer")
    first = subprocess.run(
        [str(console_script), "asr", *common, "--epochs", "2"], capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr[-3000:]
    lines = protocol_lines(first.stdout)
    assert [(line.step, line.final) for line in lines] == [(1, False), (2, False), (None, True)]
    for line in lines:
        assert 0 <= line.metrics["wer"] < math.inf and 0 <= line.metrics["cer"] < math.inf
        assert line.metrics["epoch_seconds"] > 0
    assert lines[-1].metrics["wer"] == lines[1].metrics["wer"]

    resumed = run_in_process(capsys, *common, "--epochs", "4")
    assert [(line.step, line.final) for line in resumed] == [(3, False), (4, False), (None, True)]

    # A rerun after the last epoch trains nothing but still ends with the saved final metrics.
    rerun = run_in_process(capsys, *common, "--epochs", "4")
    assert [(line.step, line.final) for line in rerun] == [(None, True)]
    assert rerun[0].metrics["wer"] == resumed[1].metrics["wer"]
