"""Issue 12's study-level measurement: the README's 8-trial NeMo study, cold against warm, side by side.

Runs `speechtune run` on examples/asr-digits-local.yaml (cold: a process per run) and on
examples/asr-digits-warm.yaml (the same study with `workers: {mode: warm, maxRunsPerWorker: 20}`),
interleaved with the order rotated each pair (cold, warm, then warm, cold, ...). Each run gets a
copy of the example with `--data` pointed at DATA and a fresh SQLite storage, and its own workdir.

Per run: wall seconds and CPU seconds of the whole `speechtune run`, its trainers included
(RUSAGE_CHILDREN: every trainer process and warm worker is reaped by the runner before it exits),
the best WER, the trials completed / pruned / failed, and every trial's parameters and per-epoch
WER (Optuna's intermediate values) read back from the run's storage. Then, within each pair, the
"same results" check: trials with the same parameters in the cold and the warm run, and whether
their per-epoch WERs are identical on the epochs both ran.

    .venv/bin/speechtune-trainer make-data --out /tmp/wstudy/digits --hours 0.2 --seed 0
    .venv/bin/python bench/warm_study.py /tmp/wstudy/digits --pairs 2

The machine may be shared, so it also reads every epoch's `epoch_seconds` (the trainer's own wall
time for training and validation) from the trial logs: the same configuration's same epoch costs
the same work cold and warm, so the ratio of those times between two runs of a pair says how much
busier the machine was for one than for the other. `--analyse-only` recomputes the summary of an
existing --out from the runs' storage and logs in --scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {"cold": ROOT / "examples/asr-digits-local.yaml", "warm": ROOT / "examples/asr-digits-warm.yaml"}


def study_file(mode: str, data: Path, scratch: Path, label: str) -> tuple[Path, str]:
    """A copy of the example with --data DATA and a fresh SQLite storage of its own."""
    document = yaml.safe_load(EXAMPLES[mode].read_text())
    args = document["spec"]["trialTemplate"]["args"]
    args[args.index("--data") + 1] = str(data)
    database = scratch / f"{label}.db"
    database.unlink(missing_ok=True)
    url = f"sqlite:///{database}"
    document["spec"]["storage"] = {"url": url}
    path = scratch / f"{label}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path, url


def run_study(mode: str, data: Path, scratch: Path, label: str) -> dict:
    path, url = study_file(mode, data, scratch, label)
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}  # the template's `speechtune-trainer`
    load_before = os.getloadavg()
    before, began, started_at = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic(), time.time()
    with open(scratch / f"{label}.out", "w") as out:
        code = subprocess.run([str(venv_bin / "speechtune"), "run", str(path), "--workdir", str(scratch / label)],
                              stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    wall, after = time.monotonic() - began, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    study = optuna.load_study(study_name=yaml.safe_load(path.read_text())["metadata"]["name"], storage=url)
    trials = []
    for trial in study.get_trials(deepcopy=False):
        trials.append({
            "number": trial.number,
            "state": trial.state.name,
            "params": trial.params,
            "value": trial.value,
            "wer_per_epoch": {int(step): value for step, value in sorted(trial.intermediate_values.items())},
            "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start else None,
        })
    states = [trial["state"] for trial in trials]
    values = [trial["value"] for trial in trials if trial["state"] == "COMPLETE" and trial["value"] is not None]
    return {
        "label": label, "mode": mode, "exit_code": code, "started_at": started_at,
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "load_average_before": [round(x, 2) for x in load_before], "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "best_wer": min(values) if values else None,
        "completed": states.count("COMPLETE"), "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
        "trials": trials,
    }


def epoch_seconds(workdir: Path, number: int) -> dict[int, float]:
    """Epoch -> the trainer's epoch_seconds, from the trial's log (a cold or a warm run's)."""
    found: dict[int, float] = {}
    log = workdir / f"trial-{number}.log"
    for raw in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if raw.startswith("{") and '"speechtune"' in raw and '"step"' in raw:
            line = json.loads(raw)
            found[int(line["step"])] = float(line["epoch_seconds"])
    return found


def analyse_run(run: dict, scratch: Path) -> None:
    """Add each trial's epoch times and the time a trial spent outside its epochs (start-up, stop, clean-up)."""
    for trial in run["trials"]:
        trial["epoch_seconds"] = epoch_seconds(scratch / run["label"], trial["number"])
        trial["outside_epochs_s"] = round(trial["seconds"] - sum(trial["epoch_seconds"].values()), 2) if trial["seconds"] else None
    run["epoch_seconds_sum"] = round(sum(sum(t["epoch_seconds"].values()) for t in run["trials"]), 1)
    run["outside_epochs_s_median"] = statistics.median(t["outside_epochs_s"] for t in run["trials"] if t["outside_epochs_s"] is not None)


def contention(cold: dict, warm: dict) -> float | None:
    """Warm's over cold's epoch time, summed over the (configuration, epoch) pairs both ran: >1 means warm ran on a busier machine."""
    by_params = {json.dumps(trial["params"], sort_keys=True): trial for trial in cold["trials"]}
    cold_sum = warm_sum = 0.0
    for trial in warm["trials"]:
        twin = by_params.get(json.dumps(trial["params"], sort_keys=True))
        for step in set(twin["epoch_seconds"]) & set(trial["epoch_seconds"]) if twin else ():
            cold_sum, warm_sum = cold_sum + twin["epoch_seconds"][step], warm_sum + trial["epoch_seconds"][step]
    return round(warm_sum / cold_sum, 3) if cold_sum else None


def same_results(cold: dict, warm: dict) -> dict:
    """Trials of the two runs with the same parameters: their per-epoch WERs on the epochs both ran."""
    by_params = {json.dumps(trial["params"], sort_keys=True): trial for trial in cold["trials"]}
    same_number_same_params = sum(
        1 for a, b in zip(cold["trials"], warm["trials"]) if a["params"] == b["params"]
    )
    matches = []
    for trial in warm["trials"]:
        twin = by_params.get(json.dumps(trial["params"], sort_keys=True))
        if twin is None:
            continue
        steps = sorted(set(twin["wer_per_epoch"]) & set(trial["wer_per_epoch"]))
        differences = [abs(twin["wer_per_epoch"][s] - trial["wer_per_epoch"][s]) for s in steps]
        matches.append({
            "cold_trial": twin["number"], "warm_trial": trial["number"],
            "epochs_compared": len(steps), "identical": all(d == 0 for d in differences),
            "max_abs_difference": max(differences, default=None),
            "cold_state": twin["state"], "warm_state": trial["state"],
        })
    return {
        "trials_with_same_number_and_params": same_number_same_params,
        "configurations_in_both": len(matches),
        "configurations_identical_per_epoch": sum(1 for m in matches if m["identical"]),
        "epochs_compared": sum(m["epochs_compared"] for m in matches),
        "max_abs_difference": max((m["max_abs_difference"] for m in matches if m["max_abs_difference"] is not None), default=None),
        "matches": matches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/speechtune-bench-warm-study"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/warm_study.json")
    parser.add_argument("--analyse-only", action="store_true", help="recompute --out's summary from --scratch; run nothing")
    args = parser.parse_args()
    if args.analyse_only:
        found = json.loads(args.out.read_text())
        analyse(found["runs"], found["pairs"], args)
        return
    args.scratch.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    runs: list[dict] = []
    pairs: list[dict] = []
    for pair in range(args.pairs):
        order = ("cold", "warm") if pair % 2 == 0 else ("warm", "cold")
        done: dict[str, dict] = {}
        for mode in order:
            result = run_study(mode, data, args.scratch.resolve(), f"pair{pair}-{mode}")
            print(f"pair {pair} {mode}: exit {result['exit_code']}, wall {result['wall_s']:.1f} s, cpu {result['cpu_s']:.1f} s, "
                  f"best wer {result['best_wer']}, completed {result['completed']}, pruned {result['pruned']}, "
                  f"failed {result['failed']}, load {result['load_average_before']} -> {result['load_average_after']}", flush=True)
            runs.append(result)
            done[mode] = result
        same = same_results(done["cold"], done["warm"])
        print(f"pair {pair} same results: {json.dumps({k: v for k, v in same.items() if k != 'matches'})}", flush=True)
        pairs.append({"pair": pair, "order": list(order), "same_results": same})
        args.out.write_text(json.dumps({"pairs": pairs, "runs": runs}, indent=1) + "\n")  # after every pair: a partial result survives
    analyse(runs, pairs, args)


def analyse(runs: list[dict], pairs: list[dict], args: argparse.Namespace) -> None:
    scratch = args.scratch.resolve()
    for run in runs:
        analyse_run(run, scratch)
    for pair in pairs:
        cold, warm = (next(r for r in runs if r["label"] == f"pair{pair['pair']}-{mode}") for mode in ("cold", "warm"))
        pair["wall_ratio_cold_over_warm"] = round(cold["wall_s"] / warm["wall_s"], 3)
        pair["cpu_ratio_cold_over_warm"] = round(cold["cpu_s"] / warm["cpu_s"], 3)
        pair["same_results"] = same_results(cold, warm)
        pair["warm_epoch_time_over_cold"] = contention(cold, warm)
        if pair["warm_epoch_time_over_cold"]:  # the wall ratio had warm's epochs run as fast as cold's: an estimate, not a measurement
            pair["wall_ratio_contention_adjusted"] = round(pair["wall_ratio_cold_over_warm"] * pair["warm_epoch_time_over_cold"], 3)
    summary: dict = {}
    for mode in ("cold", "warm"):
        mine = [run for run in runs if run["mode"] == mode]
        summary[mode] = {"wall_s_median": statistics.median(r["wall_s"] for r in mine),
                         "cpu_s_median": statistics.median(r["cpu_s"] for r in mine),
                         "best_wer": [r["best_wer"] for r in mine],
                         "completed_pruned_failed": [[r["completed"], r["pruned"], r["failed"]] for r in mine],
                         "trial_seconds_outside_epochs_median": statistics.median(r["outside_epochs_s_median"] for r in mine)}
    for key in ("wall_ratio_cold_over_warm", "cpu_ratio_cold_over_warm", "warm_epoch_time_over_cold", "wall_ratio_contention_adjusted"):
        values = [p[key] for p in pairs if p.get(key) is not None]
        summary[f"{key}_median_of_pairs"] = statistics.median(values) if values else None
    cold_runs = [run for run in runs if run["mode"] == "cold"]
    if len(cold_runs) >= 2:  # two cold runs of the same study: what a rerun changes with no warm worker involved
        summary["cold_vs_cold"] = {k: v for k, v in same_results(cold_runs[0], cold_runs[1]).items() if k != "matches"}
    warm_runs = [run for run in runs if run["mode"] == "warm"]
    if len(warm_runs) >= 2:
        summary["warm_vs_warm"] = {k: v for k, v in same_results(warm_runs[0], warm_runs[1]).items() if k != "matches"}
    print(json.dumps(summary, indent=1))
    args.out.write_text(json.dumps({
        "command": f".venv/bin/python bench/warm_study.py DATA --pairs {len(pairs)}",
        "data": "speechtune-trainer make-data --hours 0.2 --seed 0",
        "machine": f"{os.cpu_count()} cores, CPU only, shared with other work (see load_average_* per run)",
        "summary": summary, "pairs": pairs, "runs": runs,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
