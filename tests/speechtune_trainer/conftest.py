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
