"""Issue 13's recording: real learning curves of configurations sampled from the ladder benchmark's space,
for bench/ladder_replay.py to replay (``speechtune.replay``).

``--configs`` configurations are drawn uniformly at random (Optuna's RandomSampler, ``--seed``)
from bench/ladder_efficiency.py's search space. Each is trained at every *kind* of run:

- ``full``: the first ``--full-hours`` hours of the training data, the sampled model, ``--epochs`` epochs;
- ``data``: the first ``--data-hours`` hours of the training data (``train_hours``);
- ``model``: ``--model-layers`` encoder layers instead of the sampled number (``num_layers``);
- ``data-model``: both.

Every run trains ``--epochs`` epochs with ``--schedule-epochs`` equal to it, so its first e epochs
are what an e-epoch level run (or a ladder level resumed from it) computes. Each run's per-epoch
``wer``, ``cer`` and ``val_loss`` are stored, with the CPU-s and wall-s from the run's start to the
end of every epoch, before its first epoch (set-up) and over the whole run. A kind whose
overrides leave a configuration unchanged (``num_layers: 1`` on a 1-layer configuration) is the
same run as the kind it equals, stored as ``{"same_as": KIND}`` and not trained twice.

Runs execute in warm workers (``speechtune.workers.WarmWorkerBackend``), ``--parallelism`` at a
time. The worker command is this script in ``--worker`` mode: the trainer's own warm worker
(``speechtune_trainer.worker``) with a thin shim that adds ``val_loss`` (the NeMo trainer does not
print it yet; Lightning has it in ``callback_metrics``), the process's CPU-s and wall-s since the run
began to every epoch line, and one last line with the run's totals. Each worker's start-up (the
interpreter and the torch / Lightning / NeMo imports, before its first run) is measured too: it is
what a cold run pays on top of a warm one, and the replay can charge it.

The JSON is rewritten after every run, so an interrupted recording keeps what it finished, and a
rerun with the same settings only records what is missing.

    .venv/bin/python bench/record_curves.py                       # the committed bench/results/curves.json
    .venv/bin/python bench/record_curves.py --trainer fake --configs 12 --epochs 5 --data-hours 0.02 \\
        --out bench/results/curves_fake.json                     # a recording in seconds, for tests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

FORMAT = 1  # speechtune.replay.RECORDING_FORMAT
KINDS = ("full", "data", "model", "data-model")
NOT_METRICS = ("cpu_s", "wall_s", "epoch_seconds")  # kept apart from the curve's metrics (epoch_seconds is the trainer's own timer)


# -- the worker shim (runs inside each warm worker) ----------------------------------------------------
def process_started_wall_s() -> float:
    """Seconds since this process started (from /proc), so the start-up includes the interpreter's."""
    ticks = os.sysconf("SC_CLK_TCK")
    started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - started


def worker(trainer: str) -> int:
    """Be the trainer's warm worker, with every run timed and (NeMo) val_loss added to its epoch lines."""
    from speechtune import protocol

    run: dict[str, Any] = {}
    runs_here = [0]

    def timed(report):
        def timed_report(step=None, *, final=False, **metrics):
            if step is not None and not final and run:
                if "val_loss" not in metrics and run.get("val_loss") is not None:
                    metrics["val_loss"] = run["val_loss"]
                metrics["cpu_s"] = round(time.process_time() - run["cpu0"], 3)
                metrics["wall_s"] = round(time.monotonic() - run["wall0"], 3)
            report(step, final=final, **metrics)
        return timed_report

    def timed_main(main):
        def run_once(argv):
            startup = {}
            if runs_here[0] == 0:  # what this process spent before its first run: a cold run's extra
                startup = {"worker_startup_cpu_s": round(time.process_time(), 3),
                           "worker_startup_wall_s": round(process_started_wall_s(), 3)}
            runs_here[0] += 1
            run.clear()
            run.update(cpu0=time.process_time(), wall0=time.monotonic())
            code = main(argv)
            if code == 0:
                protocol.report(final=True, run_cpu_s=round(time.process_time() - run["cpu0"], 3),
                                run_wall_s=round(time.monotonic() - run["wall0"], 3),
                                setup_cpu_s=run.get("setup_cpu_s", 0.0), setup_wall_s=run.get("setup_wall_s", 0.0),
                                worker_run=runs_here[0], load_average=round(os.getloadavg()[0], 2), **startup)
            run.clear()
            return code
        return run_once

    if trainer == "fake":
        from speechtune import fake_trainer

        fake_trainer.report = timed(fake_trainer.report)
        sys.argv = sys.argv[:1]
        return protocol.serve(timed_main(fake_trainer.main))

    from speechtune_trainer import cli, reporting
    from speechtune_trainer import worker as nemo_worker

    reporter = reporting.ProtocolReporter
    epoch_start, validation_end = reporter.on_train_epoch_start, reporter.on_validation_end

    def on_train_epoch_start(self, trainer, module):
        if run and "setup_cpu_s" not in run:
            run["setup_cpu_s"] = round(time.process_time() - run["cpu0"], 3)
            run["setup_wall_s"] = round(time.monotonic() - run["wall0"], 3)
        return epoch_start(self, trainer, module)

    def on_validation_end(self, trainer, module):
        if run and not trainer.sanity_checking:
            loss = trainer.callback_metrics.get("val_loss")
            run["val_loss"] = float(loss) if loss is not None else None
        return validation_end(self, trainer, module)

    reporter.on_train_epoch_start = on_train_epoch_start
    reporter.on_validation_end = on_validation_end
    reporting.report = timed(reporting.report)
    cli.main = timed_main(cli.main)
    sys.argv = [sys.argv[0], "asr"]  # serve() puts the process's own arguments before each run's
    return nemo_worker.serve()


