"""Issue 16's architecture-search benchmark: DARTS vs black-box TPE (conditional and flat) vs random, at equal trainer CPU-s.

Every arm searches the same choices: at each of --positions Conformer positions, one of the --candidates
(kernels x feed-forward expansions x attention or not, and skip), plus the peak lr, on the same data with
the same other architecture flags. Each arm is a study run by the real engine (`Executor` with
`LocalProcessBackend`, SQLite in a temp dir), its runs timed by bench/timed_run.py, as in
bench/ladder_efficiency.py, whose run bookkeeping, curves and budget measures this reuses:

- darts: stage `supernet` runs `speechtune-trainer nas-darts` once (first-order DARTS over the candidates;
  its final line's `params` are the derived `--num_layers`/`--conformer_blocks`); stage `retrain` takes
  them (`handoff: {from: [supernet], params: true}`) and TPE-searches the lr of `speechtune-trainer asr`
  on that architecture. The supernet's cost counts; its own WER (the derived network on shared weights)
  does not count as a result, only retrained runs do.
- tpe-conditional: TPE over block_i in {conformer, skip} and kernel_i, ff_i, att_i with
  `when: {block_i: [conformer]}`, and lr; the trial command is bench/blocks_run.py, which turns them into
  `--conformer_blocks`.
- tpe-flat: the same parameters without `when` (drawn for a skip too, and ignored then).
- random: the random sampler over the conditional space.

Every arm stops launching once its finished runs used B trainer CPU-s; a run still going then finishes
but counts only if it ended within B. Seeds rotate the arm order; results are rewritten to --out after
every study, and a later run with the same settings reuses the studies already there.

    .venv/bin/python bench/nas_search.py                                   # the run in docs/benchmarks.md
    .venv/bin/python bench/nas_search.py --epochs 1 --supernet-epochs 1 --budget 50 --seeds 0 --out /tmp/nas-smoke.json  # minutes
    .venv/bin/python bench/nas_search.py --analyze bench/results/nas_search.json --budget 150
    .venv/bin/python bench/nas_search.py --merge seed0.json seed1.json seed2.json --out bench/results/nas_search.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import optuna

from speechtune import record, spec
from speechtune.executor import Event, Executor
from speechtune.local import LocalProcessBackend
from speechtune.storage import WriteThroughStorage, open_rdb
from speechtune_trainer import blocks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blocks_run import blocks_argv  # noqa: E402
from ladder_efficiency import (  # noqa: E402
    planned,
    run_todo,
    best_at,
    curve,
    log,
    mean_spent_to_reach,
    median_or_over,
    runs_of,
    settings,
    share,
    spent_to_reach,
)

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("darts", "tpe-conditional", "tpe-flat", "random")
# 2 kernels x 2 expansions x attention or not, and skip: 9 operations. The trainer's default 13 (kernel 31 too)
# would make every supernet epoch about 13/9 as costly, leaving fewer retrains within B.
CANDIDATES = "k7-ff2-att,k7-ff2-noatt,k7-ff4-att,k7-ff4-noatt,k15-ff2-att,k15-ff2-noatt,k15-ff4-att,k15-ff4-noatt,skip"
LR = {"name": "lr", "float": {"low": 5.0e-4, "high": 1.0e-2, "log": True}}
TRAINER = str(Path(sys.executable).parent / "speechtune-trainer")
TIMED = [sys.executable, str(ROOT / "bench" / "timed_run.py")]
SHIM = [sys.executable, str(ROOT / "bench" / "blocks_run.py")]
# The settings a finished study depends on; the supernet's only matter to darts.
SHARED_SETTINGS = ("data", "train_hours", "batch_size", "warmup_steps", "epochs", "positions", "candidates", "budget",
                   "startup_trials", "parallelism", "max_trials")
DARTS_SETTINGS = ("supernet_epochs", "arch_lr", "arch_split")


def choices(candidates: str) -> dict[str, list]:
    """The per-position choices the candidates span; they must be a full product (and skip), so every arm has the same set."""
    found = [b for b in blocks.parse_list(candidates) if not b.skip]
    kernels = sorted({b.kernel for b in found})
    ffs = sorted({b.expansion for b in found})
    atts = [a for a in ("att", "noatt") if any(b.attention == (a == "att") for b in found)]
    product = {f"k{k}-ff{f}-{a}" for k, f, a in itertools.product(kernels, ffs, atts)}
    if product != {str(b) for b in found} or blocks.SKIP not in candidates.split(","):
        raise SystemExit(f"--candidates must be kernels x expansions x att/noatt, and skip: {candidates}")
    return {"kernel": kernels, "ff": ffs, "att": atts}


def space(arm: str, args: argparse.Namespace) -> list[dict]:
    if arm == "darts":
        return [LR]  # the retrain stage's: the architecture is handed on, not searched
    per = choices(args.candidates)
    params = []
    for i in range(args.positions):
        params.append({"name": f"block_{i}", "categorical": ["conformer", "skip"]})
        when = {} if arm == "tpe-flat" else {"when": {f"block_{i}": ["conformer"]}}
        params += [{"name": f"{kind}_{i}", "categorical": per[kind], **when} for kind in ("kernel", "ff", "att")]
    return [*params, LR]


def shared_args(args: argparse.Namespace) -> list[str]:
    """The trainer flags of every run of every arm (asr and nas-darts alike)."""
    return ["--data", str(args.data.resolve()), "--train-hours", str(args.train_hours), "--batch-size", str(args.batch_size),
            "--warmup-steps", str(args.warmup_steps), "--accelerator", "cpu", "--threads", "1"]


def study_spec(arm: str, seed: int, args: argparse.Namespace, folder: Path) -> spec.Study:
    sampler = {"type": "random" if arm == "random" else "tpe", "seed": seed, "startupTrials": args.startup_trials}
    asr = {"command": [*(TIMED if arm == "darts" else SHIM), TRAINER, "asr"],
           "args": [*shared_args(args), "--epochs", str(args.epochs), "--seed", "0"]}
    body: dict = {
        "objective": {"metric": "wer", "direction": "minimize"},
        "parallelism": args.parallelism,
        "maxFailedTrials": args.max_trials,
        "searchSpace": space(arm, args),
        "trialTemplate": asr,
        "storage": {"url": f"sqlite:///{folder}/{arm}-seed{seed}.db"},
    }
    if arm == "darts":
        supernet = {"command": [*TIMED, TRAINER, "nas-darts"],
                    "args": [*shared_args(args), "--epochs", str(args.supernet_epochs), "--seed", str(seed),
                             "--num-layers", str(args.positions), "--candidates", args.candidates,
                             "--arch-lr", str(args.arch_lr), "--arch-split", str(args.arch_split)]}
        body["stages"] = [
            {"name": "supernet", "kind": "baseline", "trialTemplate": supernet},
            {"name": "retrain", "kind": "search", "maxTrials": args.max_trials, "sampler": sampler,
             "handoff": {"from": ["supernet"], "params": True}},
        ]
    else:
        body.update(maxTrials=args.max_trials, sampler=sampler)
    return spec.parse_study({"metadata": {"name": f"{arm}-seed{seed}"}, "spec": body})


def architecture(params: dict) -> str | None:
    """A black-box trial's --conformer_blocks, as bench/blocks_run.py builds it."""
    argv = blocks_argv([f"--{name}={value}" for name, value in params.items()])
    return next((a.split("=", 1)[1] for a in argv if a.startswith("--conformer_blocks=")), None)


