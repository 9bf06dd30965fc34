"""`make-data --tts`: a single-speaker corpus for FastPitch and HiFi-GAN, and its pitch statistics.

The utterances are make-data's (same texts for the same seed), all spoken by one espeak-ng
voice at one speed and pitch. On top of the manifests it writes what FastPitch needs and NeMo
would otherwise compute in every trial: each utterance's pitch contour (librosa's pYIN, as NeMo's
TTSDataset computes it, under sup_data/pitch/ with NeMo's file names), and DATA/tts.json with
the audio analysis and the corpus's pitch mean and standard deviation over voiced frames.
The dev split doubles as the held-out set of the objectives: its WAVs are the reference audio.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from speechtune_trainer.config import LABELS_FILE
from speechtune_trainer.data import VOICES, make_data
from speechtune_trainer.tts.config import TTS_FILE

SPEED_WPM = 160
PITCH = 50
N_FFT = 1024  # NeMo's FastPitch/HiFi-GAN recipes: 1024-point window, hop 256, 80 mels up to 8 kHz
HOP_LENGTH = 256
N_MELS = 80
HIGHFREQ = 8000
PITCH_FMIN = 65.40639132514966  # C2, NeMo's default pYIN floor
PITCH_FMAX = 523.2511306011972  # C5: espeak-ng voices stay far below it, and pYIN is 4x faster than up to C7


def analysis(sample_rate: int) -> dict:
    """The STFT, mel and pitch settings both TTS models use at this sample rate."""
    return {
        "sample_rate": sample_rate,
        "n_fft": N_FFT,
        "win_length": N_FFT,
        "hop_length": HOP_LENGTH,
        "n_mels": N_MELS,
        "lowfreq": 0,
        "highfreq": min(HIGHFREQ, sample_rate // 2),
        "pitch_fmin": PITCH_FMIN,
        "pitch_fmax": PITCH_FMAX,
    }


def pitch_contour(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """pYIN F0 in Hz per frame (0 when unvoiced), with the frames NeMo's TTSDataset uses (hop = window / 4)."""
    import librosa

    f0, _, _ = librosa.pyin(audio, fmin=PITCH_FMIN, fmax=PITCH_FMAX, frame_length=N_FFT, sr=sample_rate, fill_na=0.0)
    return f0.astype(np.float32)


def _save_pitch(job: tuple[Path, Path, int]) -> np.ndarray:
    wav, target, sample_rate = job
    import soundfile as sf
    import torch

    audio, _ = sf.read(wav, dtype="float32")
    f0 = pitch_contour(audio, sample_rate)
    torch.save(torch.from_numpy(f0), target)
    return f0


def make_tts_data(
    out: Path, hours: float, sample_rate: int, seed: int, vocabulary: str, language: str, voice: str | None, workers: int
) -> dict:
    """Write the single-speaker corpus, its pitch contours and DATA/tts.json under `out`; return tts.json's content."""
    voice = voice or VOICES[language][0]
    manifests = make_data(out, hours, sample_rate, seed, vocabulary, None, workers, language, speaker=(voice, SPEED_WPM, PITCH))
    pitch_folder = out / "sup_data" / "pitch"
    pitch_folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for split in ("train", "dev", "test"):
        for line in manifests[split].read_text().splitlines():
            wav = out / json.loads(line)["audio_filepath"]
            # NeMo names a contour after the audio path relative to the manifest's common folder (here audio/<split>).
            jobs.append((wav, pitch_folder / f"{wav.stem}.pt", sample_rate))
    # The first contour here, not in the pool: it compiles librosa's numba functions and writes their on-disk cache
    # once. Workers compiling at once write that cache concurrently, and a torn cache file segfaults later loads.
    contours = [_save_pitch(jobs[0])]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        contours += pool.map(_save_pitch, jobs[1:], chunksize=8)
    train = len(manifests["train"].read_text().splitlines())
    voiced = np.concatenate([f0[f0 > 0] for f0 in contours[:train]])
    stats = {
        **analysis(sample_rate),
        "pitch_mean": float(voiced.mean()),
        "pitch_std": float(voiced.std()),
        "pitch_min": float(voiced.min()),
        "pitch_max": float(voiced.max()),
        "voice": voice,
        "speed_wpm": SPEED_WPM,
        "espeak_pitch": PITCH,
        "labels": json.loads((out / LABELS_FILE).read_text(encoding="utf-8")),
    }
    if not all(math.isfinite(stats[key]) for key in ("pitch_mean", "pitch_std")):
        raise RuntimeError(f"no voiced frames in {out}'s train split")
    (out / TTS_FILE).write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return stats
