"""The TTS objectives on known inputs: MCD after DTW, F0 RMSE over voiced frames, CER.

A synthetic voiced signal (a 120 Hz pulse-like tone with harmonics, pauses between two
"syllables") stands in for speech, so no espeak-ng and no model is needed. librosa comes with
the trainer extra, hence the mark.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.trainer

RATE = 16000


@pytest.fixture(scope="module")
def analysis():
    from speechtune_trainer.tts import objectives

    return objectives.Analysis(sample_rate=RATE)


def voiced(f0: float = 120.0, stretch: float = 1.0) -> np.ndarray:
    """Two voiced stretches with a pause, harmonics up to 3 kHz, a slow pitch glide; `stretch` slows it all down."""
    t = np.arange(int(1.2 * stretch * RATE)) / RATE / stretch  # the time of the unstretched signal
    pitch = f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.8 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    tone = sum(np.sin(k * phase) / k for k in range(1, int(3000 // f0)))
    envelope = ((t > 0.1) & (t < 0.5)) | ((t > 0.7) & (t < 1.1))
    return (0.3 * tone * envelope).astype(np.float32)


def test_mcd_of_identical_audio_is_0_and_grows_with_shift_and_noise(analysis):
    from speechtune_trainer.tts import objectives

    reference = voiced()
    rng = np.random.default_rng(0)
    shifted = np.concatenate([np.zeros(100, np.float32), reference])[: len(reference)]
    slightly_noisy = reference + 0.001 * rng.standard_normal(len(reference)).astype(np.float32)
    noisy = reference + 0.01 * rng.standard_normal(len(reference)).astype(np.float32)
    same = objectives.mcd(reference, reference.copy(), analysis)
    assert same == 0.0
    distances = [objectives.mcd(reference, other, analysis) for other in (shifted, slightly_noisy, noisy)]
    assert all(distance > 0 for distance in distances)
    assert distances[2] > distances[1]  # more noise, further


def test_mcd_aligns_time_with_dtw_so_a_stretched_copy_is_closer_than_another_pitch(analysis):
    from speechtune_trainer.tts import objectives

    reference = voiced()
    slower = voiced(stretch=1.25)  # the same pitch, 25 % longer
    other = voiced(f0=200.0)
    assert objectives.mcd(reference, slower, analysis) < objectives.mcd(reference, other, analysis)
    assert objectives.f0_rmse(reference, slower, analysis) < 3


def test_f0_rmse_of_identical_audio_is_0_and_measures_a_pitch_offset(analysis):
    from speechtune_trainer.tts import objectives

    reference = voiced()
    assert objectives.f0_rmse(reference, reference.copy(), analysis) == 0.0
    higher = objectives.f0_rmse(reference, voiced(f0=132.0), analysis)  # 10 % higher: about 12 Hz
    assert 6 < higher < 20


def test_f0_rmse_without_voiced_frames_is_nan(analysis):
    from speechtune_trainer.tts import objectives

    silence = np.zeros(RATE, np.float32)
    assert math.isnan(objectives.f0_rmse(voiced(), silence, analysis))
    assert math.isnan(objectives.mean_scores([{"mcd": 1.0, "f0_rmse": math.nan}])["f0_rmse"])


def test_character_error_rate_counts_edits_over_reference_characters():
    from speechtune_trainer.tts.objectives import character_error_rate

    assert character_error_rate(["one two", "six"], ["one two", "six"]) == 0.0
    assert character_error_rate(["one two", "six"], ["one tw", ""]) == pytest.approx(4 / 10)
