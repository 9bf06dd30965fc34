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
    # Atomically: under DDP every process writes it, and a --checkpoint-dir may be shared by pods.
    partial = subset.with_name(f"{subset.name}.{os.getpid()}")
    partial.write_text("\n".join(kept) + "\n")
    os.replace(partial, subset)
    return subset, len(kept)


def usage_error(message: str) -> int:
    print(f"speechtune-trainer asr: error: {message}", file=sys.stderr)
    return 2


def train(args: argparse.Namespace, own_command_line: bool = True) -> int:
    """Train (or resume) one trial, optionally from --init-from's weights; return the process exit code.

    `own_command_line`: `args` came from this process's sys.argv, which Lightning's DDP launcher reruns
    to start the other processes of this machine (False for in-process calls such as a warm worker's).
    """
    devices_known = config.local_devices_before_torch(args, in_process=not own_command_line)
    if devices_known is not None and devices_known > 1 and not own_command_line:
        return usage_error(
            f"--devices {devices_known}: Lightning starts the other {devices_known - 1} processes by rerunning this "
            "process's command line, so run the speechtune-trainer command, not an in-process call"
        )
    # The machine's CPUs are shared by its processes (one per device).
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads or max(1, cpu_budget() // (devices_known or 1))))

    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy
    from omegaconf import OmegaConf

    from nemo.collections.asr.models import EncDecCTCModel, EncDecHybridRNNTCTCModel, EncDecRNNTModel
    from nemo.utils import logging as nemo_logging
    from speechtune_trainer import encoders, schedules, transfer
    from speechtune_trainer.attention import AttentionModel
    from speechtune_trainer.reporting import ErrorCounter, ProtocolReporter

    nemo_logging.setLevel(nemo_logging.WARNING)
    encoders.register()
    schedules.register()
    accelerator = args.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu" and not torch.cuda.is_available():
        return usage_error("--accelerator gpu, but torch sees no CUDA device")
    devices = devices_known or (torch.cuda.device_count() if accelerator == "gpu" else 1)
    if accelerator == "gpu" and devices > torch.cuda.device_count():
        return usage_error(f"--devices {devices}, but torch sees {torch.cuda.device_count()} CUDA devices")
    nodes = config.num_nodes(args)
    shape_problems = config.shape_problems(args, devices, nodes)
    if shape_problems:
        return usage_error("\n  ".join(["invalid flags:", *shape_problems]))
    processes = devices * nodes
    threads = args.threads or max(1, cpu_budget() // devices)
    torch.set_num_threads(threads)
    if devices > 1 and "LOCAL_RANK" not in os.environ:
        # This process starts the machine's other processes with its own command line. They must not take
        # --num-nodes from $WORLD_SIZE: Lightning sets that to all processes of all nodes before starting them.
        sys.argv += [f"--devices={devices}", f"--num-nodes={nodes}"]
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
        max_steps = config.schedule_steps(args, utterances, processes)
        num_workers = 0 if accelerator == "cpu" else min(8, threads)
        cfg = OmegaConf.create(
            config.model_config(args, train_manifest, args.data / "dev_manifest.json", max_steps, num_workers, processes)
        )
        callbacks: list[Callback] = [ScheduleHorizon(max_steps), StopWhenAsked()]
        if args.checkpoint_dir:
            callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, save_last=True, save_top_k=0))
        trainer = Trainer(
            max_epochs=args.epochs,
            accelerator=accelerator,
            devices=devices,
            num_nodes=nodes,
            # Lightning's DDP: one process per device on each node; gloo on CPU, NCCL on GPU.
            strategy=DDPStrategy(process_group_backend="gloo" if accelerator == "cpu" else "nccl") if processes > 1 else "auto",
            precision=precision,
            logger=False,
            enable_checkpointing=bool(args.checkpoint_dir),
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=callbacks,
        )
        model_class = {
            "ctc": EncDecCTCModel, "transducer": EncDecRNNTModel, "hybrid": EncDecHybridRNNTCTCModel, "attention": AttentionModel
        }
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
                return usage_error(f"--init-from {args.init_from}: {error}")
        reporter = ProtocolReporter(ErrorCounter(model.wer))
        trainer.callbacks.append(reporter)
        trainer.fit(model, ckpt_path=checkpoint if resuming else None)
    if not trainer.is_global_zero:
        return 0  # only global rank 0 prints protocol lines
    if reporter.last is None:
        print("speechtune-trainer asr: error: stopped before the first epoch was validated", file=sys.stderr)
        return 1
    report(final=True, **reporter.last)
    return 0
