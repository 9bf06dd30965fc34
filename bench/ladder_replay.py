"""Issue 13's replay benchmark: the engine's scheduling at many seeds, in seconds, on recorded NeMo curves.

Every arm is a study run by the real engine (``Executor``: sampler, pruner, the fidelity ladder,
promotions, the proxy-correlation check), its runs replayed by ``speechtune.replay.ReplayBackend``
from the recording of bench/record_curves.py: each run prints the recorded curve of the recorded
configuration nearest to its sampled parameters, for its level's kind (full, less data, a smaller
model, both) and epochs, and is charged the recorded CPU-s of what it ran (a pruned run up to
the epoch it reached, a promoted epochs-only level from the lower level's checkpoint). The loop
runs on a simulated clock (``speechtune.replay.run_virtual``), a run lasting its recorded CPU-s,
so a study takes well under a second and its result depends on nothing but the recording and the seed.

Equal budget: every arm stops launching once the CPU-s charged for its finished runs reach B
(``Executor.update_budget(parallelism=0)``); the ladders are sized by their own shape to about B
(the largest ``initialTrials`` whose expected cost, from the recording's mean costs, fits in B).
As in bench/ladder_efficiency.py, an arm's anytime curve is its runs in the order they finished,
cumulative CPU-s, and the best full-fidelity WER so far (the full kind at the last epoch: a
ladder's lower levels, and runs a pruner stopped, never count); its result is its best WER among
the runs that finished within B.

Reported per arm over the seeds: the best WER at B (median and a 95 % distribution-free
interval from order statistics), the share of B it needs to reach random search's median final
WER (median over seeds; a seed that never reaches it counts as more than B), and the median
anytime curve (a PNG). From the recording alone: Spearman's rho between each level (kind x
epochs, ranked by wer, cer or val_loss) and the full-fidelity WER, and each level's cost as a
share of a full run, warm and cold.

    .venv/bin/python bench/ladder_replay.py                        # the run in docs/benchmarks.md
    .venv/bin/python bench/ladder_replay.py --recording bench/results/curves_fake.json --seeds 3 \\
        --out /tmp/replay.json --plot /tmp/replay.png              # a smoke run on the fake trainer's recording

The last line of the output is one JSON object: ``best_arm`` (the best multi-fidelity arm: every
arm but random and TPE, by median best WER at B, then median share), its
``share_of_budget_to_random_final`` and ``best_wer_at_budget`` (medians), ``tpe_best_wer_at_budget``
(full-fidelity TPE's median) and ``seeds``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields
from pathlib import Path, PurePath
from typing import Any

import optuna

from speechtune import spec
from speechtune.executor import Executor
from speechtune.replay import FULL, Recording, ReplayBackend, ReplayStorage, run_virtual
from speechtune.schedulers.ladder import spearman

ROOT = Path(__file__).resolve().parents[1]
ETA = 3
PLAIN = ("random", "tpe")  # full-fidelity search; every other arm is multi-fidelity
HAS_RANK = "rank" in {f.name for f in fields(spec.Level)}
HAS_BRACKETS = "brackets" in {f.name for f in fields(spec.Fidelity)}
RANK = {"metric": "val_loss", "tieBreak": {"metric": "cer"}}  # chosen before the replay: the example
RANK_WITHOUT_VAL_LOSS = {"metric": "cer", "tieBreak": {"metric": "wer"}}  # a recording without val_loss (the fake trainer's)
COST = "cpu"  # what B counts and how long a replayed run lasts: recorded CPU-s (--cost wall: wall-s, for the fake recording)


# -- the arms --------------------------------------------------------------------------------------
def rank_of(recording: Recording) -> dict[str, Any]:
    has_val_loss = all("val_loss" in step for config in recording.configs for curve in config.curves.values() for step in curve.steps)
    return RANK if has_val_loss else RANK_WITHOUT_VAL_LOSS


def arm_specs(recording: Recording, startup_trials: int) -> dict[str, dict[str, Any]]:
    """Each arm's sampler, pruner and ladder (levels, mode, rank, brackets), from what the recording has."""
    rank_by = rank_of(recording)
    full_epochs = recording.epochs
    low_epochs = max(1, full_epochs // 4)  # 1 of 4
    kinds = recording.kinds
    tpe = {"type": "tpe", "startupTrials": startup_trials}
    arms: dict[str, dict[str, Any]] = {
        "random": {"sampler": {"type": "random"}},
        "tpe": {"sampler": tpe},
        "tpe+median": {"sampler": tpe, "pruner": {"type": "median"}},
        "tpe+hyperband": {"sampler": tpe, "pruner": {"type": "hyperband", "minResource": 1, "maxResource": full_epochs,
                                                    "reductionFactor": ETA}},
    }

    def ladder(levels: list[dict], mode: str = "asynchronous", rank: bool = False, brackets: int = 1) -> dict:
        named = []
        for index, overrides in enumerate(levels):
            level: dict[str, Any] = {"name": "full" if index == len(levels) - 1 else f"l{index}", "overrides": overrides}
            if rank and index < len(levels) - 1:
                level["rank"] = rank_by
            named.append(level)
        fidelity: dict[str, Any] = {"levels": named, "reductionFactor": ETA, "mode": mode, "checkpointVolume": "/replay"}
        if brackets > 1:
            fidelity["brackets"] = brackets
        return {"sampler": tpe, "fidelity": fidelity}

    # Levels: epochs alone (1 -> 2 -> 4 of 4: each level doubles the epochs), data size alone, model size alone,
    # and data size or data + model size below the epochs levels. Lower levels rank by the objective, or (+rank) by RANK.
    epochs = [{"epochs": low_epochs}, {"epochs": 2 * low_epochs}, {"epochs": full_epochs}] if 2 * low_epochs < full_epochs else [
        {"epochs": low_epochs}, {"epochs": full_epochs}]
    data = [kinds["data"], {}] if "data" in kinds else None
    data_epochs = [kinds["data"], {"epochs": max(1, full_epochs // 2)}, {"epochs": full_epochs}] if "data" in kinds else None
    model = [kinds["model"], {}] if "model" in kinds else None
    three = [kinds["data-model"], {"epochs": max(1, full_epochs // 2)}, {"epochs": full_epochs}] if "data-model" in kinds else None
    arms["ladder-epochs-sync"] = ladder(epochs, "synchronous")
    arms["ladder-epochs"] = ladder(epochs)
    for name, levels in (("ladder-data", data), ("ladder-model", model), ("ladder-data-epochs", data_epochs), ("ladder-3", three)):
        if levels:
            arms[name] = ladder(levels)
    if HAS_RANK:
        for name, levels in (("ladder-epochs", epochs), ("ladder-data", data), ("ladder-data-epochs", data_epochs), ("ladder-3", three)):
            if levels:
                arms[f"{name}+rank"] = ladder(levels, rank=True)
    if HAS_BRACKETS:
        suffix = "+rank+brackets" if HAS_RANK else "+brackets"
        for name, levels in (("ladder-epochs", epochs), ("ladder-data-epochs", data_epochs)):
            if levels:
                arms[f"{name}{suffix}"] = ladder(levels, rank=HAS_RANK, brackets=len(levels))
    return arms


def level_run_costs(recording: Recording, levels: list[dict]) -> list[float]:
    """Mean CPU-s of one configuration's run at each level, fresh at the first level of a chain, resumed above."""
    costs, previous = [], None
    for level in levels:
        kind, epochs = recording.kind_of(level["overrides"]), recording.epochs_of(level["overrides"])
        first = previous[1] + 1 if previous is not None and previous[0] == kind and previous[1] < epochs else 1
        costs.append(statistics.fmean(config.curves[kind].cost(first, epochs, COST) for config in recording.configs))
        previous = (kind, epochs)
    return costs


def fresh_run_costs(recording: Recording, levels: list[dict]) -> list[float]:
    """Mean CPU-s of a run that starts at each level (a bracket's first level: nothing to resume)."""
    return [statistics.fmean(config.curves[recording.kind_of(level["overrides"])].cost(1, recording.epochs_of(level["overrides"]), COST)
                             for config in recording.configs) for level in levels]


def first_result_floor(recording: Recording, fidelity: dict, initial: int, startup: float) -> float | None:
    """The least cost (mean costs) before a one-bracket ladder can have its first full-fidelity result: ASHA needs
    eta^(L-1-k) results at each level k below the top first, a synchronous ladder every run of every lower rung."""
    if fidelity.get("brackets", 1) > 1:
        return None  # its last bracket starts at the top: no floor beyond one full run
    levels = fidelity["levels"]
    costs = [cost + startup for cost in level_run_costs(recording, levels)]
    if fidelity["mode"] == "asynchronous":
        counts = [ETA ** (len(levels) - 1 - k) for k in range(len(levels))]
    else:
        counts = [max(1, initial // ETA**k) for k in range(len(levels) - 1)] + [1]
    return sum(count * cost for count, cost in zip(counts, costs))


def recorded_rho(recording: Recording, fidelity: dict) -> dict[str, float | None]:
    """Spearman's rho between adjacent levels over every recorded configuration, each level by what it ranks by:
    what the engine's proxy check measures on the configurations a study ran at both levels."""
    levels = fidelity["levels"]

    def values(level: dict) -> list[float]:
        metric = level.get("rank", {}).get("metric", recording.objective)
        kind, epochs = recording.kind_of(level["overrides"]), recording.epochs_of(level["overrides"])
        return [config.curves[kind].steps[epochs - 1][metric] for config in recording.configs]

    return {f"{low['name']}->{high['name']}": rnd(spearman(values(low), values(high)), 3) for low, high in zip(levels, levels[1:])}


def size_ladder(recording: Recording, fidelity: dict, budget: float, startup: float) -> int:
    """The largest initialTrials whose expected cost (every rung full, the recording's mean costs) fits in ``budget``."""
    levels = fidelity["levels"]
    resumed = [cost + startup for cost in level_run_costs(recording, levels)]
    fresh = [cost + startup for cost in fresh_run_costs(recording, levels)]
    brackets = fidelity.get("brackets", 1)
    minimum = ETA ** (len(levels) - 1)

    def expected(initial: int) -> float:
        shape = spec.Fidelity(levels=tuple(spec.Level(level["name"], level["overrides"]) for level in levels),
                              reduction_factor=ETA, initial_trials=initial, **({"brackets": brackets} if brackets > 1 else {}))
        sizes = shape.bracket_sizes() if HAS_BRACKETS else [shape.rung_sizes()]
        return sum(count * (fresh[level] if level == bracket else resumed[level])
                   for bracket, counts in enumerate(sizes) for level, count in enumerate(counts) if count)

    initial = minimum
    while expected(initial + 1) <= budget and initial < 10_000:
        initial += 1
    return initial


# -- one study ---------------------------------------------------------------------------------------
_RECORDING: Recording | None = None


def _load(path: str, kinds: tuple[str, ...] | None, cost: str) -> None:
    global _RECORDING, COST
    _RECORDING = Recording.load(path, kinds=kinds)
    COST = cost
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_study(task: dict) -> dict:
    """One arm at one seed, to budget B, with the real engine on replayed runs; its charges and what the engine concluded."""
    recording = _RECORDING
    assert recording is not None
    arm, seed, budget = task["arm"], task["seed"], task["budget"]
    folder = Path(tempfile.mkdtemp(prefix="ladder-replay-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    manifest = {
        "metadata": {"name": f"{arm.replace('+', '-')}-s{seed}"},
        "spec": {
            "objective": {"metric": recording.objective, "direction": "minimize"},
            "maxTrials": 10_000, "parallelism": task["parallelism"], "maxFailedTrials": 10_000,
            "sampler": {**task["spec"]["sampler"], "seed": seed},
            "searchSpace": recording.meta["space"],
            "trialTemplate": {"command": ["replay"]},
            "storage": {"url": f"sqlite:///{folder}/study.db"},
        },
    }
    if "pruner" in task["spec"]:
        manifest["spec"]["pruner"] = task["spec"]["pruner"]
    if "fidelity" in task["spec"]:
        manifest["spec"]["fidelity"] = {**task["spec"]["fidelity"], "initialTrials": task["initial_trials"]}
    study = spec.parse_study(manifest)
    spent = [0.0]
    holder: list[Executor] = []

    def on_charge(charge) -> None:
        spent[0] += charge.cost(COST)
        if spent[0] >= budget and holder:
            holder[0].update_budget(parallelism=0)  # B is spent: start nothing new, let the running runs end

    backend = ReplayBackend(recording, start=task["start"], clock=COST, on_charge=on_charge)
    try:
        engine = Executor(study, ReplayStorage.open(study.storage.url), backend,
                          checkpoint_root=PurePath("/replay"), checkpoint_files_here=False)
        holder.append(engine)
        outcome = run_virtual(engine.run())
        correlations = engine.study.user_attrs.get("fidelity_correlations", {})
        costs = engine.study.user_attrs.get("fidelity_costs", {})
        configurations = len(engine.trials())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    charges = sorted(backend.ledger, key=lambda c: c.end)
    return {
        "arm": arm, "seed": seed, "outcome": outcome.state, "configurations": configurations,
        "correlations": correlations, "costs": costs,
        "runs": [[round(c.end, 3), round(c.cost(COST), 3), c.config, c.kind, c.last, c.full_fidelity,
                  round(c.metrics.get(recording.objective, math.nan), 6)] for c in charges],
    }


# -- summaries -------------------------------------------------------------------------------------
def curve(runs: list[list]) -> list[tuple[float, float]]:
    """(cumulative CPU-s, best full-fidelity WER so far) after each run, in the order they finished."""
    spent, best, points = 0.0, math.inf, []
    for _, cost, _, _, _, full, wer in runs:
        spent += cost
        if full:
            best = min(best, wer)
        points.append((spent, best))
    return points


def best_at(points: list[tuple[float, float]], budget: float) -> float:
    return min((best for spent, best in points if spent <= budget + 1e-9), default=math.inf)


def spent_to_reach(points: list[tuple[float, float]], target: float, budget: float) -> float | None:
    return next((spent for spent, best in points if best <= target + 1e-12 and spent <= budget + 1e-9), None)


def median_interval(values: list[float]) -> tuple[float, float, float]:
    """The median and a distribution-free 95 % interval for it: order statistics x(k), x(n-k+1)."""
    ordered = sorted(values)
    n = len(ordered)
    k = 0
    cumulative = 0.0
    for j in range(n + 1):  # largest k with P(Binomial(n, 1/2) <= k - 1) <= 0.025
        cumulative += math.comb(n, j) / 2**n
        if cumulative > 0.025:
            k = j
            break
    median = statistics.median(ordered)
    if k == 0:
        return median, -math.inf, math.inf
    return median, ordered[k - 1], ordered[n - k]


def rnd(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def summarize(studies: list[dict], arms: list[str], budget: float) -> tuple[dict, dict]:
    curves = {(s["arm"], s["seed"]): curve(s["runs"]) for s in studies}
    finals = {key: best_at(points, budget) for key, points in curves.items()}
    random_finals = [value for (arm, _), value in finals.items() if arm == "random"]
    target = statistics.median(random_finals) if random_finals else None
    summary = {}
    grid = [budget * step / 100 for step in range(101)]
    anytime = {}
    for arm in arms:
        mine = sorted((s for s in studies if s["arm"] == arm), key=lambda s: s["seed"])
        if not mine:
            continue
        best = [finals[arm, s["seed"]] for s in mine]
        shares = [(spent / budget if (spent := spent_to_reach(curves[arm, s["seed"]], target, budget)) is not None else math.inf)
                  if target is not None else math.inf for s in mine]
        median, low, high = median_interval(best)
        share, share_low, share_high = median_interval(shares)
        full_runs = [sum(1 for run in s["runs"] if run[5]) for s in mine]
        within = [sum(1 for spent, _ in curves[arm, s["seed"]] if spent <= budget + 1e-9) for s in mine]
        correlation_pairs: dict[str, list[float]] = {}
        level_costs: dict[str, list[dict]] = {}
        for s in mine:
            for pair, found in s["correlations"].items():
                correlation_pairs.setdefault(pair, []).append(found["rho"])
            for level, found in s.get("costs", {}).items():
                level_costs.setdefault(level, []).append(found)
        summary[arm] = {
            "seeds": len(mine),
            "best_wer_at_budget": {"median": rnd(median), "ci95": [rnd(low), rnd(high)], "mean": rnd(statistics.fmean(best))
                                   if all(map(math.isfinite, best)) else None, "no_result_seeds": sum(1 for b in best if not math.isfinite(b))},
            "share_of_budget_to_random_final": {"median": rnd(share, 3), "ci95": [rnd(share_low, 3), rnd(share_high, 3)],
                                                "seeds_reaching": sum(1 for s in shares if math.isfinite(s))},
            "runs_within_budget_median": statistics.median(within),
            "full_fidelity_runs_median": statistics.median(full_runs),
            "configurations_median": statistics.median(s["configurations"] for s in mine),
            "distinct_recorded_configurations_median": statistics.median(len({run[2] for run in s["runs"]}) for s in mine),
            "distinct_full_fidelity_configurations_median": statistics.median(len({run[2] for run in s["runs"] if run[5]}) for s in mine),
            "spent_cpu_s_median": rnd(statistics.median(sum(run[1] for run in s["runs"]) for s in mine), 1),
            "engine_rho_median": {pair: rnd(statistics.median(values), 3) for pair, values in correlation_pairs.items()},
            # what the product tells the user (ProxyCostly): each level's median cost share and the seeds that flagged it
            "engine_costs": {level: {"share_median": rnd(statistics.median(f["share"] for f in found), 3),
                                     "startup_share_median": rnd(statistics.median(f["startupShare"] for f in found), 3),
                                     "costly_seeds": sum(1 for f in found if f["costly"])} for level, found in level_costs.items()},
            "best_wer_by_seed": [rnd(b) for b in best],
            "share_by_seed": [rnd(s, 3) for s in shares],
        }
        anytime[arm] = [rnd(statistics.median(best_at(curves[arm, s["seed"]], x) for s in mine)) for x in grid]
    return summary, {"target_random_median_final": rnd(target), "grid_share_of_budget": [step / 100 for step in range(101)],
                     "median_best_wer": anytime}


def level_table(recording: Recording) -> list[dict]:
    """From the recording alone: each level's rho with the full-fidelity WER, by metric, and its cost share."""
    full = [config.curves[FULL] for config in recording.configs]
    target = [curve.steps[-1][recording.objective] for curve in full]
    full_cpu = statistics.fmean(curve.cost(1, recording.epochs, COST) for curve in full)
    startup = recording.startup_cpu_s if COST == "cpu" else recording.startup_wall_s
    rows = []
    for kind, overrides in recording.kinds.items():
        curves = [config.curves[kind] for config in recording.configs]
        for epochs in range(1, recording.epochs + 1):
            row: dict[str, Any] = {"kind": kind, "overrides": overrides, "epochs": epochs}
            for metric in ("wer", "cer", "val_loss"):
                values = [curve.steps[epochs - 1].get(metric) for curve in curves]
                if all(value is not None for value in values):
                    rho = spearman(values, target)
                    row[f"rho_{metric}"] = rnd(rho, 3)
                    if metric == recording.objective:
                        row["share_at_wer_1"] = round(sum(1 for v in values if v >= 0.999) / len(values), 3)
            cost = statistics.fmean(curve.cost(1, epochs, COST) for curve in curves)
            row[f"{COST}_s"] = round(cost, 2)
            row["cost_share_warm"] = round(cost / full_cpu, 3)
            row["cost_share_cold"] = round((cost + startup) / (full_cpu + startup), 3)
            rows.append(row)
    return rows


# -- the plot --------------------------------------------------------------------------------------
COLOURS = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
           "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173", "#3182bd", "#e6550d", "#31a354"]


def plot(path: Path, anytime: dict, budget: float, title: str, order: list[str]) -> bool:
    """The median anytime curves as a PNG (Pillow, which the trainer's dependencies bring); False without Pillow."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        return False
    width, height = 1200, 720
    left, right, top, bottom = 80, 330, 50, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=14)
        small = ImageFont.load_default(size=12)
    except TypeError:  # an old Pillow: one bitmap size
        font = small = ImageFont.load_default()
    xs = anytime["grid_share_of_budget"]
    values = [v for arm in order for v in anytime["median_best_wer"][arm] if v is not None]
    y_low = math.floor(min(values, default=0.0) * 20) / 20
    y_high = math.ceil(max(values, default=1.0) * 20) / 20
    if y_high <= y_low:
        y_high = y_low + 0.05

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + x * (width - left - right), top + (y_high - y) / (y_high - y_low) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for step in range(11):
        x = step / 10
        gx, _ = px(x, y_low)
        draw.line([gx, top, gx, height - bottom], fill="#e6e6e6")
        draw.text((gx - 10, height - bottom + 6), f"{x:.1f}", fill="black", font=small)
    ticks = int(round((y_high - y_low) / 0.05))
    for step in range(ticks + 1):
        y = y_low + step * 0.05
        _, gy = px(0, y)
        draw.line([left, gy, width - right, gy], fill="#e6e6e6")
        draw.text((left - 42, gy - 7), f"{y:.2f}", fill="black", font=small)
    gx, _ = px(1 / 3, y_low)
    draw.line([gx, top, gx, height - bottom], fill="#999999", width=1)
    draw.text((gx + 4, top + 4), "B/3", fill="#555555", font=small)
    target = anytime["target_random_median_final"]
    if target is not None and y_low <= target <= y_high:
        _, gy = px(0, target)
        draw.line([left, gy, width - right, gy], fill="#999999")
        draw.text((left + 4, gy - 16), "random's median final WER", fill="#555555", font=small)
    unit = "CPU-s" if COST == "cpu" else "wall-s"
    draw.text((left, 6), title, fill="black", font=font)
    draw.text(((left + width - right) / 2 - 150, height - 35), f"{unit} spent, as a share of B = {budget:.0f} {unit}",
              fill="black", font=font)
    draw.text((left, top - 20), "median over seeds of the best full-fidelity dev WER so far", fill="black", font=small)
    palette = iter(COLOURS * 3)
    for index, arm in enumerate(order):
        colour = {"random": "#000000", "tpe": "#d62728"}.get(arm) or next(palette)
        points = [px(x, y) for x, y in zip(xs, anytime["median_best_wer"][arm]) if y is not None]
        line_width = 4 if arm in PLAIN else 2
        for a, b in zip(points, points[1:]):  # a step: the best so far changes when a run ends
            draw.line([a, (b[0], a[1]), b], fill=colour, width=line_width)
        legend_y = top + 10 + index * 22
        draw.line([width - right + 15, legend_y + 7, width - right + 45, legend_y + 7], fill=colour, width=line_width)
        final = anytime["median_best_wer"][arm][-1]
        draw.text((width - right + 52, legend_y), f"{arm}  {final:.3f}" if final is not None else f"{arm}  none",
                  fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return True


# -- main ----------------------------------------------------------------------------------------------
def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recording", type=Path, default=ROOT / "bench" / "results" / "curves.json")
    parser.add_argument("--seeds", type=int, default=20, help="seeds 0..N-1; each runs every arm")
    parser.add_argument("--budget-runs", type=float, default=10.0,
                        help="B in full-fidelity runs: B = this x a full run's mean recorded CPU-s (with start-up when --start cold)")
    parser.add_argument("--start", choices=("warm", "cold"), default="warm",
                        help="warm: runs in warm workers; cold: every run also pays the recorded start-up (imports)")
    parser.add_argument("--startup-trials", type=int, default=3, help="TPE's random start-up trials")
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--cost", choices=("cpu", "wall"), default="cpu",
                        help="what B counts and how long a run lasts on the simulated clock: recorded CPU-s, or wall-s")
    parser.add_argument("--arms", nargs="+", help="a subset of the arms (default: all the recording and the spec allow)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="studies replayed at once (processes)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ladder_replay.json")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "ladder_replay.png"), help="the PNG ('' for none)")
    args = parser.parse_args()
    args.plot = Path(args.plot) if args.plot else None
    global COST
    COST = args.cost
    began = time.monotonic()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    everything = Recording.load(args.recording)
    kinds = tuple(everything.kinds)
    recording = Recording.load(args.recording, kinds=kinds)  # the configurations with every kind recorded
    startup = (recording.startup_cpu_s if COST == "cpu" else recording.startup_wall_s) if args.start == "cold" else 0.0
    full_cost = statistics.fmean(config.curves[FULL].cost(1, recording.epochs, COST) for config in recording.configs) + startup
    budget = args.budget_runs * full_cost
    specs = arm_specs(recording, args.startup_trials)
    arms = [arm for arm in specs if not args.arms or arm in args.arms]
    print(f"# {args.recording.name}: {len(recording.configs)} configurations with every kind of {list(kinds)} "
          f"(of {len(everything.data['configs'])}), {recording.epochs} epochs; B = {args.budget_runs:g} full runs = {budget:.0f} CPU-s "
          f"({args.start}); {len(arms)} arms x {args.seeds} seeds; rank metric {'yes' if HAS_RANK else 'no'}, "
          f"brackets {'yes' if HAS_BRACKETS else 'no'}", flush=True)
    tasks = []
    shapes = {}
    for arm in arms:
        initial = size_ladder(recording, specs[arm]["fidelity"], budget, startup) if "fidelity" in specs[arm] else None
        shapes[arm] = {**specs[arm], **({"initialTrials": initial} if initial else {})}
        if initial:
            floor = first_result_floor(recording, specs[arm]["fidelity"], initial, startup)
            shapes[arm]["first_result_floor_share_of_budget"] = round(floor / budget, 3) if floor is not None else None
            shapes[arm]["recorded_rho"] = recorded_rho(recording, specs[arm]["fidelity"])
        for seed in range(args.seeds):
            tasks.append({"arm": arm, "seed": seed, "budget": budget, "spec": specs[arm], "initial_trials": initial,
                          "start": args.start, "parallelism": args.parallelism})
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_load, initargs=(str(args.recording), kinds, COST)) as pool:
        studies = list(pool.map(run_study, tasks, chunksize=4))
    failed = [f"{s['arm']}-s{s['seed']}" for s in studies if s["outcome"] != "Succeeded"]
    summary, anytime = summarize(studies, arms, budget)
    levels = level_table(recording)
    multi = [arm for arm in arms if arm not in PLAIN and arm in summary]

    def order_key(arm: str) -> tuple[float, float]:
        best = summary[arm]["best_wer_at_budget"]["median"]
        share = summary[arm]["share_of_budget_to_random_final"]["median"]
        return (best if best is not None else math.inf, share if share is not None else math.inf)

    best_arm = min(multi, key=order_key) if multi else None
    elapsed = time.monotonic() - began
    # -- print -------------------------------------------------------------------------------------
    rows = [["level (kind, epochs)", "rho wer", "rho cer", "rho val_loss", "WER=1 share", f"{COST}-s", "cost/full warm", "cost/full cold"]]
    for row in levels:
        rows.append([f"{row['kind']} {row['epochs']}", str(row.get("rho_wer")), str(row.get("rho_cer")), str(row.get("rho_val_loss")),
                     str(row.get("share_at_wer_1")), str(row[f"{COST}_s"]), str(row["cost_share_warm"]), str(row["cost_share_cold"])])
    print("# Spearman rho of each level's metric with the full-fidelity WER, over the recorded configurations; cost shares")
    print(table(rows))
    rows = [["arm", "best WER at B: median [95 %]", "share of B to random's median final [95 %]", "reached", "runs", "full runs",
             "configs (distinct)", "initialTrials", "floor", "rho recorded", "engine rho", "engine ProxyCostly seeds"]]
    for arm in arms:
        found = summary[arm]
        best, share = found["best_wer_at_budget"], found["share_of_budget_to_random_final"]
        rows.append([arm, f"{best['median']} [{best['ci95'][0]}, {best['ci95'][1]}]",
                     f"{share['median']} [{share['ci95'][0]}, {share['ci95'][1]}]", f"{share['seeds_reaching']}/{found['seeds']}",
                     str(found["runs_within_budget_median"]), str(found["full_fidelity_runs_median"]), f"{found['configurations_median']} ({found['distinct_recorded_configurations_median']})",
                     str(shapes[arm].get("initialTrials", "")), str(shapes[arm].get("first_result_floor_share_of_budget", "")),
                     " ".join(f"{pair}={rho}" for pair, rho in shapes[arm].get("recorded_rho", {}).items()),
                     " ".join(f"{pair}={rho}" for pair, rho in found["engine_rho_median"].items()),
                     " ".join(f"{level}={cost['costly_seeds']}" for level, cost in found["engine_costs"].items())])
    print(f"# B = {budget:.0f} CPU-s; random's median final WER {anytime['target_random_median_final']}; share None: the median seed "
          f"never reaches it within B")
    print(table(rows))
    if failed:
        print(f"# studies that did not succeed: {failed}")
    drawn = plot(args.plot, anytime, budget, f"Replayed studies on {args.recording.name}: median over {args.seeds} seeds, "
                 f"{args.start} runs, B = {args.budget_runs:g} full runs", sorted(arms, key=order_key)) if args.plot else False
    report = {
        "meta": {"command": " ".join([".venv/bin/python", "bench/ladder_replay.py", *sys.argv[1:]]),
                 "recording": os.path.relpath(args.recording, ROOT), "recording_command": recording.meta.get("command"),
                 "configurations": len(recording.configs), "kinds": recording.kinds, "epochs": recording.epochs,
                 "budget_cost": COST, "budget_s": round(budget, 1), "budget_full_runs": args.budget_runs, "start": args.start, "seeds": args.seeds,
                 "eta": ETA, "parallelism": args.parallelism, "tpe_startup_trials": args.startup_trials,
                 "rank_metric_available": HAS_RANK, "brackets_available": HAS_BRACKETS, "rank": rank_of(recording) if HAS_RANK else None,
                 "startup_cpu_s": recording.startup_cpu_s, "full_run_cpu_s_mean": round(full_cost - startup, 2),
                 "elapsed_s": round(elapsed, 1), "cpus": os.cpu_count(), "jobs": args.jobs, "failed_studies": failed,
                 "plot": os.path.relpath(args.plot, ROOT) if drawn else None},
        "arms": {arm: {"spec": shapes[arm], **summary[arm]} for arm in arms},
        "levels": levels,
        "anytime": anytime,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"# {len(studies)} studies in {elapsed:.0f} s on {args.jobs} processes; {args.out}" + (f"; {args.plot}" if drawn else ""))
    best = summary[best_arm] if best_arm else None
    print(json.dumps({
        "best_arm": best_arm,
        "share_of_budget_to_random_final": best["share_of_budget_to_random_final"]["median"] if best else None,
        "best_wer_at_budget": best["best_wer_at_budget"]["median"] if best else None,
        "tpe_best_wer_at_budget": summary["tpe"]["best_wer_at_budget"]["median"] if "tpe" in summary else None,
        "random_best_wer_at_budget": summary["random"]["best_wer_at_budget"]["median"] if "random" in summary else None,
        "budget_s": round(budget, 1),
        "budget_cost": COST,
        "seeds": args.seeds,
    }))


if __name__ == "__main__":
    main()
