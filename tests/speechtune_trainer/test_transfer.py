"""`--init-from`: a Spanish model starts from an English one; the output layer is mapped by character.

One English checkpoint (a tiny Conformer-CTC, 2 epochs) serves every test; runs are in-process.
torch is imported inside the tests, so the module collects without the trainer extra.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from speechtune_trainer import cli, config
from tests.speechtune_trainer.test_asr import TINY, protocol_lines

pytestmark = pytest.mark.trainer

SUMMARY = re.compile(
    r"init-from (?P<path>\S+): (?P<copied>\d+) tensors copied, (?P<mapped>\d+) mapped by character "
    r"\((?P<shared>\d+) of (?P<labels>\d+) characters shared\), (?P<skipped>\d+) skipped \(shape\), (?P<absent>\d+) not in the checkpoint"
)


def make_data(out: Path, language: str, seed: int) -> Path:
    argv = ["make-data", "--out", str(out), "--hours", "0.02", "--seed", str(seed), "--language", language, "--workers", "2"]
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def english(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("en"), "en", seed=1)


@pytest.fixture(scope="module")
def spanish(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("es"), "es", seed=2)


@pytest.fixture(scope="module")
def english_checkpoint(english, tmp_path_factory) -> Path:
    checkpoints = tmp_path_factory.mktemp("en-checkpoints")
    assert cli.main(["asr", "--data", str(english), *TINY, "--epochs", "2", "--checkpoint-dir", str(checkpoints)]) == 0
    return checkpoints / "last.ckpt"


def test_the_last_checkpoint_holds_the_final_epoch_and_its_labels(english, english_checkpoint):
    import torch

    from speechtune_trainer.transfer import read_checkpoint

    checkpoint = torch.load(english_checkpoint, map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1  # 0-based: the second and last epoch
    labels = json.loads((english / config.LABELS_FILE).read_text())
    assert list(checkpoint["hyper_parameters"]["cfg"]["labels"]) == labels
    state, from_labels = read_checkpoint(english_checkpoint)
    assert from_labels == labels and state["decoder.decoder_layers.0.bias"].shape == (len(labels) + 1,)


def test_spanish_run_starts_from_the_english_checkpoint(spanish, english, english_checkpoint, capsys):
    capsys.readouterr()
    assert cli.main(["asr", "--data", str(spanish), *TINY, "--epochs", "1", "--init-from", str(english_checkpoint)]) == 0
    out, err = capsys.readouterr()
    summary = SUMMARY.search(err)
    assert summary, err[-3000:]
    spanish_labels = json.loads((spanish / config.LABELS_FILE).read_text())
    shared = set(spanish_labels) & set(json.loads((english / config.LABELS_FILE).read_text()))
    counts = {key: int(value) for key, value in summary.groupdict().items() if key != "path"}
    assert summary["path"] == str(english_checkpoint)
    assert counts["copied"] > 40  # every other tensor of the 1-layer Conformer-CTC
    assert (counts["mapped"], counts["skipped"], counts["absent"]) == (2, 0, 0)  # the decoder's weight and bias
    assert (counts["shared"], counts["labels"]) == (len(shared), len(spanish_labels))
    lines = protocol_lines(out)
    assert [(line.step, line.final) for line in lines] == [(1, False), (None, True)]


def test_a_checkpoint_of_another_architecture_exits_2(spanish, english_checkpoint, capsys):
    capsys.readouterr()
    argv = ["asr", "--data", str(spanish), *TINY, "--encoder", "lstm", "--init-from", str(english_checkpoint)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--init-from {english_checkpoint}: incompatible with this model: only 8 of its 20 tensors match" in err


def test_resuming_wins_over_init_from(english, english_checkpoint, capsys):
    capsys.readouterr()
    common = ["--data", str(english), *TINY, "--epochs", "2", "--checkpoint-dir", str(english_checkpoint.parent)]
    assert cli.main(["asr", *common, "--init-from", str(english_checkpoint)]) == 0
    out, err = capsys.readouterr()
    assert f"init-from {english_checkpoint}: not loaded, resuming from {english_checkpoint}" in err
    assert [(line.step, line.final) for line in protocol_lines(out)] == [(None, True)]


def test_a_nemo_archive_gives_the_same_weights_and_labels(english_checkpoint, tmp_path):
    import torch

    from nemo.collections.asr.models import EncDecCTCModel
    from speechtune_trainer.transfer import read_checkpoint

    EncDecCTCModel.load_from_checkpoint(str(english_checkpoint), map_location="cpu").save_to(str(tmp_path / "en.nemo"))
    state, labels = read_checkpoint(tmp_path / "en.nemo")
    expected_state, expected_labels = read_checkpoint(english_checkpoint)
    assert labels == expected_labels
    assert state.keys() == expected_state.keys() and all(torch.equal(state[k], expected_state[k]) for k in state)


def test_output_rows_follow_their_characters_and_the_blank_moves_to_the_end():
    import torch

    from speechtune_trainer.transfer import IncompatibleCheckpoint, transfer

    old, new = [" ", "a", "b"], [" ", "b", "c", "d"]  # rows: labels, then the blank
    source = {
        "encoder.weight": torch.full((2, 2), 7.0),
        "ctc_decoder.decoder_layers.0.bias": torch.tensor([10.0, 11.0, 12.0, 13.0]),  # a hybrid's CTC output
        "joint.joint_net.2.weight": torch.tensor([[10.0], [11.0], [12.0], [13.0]]),  # with dropout
        "encoder.other": torch.zeros(3),
    }
    target = {
        "preprocessor.featurizer.fb": torch.zeros(4),
        "encoder.weight": torch.zeros(2, 2),
        "decoder.decoder_layers.0.bias": torch.full((5,), -1.0),
        "joint.joint_net.1.weight": torch.full((5, 1), -1.0),  # without dropout
        "encoder.other": torch.zeros(4),
        "encoder.new": torch.zeros(1),
    }
    result = transfer(target, source, old, new)
    assert result.state["decoder.decoder_layers.0.bias"].tolist() == [10.0, 12.0, -1.0, -1.0, 13.0]
    assert result.state["joint.joint_net.1.weight"].flatten().tolist() == [10.0, 12.0, -1.0, -1.0, 13.0]
    assert result.state["encoder.weight"].eq(7.0).all() and result.state["preprocessor.featurizer.fb"] is target["preprocessor.featurizer.fb"]
    assert (result.copied, result.mapped, result.skipped, result.absent, result.shared) == (1, 2, 1, 1, 2)
    assert result.summary(Path("x.ckpt"), new) == (
        "init-from x.ckpt: 1 tensors copied, 2 mapped by character (2 of 4 characters shared), 1 skipped (shape), 1 not in the checkpoint"
    )

    same = transfer({"decoder.decoder_layers.0.bias": torch.zeros(4)}, source, old, old)  # same labels: a plain copy
    assert same.state["decoder.decoder_layers.0.bias"].tolist() == [10.0, 11.0, 12.0, 13.0]
    assert (same.copied, same.mapped, same.shared) == (1, 0, 3)
    with pytest.raises(IncompatibleCheckpoint, match="only 1 of its 5 tensors match"):
        transfer(target, {"encoder.weight": source["encoder.weight"]}, old, new)


@pytest.mark.parametrize("name", ["model.ckpt", "model.nemo"])
def test_a_file_that_is_no_checkpoint_is_rejected(tmp_path, name):
    from speechtune_trainer.transfer import IncompatibleCheckpoint, read_checkpoint

    (tmp_path / name).write_bytes(b"not a checkpoint")
    with pytest.raises(IncompatibleCheckpoint, match="not a readable"):
        read_checkpoint(tmp_path / name)
