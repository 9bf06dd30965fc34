"""Issue 12's per-run cost: a 1-epoch `speechtune-trainer asr` run, cold (its own process) against warm
(in a worker that already imported torch and NeMo), interleaved, medians over --repetitions.

Cold CPU-s is the child's rusage; warm CPU-s is the worker's /proc CPU time across the run. The
overhead is CPU-s minus the trainer's own `epoch_seconds` (training and validation).

    .venv/bin/speechtune-trainer make-data --out /tmp/d005 --hours 0.05 --seed 0
    .venv/bin/python bench/warm_workers.py /tmp/d005 --repetitions 3

With --rss-runs N it measures memory instead (issue 12's "Memory"): one warm worker executes N
1-epoch runs, cycling through RSS_CONFIGS (five configurations of the README study's search space,
so every fifth run has seen each of them once), and after each run the worker's VmRSS and VmHWM
are read from /proc/<pid>/status. The result, every run's row and the growth of RSS from run 5 to
run N, goes to --out as JSON:

    .venv/bin/python bench/warm_workers.py /tmp/d005 --rss-runs 50 --out bench/results/warm_rss.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


# Five configurations from examples/asr-digits-local.yaml's search space: every encoder, every width.
RSS_CONFIGS: tuple[dict[str, object], ...] = (
    {"encoder": "conformer", "num_layers": 2, "d_model": 96, "n_mels": 64},
    {"encoder": "transformer", "num_layers": 3, "d_model": 128, "n_mels": 80},
    {"encoder": "lstm", "num_layers": 2, "d_model": 64, "n_mels": 40},
    {"encoder": "conformer", "num_layers": 3, "d_model": 128, "n_mels": 72},
    {"encoder": "lstm", "num_layers": 3, "d_model": 128, "n_mels": 56},
)


def status_kib(pid: int, field: str) -> int:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


async def rss(backend: WarmWorkerBackend, template: spec.TrialTemplate, runs: int, out: Path | None) -> None:
    """One worker, `runs` runs; its resident memory after each."""
    rows = []
    pid = None
    for number in range(runs):
        params = RSS_CONFIGS[number % len(RSS_CONFIGS)]
        idle = next(iter(backend._idle), None)
        cpu_before, began = (cpu_of(idle.process.pid) if idle else 0.0), time.monotonic()
        run = await backend.launch(build_launch("bench-rss", number, template, params))
        pid = pid or run.worker.process.pid
        assert run.worker.process.pid == pid, "the worker was replaced"
        lines = [line async for raw in run.lines() if (line := parse_line(raw))]
        assert (await run.wait()).succeeded
        await asyncio.sleep(0.2)  # the worker's clean-up (gc.collect, reset) follows its run-end line
        row = {"run": number + 1, "params": params, "vm_rss_mib": round(status_kib(pid, "VmRSS") / 1024, 1),
               "vm_hwm_mib": round(status_kib(pid, "VmHWM") / 1024, 1), "cpu_s": round(cpu_of(pid) - cpu_before, 2),
               "wall_s": round(time.monotonic() - began, 2), "wer": next(line for line in lines if line.final).metrics.get("wer"),
               "load_average": round(os.getloadavg()[0], 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    def at(n: int) -> float:
        return rows[n - 1]["vm_rss_mib"]
    summary = {"worker_pid": pid, "runs": runs, "rss_after_1_mib": at(1)}
    if runs >= 5:
        summary |= {"rss_after_5_mib": at(5), f"rss_after_{runs}_mib": at(runs),
                    "growth_5_to_last": round(at(runs) / at(5) - 1, 4), "hwm_after_last_mib": rows[-1]["vm_hwm_mib"]}
        if runs >= 10:  # both after a full cycle of the configurations
            summary |= {"rss_after_10_mib": at(10), "growth_10_to_last": round(at(runs) / at(10) - 1, 4)}
    print(json.dumps(summary, indent=1))
    if out:
        out.write_text(json.dumps({
            "command": f".venv/bin/python bench/warm_workers.py DATA --rss-runs {runs} --out {out}",
            "machine": f"{os.cpu_count()} cores, CPU only, shared with other work",
            "flags": list(template.args), "configs": list(RSS_CONFIGS), "summary": summary, "rows": rows,
        }, indent=1) + "\n")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--rss-runs", type=int, default=0, help="measure one worker's RSS over this many runs instead")
    parser.add_argument("--out", type=Path, help="--rss-runs: where the JSON goes")
    args = parser.parse_args()
    flags = ["--data", str(args.data), "--epochs", "1", "--accelerator", "cpu", "--threads", "1"]
    template = spec.TrialTemplate(command=(str(Path(sys.executable).parent / "speechtune-trainer"), "asr"), args=tuple(flags))
    if args.rss_runs:
        backend = WarmWorkerBackend(Path("/tmp/speechtune-bench-warm-rss"), spec.Workers(mode="warm", max_runs_per_worker=args.rss_runs + 1))
        try:
            await rss(backend, template, args.rss_runs, args.out)
        finally:
            await backend.close()
        return
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
