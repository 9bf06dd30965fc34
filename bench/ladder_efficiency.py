"""Issue 7's efficiency benchmark: random vs TPE at full fidelity vs TPE + ladder, at equal trainer-seconds.

Every trial is a real NeMo run (`speechtune-trainer asr`, CPU, one thread) on speech that
`make-data` synthesises with espeak-ng; each arm is a study run by the real engine
(`Executor` with `LocalProcessBackend`, SQLite in a temp dir). The trial
command is bench/timed_run.py around the trainer, so each run's CPU-seconds, wall-seconds and
end time are stored with its trial; the anytime curve comes from storage alone: runs in
finish order, cumulative trainer CPU-seconds, best full-fidelity WER so far. CPU-seconds, not
wall-seconds, are the budget, because the 2 cores are shared and wall time depends on what
else runs. Low-level WERs of the ladder never count as a result: only its top level, which is
the full fidelity of the other arms.

The full-fidelity arms stop launching once their finished runs used the budget B; the ladder
is sized to about B by its own shape. Seeds rotate the order of the arms, so machine load
falls on each arm alike. Results (every run, each study's curve, the summary) are rewritten
to --out after every study, so an interrupted run keeps what it finished, and a later run
with the same settings reuses the studies already there (a changed ladder reruns only the
ladder arm).

    .venv/bin/python bench/ladder_efficiency.py              # the run in docs/benchmarks.md
    .venv/bin/python bench/ladder_efficiency.py --hours 0.03 --epochs 2 --low-epochs 1 \\
        --budget 60 --ladder-initial 3 --seeds 0 --out /tmp/smoke.json   # a smoke run, minutes
    .venv/bin/python bench/ladder_efficiency.py --analyze bench/results/ladder_efficiency.json --budget 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from speechtune import spec
from speechtune.executor import Event, Executor
from speechtune.local import LocalProcessBackend
from speechtune.storage import WriteThroughStorage, open_rdb

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("random", "tpe", "ladder")
# Small enough that a full trial is about a minute of one core; lr wide enough that some
# configurations never leave WER 1.0 in the budgeted epochs (what a cheap proxy can spot).
SPACE = [
    {"name": "lr", "float": {"low": 3.0e-4, "high": 1.0e-2, "log": True}},
    {"name": "schedule", "categorical": ["warmup-cosine", "noam"]},
    {"name": "d_model", "categorical": [48, 64, 96]},
    {"name": "num_layers", "int": {"low": 1, "high": 2}},
    {"name": "n_mels", "int": {"low": 40, "high": 80, "step": 8}},
    {"name": "dropout", "float": {"low": 0.0, "high": 0.3}},
    {"name": "freq_masks", "int": {"low": 0, "high": 2}},
    {"name": "time_masks", "int": {"low": 0, "high": 2}},
]
COSTS = ("cpu", "wall", "epochs")  # run_cpu_s, run_wall_s, run_epochs_s (see bench/timed_run.py)
# The settings a finished study depends on; the ladder's own only matter to the ladder arm.
SHARED_SETTINGS = ("data", "hours", "data_seed", "budget", "epochs", "batch_size", "warmup_steps", "startup_trials",
                   "parallelism", "max_trials")
LADDER_SETTINGS = ("low_epochs", "ladder_initial", "eta", "mode")


def ensure_data(args: argparse.Namespace) -> None:
    """Synthesise the corpus once; later runs reuse it."""
    if (args.data / "train_manifest.json").is_file():
        return
    subprocess.run([str(Path(sys.executable).parent / "speechtune-trainer"), "make-data", "--out", str(args.data),
                    "--hours", str(args.hours), "--seed", str(args.data_seed)], check=True)


def study_spec(arm: str, seed: int, args: argparse.Namespace, folder: Path) -> spec.Study:
    """One arm's study: the same space, trainer and full fidelity for all three."""
    manifest: dict = {
        "metadata": {"name": f"{arm}-seed{seed}"},
        "spec": {
            "objective": {"metric": "wer", "direction": "minimize"},
            "maxTrials": args.max_trials,
            "parallelism": args.parallelism,
            "maxFailedTrials": args.max_trials,
            "sampler": {"type": "random" if arm == "random" else "tpe", "seed": seed, "startupTrials": args.startup_trials},
            "searchSpace": SPACE,
            "trialTemplate": {
                "command": [sys.executable, str(ROOT / "bench" / "timed_run.py"), "speechtune-trainer", "asr"],
                # --schedule-epochs: the ladder's low level stops early on the full run's lr schedule, so a
                # promoted run resumes that schedule instead of restarting a decayed one (a no-op at full fidelity).
                "args": ["--data", str(args.data.resolve()), "--epochs", str(args.epochs), "--schedule-epochs", str(args.epochs),
                         "--batch-size", str(args.batch_size),
                         "--warmup-steps", str(args.warmup_steps), "--accelerator", "cpu", "--threads", "1", "--seed", "0"],
            },
            "storage": {"url": f"sqlite:///{folder}/{arm}-seed{seed}.db"},
        },
    }
    if arm == "ladder":
        manifest["spec"]["fidelity"] = {
            "levels": [{"name": "low", "overrides": {"epochs": args.low_epochs}},
                       {"name": "full", "overrides": {"epochs": args.epochs}}],
            "reductionFactor": args.eta,
            "initialTrials": args.ladder_initial,
            "mode": args.mode,
            "resumeFromCheckpoint": True,
            "checkpointVolume": str(folder / f"checkpoints-seed{seed}"),
        }
    return spec.parse_study(manifest)