def run_study(arm: str, seed: int, args: argparse.Namespace, folder: Path) -> dict:
    """Run one arm until B is spent; its runs as read back from storage."""
    study = study_spec(arm, seed, args, folder)
    storage = WriteThroughStorage(open_rdb(study.storage.url))

    def guard(event: Event) -> None:
        log(study.name, event)
        if event.kind in ("completed", "failed") and sum(r["cpu"] for r in runs_of(engine.study, None)) >= args.budget:
            engine.update_budget(parallelism=0)  # B spent: start nothing new (a stage's maxTrials is its own)

    engine = Executor(study, storage, LocalProcessBackend(folder / study.name), notify=guard)
    load_before, began = os.getloadavg(), time.monotonic()
    outcome = asyncio.run(engine.run())
    stages = {t.number: record.stage(t) for t in engine.trials()}
    handoff = record.stages(engine.study.user_attrs).get("retrain", {}).get("handoff", {})
    runs = runs_of(engine.study, None)
    for run in runs:
        run["stage"] = stages.get(run["trial"])
        run["full"] = run["stage"] != "supernet"  # the supernet's WER is not a result, only its cost counts
        if arm == "darts":
            run["architecture"] = handoff.get("params", {}).get("conformer_blocks") if run["full"] else None
        else:
            run["architecture"] = architecture(run["params"])
    supernet = next((t for t in engine.trials() if stages.get(t.number) == "supernet"), None)
    return {
        "arm": arm, "seed": seed, "outcome": outcome.state, "message": outcome.message,
        "wall_s": round(time.monotonic() - began, 1), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "failed_trials": sum(1 for t in engine.trials() if t.state == optuna.trial.TrialState.FAIL),
        "configurations": len(engine.trials()), "runs": runs,
        "derived": handoff.get("params"),
        "supernet": {"wer": supernet.value, **{k: (supernet.user_attrs.get("metrics") or {}).get(k) for k in ("cer", "arch_entropy", "run_cpu_s")}}
        if supernet is not None and supernet.value is not None else None,
    }


