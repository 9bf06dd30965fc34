"""`asr`: build a NeMo model from validated flags, train it with Lightning, report every epoch.

torch and NeMo are imported inside `train` only, after the flags passed their checks, so
invalid trials fail fast and `make-data` never pays NeMo's import.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from speechtune.protocol import RunStopped, report, stop_requested
from speechtune_trainer import config

CHECKPOINT = "last.ckpt"


def cpu_budget() -> int:
    """CPUs this process may use: the cgroup v2 quota (a pod's CPU limit) when set, else the affinity mask."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def training_manifest(data: Path, hours: float | None, workdir: Path) -> tuple[Path, int]:
    """The train manifest cut to its first `hours` of audio, and its utterance count.

    A prefix, so the subsets are nested: a trial on more hours sees the same utterances plus more.
    """
    source = data / "train_manifest.json"
    lines = source.read_text().splitlines()
    if hours is None:
        return source, len(lines)
    kept, seconds = [], 0.0
    for line in lines:
        if seconds >= hours * 3600:
            break
        entry = json.loads(line)
        seconds += entry["duration"]
        # The subset lives outside the data directory, so relative audio paths must become absolute.
        entry["audio_filepath"] = str((data / entry["audio_filepath"]).resolve())
        kept.append(json.dumps(entry))
    subset = workdir / "train_subset_manifest.json"
    subset.write_text("\n".join(kept) + "\n")
    return subset, len(kept)


def train(args: argparse.Namespace) -> int:
    """Train (or resume) one trial, optionally from --init-from's weights; return the process exit code."""
    threads = args.threads or cpu_budget()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))

    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from omegaconf import OmegaConf

    from nemo.collections.asr.models import EncDecCTCModel, EncDecHybridRNNTCTCModel, EncDecRNNTModel
    from nemo.utils import logging as nemo_logging
    from speechtune_trainer import encoders, schedules, transfer
    from speechtune_trainer.reporting import CharErrorCounter, ProtocolReporter

    torch.set_num_threads(threads)
    nemo_logging.setLevel(nemo_logging.WARNING)
    encoders.register()
    schedules.register()
    accelerator = args.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu" and not torch.cuda.is_available():
        print("speechtune-trainer asr: error: --accelerator gpu, but torch sees no CUDA device", file=sys.stderr)
        return 2
    precision = args.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" else "32"
    seed_everything(args.seed, workers=True, verbose=False)

    class ScheduleHorizon(Callback):
        """Keeps the decay horizon at this run's schedule length when resuming: the checkpoint holds the old one."""

        def __init__(self, max_steps: int) -> None:
            self.max_steps = max_steps

        def on_train_start(self, trainer: Trainer, pl_module) -> None:
            for scheduler_config in trainer.lr_scheduler_configs:
                if hasattr(scheduler_config.scheduler, "max_steps"):
                    scheduler_config.scheduler.max_steps = self.max_steps

    class StopWhenAsked(Callback):
        """In a warm worker, ends the run at the next batch once the engine asked (pruned, study over).
        Raising rather than setting trainer.should_stop: Lightning would first validate the whole dev set."""

        def on_train_batch_start(self, *args) -> None:
            if stop_requested():
                raise RunStopped

        def on_validation_batch_start(self, *args) -> None:
            if stop_requested():
                raise RunStopped

    with tempfile.TemporaryDirectory(prefix="speechtune-trainer-") as scratch:
        workdir = args.checkpoint_dir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        train_manifest, utterances = training_manifest(args.data, args.train_hours, workdir)
        max_steps = config.schedule_steps(args, utterances)
        num_workers = 0 if accelerator == "cpu" else min(8, threads)
        cfg = OmegaConf.create(
            config.model_config(args, train_manifest, args.data / "dev_manifest.json", max_steps, num_workers)
        )
        callbacks: list[Callback] = [ScheduleHorizon(max_steps), StopWhenAsked()]
        if args.checkpoint_dir:
            callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, save_last=True, save_top_k=0))
        trainer = Trainer(
            max_epochs=args.epochs,
            accelerator=accelerator,
            devices=1,
            precision=precision,
            logger=False,
            enable_checkpointing=bool(args.checkpoint_dir),
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=callbacks,
        )
        model_class = {"ctc": EncDecCTCModel, "transducer": EncDecRNNTModel, "hybrid": EncDecHybridRNNTCTCModel}
        model = model_class[args.decoder](cfg=cfg, trainer=trainer)
        checkpoint = args.checkpoint_dir / CHECKPOINT if args.checkpoint_dir else None
        resuming = checkpoint is not None and checkpoint.exists()
        if args.init_from and resuming:
            # The run is being continued: its own checkpoint already started from --init-from.
            print(f"init-from {args.init_from}: not loaded, resuming from {checkpoint}", file=sys.stderr)
        elif args.init_from:
            try:
                print(transfer.init_from(model, args.init_from, list(cfg.labels)), file=sys.stderr)
            except transfer.IncompatibleCheckpoint as error:
                print(f"speechtune-trainer asr: error: --init-from {args.init_from}: {error}", file=sys.stderr)
                return 2
        reporter = ProtocolReporter(CharErrorCounter(model.wer))
        trainer.callbacks.append(reporter)
        trainer.fit(model, ckpt_path=checkpoint if resuming else None)
    if reporter.last is None:
        print("speechtune-trainer asr: error: stopped before the first epoch was validated", file=sys.stderr)
        return 1
    report(final=True, **reporter.last)
    return 0
