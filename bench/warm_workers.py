"""Issue 12's per-run cost: a 1-epoch `speechtune-trainer asr` run, cold (its own process) against warm
(in a worker that already imported torch and NeMo), interleaved, medians over --repetitions.

Cold CPU-s is the child's rusage; warm CPU-s is the worker's /proc CPU time across the run. The
overhead is CPU-s minus the trainer's own `epoch_seconds` (training and validation).

    .venv/bin/speechtune-trainer make-data --out /tmp/d005 --hours 0.05 --seed 0
    .venv/bin/python bench/warm_workers.py /tmp/d005 --repetitions 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from speechtune import spec
from speechtune.backend import build_launch
from speechtune.protocol import parse_line
from speechtune.workers import WarmWorkerBackend

TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def cold(flags: list[str]) -> tuple[float, float, float]:
    before, began = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    out = subprocess.run([str(Path(sys.executable).parent / "speechtune-trainer"), "asr", *flags],
                         capture_output=True, text=True, check=True).stdout
    wall, after = time.monotonic() - began, resource.getrusage(resource.RUSAGE_CHILDREN)
    epoch = next(line for line in map(parse_line, out.splitlines()) if line and not line.final)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, wall, epoch.metrics["epoch_seconds"]


async def warm(backend: WarmWorkerBackend, template: spec.TrialTemplate, number: int) -> tuple[float, float, float]:
    idle = next(iter(backend._idle), None)  # the worker that will take the run (none yet: a new one, from 0 CPU-s)
    cpu_before, began = (cpu_of(idle.process.pid) if idle else 0.0), time.monotonic()
    run = await backend.launch(build_launch("bench", number, template, {}))
    pid = run.worker.process.pid
    lines = [line async for raw in run.lines() if (line := parse_line(raw))]
    cpu, wall = cpu_of(pid) - cpu_before, time.monotonic() - began
    assert (await run.wait()).succeeded
    epoch = next(line for line in lines if not line.final)
    return cpu, wall, epoch.metrics["epoch_seconds"]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    flags = ["--data", str(args.data), "--epochs", "1", "--accelerator", "cpu", "--threads", "1"]
    template = spec.TrialTemplate(command=(str(Path(sys.executable).parent / "speechtune-trainer"), "asr"), args=tuple(flags))
    backend = WarmWorkerBackend(Path("/tmp/speechtune-bench-warm"), spec.Workers(mode="warm"))
    try:
        first = await warm(backend, template, 0)
        print(f"warm worker's first run (imports included): cpu {first[0]:.2f} s, wall {first[1]:.2f} s", flush=True)
        rows: dict[str, list[tuple[float, float, float]]] = {"cold": [], "warm": []}
        for repetition in range(args.repetitions):
            rows["cold"].append(await asyncio.to_thread(cold, flags))
            rows["warm"].append(await warm(backend, template, repetition + 1))
        for mode, values in rows.items():
            cpu, wall, epoch = (statistics.median(value[index] for value in values) for index in range(3))
            print(f"{mode}: median CPU {cpu:.2f} s, wall {wall:.2f} s, epoch_seconds {epoch:.2f} s, CPU beyond the epoch {cpu - epoch:.2f} s")
    finally:
        await backend.close()


if __name__ == "__main__":
    asyncio.run(main())