# -- the recorder --------------------------------------------------------------------------------
def sample_configs(space: list[dict], count: int, seed: int) -> list[dict[str, Any]]:
    import optuna

    from speechtune import search
    from speechtune.replay import parse_space

    distributions = search.distributions(parse_space(space))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [study.ask(distributions).params for _ in range(count)]


def kinds_of(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    kinds = {"full": {}, "data": {"train_hours": args.data_hours}, "model": {"num_layers": args.model_layers},
             "data-model": {"train_hours": args.data_hours, "num_layers": args.model_layers}}
    return {name: kinds[name] for name in args.kinds}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a recorded run depends on: a rerun with other settings starts over."""
    return {key: getattr(args, key) for key in ("trainer", "hours", "data_seed", "seed", "epochs", "batch_size", "warmup_steps",
                                                "full_hours", "data_hours", "model_layers", "fake_sleep")}


def template(args: argparse.Namespace):
    from speechtune import spec

    if args.trainer == "fake":
        command = (sys.executable, str(Path(__file__).resolve()), "--worker", "fake")
        flags = ["--epochs", str(args.epochs), "--sleep", str(args.fake_sleep)]
    else:  # the command line names speechtune-trainer asr, so `pgrep -f "speechtune-trainer asr"` finds these workers
        command = (sys.executable, str(Path(__file__).resolve()), "--worker", "nemo", "speechtune-trainer", "asr")
        flags = ["--data", str(args.data.resolve()), "--epochs", str(args.epochs), "--schedule-epochs", str(args.epochs),
                 "--batch-size", str(args.batch_size), "--warmup-steps", str(args.warmup_steps),
                 "--accelerator", "cpu", "--threads", "1", "--seed", "0"]
        if args.full_hours is not None:
            flags += ["--train-hours", str(args.full_hours)]
    return spec.TrialTemplate(command=command, args=tuple(flags), workers=spec.Workers(mode="warm", max_runs_per_worker=args.max_runs_per_worker))


def command_line(args: argparse.Namespace) -> str:
    parts = [".venv/bin/python bench/record_curves.py"]
    defaults = vars(build_parser().parse_args([]))
    for key, value in vars(args).items():
        if key in ("worker",) or value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            parts.append(f"{flag} {' '.join(map(str, value))}")
        else:
            parts.append(f"{flag} {value if not isinstance(value, Path) else os.path.relpath(value, ROOT)}")
    return " ".join(parts)


def ensure_data(args: argparse.Namespace) -> None:
    if args.trainer == "fake" or (args.data / "train_manifest.json").is_file():
        return
    subprocess.run([str(Path(sys.executable).parent / "speechtune-trainer"), "make-data", "--out", str(args.data),
                    "--hours", str(args.hours), "--seed", str(args.data_seed)], check=True)


def training_hours(args: argparse.Namespace) -> float | None:
    manifest = args.data / "train_manifest.json"
    if not manifest.is_file():
        return None
    return round(sum(json.loads(line)["duration"] for line in manifest.read_text().splitlines() if line.strip()) / 3600, 4)


def load(args: argparse.Namespace, configs: list[dict]) -> dict:
    """The recording so far: the one in --out if it has the same settings, else a new one."""
    if args.out.is_file():
        old = json.loads(args.out.read_text())
        if old.get("meta", {}).get("settings") == settings(args):
            known = {entry["id"]: entry for entry in old["configs"]}
            old["configs"] = [known.get(index, {"id": index, "params": params, "runs": {}}) for index, params in enumerate(configs)]
            return old
    return {"meta": {}, "configs": [{"id": index, "params": params, "runs": {}} for index, params in enumerate(configs)]}


def same_as(config: dict, kind: str, kinds: dict[str, dict]) -> str | None:
    """The earlier kind whose run this kind's run of this configuration is (its overrides change nothing else)."""
    mine = {**config["params"], **kinds[kind]}
    for other in kinds:
        if other == kind:
            return None
        if {**config["params"], **kinds[other]} == mine:
            return other
    return None


def write(args: argparse.Namespace, recording: dict, kinds: dict, started: float, extra: dict) -> None:
    startup = [run for entry in recording["configs"] for run in entry["runs"].values() if "worker_startup_cpu_s" in run]
    cpu = [run["worker_startup_cpu_s"] for run in startup]
    wall = [run["worker_startup_wall_s"] for run in startup]
    recording["meta"] = {
        "format": FORMAT,
        "command": command_line(args),
        "what": ("real NeMo learning curves" if args.trainer == "nemo" else "the fake trainer's curves (tests, smoke runs)")
                + " for bench/ladder_replay.py (speechtune.replay); see bench/record_curves.py",
        "trainer": "speechtune-trainer asr (NeMo Conformer-CTC, CPU, 1 thread)" if args.trainer == "nemo" else "speechtune.fake_trainer",
        "trainer_args": [os.path.relpath(arg, ROOT) if arg == str(args.data.resolve()) else arg for arg in template(args).args],
        "settings": settings(args),
        "objective": "wer",
        "epochs": args.epochs,
        "kinds": kinds,
        "space": extra["space"],
        "train_hours_total": training_hours(args) if args.trainer == "nemo" else None,
        "startup": {
            "what": "each warm worker's CPU-s and wall-s before its first run (interpreter, torch, Lightning, NeMo imports): "
                    "what a cold run pays on top of a warm one",
            "cpu_s": cpu, "wall_s": wall,
            "cpu_s_median": round(statistics.median(cpu), 3) if cpu else 0.0,
            "wall_s_median": round(statistics.median(wall), 3) if wall else 0.0,
        },
        "machine": f"{os.cpu_count()} cores, CPU only, shared with other work (load average in each run)",
        "recorded_wall_s": round(extra["wall_before"] + time.monotonic() - started, 1),
        "notes": extra["notes"],
    }
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(recording, separators=(",", ":")) + "\n")
    os.replace(temporary, args.out)