def run_study(arm: str, seed: int, args: argparse.Namespace, folder: Path) -> dict:
    """Run one arm to its budget with the real engine; return its runs as read back from storage."""
    study = study_spec(arm, seed, args, folder)
    storage = WriteThroughStorage(open_rdb(study.storage.url))
    backend = LocalProcessBackend(folder / study.name)
    engine: Executor
    if study.fidelity is not None:
        engine = Executor(study, storage, backend, notify=lambda e: log(study.name, e), checkpoint_root=Path(study.fidelity.checkpoint_volume))
    else:
        def guard(event: Event) -> None:
            log(study.name, event)
            if event.kind == "completed" and sum(r["cpu"] for r in runs_of(engine.study, None)) >= args.budget:
                engine.update_budget(max_trials=len(engine.trials()))  # B spent: start nothing new
        engine = Executor(study, storage, backend, notify=guard)
    load_before, began = os.getloadavg(), time.monotonic()
    outcome = asyncio.run(engine.run())
    runs = runs_of(engine.study, study.fidelity)
    shutil.rmtree(folder / f"checkpoints-seed{seed}", ignore_errors=True)
    return {
        "arm": arm, "seed": seed, "outcome": outcome.state, "message": outcome.message,
        "wall_s": round(time.monotonic() - began, 1), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "failed_trials": sum(1 for t in engine.trials() if t.state == optuna.trial.TrialState.FAIL),
        "configurations": len(engine.trials()), "runs": runs,
    }


def runs_of(study: optuna.Study, fidelity: spec.Fidelity | None) -> list[dict]:
    """Every finished trainer run with its WER and cost, from the trials' stored metrics."""
    runs = []
    for trial in study.get_trials(deepcopy=False):
        if fidelity is None:
            levels = [("full", trial.user_attrs.get("metrics"), trial.value)]
        else:
            levels = [(level.name, trial.user_attrs.get(f"metrics_{level.name}"), trial.intermediate_values.get(index))
                      for index, level in enumerate(fidelity.levels)]
        for index, (level, found, wer) in enumerate(levels):
            if not found or "run_cpu_s" not in found or wer is None:
                continue
            runs.append({"trial": trial.number, "level": level, "full": index == len(levels) - 1, "wer": round(wer, 4),
                         "cpu": found["run_cpu_s"], "wall": found["run_wall_s"], "epochs": found["run_epochs_s"],
                         "end": found["run_end"], "params": trial.params if index == len(levels) - 1 else None})
    return sorted(runs, key=lambda r: r["end"])


