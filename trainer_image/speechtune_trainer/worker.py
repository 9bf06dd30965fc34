"""The trainer as a warm worker: torch, Lightning and NeMo are imported once, then run after run executes here.

The engine starts `speechtune-trainer asr` with SPEECHTUNE_WORKER=1 (`trialTemplate.workers.mode:
warm`) and hands it runs (docs/engine.md, "Warm workers"). Each run is `cli.main` on the run's
flags, exactly as a cold process would execute it: its flags are checked first (invalid ones end
the run with exit code 2), and `train` seeds everything before it builds anything. Between runs
the worker puts back what a run can leave behind (docs/trainer.md, "Warm workers").

A worker is one process, so it runs single-process runs only: `--devices` defaults to 1 here, and a
run asking for more (`--devices 2`, or `--num-nodes`/$WORLD_SIZE above 1) ends with exit code 2 and
the reason (config.shape_problems), before torch is touched. DDP trials run cold.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from speechtune.protocol import serve as serve_runs

FD_LEAK_LIMIT = 64  # open files a worker may gain over its runs before it is replaced


def serve() -> int:
    """Import once, then execute the engine's runs until it closes stdin."""
    import torch
    from nemo.collections.asr import models  # noqa: F401 -- the import a warm worker pays once, not per run
    from nemo.utils.app_state import AppState

    from speechtune_trainer import cli

    scratch = Path(tempfile.mkdtemp(prefix="speechtune-worker-"))
    threads = torch.get_num_threads()
    open_files: int | None = None  # after the first run: what later runs are measured against

    def fresh_tempdir() -> None:
        """Each run's temporary files go to a directory of its own, deleted after it."""
        shutil.rmtree(scratch / "run", ignore_errors=True)
        (scratch / "run").mkdir()
        tempfile.tempdir = str(scratch / "run")

    def run(argv: list[str]) -> int:
        try:
            return cli.main(argv)
        except torch.cuda.OutOfMemoryError as error:
            raise MemoryError(str(error)) from error  # the worker is replaced, as after any out-of-memory

    def reset() -> dict[str, Any]:
        nonlocal open_files
        end: dict[str, Any] = {}
        gc.collect()  # the run's model, trainer and data loaders, held by cycles
        torch.set_num_threads(threads)
        AppState().reset_model_guid_registry()  # NeMo registers every model it builds
        fresh_tempdir()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # gpu_peak_gib is per run
            end["gpu_mib"] = round(torch.cuda.memory_reserved() / 2**20)
        files = len(os.listdir("/proc/self/fd"))
        open_files = open_files or files
        if files > open_files + FD_LEAK_LIMIT:  # leaked files cannot be closed safely from outside the run
            end["retire"] = True
        return end

    fresh_tempdir()
    try:
        return serve_runs(run, reset)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
