"""What `tts-acoustic` and `tts-vocoder` share: the Lightning run, resuming, and the objectives at every validation.

A command supplies the NeMo model and a `synthesise` function ((model, held-out utterances) ->
a log-mel and a waveform per utterance); this module trains it, and after every validation scores
the held-out utterances against their reference audio (objectives.py), prints one protocol
line and rewrites the artefacts (WAVs, a mel PNG).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from speechtune.protocol import RunStopped, report, stop_requested
from speechtune_trainer.reporting import ProtocolReporter
from speechtune_trainer.train import cpu_budget
from speechtune_trainer.tts import objectives
from speechtune_trainer.tts.config import corpus
from speechtune_trainer.tts.models import ModelFileError, Transcriber

CHECKPOINT = "last.ckpt"
Synthesise = Callable[[LightningModule, list["Utterance"]], list[tuple[np.ndarray, np.ndarray]]]


class UsageError(Exception):
    """A flag that only turned out wrong once torch was imported (a checkpoint's content, no CUDA): exit code 2."""


@dataclass
class Utterance:
    text: str
    audio: np.ndarray
    features: objectives.Features


def absolute_manifests(data: Path, hours: float | None, workdir: Path) -> tuple[dict[str, Path], int]:
    """Train (its first `hours`, nested) and dev manifests with absolute audio paths, as NeMo's TTS datasets need."""
    manifests, count = {}, 0
    for split in ("train", "dev"):
        kept, seconds = [], 0.0
        for line in (data / f"{split}_manifest.json").read_text().splitlines():
            if split == "train" and hours is not None and seconds >= hours * 3600:
                break
            entry = json.loads(line)
            seconds += entry["duration"]
            entry["audio_filepath"] = str((data / entry["audio_filepath"]).resolve())
            kept.append(entry)
        manifests[split] = workdir / f"{split}_tts_manifest.json"
        manifests[split].write_text("".join(json.dumps(entry) + "\n" for entry in kept))
        count = count or len(kept)
    return manifests, count


def held_out(data: Path, count: int, analysis: objectives.Analysis) -> list[Utterance]:
    """The first `count` dev utterances: text, reference audio and its features."""
    utterances = []
    for line in (data / "dev_manifest.json").read_text().splitlines()[:count]:
        entry = json.loads(line)
        audio, _ = sf.read(data / entry["audio_filepath"], dtype="float32")
        utterances.append(Utterance(entry["text"], audio, objectives.features(audio, analysis)))
    return utterances


def accelerator_of(args: argparse.Namespace) -> str:
    if args.accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise UsageError("--accelerator gpu, but torch sees no CUDA device")
    return args.accelerator


class StopWhenAsked(Callback):
    """In a warm worker, ends the run at the next batch once the engine asked (pruned, study over)."""

    def _stop_if_asked(self, *args) -> None:
        if stop_requested():
            raise RunStopped

    on_train_batch_start = on_validation_batch_start = _stop_if_asked


class ObjectiveReporter(ProtocolReporter):
    """After every validation: synthesise the held-out utterances, score them, print a protocol line, write artefacts.

    As the asr reporter (its epoch clock, its last line saved in checkpoints), with the TTS objectives instead of WER.
    """

    def __init__(self, synthesise: Synthesise, utterances: list[Utterance], analysis: objectives.Analysis,
                 judge: Transcriber | None, artifacts: Path | None, artifact_count: int) -> None:
        super().__init__(None)
        self.synthesise = synthesise
        self.utterances = utterances
        self.analysis = analysis
        self.judge = judge
        self.artifacts = artifacts
        self.artifact_count = artifact_count

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass  # no error counter to reset

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            synthesised = self.synthesise(pl_module, self.utterances)
        pl_module.train(was_training)
        self.last = self.score([audio for _, audio in synthesised])
        loss = trainer.callback_metrics.get("val_loss")
        if loss is not None:
            self.last["val_loss"] = float(loss)
        self.last["epoch_seconds"] = round(time.monotonic() - self.epoch_started, 3)
        report(step=trainer.current_epoch + 1, **self.last)
        if self.artifacts is not None:
            write_artifacts(self.artifacts, self.utterances, synthesised[: self.artifact_count], self.analysis)

    def score(self, waveforms: list[np.ndarray]) -> dict[str, float]:
        scores = [
            objectives.compare(utterance.features, objectives.features(audio, self.analysis))
            for utterance, audio in zip(self.utterances, waveforms)
        ]
        result = objectives.mean_scores(scores)
        if self.judge is not None:
            texts = [utterance.text for utterance in self.utterances]
            result["asr_cer"] = objectives.character_error_rate(texts, self.judge.transcribe(waveforms, self.analysis.sample_rate))
        return result


def write_artifacts(
    folder: Path, utterances: list[Utterance], synthesised: list[tuple[np.ndarray, np.ndarray]], analysis: objectives.Analysis
) -> None:
    """`synth-<i>.wav` per utterance, `texts.json`, and `mel.png` (the first utterance's mel: reference over synthesised)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (_, audio) in enumerate(synthesised):
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        sf.write(folder / f"synth-{index}.wav", audio / peak * 0.9 if peak > 1 else audio, analysis.sample_rate, subtype="PCM_16")
    (folder / "texts.json").write_text(json.dumps([u.text for u in utterances[: len(synthesised)]]) + "\n")
    if not synthesised:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        print("tts: matplotlib is not installed, so no mel.png", file=sys.stderr)
        return
    reference = objectives.log_mel(utterances[0].audio, analysis)
    figure, axes = pyplot.subplots(2, 1, figsize=(8, 5))
    for axis, (title, mel) in zip(axes, (("reference", reference), ("synthesised", synthesised[0][0]))):
        image = axis.imshow(mel, origin="lower", aspect="auto", interpolation="none", vmin=-11.5, vmax=max(2.0, float(reference.max())))
        axis.set(title=f"{title}: {utterances[0].text}", ylabel="mel band")
        figure.colorbar(image, ax=axis, label="ln magnitude")
    axes[1].set(xlabel="frame (hop 256 samples)")
    figure.tight_layout()
    figure.savefig(folder / "mel.png", dpi=100)
    pyplot.close(figure)


@dataclass
class Run:
    """One TTS run's setting, made by `start` before the model exists."""

    command: str
    args: argparse.Namespace
    stats: dict
    accelerator: str
    workdir: Path
    manifests: dict[str, Path]
    max_steps: int
    num_workers: int
    judge: Transcriber | None
    trainer: Trainer | None = None


def error(command: str, message: str) -> int:
    print(f"speechtune-trainer {command}: error: {message}", file=sys.stderr)
    return 2


def run(command: str, args: argparse.Namespace, body: Callable[[Run], tuple[LightningModule, Synthesise]]) -> int:
    """Set up, call `body` for the model and its synthesis, train with objectives; return the exit code."""
    threads = args.threads or cpu_budget()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    from nemo.utils import logging as nemo_logging
    from speechtune_trainer import schedules

    torch.set_num_threads(threads)
    nemo_logging.setLevel(nemo_logging.WARNING)
    schedules.register()
    seed_everything(args.seed, workers=True, verbose=False)
    stats = corpus(args.data)
    try:
        accelerator = accelerator_of(args)
        judge = Transcriber(args.asr_checkpoint) if args.asr_checkpoint else None
        with tempfile.TemporaryDirectory(prefix="speechtune-tts-") as scratch:
            workdir = args.checkpoint_dir or Path(scratch)
            workdir.mkdir(parents=True, exist_ok=True)
            manifests, utterances = absolute_manifests(args.data, args.train_hours, workdir)
            setting = Run(
                command, args, stats, accelerator, workdir, manifests, max_steps=math.ceil(utterances / args.batch_size) * args.epochs,
                num_workers=0 if accelerator == "cpu" else min(8, threads), judge=judge,
            )
            return fit(setting, body)
    except (UsageError, ModelFileError) as problem:
        return error(command, str(problem))


def fit(setting: Run, body: Callable[[Run], tuple[LightningModule, Synthesise]]) -> int:
    from speechtune_trainer import transfer

    args = setting.args
    callbacks: list[Callback] = [StopWhenAsked()]
    if args.checkpoint_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, save_last=True, save_top_k=0))
    trainer = Trainer(
        max_epochs=args.epochs, accelerator=setting.accelerator, devices=1, precision="32", logger=False,
        enable_checkpointing=bool(args.checkpoint_dir), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=callbacks,
    )
    setting.trainer = trainer
    model, synthesise = body(setting)
    own = args.checkpoint_dir / CHECKPOINT if args.checkpoint_dir else None
    resume = own if own is not None and own.exists() else None
    if args.init_from:  # as for asr: a resumed run started from --init-from already, so resuming wins
        try:
            loaded = transfer.init_from(model, args.init_from, []) if resume is None else None
        except transfer.IncompatibleCheckpoint as problem:
            raise UsageError(f"--init-from {args.init_from}: {problem}") from problem
        print(loaded or f"init-from {args.init_from}: not loaded, resuming from {resume}", file=sys.stderr)
    analysis = objectives.Analysis.of(setting.stats)
    artifacts = args.artifacts_dir or (args.checkpoint_dir / "artifacts" if args.checkpoint_dir else None)
    reporter = ObjectiveReporter(
        synthesise, held_out(args.data, args.eval_utterances, analysis), analysis, setting.judge, artifacts, args.artifact_utterances
    )
    trainer.callbacks.append(reporter)
    trainer.fit(model, ckpt_path=resume)
    if reporter.last is None:
        print(f"speechtune-trainer {setting.command}: error: stopped before the first epoch was validated", file=sys.stderr)
        return 1
    report(final=True, **reporter.last)
    return 0
