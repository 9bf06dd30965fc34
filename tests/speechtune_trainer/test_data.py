"""make-data: deterministic manifests, correct durations (needs espeak-ng, sox and the trainer extra)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speechtune_trainer import cli

pytestmark = pytest.mark.trainer

SPLITS = ("train", "dev", "test")


def make(out: Path, seed: int, *extra: str) -> None:
    argv = ["make-data", "--out", str(out), "--hours", "0.01", "--sample-rate", "8000", "--seed", str(seed)]
    assert cli.main([*argv, "--workers", "2", *extra]) == 0


def manifests(out: Path) -> dict[str, bytes]:
    return {split: (out / f"{split}_manifest.json").read_bytes() for split in SPLITS}


def test_same_seed_gives_byte_identical_manifests_and_audio(tmp_path):
    make(tmp_path / "a", seed=7)
    make(tmp_path / "b", seed=7)
    assert manifests(tmp_path / "a") == manifests(tmp_path / "b")
    first = json.loads(manifests(tmp_path / "a")["train"].splitlines()[0])["audio_filepath"]
    assert (tmp_path / "a" / first).read_bytes() == (tmp_path / "b" / first).read_bytes()


def test_another_seed_gives_another_corpus(tmp_path):
    make(tmp_path / "a", seed=7)
    make(tmp_path / "b", seed=8)
    assert manifests(tmp_path / "a")["train"] != manifests(tmp_path / "b")["train"]


def test_durations_match_the_audio_files_and_every_split_is_filled(tmp_path):
    import soundfile as sf

    make(tmp_path, 3, "--snr-db", "20", "--vocabulary", "commands")
    for split in SPLITS:
        entries = [json.loads(line) for line in manifests(tmp_path)[split].decode().splitlines()]
        assert entries, f"{split} is empty"
        for entry in entries:
            info = sf.info(tmp_path / entry["audio_filepath"])
            assert info.samplerate == 8000
            assert entry["duration"] == pytest.approx(info.frames / info.samplerate, abs=1e-6)
            assert entry["text"] and set(entry["text"]) <= set("abcdefghijklmnopqrstuvwxyz ")
