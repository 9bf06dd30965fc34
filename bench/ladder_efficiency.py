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

Issue 13 part 5 runs it with warm workers (``--workers warm``: speechtune.workers.WarmWorkerBackend,
the worker being bench/record_curves.py's timed shim around the NeMo trainer's worker, ``warm_worker``), a 3-level
epochs ladder ranked below the top by ``--rank`` (tie-break ``--tie-break``), and the recording's
trainer settings (docs/benchmarks.md, "Live confirmation"); every arm, the ladder too, then stops
launching once B is spent. A warm run's cost is its own CPU-s plus, for the first run of each
worker, that worker's start-up (imports) before it: start-up is counted once per worker, and the
summary also gives every result without it (``cpu_warm``).

    .venv/bin/python bench/ladder_efficiency.py --workers warm --data data/replay-bench --train-hours 0.054 \\
        --batch-size 3 --epochs 4 --ladder-epochs 1 2 4 --rank val_loss --tie-break cer --ladder-initial 25 \\
        --budget 171 --seeds 0 1 2 --out bench/results/ladder_live.json
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


def warm_worker() -> int:
    """The warm worker: bench/record_curves.py's timed shim around the NeMo trainer's worker, with its totals line (each
    run's CPU-s, and each worker's start-up on its first run) carrying the run's last metrics and end time too: the
    engine keeps only lines with the objective. Defined before this script's imports so that they add nothing to a
    worker's start-up."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from record_curves import worker

    from speechtune import protocol

    report, last = protocol.report, {}

    def with_metrics(step=None, *, final=False, **metrics):
        if final and "run_cpu_s" in metrics:  # the shim's totals line: the last metrics, when it ended
            metrics = {**last, **metrics, "run_end": time.time(), "run_epochs_s": round(last.pop("run_epochs_s", 0.0), 3)}
            last.clear()
        else:
            epochs = last.get("run_epochs_s", 0.0) + (metrics.get("epoch_seconds", 0.0) if not final else 0.0)
            last.update(metrics, run_epochs_s=epochs)
        report(step, final=final, **metrics)

    protocol.report = with_metrics  # before record_curves.worker imports the trainer, which imports it by name
    return worker("nemo")


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.exit(warm_worker())

import optuna  # noqa: E402

from speechtune import record, spec  # noqa: E402
from speechtune.executor import Event, Executor, Outcome  # noqa: E402
from speechtune.local import LocalProcessBackend  # noqa: E402
from speechtune.schedulers.ladder import spearman  # noqa: E402
from speechtune.storage import WriteThroughStorage, open_rdb  # noqa: E402
from speechtune.workers import WarmWorkerBackend  # noqa: E402

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
# run_cpu_s (+ a warm worker's start-up on its first run), run_wall_s, run_epochs_s (bench/timed_run.py; None warm),
# and run_cpu_s alone (cold: the same as cpu)
COSTS = ("cpu", "wall", "epochs", "cpu_warm")
# The settings a finished study depends on; the ladder's own only matter to the ladder arm.
SHARED_SETTINGS = ("data", "hours", "data_seed", "budget", "epochs", "batch_size", "warmup_steps", "startup_trials",
                   "parallelism", "max_trials", "workers", "train_hours")
LADDER_SETTINGS = ("low_epochs", "ladder_epochs", "rank", "tie_break", "ladder_initial", "eta", "mode")
ADDED_SETTINGS = {"workers": "cold", "train_hours": None, "ladder_epochs": None, "rank": None, "tie_break": None}  # issue 13's
# The warm worker (warm_worker); its command line names speechtune-trainer asr, so `pgrep -f "speechtune-trainer asr"` finds it.
WARM_COMMAND = [sys.executable, str(Path(__file__).resolve()), "--worker", "speechtune-trainer", "asr"]


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
                "command": WARM_COMMAND if args.workers == "warm" else
                [sys.executable, str(ROOT / "bench" / "timed_run.py"), "speechtune-trainer", "asr"],
                # --schedule-epochs: the ladder's low level stops early on the full run's lr schedule, so a
                # promoted run resumes that schedule instead of restarting a decayed one (a no-op at full fidelity).
                "args": ["--data", str(args.data.resolve()), "--epochs", str(args.epochs), "--schedule-epochs", str(args.epochs),
                         "--batch-size", str(args.batch_size),
                         "--warmup-steps", str(args.warmup_steps), "--accelerator", "cpu", "--threads", "1", "--seed", "0",
                         *(["--train-hours", str(args.train_hours)] if args.train_hours is not None else [])],
                **({"workers": {"mode": "warm", "maxRunsPerWorker": args.max_runs_per_worker}} if args.workers == "warm" else {}),
            },
            "storage": {"url": f"sqlite:///{folder}/{arm}-seed{seed}.db"},
        },
    }
    if arm == "ladder":
        epochs = args.ladder_epochs or [args.low_epochs, args.epochs]
        levels = [{"name": "full" if index == len(epochs) - 1 else "low" if index == 0 else f"mid{index}",
                   "overrides": {"epochs": value}} for index, value in enumerate(epochs)]
        if args.rank:  # every level below the top ranks by it
            for level in levels[:-1]:
                level["rank"] = {"metric": args.rank, **({"tieBreak": {"metric": args.tie_break}} if args.tie_break else {})}
        manifest["spec"]["fidelity"] = {
            "levels": levels,
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
    warm = study.trial_template.workers.mode == "warm"
    backend = WarmWorkerBackend(folder / study.name, study.trial_template.workers) if warm else LocalProcessBackend(folder / study.name)
    stops = args.workers == "warm" or study.fidelity is None  # issue 7's cold ladder ran its shape, about B

    def guard(event: Event) -> None:
        log(study.name, event)
        if stops and event.kind in ("completed", "level-done") and sum(r["cpu"] for r in runs_of(engine.study, study.fidelity)) >= args.budget:
            if study.fidelity is None:
                engine.update_budget(max_trials=len(engine.trials()))  # B spent: start nothing new
            else:
                engine.update_budget(parallelism=0)  # B spent: no new configuration, no promotion (as bench/ladder_replay.py)

    checkpoints = Path(study.fidelity.checkpoint_volume) if study.fidelity is not None else None
    engine = Executor(study, storage, backend, notify=guard, checkpoint_root=checkpoints)
    if warm:
        backend.labels = engine.labels

    async def run() -> Outcome:
        try:
            return await engine.run()
        finally:
            if warm:
                await backend.close()

    load_before, began = os.getloadavg(), time.monotonic()
    outcome = asyncio.run(run())
    runs = runs_of(engine.study, study.fidelity)
    shutil.rmtree(folder / f"checkpoints-seed{seed}", ignore_errors=True)
    return {
        "arm": arm, "seed": seed, "outcome": outcome.state, "message": outcome.message,
        "wall_s": round(time.monotonic() - began, 1), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "failed_trials": sum(1 for t in engine.trials() if t.state == optuna.trial.TrialState.FAIL),
        "configurations": len(engine.trials()), "runs": runs,
        "workers_started": backend.started if warm else None,
        "engine_correlations": engine.study.user_attrs.get(record.CORRELATIONS),
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
            # a warm run's end: when the engine recorded it (the level's finish time, or the trial's)
            end = found.get("run_end") or trial.user_attrs.get(record.level_finished_key(level)) or trial.datetime_complete.timestamp()
            startup = found.get("worker_startup_cpu_s", 0.0)  # a warm worker's imports, on its first run only
            runs.append({"trial": trial.number, "level": level, "full": index == len(levels) - 1, "wer": round(wer, 4),
                         "cpu": round(found["run_cpu_s"] + startup, 3), "cpu_warm": found["run_cpu_s"], "startup_cpu": startup,
                         "wall": found["run_wall_s"], "epochs": found.get("run_epochs_s"),
                         "end": end, "params": trial.params if index == len(levels) - 1 else None,
                         **{metric: found[metric] for metric in ("cer", "val_loss") if metric in found}})
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


def summarize(studies: list[dict], budget: float, rank: str | None = None) -> dict:
    """Per arm at budget B: best WER mean ± std over seeds, and the share of B needed to reach random's final WER.

    That share is given two ways: per seed, against random's final with the same sampler seed
    (random, TPE and the ladder's TPE draw the same start-up configurations from it), and for
    the mean over seeds of the best-so-far curve, against the mean of random's finals. Only
    seeds that ran every arm count, so an interrupted run compares the arms on the same seeds.
    With warm workers it is given again without the workers' start-up (``without_startup``), and
    the ladder's levels are measured: rho between adjacent levels, cost as a share of a full run.
    """
    arms_run = {s["arm"] for s in studies}
    complete = {seed for seed in {s["seed"] for s in studies} if {s["arm"] for s in studies if s["seed"] == seed} == arms_run}
    left_out = [f"{s['arm']}-seed{s['seed']}" for s in studies if s["seed"] not in complete]
    studies = [s for s in studies if s["seed"] in complete]
    all_runs = [r for s in studies for r in s["runs"]]
    summary, random_final_mean = arms_at(studies, budget, "cpu")
    overhead = [r["wall"] - r["epochs"] for r in all_runs if r.get("epochs") is not None]
    report = {
        "budget_cpu_s": budget, "random_final_mean": random_final_mean,
        "median_run_overhead_wall_s": round(statistics.median(overhead), 1) if overhead else None,
        "left_out_incomplete_seeds": left_out, "arms": summary,
    }
    if any(r.get("startup_cpu") for r in all_runs):
        report["startup_cpu_s"] = "counted once per warm worker, on its first run; without_startup: the same runs without it"
        report["without_startup"] = arms_at(studies, budget, "cpu_warm")[0]
    if "ladder" in summary:
        report["verdict"] = verdict(report["arms"])
        report["ladder_levels"] = ladder_levels(studies, rank)
    return report


def arms_at(studies: list[dict], budget: float, cost: str) -> tuple[dict, float | None]:
    """Each arm's results at B, counting ``cost``; and random's mean final WER."""
    curves = {(s["arm"], s["seed"]): curve(s["runs"], cost) for s in studies}
    best = {key: best_at(points, budget) for key, points in curves.items()}
    random_final = {seed: value for (arm, seed), value in best.items() if arm == "random"}
    target = sum(random_final.values()) / len(random_final) if random_final else None
    arms = {}
    for arm in ARMS:
        mine = [s for s in studies if s["arm"] == arm]
        if not mine:
            continue
        values = [best[arm, s["seed"]] for s in mine if math.isfinite(best[arm, s["seed"]])]
        shares = {s["seed"]: share(spent_to_reach(curves[arm, s["seed"]], random_final[s["seed"]], budget), budget)
                  for s in mine if s["seed"] in random_final}
        arms[arm] = {
            "seeds": len(mine),
            "best_wer_by_seed": {s["seed"]: (round(best[arm, s["seed"]], 4) if math.isfinite(best[arm, s["seed"]]) else None) for s in mine},
            "best_wer_mean": round(statistics.mean(values), 4) if values else None,
            "best_wer_std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0 if values else None,
            "best_wer_median": round(statistics.median(values), 4) if len(values) == len(mine) else None,
            "share_of_budget_to_reach_random_final_same_seed": shares,
            # a seed that never reaches it counts as more than B
            "share_of_budget_to_reach_random_final_median": median_or_over(list(shares.values())),
            "share_of_budget_for_mean_curve_to_reach_random_mean_final": share(
                mean_spent_to_reach([curves[arm, s["seed"]] for s in mine], target, budget), budget) if target is not None else None,
            "spent_within_budget_by_seed": {s["seed"]: max((spent for spent, _ in curves[arm, s["seed"]] if spent <= budget), default=0.0)
                                            for s in mine},
            "total_cost_by_seed": {s["seed"]: {c: round(sum(r.get(c) or 0.0 for r in s["runs"]), 1) for c in COSTS} for s in mine},
            "runs_by_seed": {s["seed"]: len(s["runs"]) for s in mine},
            "full_fidelity_runs_by_seed": {s["seed"]: sum(r["full"] for r in s["runs"]) for s in mine},
            "full_fidelity_runs_within_budget_by_seed": {s["seed"]: sum(r["full"] for r, (spent, _) in zip(
                sorted(s["runs"], key=lambda r: r["end"]), curves[arm, s["seed"]]) if spent <= budget) for s in mine},
            "configurations_by_seed": {s["seed"]: s["configurations"] for s in mine},
            "workers_started_by_seed": {s["seed"]: s.get("workers_started") for s in mine},
            "startup_cpu_s_by_seed": {s["seed"]: round(sum(r.get("startup_cpu", 0.0) for r in s["runs"]), 1) for s in mine},
            "failed_trials": sum(s["failed_trials"] for s in mine),
            "study_wall_s": round(sum(s["wall_s"] for s in mine), 1),
        }
    return arms, round(target, 4) if target is not None else None


def median_or_over(shares: list[float | None]) -> float | str | None:
    """The median share; a seed that never got there counts as more than B ("> B" when the median is one)."""
    if not shares:
        return None
    ordered = sorted(shares, key=lambda v: math.inf if v is None else v)
    middle = [ordered[(len(ordered) - 1) // 2], ordered[len(ordered) // 2]]
    if any(v is None for v in middle):
        return "> B"
    return round(statistics.mean(middle), 3)


def verdict(arms: dict) -> dict:
    """Issue 13's goal per seed: the ladder reaches random's final with <= 1/3 of B, and its best at B is no worse than TPE's."""
    by_seed = {}
    for seed, wer in arms["ladder"]["best_wer_by_seed"].items():
        spent = arms["ladder"]["share_of_budget_to_reach_random_final_same_seed"].get(seed)
        tpe = arms.get("tpe", {}).get("best_wer_by_seed", {}).get(seed)
        fast = spent is not None and spent <= 1 / 3
        as_good = wer is not None and (tpe is None or wer <= tpe + 1e-9)
        by_seed[seed] = {"reaches_random_final_within_third": fast, "no_worse_than_tpe": as_good, "both": fast and as_good}
    held = sum(v["both"] for v in by_seed.values())
    return {"by_seed": by_seed, "seeds_holding": held, "seeds": len(by_seed), "goal_met": held >= 2}


def ladder_levels(studies: list[dict], rank: str | None) -> list[dict]:
    """The ladder's levels as measured in these studies: Spearman rho of each level's rank metric with the next level's
    (and with the top level's WER), over the configurations run at both, pooled over seeds; each level's mean CPU-s
    (a resumed level pays only its own epochs) as a share of the full-fidelity arms' mean full run."""
    def own_cpu(run: dict) -> float:  # a run's CPU-s without a warm worker's start-up (a cold run's include its own)
        return run.get("cpu_warm", run["cpu"])

    full = [own_cpu(r) for s in studies if s["arm"] != "ladder" for r in s["runs"]]
    full_mean = statistics.fmean(full) if full else math.nan
    ladder = [s for s in studies if s["arm"] == "ladder"]
    top = next((r["level"] for s in ladder for r in s["runs"] if r["full"]), None)
    order = {"low": 0, top: math.inf}  # study_spec's names: low, mid1, mid2, ..., the top
    names = sorted({r["level"] for s in ladder for r in s["runs"]}, key=lambda n: order[n] if n in order else int(n.removeprefix("mid")))
    at = {(s["seed"], r["trial"], r["level"]): r for s in ladder for r in s["runs"]}

    def value(run: dict, level: str) -> float | None:
        return run.get(rank) if rank and level != top else run["wer"]

    rows = []
    for index, level in enumerate(names):
        mine = [r for (_, _, name), r in at.items() if name == level]
        row: dict = {"level": level, "runs": len(mine), "rank_metric": rank if rank and level != top else "wer",
                     "cpu_s_mean": round(statistics.fmean(own_cpu(r) for r in mine), 2) if mine else None,
                     "cost_share_of_full_run": round(statistics.fmean(own_cpu(r) for r in mine) / full_mean, 3) if mine else None,
                     "share_at_wer_1": round(sum(r["wer"] >= 0.999 for r in mine) / len(mine), 3) if mine else None}
        for other, key in ((names[index + 1] if index + 1 < len(names) else None, "rho_next"), (top if level != top else None, "rho_top_wer")):
            if other is None:
                continue
            pairs = [(value(r, level), at[seed, trial, other]["wer"] if other == top else value(at[seed, trial, other], other))
                     for (seed, trial, name), r in at.items() if name == level and (seed, trial, other) in at]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            row[key] = round(spearman([a for a, _ in pairs], [b for _, b in pairs]), 3) if len(pairs) >= 3 else None
            row[f"{key}_pairs"] = len(pairs)
        rows.append(row)
    return rows


def settings(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def reusable(args: argparse.Namespace) -> list[dict]:
    """Studies already in --out that these settings would run the same way: changing the ladder reruns only the ladder."""
    if not args.out.is_file():
        return []
    old = json.loads(args.out.read_text())
    now = settings(args)
    before = {**ADDED_SETTINGS, **old["args"]}  # a file from before a setting existed ran with its default
    same = all(before.get(key) == now[key] for key in SHARED_SETTINGS)
    same_ladder = same and all(before.get(key) == now[key] for key in LADDER_SETTINGS)
    return [s for s in old["studies"] if s["seed"] in args.seeds and s["arm"] in args.arms
            and (same_ladder if s["arm"] == "ladder" else same)]


def log(study: str, event: Event) -> None:
    if event.kind in ("started", "level-done"):
        return
    who = f" trial {event.number}" if event.number is not None else ""
    print(f"{time.strftime('%H:%M:%S')} {study}{who} {event.kind}: {event.message}", flush=True)


def write(out: Path, args: argparse.Namespace, studies: list[dict], command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(studies, args.budget, args.rank)
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
    parser.add_argument("--ladder-epochs", type=int, nargs="+",
                        help="the ladder's levels' epochs, low to full (default: --low-epochs, --epochs); each resumes the one below")
    parser.add_argument("--rank", choices=spec.RANK_METRICS, help="what every ladder level below the top ranks by (default: wer)")
    parser.add_argument("--tie-break", choices=spec.RANK_METRICS, help="the rank's tie-break metric")
    parser.add_argument("--train-hours", type=float, help="the trainer's --train-hours: train on the first H hours (default: all)")
    parser.add_argument("--workers", choices=spec.WORKER_MODES, default="cold",
                        help="cold: a process per run (bench/timed_run.py); warm: warm workers (bench/record_curves.py's shim)")
    parser.add_argument("--max-runs-per-worker", type=int, default=20)
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
        old = json.loads(args.analyze.read_text())
        print(json.dumps(summarize(old["studies"], args.budget, old["args"].get("rank")), indent=1))
        return
    command = " ".join([Path(sys.executable).name, *sys.argv])
    studies, todo = planned(args, reusable(args))
    if not todo:  # nothing new to run: still write the summary for these settings
        write(args.out, args, studies, command)
        return
    ensure_data(args)
    run_todo(todo, studies, args, command, "ladder-bench-", run_study, write)


def planned(args: argparse.Namespace, reused: list[dict]) -> tuple[list[dict], list[tuple[str, int]]]:
    """``reused`` (the studies already in --out for these settings), and the (arm, seed) studies left to run,
    the arm order rotated by seed so that machine load falls on each arm alike."""
    for s in reused:
        print(f"# reusing {s['arm']} seed {s['seed']} from {args.out}", flush=True)
    todo = [(arm, seed) for index, seed in enumerate(args.seeds)
            for arm in args.arms[index % len(args.arms):] + args.arms[: index % len(args.arms)]
            if not any(s["arm"] == arm and s["seed"] == seed for s in reused)]
    return list(reused), todo


def run_todo(todo: list[tuple[str, int]], studies: list[dict], args: argparse.Namespace, command: str, prefix: str,
             run_one, write_out) -> None:
    """Run each (arm, seed) study in turn in args.workdir (else a new temp dir), rewriting --out after each,
    so an interrupted benchmark keeps what it finished."""
    folder = args.workdir or Path(tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"# workdir {folder}; {os.cpu_count()} CPUs; load {os.getloadavg()}", flush=True)
    for arm, seed in todo:
        studies.append(run_one(arm, seed, args, folder))
        last = studies[-1]
        print(f"# {arm} seed {seed}: {last['outcome']} {last['message']}; {len(last['runs'])} runs, "
              f"{sum(r['cpu'] for r in last['runs']):.0f} CPU-s, {last['wall_s']:.0f} s wall", flush=True)
        write_out(args.out, args, studies, command)


if __name__ == "__main__":
    main()
