"""The fidelity ladder driving the real NeMo trainer: a promoted run resumes from its checkpoint."""

import asyncio

import pytest

from speechtune import spec
from speechtune.executor import Executor
from speechtune.local import LocalProcessBackend
from speechtune.protocol import parse_line
from speechtune.storage import WriteThroughStorage, open_rdb
from speechtune_trainer import cli

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def test_promoted_run_that_only_adds_epochs_continues_from_the_checkpoint(tmp_path):
    data = tmp_path / "digits"
    assert cli.main(["make-data", "--out", str(data), "--hours", "0.02", "--seed", "3", "--workers", "2"]) == 0
    study = spec.parse_study({
        "metadata": {"name": "nemo-ladder"},
        "spec": {
            "parallelism": 2,
            "sampler": {"type": "random", "seed": 1},
            "searchSpace": [{"name": "lr", "float": {"low": 1e-3, "high": 5e-3, "log": True}}],
            "fidelity": {
                "levels": [{"name": "short", "overrides": {"epochs": 1}}, {"name": "longer", "overrides": {"epochs": 2}}],
                "reductionFactor": 2, "initialTrials": 2, "resumeFromCheckpoint": True,
            },
            "trialTemplate": {
                "command": ["speechtune-trainer", "asr"],
                "args": ["--data", str(data), "--accelerator", "cpu", "--threads", "1", "--num-layers", "1",
                         "--d-model", "64", "--n-mels", "40", "--batch-size", "32"],
            },
            "storage": {"url": f"sqlite:///{tmp_path}/ladder.db"},
        },
    })
    engine = Executor(study, WriteThroughStorage(open_rdb(study.storage.url)), LocalProcessBackend(tmp_path / "logs"),
                          checkpoint_root=tmp_path / "checkpoints")
    outcome = asyncio.run(engine.run())
    assert outcome.state == "Succeeded", outcome.message
    best = engine.best_trial()
    assert set(best.intermediate_values) == {0, 1}
    log = (tmp_path / "logs" / f"trial-{best.number}-L1-longer.log").read_bytes().splitlines()
    steps = [line.step for line in map(parse_line, log) if line is not None and not line.final]
    assert steps == [2], "the promoted run resumed after epoch 1 instead of starting over"
    assert (tmp_path / "checkpoints" / f"trial-{best.number}" / "from-level-0").is_dir()