def curve(runs: list[dict], cost: str) -> list[tuple[float, float]]:
    """(cumulative cost, best full-fidelity WER so far) after each run, in finish order."""
    spent, best, points = 0.0, math.inf, []
    for run in sorted(runs, key=lambda r: r["end"]):
        spent += run[cost]
        if run["full"]:
            best = min(best, run["wer"])
        points.append((round(spent, 1), best))
    return points


def best_at(points: list[tuple[float, float]], budget: float) -> float:
    """Best WER among the runs that finished within the budget (inf: no full-fidelity result yet)."""
    return min((best for spent, best in points if spent <= budget), default=math.inf)


def spent_to_reach(points: list[tuple[float, float]], target: float, budget: float) -> float | None:
    """Cost at which the best WER first got to ``target`` within the budget; None if it never did."""
    return next((spent for spent, best in points if best <= target and spent <= budget), None)


def mean_spent_to_reach(curves: list[list[tuple[float, float]]], target: float, budget: float) -> float | None:
    """Cost at which the seeds' mean best-so-far WER first got to ``target`` within the budget; None if never."""
    for spent in sorted({spent for points in curves for spent, _ in points if spent <= budget}):
        if sum(best_at(points, spent) for points in curves) / len(curves) <= target:
            return spent
    return None


def share(spent: float | None, budget: float) -> float | None:
    return round(spent / budget, 3) if spent is not None else None


def summarize(studies: list[dict], budget: float) -> dict:
    """Per arm at budget B: best WER mean ± std over seeds, and the share of B needed to reach random's final WER.

    That share is given two ways: per seed, against random's final with the same sampler seed
    (random, TPE and the ladder's TPE draw the same start-up configurations from it), and for
    the mean over seeds of the best-so-far curve, against the mean of random's finals. Only
    seeds that ran every arm count, so an interrupted run compares the arms on the same seeds.
    """
    arms_run = {s["arm"] for s in studies}
    complete = {seed for seed in {s["seed"] for s in studies} if {s["arm"] for s in studies if s["seed"] == seed} == arms_run}
    left_out = [f"{s['arm']}-seed{s['seed']}" for s in studies if s["seed"] not in complete]
    studies = [s for s in studies if s["seed"] in complete]
    curves = {(s["arm"], s["seed"]): curve(s["runs"], "cpu") for s in studies}
    best = {key: best_at(points, budget) for key, points in curves.items()}
    random_final = {seed: value for (arm, seed), value in best.items() if arm == "random"}
    target = sum(random_final.values()) / len(random_final) if random_final else None
    arms = {}
    for arm in ARMS:
        mine = [s for s in studies if s["arm"] == arm]
        if not mine:
            continue
        values = [best[arm, s["seed"]] for s in mine if math.isfinite(best[arm, s["seed"]])]
        arms[arm] = {
            "seeds": len(mine),
            "best_wer_by_seed": {s["seed"]: (round(best[arm, s["seed"]], 4) if math.isfinite(best[arm, s["seed"]]) else None) for s in mine},
            "best_wer_mean": round(statistics.mean(values), 4) if values else None,
            "best_wer_std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0 if values else None,
            "share_of_budget_to_reach_random_final_same_seed": {
                s["seed"]: share(spent_to_reach(curves[arm, s["seed"]], random_final[s["seed"]], budget), budget)
                for s in mine if s["seed"] in random_final},
            "share_of_budget_for_mean_curve_to_reach_random_mean_final": share(
                mean_spent_to_reach([curves[arm, s["seed"]] for s in mine], target, budget), budget) if target is not None else None,
            "total_cost_by_seed": {s["seed"]: {cost: round(sum(r[cost] for r in s["runs"]), 1) for cost in COSTS} for s in mine},
            "runs_by_seed": {s["seed"]: len(s["runs"]) for s in mine},
            "full_fidelity_runs_by_seed": {s["seed"]: sum(r["full"] for r in s["runs"]) for s in mine},
            "configurations_by_seed": {s["seed"]: s["configurations"] for s in mine},
            "failed_trials": sum(s["failed_trials"] for s in mine),
            "study_wall_s": round(sum(s["wall_s"] for s in mine), 1),
        }
    all_runs = [r for s in studies for r in s["runs"]]
    overhead = [r["wall"] - r["epochs"] for r in all_runs]
    return {
        "budget_cpu_s": budget, "random_final_mean": round(target, 4) if target is not None else None,
        "median_run_overhead_wall_s": round(statistics.median(overhead), 1) if overhead else None,
        "left_out_incomplete_seeds": left_out, "arms": arms,
    }