def parse_run(lines: list[bytes]) -> dict[str, Any]:
    from speechtune.protocol import parse_line

    steps, cpu, wall, totals = [], [], [], None
    for raw in lines:
        line = parse_line(raw)
        if line is None:
            continue
        if line.final and "run_cpu_s" in line.metrics:
            totals = line.metrics
        elif not line.final and line.step is not None:
            steps.append({key: round(value, 6) for key, value in line.metrics.items() if key not in NOT_METRICS})
            cpu.append(line.metrics["cpu_s"])
            wall.append(line.metrics["wall_s"])
    if totals is None:
        raise RuntimeError("the run printed no totals line")
    run = {"steps": steps, "cpu_s": cpu, "wall_s": wall, **{key: totals[key] for key in
           ("run_cpu_s", "run_wall_s", "setup_cpu_s", "setup_wall_s", "worker_run", "load_average")}}
    for key in ("worker_startup_cpu_s", "worker_startup_wall_s"):
        if key in totals:
            run[key] = totals[key]
    return run


async def record(args: argparse.Namespace) -> None:
    from speechtune.backend import build_launch
    from speechtune.workers import WarmWorkerBackend

    from ladder_efficiency import SPACE

    configs = sample_configs(SPACE, args.configs, args.seed)
    kinds = kinds_of(args)
    recording = load(args, configs)
    wall_before = recording.get("meta", {}).get("recorded_wall_s", 0.0)
    notes = [
        "val_loss: NeMo's validation loss, Lightning's callback_metrics['val_loss'] (the trainer prints it since issue 13; "
        "the recording's worker shim adds it when a trainer does not)",
        "cpu_s / wall_s per epoch are cumulative from the run's start (the worker's process CPU time: one torch thread)",
        "setup_*: before the first training epoch (model, data loaders); run_*: the whole run; a kind marked same_as is that kind's run",
        "warm runs: the worker had already imported torch and NeMo; startup.* is the cost a cold run adds",
    ] if args.trainer == "nemo" else ["fake trainer: costs are its --sleep and the interpreter's, not training"]
    extra = {"space": SPACE, "notes": notes, "wall_before": wall_before}
    todo = []
    for entry in recording["configs"]:
        for kind in kinds:
            if kind in entry["runs"]:
                continue
            twin = same_as(entry, kind, kinds)
            if twin is not None:
                entry["runs"][kind] = {"same_as": twin}
            else:
                todo.append((entry, kind))
    started = time.monotonic()
    write(args, recording, kinds, started, extra)
    print(f"# {len(todo)} runs to record ({len(recording['configs'])} configurations x {len(kinds)} kinds, "
          f"{sum(len(e['runs']) for e in recording['configs'])} kept); out {args.out}", flush=True)
    template_ = template(args)
    workdir = Path(tempfile.mkdtemp(prefix="record-curves-"))
    backend = WarmWorkerBackend(workdir, template_.workers)
    queue: asyncio.Queue = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    done = [0]

    async def one(entry: dict, kind: str) -> None:
        launch = build_launch("record", entry["id"], template_, entry["params"], overrides=kinds[kind], attempt=kind)
        run = await backend.launch(launch)
        lines = [raw async for raw in run.lines()]
        exit = await run.wait()
        if not exit.succeeded:
            raise RuntimeError(f"{exit.reason}: {exit.message}")
        entry["runs"][kind] = parse_run(lines)

    async def consume() -> None:
        while not queue.empty():
            entry, kind = queue.get_nowait()
            for attempt in (1, 2):
                try:
                    await one(entry, kind)
                    break
                except Exception as error:  # noqa: BLE001 -- a failed run is retried once, then left out
                    print(f"# config {entry['id']} {kind}: attempt {attempt} failed: {error}", flush=True)
            done[0] += 1
            run = entry["runs"].get(kind)
            if run is not None:
                last = run["steps"][-1] if run["steps"] else {}
                print(f"{time.strftime('%H:%M:%S')} [{done[0]}/{len(todo)}] config {entry['id']} {kind}: "
                      f"wer {last.get('wer', float('nan')):.3f} cer {last.get('cer', float('nan')):.3f} "
                      f"val_loss {last.get('val_loss', float('nan')):.3g}; {run['run_cpu_s']:.1f} CPU-s, {run['run_wall_s']:.1f} s, "
                      f"load {run['load_average']}", flush=True)
            write(args, recording, kinds, started, extra)

    try:
        await asyncio.gather(*(consume() for _ in range(args.parallelism)))
    finally:
        await backend.close()
    write(args, recording, kinds, started, extra)
    missing = sum(1 for entry in recording["configs"] for kind in kinds if kind not in entry["runs"])
    print(f"# done: {len(todo) - missing} runs recorded, {missing} missing; {time.monotonic() - started:.0f} s", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer", choices=("nemo", "fake"), default="nemo")
    parser.add_argument("--configs", type=int, default=60, help="configurations sampled uniformly from the space")
    parser.add_argument("--seed", type=int, default=0, help="the random sampler's seed")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "replay-bench", help="make-data directory (made if missing)")
    parser.add_argument("--hours", type=float, default=0.2, help="make-data --hours, when the data is made")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4, help="full fidelity, and every recorded run")
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--full-hours", type=float, default=0.054,
                        help="train_hours of the full kind (the first H hours of make-data's training set); the dev set is all of it")
    parser.add_argument("--data-hours", type=float, default=0.0135, help="train_hours of the data and data-model kinds")
    parser.add_argument("--model-layers", type=int, default=1, help="num_layers of the model and data-model kinds")
    parser.add_argument("--fake-sleep", type=float, default=0.01, help="fake trainer: seconds per epoch")
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--max-runs-per-worker", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "curves.json")
    parser.add_argument("--worker", choices=("nemo", "fake"), help=argparse.SUPPRESS)
    return parser


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2]))
    args = build_parser().parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ensure_data(args)
    asyncio.run(record(args))


if __name__ == "__main__":
    main()
