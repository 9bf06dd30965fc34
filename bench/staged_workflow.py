"""Issue 11's workflow benchmark: seed section 13's stages against one TPE study, at an equal trial budget.

Both arms are run by the real engine on the same trainer and space, per seed:
- staged: baseline (the trainer's defaults, BASELINE) -> coarse random search -> TPE refined around the
  coarse top 3 -> validate (the best x 3 seeds);
- tpe: one TPE search of the same number of trials -> the same validate stage.
Reported per arm over seeds: best WER, the validated mean ± std of the winner, and the
trainer CPU-seconds of each stage (NeMo: bench/timed_run.py's run_cpu_s; the fake trainer's
cost is its trial count, as it has no real cost).

    .venv/bin/python bench/staged_workflow.py --trainer nemo --seeds 1 2 3     # docs/benchmarks.md
    .venv/bin/python bench/staged_workflow.py --trainer fake --seeds $(seq 1 20)  # the policy alone, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import optuna

from speechtune import record, spec
from speechtune.executor import Executor
from speechtune.local import LocalProcessBackend
from speechtune.storage import WriteThroughStorage, open_rdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer import SPACE, make_data  # noqa: E402  (the same space and corpus as the transfer benchmark)

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("staged", "tpe")
# The baseline: speechtune-trainer asr's own defaults, spelled out (the fake trainer has no defaults of its own:
# a parameter it is not given costs it nothing, which would make an empty baseline perfect).
BASELINE = {"encoder": "conformer", "num_layers": 2, "d_model": 96, "n_mels": 64, "lr": 3.0e-3, "freq_masks": 2, "time_masks": 2}


def stages(arm: str, seed: int, args: argparse.Namespace) -> list[dict]:
    validate = {"name": "validate", "kind": "validate", "seeds": 3}
    if arm == "tpe":
        return [{"name": "search", "kind": "search", "maxTrials": args.trials,
                 "sampler": {"type": "tpe", "seed": seed, "startupTrials": args.startup_trials}}, validate]
    coarse = (args.trials - 1) // 2
    return [
        {"name": "baseline", "kind": "baseline", "params": BASELINE},
        {"name": "coarse", "kind": "search", "maxTrials": coarse, "sampler": {"type": "random", "seed": seed}},
        {"name": "fine", "kind": "refine", "maxTrials": args.trials - 1 - coarse, "topK": 3,
         "sampler": {"type": "tpe", "seed": seed, "startupTrials": args.startup_trials}},
        validate,
    ]


def template(args: argparse.Namespace) -> dict:
    if args.trainer == "fake":
        return {"command": [sys.executable, "-m", "speechtune.fake_trainer"], "args": ["--epochs", str(args.epochs)]}
    return {"command": [sys.executable, str(ROOT / "bench" / "timed_run.py"), "speechtune-trainer", "asr"],
            "args": ["--data", str((args.folder / "data-en").resolve()), "--epochs", str(args.epochs), "--warmup-steps", "30",
                     "--accelerator", "cpu", "--threads", "1", "--seed", "0"]}


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict:
    name = f"{arm}-seed{seed}"
    study = spec.parse_study({"metadata": {"name": name}, "spec": {
        "parallelism": args.parallelism, "maxFailedTrials": args.trials, "searchSpace": SPACE,
        "stages": stages(arm, seed, args), "trialTemplate": template(args),
        "storage": {"url": f"sqlite:///{args.folder / f'workflow-{args.trainer}.db'}"}}})
    engine = Executor(study, WriteThroughStorage(open_rdb(study.storage.url)), LocalProcessBackend(args.folder / "logs" / name),
                      notify=lambda e: print(f"{time.strftime('%H:%M:%S')} {name} {e.kind} {e.number} {e.message}", flush=True))
    began = time.monotonic()
    outcome = asyncio.run(engine.run())
    cost: dict[str, float] = {}
    for trial in engine.trials():
        found = trial.user_attrs.get("metrics") or {}
        cost[record.stage(trial)] = cost.get(record.stage(trial), 0.0) + found.get("run_cpu_s", 1.0)
    validation = engine.study.user_attrs.get(record.VALIDATION, {})
    best = engine.best_trial()
    return {"arm": arm, "seed": seed, "outcome": outcome.state, "wall_s": round(time.monotonic() - began, 1),
            "best": round(best.value, 4) if best else None, "best_trial": best.number if best else None,
            "validated_mean": validation.get("mean"), "validated_std": validation.get("std"),
            "validation_cost": None,  # validation runs are attempts of the best trial: cost in the run logs only
            "cost_by_stage": {stage: round(value, 1) for stage, value in cost.items()},
            "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in engine.trials())}


def summarize(rows: list[dict]) -> dict:
    summary = {}
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm and r["best"] is not None]
        if not mine:
            continue
        summary[arm] = {
            "seeds": len(mine),
            "best_mean": round(statistics.mean(r["best"] for r in mine), 4),
            "best_std": round(statistics.stdev(r["best"] for r in mine), 4) if len(mine) > 1 else None,
            "validated_mean": round(statistics.mean(r["validated_mean"] for r in mine if r["validated_mean"] is not None), 4),
            "cost_by_stage_median": {stage: statistics.median(r["cost_by_stage"].get(stage, 0.0) for r in mine)
                                     for stage in sorted({s for r in mine for s in r["cost_by_stage"]})},
        }
    staged, tpe = [r for r in rows if r["arm"] == "staged"], [r for r in rows if r["arm"] == "tpe"]
    pairs = [(s["best"], t["best"]) for s in staged for t in tpe if s["seed"] == t["seed"] and s["best"] and t["best"]]
    summary["staged_better_in"] = f"{sum(s < t for s, t in pairs)}/{len(pairs)} seeds"
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=("nemo", "fake"), default="nemo")
    parser.add_argument("--hours", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--trials", type=int, default=9, help="trials per arm, validation not counted")
    parser.add_argument("--startup-trials", type=int, default=3)
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--folder", type=Path, default=ROOT / ".bench" / "transfer")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.out = args.out or ROOT / "bench" / "results" / f"staged_workflow_{args.trainer}.json"
    args.folder.mkdir(parents=True, exist_ok=True)
    if args.trainer == "nemo":
        make_data(args.folder / "data-en", "en", args.hours)
    rows = []
    for index, seed in enumerate(args.seeds):
        for arm in (ARMS if index % 2 == 0 else ARMS[::-1]):
            rows.append(run_arm(arm, seed, args))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                            "machine": f"{os.cpu_count()} CPUs", "runs": rows, "summary": summarize(rows)}, indent=1))
    print(json.dumps(summarize(rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