def settings(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def reusable(args: argparse.Namespace) -> list[dict]:
    """Studies already in --out that these settings would run the same way: changing the ladder reruns only the ladder."""
    if not args.out.is_file():
        return []
    old = json.loads(args.out.read_text())
    now = settings(args)
    same = all(old["args"].get(key) == now[key] for key in SHARED_SETTINGS)
    same_ladder = same and all(old["args"].get(key) == now[key] for key in LADDER_SETTINGS)
    return [s for s in old["studies"] if s["seed"] in args.seeds and s["arm"] in args.arms
            and (same_ladder if s["arm"] == "ladder" else same)]


def log(study: str, event: Event) -> None:
    if event.kind in ("started", "level-done"):
        return
    who = f" trial {event.number}" if event.number is not None else ""
    print(f"{time.strftime('%H:%M:%S')} {study}{who} {event.kind}: {event.message}", flush=True)


def write(out: Path, args: argparse.Namespace, studies: list[dict], command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(studies, args.budget)
    for s in studies:  # null: no full-fidelity result yet
        s["curve_cpu"] = [(spent, best if math.isfinite(best) else None) for spent, best in curve(s["runs"], "cpu")]
    report = {"command": command, "args": settings(args),
              "cpus": os.cpu_count(), "summary": summary, "studies": studies}
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "ladder-bench", help="make-data directory (made if missing)")
    parser.add_argument("--hours", type=float, default=0.2, help="make-data --hours, when the data is made")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampler seeds; each runs every arm (issue 7 asks for 3)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--budget", type=float, default=480.0, help="B, trainer CPU-seconds per study")
    parser.add_argument("--epochs", type=int, default=5, help="full fidelity: epochs on all the training data")
    parser.add_argument("--low-epochs", type=int, default=3, help="the ladder's low level: epochs, resumed when promoted")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--ladder-initial", type=int, default=9, help="configurations at the low level")
    parser.add_argument("--eta", type=int, default=3, help="reductionFactor: 9 -> 3")
    parser.add_argument("--mode", choices=spec.FIDELITY_MODES, default="asynchronous")
    parser.add_argument("--startup-trials", type=int, default=3, help="TPE's random start-up trials")
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--max-trials", type=int, default=200, help="a cap the CPU budget reaches first")
    parser.add_argument("--workdir", type=Path, help="storage, trial logs, checkpoints (default: a new temp dir, kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ladder_efficiency.json",
                        help="results; studies already there with the same settings are kept, not rerun")
    parser.add_argument("--analyze", type=Path, help="only recompute the summary of this results file at --budget")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.analyze:
        print(json.dumps(summarize(json.loads(args.analyze.read_text())["studies"], args.budget), indent=1))
        return
    command = " ".join([Path(sys.executable).name, *sys.argv])
    reused = reusable(args)
    for s in reused:
        print(f"# reusing {s['arm']} seed {s['seed']} from {args.out}", flush=True)
    todo = [(arm, seed) for index, seed in enumerate(args.seeds)
            for arm in args.arms[index % len(args.arms):] + args.arms[: index % len(args.arms)]
            if not any(s["arm"] == arm and s["seed"] == seed for s in reused)]
    studies = list(reused)
    if not todo:  # nothing new to run: still write the summary for these settings
        write(args.out, args, studies, command)
        return
    ensure_data(args)
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="ladder-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"# workdir {folder}; {os.cpu_count()} CPUs; load {os.getloadavg()}", flush=True)
    for arm, seed in todo:
        studies.append(run_study(arm, seed, args, folder))
        last = studies[-1]
        print(f"# {arm} seed {seed}: {last['outcome']} {last['message']}; {len(last['runs'])} runs, "
              f"{sum(r['cpu'] for r in last['runs']):.0f} CPU-s, {last['wall_s']:.0f} s wall", flush=True)
        write(args.out, args, studies, command)


if __name__ == "__main__":
    main()