def summarize(studies: list[dict], budget: float) -> dict:
    """Per arm at B: best WER per seed (median, mean), compute, and the compute to reach random's final WER.

    Only seeds that ran every arm present count, so an interrupted run compares the arms on the same seeds.
    """
    arms_run = {s["arm"] for s in studies}
    complete = {seed for seed in {s["seed"] for s in studies} if {s["arm"] for s in studies if s["seed"] == seed} == arms_run}
    left_out = [f"{s['arm']}-seed{s['seed']}" for s in studies if s["seed"] not in complete]
    studies = [s for s in studies if s["seed"] in complete]
    curves = {(s["arm"], s["seed"]): curve(s["runs"], "cpu") for s in studies}
    best = {key: best_at(points, budget) for key, points in curves.items()}
    random_final = {seed: value for (arm, seed), value in best.items() if arm == "random" and math.isfinite(value)}
    target = statistics.mean(random_final.values()) if random_final else None

    def rounded(value: float) -> float | None:
        return round(value, 4) if math.isfinite(value) else None

    arms = {}
    for arm in ARMS:
        mine = sorted((s for s in studies if s["arm"] == arm), key=lambda s: s["seed"])
        if not mine:
            continue
        values = [best[arm, s["seed"]] for s in mine]
        finite = [v for v in values if math.isfinite(v)]
        reach = {s["seed"]: spent_to_reach(curves[arm, s["seed"]], random_final[s["seed"]], budget)
                 for s in mine if s["seed"] in random_final}
        within = {s["seed"]: [r for r, (spent, _) in zip(sorted(s["runs"], key=lambda r: r["end"]), curves[arm, s["seed"]]) if spent <= budget]
                  for s in mine}
        best_runs = {s["seed"]: min((r for r in within[s["seed"]] if r["full"]), key=lambda r: r["wer"], default=None) for s in mine}
        arms[arm] = {
            "seeds": len(mine),
            "best_wer_by_seed": {s["seed"]: rounded(v) for s, v in zip(mine, values)},
            "best_wer_median": round(statistics.median(values), 4) if len(finite) == len(values) else None,
            "best_wer_mean": round(statistics.mean(finite), 4) if finite else None,
            "best_wer_std": round(statistics.stdev(finite), 4) if len(finite) > 1 else None,
            "best_run_by_seed": {seed: None if r is None else {"architecture": r["architecture"], "lr": (r["params"] or {}).get("lr"), "cpu": r["cpu"]}
                                 for seed, r in best_runs.items()},
            "cpu_s_within_budget_by_seed": {seed: round(sum(r["cpu"] for r in runs), 1) for seed, runs in within.items()},
            "cpu_s_total_by_seed": {s["seed"]: round(sum(r["cpu"] for r in s["runs"]), 1) for s in mine},
            "runs_within_budget_by_seed": {seed: len(runs) for seed, runs in within.items()},
            "runs_total_by_seed": {s["seed"]: len(s["runs"]) for s in mine},
            "cpu_s_to_reach_random_final_same_seed": reach,
            "share_of_budget_to_reach_random_final_median": median_or_over([share(v, budget) for v in reach.values()]),
            "share_of_budget_for_mean_curve_to_reach_random_mean_final": share(
                mean_spent_to_reach([curves[arm, s["seed"]] for s in mine], target, budget), budget) if target is not None else None,
            "failed_trials": sum(s["failed_trials"] for s in mine),
            "study_wall_s": round(sum(s["wall_s"] or 0.0 for s in mine), 1),  # None: a study stopped, read back from storage
        }
        if arm == "darts":
            arms[arm]["derived_by_seed"] = {s["seed"]: (s.get("derived") or {}).get("conformer_blocks") for s in mine}
            arms[arm]["supernet_by_seed"] = {s["seed"]: s.get("supernet") for s in mine}
    flat, conditional = arms.get("tpe-flat"), arms.get("tpe-conditional")
    versus = None
    if flat and conditional:
        pairs = [(conditional["best_wer_by_seed"][seed], flat["best_wer_by_seed"][seed]) for seed in conditional["best_wer_by_seed"]
                 if seed in flat["best_wer_by_seed"]]
        pairs = [(c, f) for c, f in pairs if c is not None and f is not None]
        versus = {"conditional_better": sum(c < f - 1e-9 for c, f in pairs), "flat_better": sum(f < c - 1e-9 for c, f in pairs),
                  "ties": sum(abs(c - f) <= 1e-9 for c, f in pairs), "seeds": len(pairs)}
    return {"budget_cpu_s": budget, "random_final_mean": round(target, 4) if target is not None else None,
            "left_out_incomplete_seeds": left_out, "arms": arms, "conditional_vs_flat_tpe": versus}


