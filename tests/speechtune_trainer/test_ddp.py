"""Data-parallel `asr` on CPU, DDP over gloo: `--devices 2` in one machine, and two "pods" on loopback.

The pods get what the operator sets on every pod of an N-pod trial (docs/trainer.md, "Multi-process
and multi-node training"): MASTER_ADDR, MASTER_PORT, WORLD_SIZE (N pods) and NODE_RANK (the pod's index),
with --num-nodes taken from WORLD_SIZE. Every run is a console-script process: Lightning starts a
machine's other processes by rerunning its command line.

Cost: 5 trainer processes (1 + 2 + 2), each paying NeMo's import (about 16 CPU-s): measured 19, 39 and
2 x 19 CPU-s, about 100 CPU-s in all (6 minutes of wall on 2 cores shared with other work).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from speechtune.protocol import parse_line
from speechtune_trainer import cli

pytestmark = pytest.mark.trainer

TRAINER = Path(sys.executable).with_name("speechtune-trainer")
# 61 training and 8 dev utterances, 2 epochs of a 1-layer Conformer-CTC, the same global batch in every run.
RUN = [
    "--accelerator", "cpu", "--threads", "1", "--num-layers", "1", "--d-model", "64", "--n-mels", "40",
    "--epochs", "2", "--global-batch-size", "16", "--seed", "3",
]
DEV_UTTERANCES = 8
# Against the 1-process run: the processes draw other batches and dropout masks, so only close, not equal.
WER_TOLERANCE = 0.1  # absolute
VAL_LOSS_TOLERANCE = 0.15  # relative
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "RANK", "GROUP_RANK", "SPEECHTUNE_WORKER")
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    assert cli.main(["make-data", "--out", str(out), "--hours", "0.03", "--seed", "1", "--workers", "2"]) == 0
    assert len((out / "dev_manifest.json").read_text().splitlines()) == DEV_UTTERANCES
    return out


def environment(**distributed: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in DISTRIBUTED_ENV}
    return {**env, **distributed}


def start(digits: Path, *flags: str, **distributed: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(TRAINER), "asr", "--data", str(digits), *RUN, *flags],
        env=environment(**distributed), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(process: subprocess.Popen) -> tuple[str, str]:
    out, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, err[-3000:]
    return out, err


def protocol_lines(stdout: str) -> list:
    return [parsed for parsed in map(parse_line, stdout.splitlines()) if parsed is not None]


def steps(lines: list) -> list:
    return [(line.step, line.final) for line in lines]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(digits) -> list:
    return protocol_lines(finish(start(digits))[0])


@pytest.fixture(scope="module")
def two_devices(digits) -> tuple[list, str]:
    out, err = finish(start(digits, "--devices", "2"))
    return protocol_lines(out), err


def test_two_devices_print_one_protocol_stream_over_the_whole_dev_set(two_devices):
    lines, stderr = two_devices
    # Both processes write to the same stdout: each epoch once means rank 1 printed nothing.
    assert steps(lines) == [(1, False), (2, False), (None, True)]
    # Rank 0's summary of the counts summed over both processes: the whole dev set, not its 4-utterance share,
    # and NeMo's printed WER is the WER of those summed counts.
    summary = re.search(r"epoch 2: validated (\d+) dev utterances on 2 processes .* WER of the summed counts ([\d.]+)", stderr)
    assert summary, stderr[-3000:]
    assert int(summary[1]) == DEV_UTTERANCES
    assert lines[-1].metrics["wer"] == pytest.approx(float(summary[2]), abs=1e-6)


def test_two_devices_match_one_process_at_the_same_seed_and_global_batch(one_process, two_devices):
    single, parallel = one_process[-1].metrics, two_devices[0][-1].metrics
    print(f"\n1 process: {single}\n2 processes: {parallel}")
    assert steps(one_process) == [(1, False), (2, False), (None, True)]
    assert abs(parallel["wer"] - single["wer"]) <= WER_TOLERANCE, (single, parallel)
    assert parallel["val_loss"] == pytest.approx(single["val_loss"], rel=VAL_LOSS_TOLERANCE), (single, parallel)


def test_two_pods_on_loopback_print_one_stream_from_node_rank_0(digits, two_devices):
    """The cross-pod contract: two processes with --devices 1, told only MASTER_*, WORLD_SIZE and NODE_RANK."""
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    pods = [start(digits, "--devices", "1", NODE_RANK=str(rank), **rendezvous) for rank in (0, 1)]
    (out0, err0), (out1, _) = map(finish, pods)
    lines = protocol_lines(out0)
    assert steps(lines) == [(1, False), (2, False), (None, True)]
    assert protocol_lines(out1) == []
    assert "validated 8 dev utterances on 2 processes" in err0
    # Global ranks 0 and 1 with the same seeds and shares as --devices 2: the same training, bit for bit on CPU.
    assert lines[-1].metrics == pytest.approx(two_devices[0][-1].metrics | {"epoch_seconds": lines[-1].metrics["epoch_seconds"]})
