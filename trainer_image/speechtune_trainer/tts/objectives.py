"""TTS objectives without listeners: MCD after DTW, F0 RMSE over voiced frames, and CER.

numpy and librosa only (librosa comes with NeMo's ASR extra), so the numbers can be checked on
known inputs without a model.

- Mel cepstra: the DCT (type II, orthonormal) of the natural-log magnitude of an 80-band mel
  spectrum, coefficients 1..24 (c0, the loudness, left out). This is not SPTK's mel-cepstral
  analysis, so the values compare runs of speechtune, not papers' numbers exactly.
- MCD: (10 / ln 10) * sqrt(2 * sum_d (c_d - c'_d)^2) per frame pair, in dB, averaged over the
  DTW path between the reference's and the synthesised frames (librosa's DTW, Euclidean cost on
  the same cepstra), so a slower or faster synthesis is not punished for its timing.
- F0 RMSE: pYIN contours of both, compared along the same DTW path, over the frame pairs voiced
  in both, in Hz. NaN when no pair is voiced in both.
- CER: character edits (kaldialign, as the asr trainer counts them) over reference characters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MCD_ORDER = 24
MCD_SCALE = 10.0 / math.log(10.0) * math.sqrt(2.0)


@dataclass(frozen=True)
class Analysis:
    """The frames objectives compare: the corpus's STFT, mel and pitch settings (DATA/tts.json)."""

    sample_rate: int
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 80
    fmax: float = 8000.0
    pitch_fmin: float = 65.40639132514966
    pitch_fmax: float = 523.2511306011972

    @classmethod
    def of(cls, stats: dict) -> Analysis:
        return cls(
            stats["sample_rate"], stats["n_fft"], stats["hop_length"], stats["n_mels"], stats["highfreq"],
            stats["pitch_fmin"], stats["pitch_fmax"],
        )


@dataclass
class Features:
    """What the objectives need of one utterance: mel cepstra (frames x 24) and F0 per frame (0 unvoiced)."""

    cepstra: np.ndarray
    f0: np.ndarray


def log_mel(audio: np.ndarray, analysis: Analysis) -> np.ndarray:
    """Natural-log mel magnitudes (n_mels x frames), floored at 1e-5 as NeMo's filterbanks are."""
    import librosa

    mel = librosa.feature.melspectrogram(
        y=audio.astype(np.float32), sr=analysis.sample_rate, n_fft=analysis.n_fft, hop_length=analysis.hop_length,
        n_mels=analysis.n_mels, fmax=analysis.fmax, power=1.0,
    )
    return np.log(np.maximum(mel, 1e-5))


def mel_cepstra(audio: np.ndarray, analysis: Analysis) -> np.ndarray:
    import scipy.fft

    return scipy.fft.dct(log_mel(audio, analysis), type=2, norm="ortho", axis=0)[1 : MCD_ORDER + 1].T


def f0_contour(audio: np.ndarray, analysis: Analysis) -> np.ndarray:
    import librosa

    f0, _, _ = librosa.pyin(
        audio.astype(np.float32), fmin=analysis.pitch_fmin, fmax=analysis.pitch_fmax, sr=analysis.sample_rate,
        frame_length=analysis.n_fft, hop_length=analysis.hop_length, fill_na=0.0,
    )
    return f0


def features(audio: np.ndarray, analysis: Analysis) -> Features:
    return Features(mel_cepstra(audio, analysis), f0_contour(audio, analysis))


def dtw_path(reference: np.ndarray, synthesised: np.ndarray) -> np.ndarray:
    """Pairs (reference frame, synthesised frame) of the cheapest monotonic alignment, in time order."""
    import librosa

    _, path = librosa.sequence.dtw(X=reference.T, Y=synthesised.T, metric="euclidean")
    return path[::-1]


def compare(reference: Features, synthesised: Features) -> dict[str, float]:
    """MCD (dB) and F0 RMSE (Hz) of one synthesised utterance against its reference."""
    path = dtw_path(reference.cepstra, synthesised.cepstra)
    ref, syn = path[:, 0], path[:, 1]
    difference = reference.cepstra[ref] - synthesised.cepstra[syn]
    mcd = float(np.mean(MCD_SCALE * np.sqrt(np.sum(difference**2, axis=1))))
    f0_ref = reference.f0[np.minimum(ref, len(reference.f0) - 1)]
    f0_syn = synthesised.f0[np.minimum(syn, len(synthesised.f0) - 1)]
    voiced = (f0_ref > 0) & (f0_syn > 0)
    f0_rmse = float(np.sqrt(np.mean((f0_ref[voiced] - f0_syn[voiced]) ** 2))) if voiced.any() else math.nan
    return {"mcd": mcd, "f0_rmse": f0_rmse}


def mcd(reference: np.ndarray, synthesised: np.ndarray, analysis: Analysis) -> float:
    return compare(features(reference, analysis), features(synthesised, analysis))["mcd"]


def f0_rmse(reference: np.ndarray, synthesised: np.ndarray, analysis: Analysis) -> float:
    return compare(features(reference, analysis), features(synthesised, analysis))["f0_rmse"]


def character_error_rate(references: list[str], hypotheses: list[str]) -> float:
    from kaldialign import edit_distance

    edits = sum(edit_distance(list(ref), list(hyp))["total"] for ref, hyp in zip(references, hypotheses, strict=True))
    chars = sum(len(ref) for ref in references)
    return edits / chars if chars else math.nan


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each objective over utterances, NaNs (no voiced pair) left out of F0 RMSE."""
    result = {}
    for name in ("mcd", "f0_rmse"):
        values = [score[name] for score in scores if not math.isnan(score[name])]
        result[name] = float(np.mean(values)) if values else math.nan
    return result