def reusable(args: argparse.Namespace) -> list[dict]:
    """Studies already in --out that these settings would run the same way (the supernet's settings matter to darts only)."""
    if not args.out.is_file():
        return []
    old = json.loads(args.out.read_text())
    now, before = settings(args), old["args"]
    same = all(before.get(key) == now[key] for key in SHARED_SETTINGS)
    same_darts = same and all(before.get(key) == now[key] for key in DARTS_SETTINGS)
    return [s for s in old["studies"] if s["seed"] in args.seeds and s["arm"] in args.arms
            and (same_darts if s["arm"] == "darts" else same)]


def write(out: Path, args: argparse.Namespace, studies: list[dict], command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(studies, args.budget)
    for s in studies:
        s["curve_cpu"] = [(spent, best if math.isfinite(best) else None) for spent, best in curve(s["runs"], "cpu")]
    out.write_text(json.dumps({"command": command, "args": settings(args), "cpus": os.cpu_count(),
                               "summary": summary, "studies": studies}, indent=1))
    print(json.dumps(summary, indent=1), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "replay-bench", help="a make-data directory")
    parser.add_argument("--train-hours", type=float, default=0.054)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of every asr run (black-box trials and retrains)")
    parser.add_argument("--positions", type=int, default=2, help="Conformer positions (num_layers, skips included)")
    parser.add_argument("--candidates", default=CANDIDATES, help="the operations at every position, nas-darts' grammar")
    parser.add_argument("--supernet-epochs", type=int, default=4)
    parser.add_argument("--arch-lr", type=float, default=3e-2, help="nas-darts --arch-lr")
    parser.add_argument("--arch-split", type=float, default=0.5, help="nas-darts --arch-split")
    parser.add_argument("--budget", type=float, default=200.0, help="B, trainer CPU-seconds per study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--startup-trials", type=int, default=3, help="TPE's random start-up trials (darts' retrain too)")
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--max-trials", type=int, default=100, help="a cap the CPU budget reaches first")
    parser.add_argument("--workdir", type=Path, help="storage and trial logs (default: a new temp dir, kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "nas_search.json")
    parser.add_argument("--analyze", type=Path, help="only recompute the summary of this results file at --budget")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="only merge these results files (e.g. one process per seed) into --out, with their summary")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.analyze:
        print(json.dumps(summarize(json.loads(args.analyze.read_text())["studies"], args.budget), indent=1))
        return
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        studies = [s for part in parts for s in part["studies"]]
        args = argparse.Namespace(**{**parts[0]["args"], "seeds": sorted({s["seed"] for s in studies}), "out": args.out})
        write(args.out, args, studies, " ; ".join(part["command"] for part in parts))
        return
    choices(args.candidates)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    studies, todo = planned(args, reusable(args))
    run_todo(todo, studies, args, command, "nas-bench-", run_study, write)
    if not todo:
        write(args.out, args, studies, command)


if __name__ == "__main__":
    main()
