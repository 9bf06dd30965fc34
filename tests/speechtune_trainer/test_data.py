"""make-data: deterministic manifests, correct durations (needs espeak-ng, sox and the trainer extra)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speechtune_trainer import cli, config

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


def test_spanish_plan_uses_only_spanish_words_and_voices():
    from speechtune_trainer import data

    utterances = data.plan(0.05, seed=4, vocabulary="digits", language="es")
    assert utterances == data.plan(0.05, seed=4, vocabulary="digits", language="es")
    assert {word for utt in utterances for word in utt.text.split()} == set(data.VOCABULARIES["es"]["digits"])
    assert {utt.voice.split("+")[0] for utt in utterances} == {"es", "es-419"}
    commands = data.plan(0.05, seed=4, vocabulary="commands", language="es")
    assert {"á", "í"} <= set(config.character_set(utt.text for utt in commands))  # atrás, sí


def test_spanish_make_data_writes_manifests_and_the_labels_of_all_transcripts(tmp_path):
    from speechtune_trainer import data

    make(tmp_path, 5, "--language", "es", "--hours", "0.005")
    texts = [json.loads(line)["text"] for split in SPLITS for line in manifests(tmp_path)[split].decode().splitlines()]
    assert texts and all(text == text.lower() for text in texts)
    assert {word for text in texts for word in text.split()} <= set(data.VOCABULARIES["es"]["digits"])
    labels = json.loads((tmp_path / config.LABELS_FILE).read_text())
    assert labels == sorted(set(" ".join(texts))) and " " in labels
