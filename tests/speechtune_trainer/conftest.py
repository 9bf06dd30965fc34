"""Fixtures the trainer tests share."""

from pathlib import Path

import pytest

from speechtune_trainer import cli


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """0.03 h of spoken digits (make-data): made once, read by every test that trains an ASR model on it."""
    out = tmp_path_factory.mktemp("digits")
    assert cli.main(["make-data", "--out", str(out), "--hours", "0.03", "--seed", "1", "--workers", "2"]) == 0
    return out


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data directory that passes the manifest check (the flags are rejected before any audio is read)."""
    for split in ("train", "dev"):
        (tmp_path / f"{split}_manifest.json").write_text("")
    return tmp_path
