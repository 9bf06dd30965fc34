"""`make-data`: a synthetic speech corpus from espeak-ng, so tuning runs without any download.

Every utterance is planned up front from one seeded RNG (text, voice, speed, pitch), then
synthesised in parallel and written under its planned index, so the manifests and the audio
are the same for the same seed however the workers interleave. Audio paths in the manifests
are relative to the data directory (NeMo resolves them against the manifest's folder), so a
corpus can be moved or mounted anywhere. `labels.json` holds the corpus's characters, the
ASR model's vocabulary (config.labels).
"""

from __future__ import annotations

import json
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from speechtune_trainer.config import LABELS_FILE, character_set

# Each language's words, lower-case, the same meanings in the same order (make-data --language).
VOCABULARIES = {
    "en": {
        "digits": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
        "commands": ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "forward", "backward"),
    },
    "es": {
        "digits": ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"),
        "commands": ("sí", "no", "arriba", "abajo", "izquierda", "derecha", "enciende", "apaga", "para", "ve", "adelante", "atrás"),
    },
}
WORDS_PER_UTTERANCE = {"digits": (1, 5), "commands": (1, 3)}
# espeak-ng's own voices for the language (`espeak-ng --voices=es`); the mbrola ones need extra packages.
VOICES = {
    "en": ("en", "en-us", "en-gb", "en-gb-scotland", "en-029"),
    "es": ("es", "es-419"),
}
VARIANTS = ("", "+m1", "+m3", "+m5", "+m7", "+f1", "+f2", "+f3", "+f4")
SPEED_WPM = (130, 210)  # espeak-ng -s
PITCH = (25, 75)  # espeak-ng -p, 0..99
SPLIT_SHARES = {"dev": 0.1, "test": 0.1}  # the rest is train


@dataclass(frozen=True)
class Utterance:
    split: str
    index: int
    text: str
    voice: str
    speed: int
    pitch: int

    @property
    def relative_path(self) -> str:
        return f"audio/{self.split}/{self.split}-{self.index:06d}.wav"

    def estimated_seconds(self) -> float:
        """espeak-ng's length for planning only: about one word per 60/speed s plus edge silence."""
        return 0.35 + len(self.text.split()) * 60.0 / self.speed


def plan(
    hours: float, seed: int, vocabulary: str, language: str = "en", speaker: tuple[str, int, int] | None = None
) -> list[Utterance]:
    """Choose every utterance of the corpus from the seed alone, until the planned audio reaches `hours`.

    `speaker` (voice, speed, pitch) fixes the voice of every utterance: a single-speaker (TTS) corpus.
    """
    rng = random.Random(seed)
    words = VOCABULARIES[language][vocabulary]
    voices = VOICES[language]
    low, high = WORDS_PER_UTTERANCE[vocabulary]
    drafts: list[Utterance] = []
    total = 0.0
    while total < hours * 3600:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))
        voice = rng.choice(voices) + rng.choice(VARIANTS)
        draft = Utterance("train", 0, text, voice, rng.randint(*SPEED_WPM), rng.randint(*PITCH))
        if speaker is not None:
            draft = Utterance("train", 0, text, *speaker)
        drafts.append(draft)
        total += draft.estimated_seconds()
    counts = {split: max(1, round(share * len(drafts))) for split, share in SPLIT_SHARES.items()}
    splits = ["dev"] * counts["dev"] + ["test"] * counts["test"]
    splits += ["train"] * (len(drafts) - len(splits))
    indices: dict[str, int] = {}
    planned = []
    for draft, split in zip(drafts, splits):
        index = indices.get(split, 0)
        indices[split] = index + 1
        planned.append(Utterance(split, index, draft.text, draft.voice, draft.speed, draft.pitch))
    return planned


def synthesize(utt: Utterance, out: Path, sample_rate: int, snr_db: float | None, seed: int) -> dict:
    """Speak one utterance, resample it with sox, optionally add white noise, and return its manifest entry."""
    wav = subprocess.run(
        ["espeak-ng", "-v", utt.voice, "-s", str(utt.speed), "-p", str(utt.pitch), "--stdout", utt.text],
        check=True,
        capture_output=True,
    ).stdout
    # -R: repeatable, -D: no dither, so the same input gives the same samples.
    raw = subprocess.run(
        ["sox", "-R", "-D", "-t", "wav", "-", "-t", "f32", "-r", str(sample_rate), "-c", "1", "-"],
        input=wav,
        check=True,
        capture_output=True,
    ).stdout
    audio = np.frombuffer(raw, dtype=np.float32).copy()
    if snr_db is not None:
        noise_rng = np.random.default_rng([seed, ["train", "dev", "test"].index(utt.split), utt.index])
        signal_power = float(np.mean(audio**2)) or 1e-10
        noise = noise_rng.standard_normal(audio.shape[0]).astype(np.float32)
        audio += noise * np.sqrt(signal_power / 10 ** (snr_db / 10))
        audio = np.clip(audio, -1.0, 1.0)
    path = out / utt.relative_path
    sf.write(path, audio, sample_rate, subtype="PCM_16")
    return {"audio_filepath": utt.relative_path, "duration": round(len(audio) / sample_rate, 6), "text": utt.text}


def make_data(
    out: Path,
    hours: float,
    sample_rate: int,
    seed: int,
    vocabulary: str = "digits",
    snr_db: float | None = None,
    workers: int = 4,
    language: str = "en",
    speaker: tuple[str, int, int] | None = None,
) -> dict[str, Path]:
    """Write `{train,dev,test}_manifest.json`, their audio and `labels.json` under `out`; return the manifest paths."""
    from rich.console import Console
    from rich.progress import Progress

    utterances = plan(hours, seed, vocabulary, language, speaker)
    for split in ("train", "dev", "test"):
        (out / "audio" / split).mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    with Progress(console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(f"synthesising {len(utterances)} utterances", total=len(utterances))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for entry in pool.map(lambda u: synthesize(u, out, sample_rate, snr_db, seed), utterances):
                entries.append(entry)
                progress.advance(task)
    manifests = {}
    for split in ("train", "dev", "test"):
        manifests[split] = out / f"{split}_manifest.json"
        lines = [json.dumps(e) for u, e in zip(utterances, entries) if u.split == split]
        manifests[split].write_text("\n".join(lines) + "\n")
    labels = character_set(utt.text for utt in utterances)
    (out / LABELS_FILE).write_text(json.dumps(labels, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifests
