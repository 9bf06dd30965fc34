"""Issue 11's transfer benchmark: English digits -> Spanish digits, cold start vs warm start vs transfer.

Every trial is a real NeMo run (`speechtune-trainer asr`, CPU, one thread) on speech that
`make-data --language en|es` synthesises with espeak-ng; each study is run by the real engine
(`Executor`, `LocalProcessBackend`, one SQLite file for all studies, so warm start reads the
source from the same storage). The trial command is bench/timed_run.py around the trainer, so
each run's trainer CPU-seconds are stored with its trial.

1. The source: one English study (TPE) that keeps its best checkpoint (`checkpoints.keepBest`).
2. Per seed, three Spanish studies of `--trials` trials each, TPE with that seed:
   - cold: the whole space (architecture, lr, SpecAugment), from scratch;
   - warm: `warmStart: {topK: 2, fixed: <architecture>}`: the English best's architecture and its
     two best configurations first, weights from scratch;
   - transfer: the same plus `initFrom: best`: every run starts from the English best checkpoint
     (output layer mapped by character).
3. Per seed, the target is the cold study's final best WER; each arm's cost to reach it is the
   trials (in finish order) and trainer CPU-seconds until its best-so-far WER is at or below it.
   Also reported: the WER of each arm's first trial and the median WER of its trials.

    .venv/bin/python bench/transfer.py                                   # the run in docs/benchmarks.md
    .venv/bin/python bench/transfer.py --analyze bench/results/transfer.json   # summarise again
    .venv/bin/python bench/transfer.py --hours 0.03 --epochs 2 --source-trials 2 --trials 2 --seeds 1 --out /tmp/t.json   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna

from speechtune import spec
from speechtune.executor import Executor
from speechtune.local import LocalProcessBackend
from speechtune.storage import WriteThroughStorage, open_rdb

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("cold", "warm", "transfer")
ARCHITECTURE = ["encoder", "num_layers", "d_model", "n_mels"]
# Conformer only: in a few epochs on a few hundred utterances an LSTM stays at WER 1.0 (seen in
# a first run of this benchmark), and a study whose every trial scores 1.0 measures nothing.
SPACE = [
    {"name": "encoder", "categorical": ["conformer"]},
    {"name": "num_layers", "int": {"low": 1, "high": 2}},
    {"name": "d_model", "categorical": [64, 96]},
    {"name": "n_mels", "int": {"low": 40, "high": 80, "step": 8}},
    {"name": "lr", "float": {"low": 1.5e-3, "high": 6.0e-3, "log": True}},
    {"name": "freq_masks", "int": {"low": 0, "high": 2}},
    {"name": "time_masks", "int": {"low": 0, "high": 2}},
]


def make_data(out: Path, language: str, hours: float) -> None:
    if not (out / "train_manifest.json").is_file():
        subprocess.run([str(Path(sys.executable).parent / "speechtune-trainer"), "make-data", "--out", str(out), "--hours", str(hours),
                        "--seed", "0", "--language", language], check=True)


def manifest(name: str, data: Path, seed: int, trials: int, args: argparse.Namespace, **extra: object) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {
            "maxTrials": trials, "parallelism": args.parallelism, "maxFailedTrials": trials,
            "sampler": {"type": "tpe", "seed": seed, "startupTrials": args.startup_trials},
            "searchSpace": SPACE,
            "trialTemplate": {
                "command": [sys.executable, str(ROOT / "bench" / "timed_run.py"), "speechtune-trainer", "asr"],
                "args": ["--data", str(data.resolve()), "--epochs", str(args.epochs), "--warmup-steps", "30",
                         "--accelerator", "cpu", "--threads", "1", "--seed", "0"],
            },
            "storage": {"url": f"sqlite:///{args.folder / 'transfer.db'}"},
            **extra,
        },
    }


def run(body: dict, args: argparse.Namespace) -> dict:
    """Run a study (or read it back if it already finished); its runs in finish order."""
    study = spec.parse_study(body)
    storage = WriteThroughStorage(open_rdb(study.storage.url))
    engine = Executor(study, storage, LocalProcessBackend(args.folder / "logs" / study.name),
                      checkpoint_root=args.folder / "checkpoints" / study.name,
                      notify=lambda e: print(f"{time.strftime('%H:%M:%S')} {study.name} {e.kind} {e.number} {e.message}", flush=True))
    began = time.monotonic()
    outcome = asyncio.run(engine.run())
    runs = []
    for trial in engine.trials():
        found = trial.user_attrs.get("metrics") or {}
        if trial.state == optuna.trial.TrialState.COMPLETE and "run_cpu_s" in found:
            runs.append({"trial": trial.number, "wer": round(trial.value, 4), "cpu": found["run_cpu_s"], "end": found["run_end"],
                         "params": trial.params, "warm": trial.user_attrs.get("warm_start_from")})
    return {"study": study.name, "outcome": outcome.state, "wall_s": round(time.monotonic() - began, 1),
            "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in engine.trials()),
            "runs": sorted(runs, key=lambda r: r["end"])}


def cost_to_reach(runs: list[dict], target: float) -> tuple[int | None, float | None]:
    """(trials, trainer CPU-s) until the best-so-far WER is <= target; (None, None) if never."""
    spent, best = 0.0, math.inf
    for index, found in enumerate(runs, start=1):
        spent += found["cpu"]
        best = min(best, found["wer"])
        if best <= target:
            return index, round(spent, 1)
    return None, None


def summarize(results: dict) -> dict:
    """Per arm over seeds: final best WER, and trials / CPU-s to reach the cold study's final best WER."""
    summary: dict = {}
    for arm in ARMS:
        rows = []
        for seed, studies in results["seeds"].items():
            if arm not in studies or "cold" not in studies:
                continue
            target = min(r["wer"] for r in studies["cold"]["runs"])
            trials, cpu = cost_to_reach(studies[arm]["runs"], target)
            wers = [r["wer"] for r in studies[arm]["runs"]]
            rows.append({"seed": seed, "target": target, "best": min(wers), "first": wers[0], "median": statistics.median(wers),
                         "trials_to_target": trials, "cpu_to_target": cpu,
                         "cpu_total": round(sum(r["cpu"] for r in studies[arm]["runs"]), 1)})
        reached = [r for r in rows if r["trials_to_target"] is not None]
        summary[arm] = {
            "seeds": rows,
            "best_mean": _mean([r["best"] for r in rows]), "best_std": _std([r["best"] for r in rows]),
            "first_trial_mean": _mean([r["first"] for r in rows]), "trial_median_mean": _mean([r["median"] for r in rows]),
            "reached": f"{len(reached)}/{len(rows)}",
            "trials_to_target_median": statistics.median([r["trials_to_target"] for r in reached]) if reached else None,
            "cpu_to_target_median": statistics.median([r["cpu_to_target"] for r in reached]) if reached else None,
        }
    cold = summary["cold"]
    for arm in ARMS:
        found = summary[arm]
        if found["trials_to_target_median"] and cold["trials_to_target_median"]:
            found["fewer_trials_x"] = round(cold["trials_to_target_median"] / found["trials_to_target_median"], 2)
            found["less_cpu_x"] = round(cold["cpu_to_target_median"] / found["cpu_to_target_median"], 2)
    return summary


def _mean(values: list[float]) -> float | None:
    return round(statistics.mean(values), 4) if values else None


def _std(values: list[float]) -> float | None:
    return round(statistics.stdev(values), 4) if len(values) > 1 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--source-trials", type=int, default=6)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--startup-trials", type=int, default=3)
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--folder", type=Path, default=ROOT / ".bench" / "transfer")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "transfer.json")
    parser.add_argument("--analyze", type=Path, help="only summarise the results in this file again")
    args = parser.parse_args()
    if args.analyze:
        results = json.loads(args.analyze.read_text())
        results["summary"] = summarize(results)
        args.analyze.write_text(json.dumps(results, indent=1))
        print(json.dumps(results["summary"], indent=1))
        return 0
    args.folder.mkdir(parents=True, exist_ok=True)
    english, spanish = args.folder / "data-en", args.folder / "data-es"
    make_data(english, "en", args.hours)
    make_data(spanish, "es", args.hours)
    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "machine": f"{os.cpu_count()} CPUs", "seeds": {}}
    results["source"] = run(manifest("english", english, 0, args.source_trials, args, checkpoints={"keepBest": 1}), args)
    for index, seed in enumerate(args.seeds):
        studies = results["seeds"].setdefault(str(seed), {})
        for arm in ARMS[index % 3:] + ARMS[: index % 3]:  # rotate the order: machine load falls on each arm alike
            warm = {"study": "english", "topK": 2, "fixed": ARCHITECTURE}
            extra = {} if arm == "cold" else {"warmStart": {**warm, **({"initFrom": "best"} if arm == "transfer" else {})}}
            studies[arm] = run(manifest(f"spanish-{arm}-seed{seed}", spanish, seed, args.trials, args, **extra), args)
            results["summary"] = summarize(results)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
