"""`speechtune report`: a study's shape, as one offline HTML file and a PNG per figure.

Not `speechtune/report.py`: `speechtune.report` is the metric-protocol helper trainers import
(`from speechtune import report`), and a submodule of that name would replace it on the package.

Everything is read from the Optuna storage alone: Optuna's own fields plus the user attributes
named in ``record.py``. The figures are drawn with matplotlib's Agg backend (the ``report`` extra);
the HTML embeds them as base64 data URIs and carries its CSS inline, so it opens offline and
requests nothing. A figure that cannot be drawn (no complete trial, no intermediate values, not
a ladder...) is replaced by a note that says what is missing.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from speechtune import leaderboard, record

INSTALL_HINT = "pip install 'speechtune[report]'"
TOP_PARALLEL = 20  # trials drawn in the parallel-coordinates plot
TABLE_ROWS = 50  # leaderboard rows in the HTML
# Importances: PED-ANOVA first, Optuna 5's default evaluator (0.03 CPU-s on bench/report_speed.py's
# 1,000 trials); fANOVA when PED-ANOVA fails, with a forest smaller than Optuna's 64 trees of depth 64
# (12.8 CPU-s there, plus 2 s to import scikit-learn; 32 trees of depth 8: 1.4 s, the same importances within 0.01).
FANOVA_TREES, FANOVA_DEPTH = 32, 8
STATE_COLOURS = {"COMPLETE": "#2b7bba", "PRUNED": "#e69f00", "FAIL": "#d62728", "RUNNING": "#7f7f7f", "WAITING": "#bcbd22"}

# The figures, in page order: (id, title). Each PNG is <id>.png; the HTML has an element with this id.
FIGURES = (
    ("history", "Best value so far, by trial"),
    ("compute", "Best value so far, by compute"),
    ("curves", "Learning curves"),
    ("ladder", "The fidelity ladder"),
    ("importances", "Parameter importances"),
    ("parallel", "Top trials, parameter by parameter"),
    ("validation", "Seed validation"),
    ("failures", "Failures by reason"),
)


class ReportError(Exception):
    """The study cannot be reported: missing study or unreachable storage. The CLI exits 2."""


class MatplotlibMissing(ReportError):
    def __init__(self) -> None:
        super().__init__(f"the study report needs matplotlib: {INSTALL_HINT}")


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Figure:
    id: str
    title: str
    png: bytes | None = None  # None: not drawn, see missing
    caption: str = ""
    missing: str = ""


@dataclass
class Report:
    html: Path
    figures: list[Figure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def pngs(self) -> list[Path]:
        return [self.html.parent / f"{figure.id}.png" for figure in self.figures if figure.png is not None]


def load_study(name: str, url: str) -> optuna.Study:
    """The study, read-only; ReportError naming the study or storage when it is not there."""
    from speechtune.storage import StorageUnavailable, open_rdb, redact

    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url[len("sqlite:///"):])
        if not path.is_file():  # RDBStorage would create an empty database
            raise ReportError(f"no study storage at {redact(url)}: {path} does not exist")
    try:
        storage = open_rdb(url)
    except StorageUnavailable as error:
        raise ReportError(str(error)) from error
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = ", ".join(s.study_name for s in storage.get_all_studies()) or "none"
        raise ReportError(f"no study {name!r} in {redact(url)} (studies there: {names})") from None


def write(study: optuna.Study, out: Path) -> Report:
    """Draw every figure into ``out`` (PNGs) and write ``out/index.html``; never fails on a study's shape."""
    if not matplotlib_available():
        raise MatplotlibMissing()
    import matplotlib

    matplotlib.use("Agg", force=True)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = _Data(study)
    figures = []
    for figure_id, title in FIGURES:
        figure = Figure(figure_id, title)
        try:
            _DRAW[figure_id](data, figure)
        except Exception as error:  # a figure must never take the report down with it
            figure.png, figure.missing = None, f"could not be drawn: {type(error).__name__}: {error}"
        path = out / f"{figure_id}.png"
        if figure.png is not None:
            path.write_bytes(figure.png)
        elif path.exists():
            path.unlink()  # a stale figure of an earlier report
        figures.append(figure)
    page = out / "index.html"
    page.write_text(_html(data, figures), encoding="utf-8")
    return Report(html=page, figures=figures, seconds=time.perf_counter() - started)


# -- what the figures read ---------------------------------------------------------------------


class _Data:
    def __init__(self, study: optuna.Study):
        self.study = study
        self.trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        self.metric = study.user_attrs.get(record.OBJECTIVE, "value")
        self.maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        self.complete = [t for t in self.trials if t.state == TrialState.COMPLETE and t.value is not None]
        self.counts = Counter(t.state.name for t in self.trials)
        self.stages = record.stages(study.user_attrs)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.maximize else a < b

    def best(self) -> FrozenTrial | None:
        if not self.complete:
            return None
        return (max if self.maximize else min)(self.complete, key=lambda t: t.value)

    def summary(self) -> str:
        if not self.trials:
            return "no trials yet"
        return ", ".join(f"{state.lower()} {count}" for state, count in sorted(self.counts.items()))


def _figure(columns: int = 1, width: float = 7.0, height: float = 3.6):
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width * columns if columns > 1 else width, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, columns, squeeze=False)[0]
    return fig, list(axes)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _best_so_far(data: _Data, trials: list[FrozenTrial]) -> list[float]:
    best, result = math.nan, []
    for trial in trials:
        if math.isnan(best) or data.better(trial.value, best):
            best = trial.value
        result.append(best)
    return result


def _draw_history(data: _Data, figure: Figure) -> None:
    if not data.complete:
        figure.missing = f"No complete trial yet ({data.summary()}): there is no value to follow."
        return
    fig, (ax,) = _figure()
    numbers = [t.number for t in data.complete]
    ax.scatter(numbers, [t.value for t in data.complete], s=10, color="#9ecae1", label="complete trial", zorder=2)
    ax.step(numbers, _best_so_far(data, data.complete), where="post", color="#08519c", linewidth=2, label="best so far", zorder=3)
    _stage_lines(data, ax, lambda t: t.number)
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"{data.metric} ({'maximize' if data.maximize else 'minimize'})")
    ax.legend(loc="best", fontsize=8)
    figure.png = _png(fig)
    best = data.best()
    figure.caption = f"Best {data.metric} {best.value:.4g} at trial {best.number}, over {len(data.complete)} complete trials."


def _stage_lines(data: _Data, ax, position: Callable[[FrozenTrial], float]) -> None:
    """A dashed line where each stage's first trial starts, named."""
    seen: set[str] = set()
    for trial in data.trials:
        stage = record.stage(trial)
        if stage and stage not in seen:
            seen.add(stage)
            x = position(trial)
            if x is None:
                continue
            ax.axvline(x, color="#555555", linestyle="--", linewidth=0.8, zorder=1)
            ax.annotate(stage, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -10), textcoords="offset points",
                        fontsize=8, color="#333333")


_COMPUTE_METRICS = (("gpu_s", "trainer GPU-seconds"), ("gpu_seconds", "trainer GPU-seconds"), ("run_cpu_s", "trainer CPU-seconds"),
                    ("cpu_s", "trainer CPU-seconds"), ("cpu_seconds", "trainer CPU-seconds"))


def _cost(data: _Data) -> tuple[str, Callable[[FrozenTrial], float | None]]:
    """What compute is measured in: a cost the trainers recorded in their metrics, else each trial's wall time."""
    for key, label in _COMPUTE_METRICS:
        if data.trials and all(key in t.user_attrs.get(record.METRICS, {}) for t in data.complete):
            return label, lambda t, key=key: t.user_attrs.get(record.METRICS, {}).get(key)

    def duration(trial: FrozenTrial) -> float | None:
        if trial.datetime_start and trial.datetime_complete:
            return (trial.datetime_complete - trial.datetime_start).total_seconds()
        return None

    return "trial-seconds (sum of trial durations)", duration


def _draw_compute(data: _Data, figure: Figure) -> None:
    if not data.complete:
        figure.missing = f"No complete trial yet ({data.summary()}): no compute to weigh."
        return
    label, cost = _cost(data)
    finished = sorted((t for t in data.trials if t.datetime_complete), key=lambda t: t.datetime_complete)
    spent, xs, ys, best, at = 0.0, [], [], math.nan, {}
    for trial in finished:
        spent += cost(trial) or 0.0
        at[trial.number] = spent
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            if math.isnan(best) or data.better(trial.value, best):
                best = trial.value
            xs.append(spent)
            ys.append(best)
    fig, (ax,) = _figure()
    ax.step(xs, ys, where="post", color="#08519c", linewidth=2, marker="o", markersize=3)
    _stage_lines(data, ax, lambda t: at.get(t.number))
    ax.set_xlabel(label)
    ax.set_ylabel(f"best {data.metric} so far")
    figure.png = _png(fig)
    figure.caption = f"{spent:,.0f} {label.split(' (')[0]} spent by {len(finished)} finished trials, in the order they finished."


def _draw_curves(data: _Data, figure: Figure) -> None:
    with_values = [t for t in data.trials if t.intermediate_values]
    if not with_values:
        figure.missing = (f"No learning curves: no trial reported an intermediate value ({data.summary()}). "
                          "Trainers report them as protocol lines with a step.")
        return
    from matplotlib.collections import LineCollection

    fig, (ax,) = _figure()
    alpha = 0.6 if len(with_values) <= 100 else 0.25  # a thousand curves must not paint one block
    for state in ("FAIL", "PRUNED", "RUNNING", "COMPLETE"):  # the complete ones, the study's result, on top
        group = [t for t in with_values if t.state.name == state]
        if not group:
            continue
        lines = [sorted(t.intermediate_values.items()) for t in group]
        ax.add_collection(LineCollection(lines, colors=STATE_COLOURS[state], linewidths=0.9, alpha=alpha,
                                         label=f"{state.lower()} ({len(group)})"))
        ends = [line[-1] for line in lines]
        if state == "PRUNED":
            ax.scatter([x for x, _ in ends], [y for _, y in ends], marker="x", s=22, color=STATE_COLOURS[state], zorder=3,
                       label="pruned here")
        else:
            ax.scatter([x for x, _ in ends], [y for _, y in ends], marker=".", s=12, color=STATE_COLOURS[state], zorder=3)
    ax.autoscale_view()
    ax.set_xlabel("step (level index for a ladder)" if _levels(data) else "step")
    ax.set_ylabel(data.metric)
    ax.legend(loc="best", fontsize=8)
    figure.png = _png(fig)
    figure.caption = f"{len(with_values)} of {len(data.trials)} trials reported intermediate values; a cross marks where a trial was pruned."


def _levels(data: _Data) -> list[str]:
    """The ladder's level names, lowest first, from what its trials recorded; [] if not a ladder."""
    if not any(record.LEVEL in t.user_attrs for t in data.trials):
        return []
    names: dict[int, str] = {}
    for trial in data.trials:
        keys = [k[len("metrics_"):] for k in trial.user_attrs if k.startswith("metrics_")]
        if len(keys) == 1 and len(trial.intermediate_values) == 1:
            names.setdefault(next(iter(trial.intermediate_values)), keys[0])
    for pair in data.study.user_attrs.get(record.CORRELATIONS, {}):
        low, _, high = pair.partition("->")
        for index, name in list(names.items()):
            if name == low:
                names.setdefault(index + 1, high)
            if name == high and index > 0:
                names.setdefault(index - 1, low)
    top = max([*names, *(max(t.intermediate_values, default=0) for t in data.trials), *(record.level(t) or 0 for t in data.trials)])
    return [names.get(index, f"level {index}") for index in range(top + 1)]


def _spearman(xs: list[float], ys: list[float]) -> float:
    from speechtune.schedulers.ladder import spearman

    return spearman(xs, ys) if len(xs) >= 2 else math.nan


def _draw_ladder(data: _Data, figure: Figure) -> None:
    levels = _levels(data)
    if not levels:
        figure.missing = "Not a fidelity study: no trial carries a ladder level (spec.fidelity)."
        return
    if len(levels) < 2 or not any(len(t.intermediate_values) >= 2 for t in data.trials):
        figure.missing = f"No configuration has run two levels yet (levels so far: {', '.join(levels)}): nothing to compare."
        return
    correlations = data.study.user_attrs.get(record.CORRELATIONS, {})
    pairs = len(levels) - 1
    fig, axes = _figure(columns=pairs + 1, width=3.6, height=3.6)
    rungs = []
    for lower in range(pairs):
        ax = axes[lower]
        both = [t for t in data.trials if lower in t.intermediate_values and lower + 1 in t.intermediate_values]
        low, high = levels[lower], levels[lower + 1]
        xs, ys = [t.intermediate_values[lower] for t in both], [t.intermediate_values[lower + 1] for t in both]
        ax.scatter(xs, ys, s=18, color="#2b7bba")
        stored = correlations.get(f"{low}->{high}")
        rho = stored["rho"] if stored else _spearman(xs, ys)
        flag = " ProxyUnreliable" if stored and stored.get("unreliable") else ""
        ax.set_title(f"{low} → {high}: ρ {rho:.2f}, {len(both)} pairs{flag}", fontsize=9)
        ax.set_xlabel(f"{data.metric} at {low}")
        ax.set_ylabel(f"{data.metric} at {high}")
        rungs.append(f"{low} → {high}: Spearman ρ {rho:.2f} over {len(both)} configurations{flag}")
    ax = axes[-1]
    for index, name in enumerate(levels):
        ran = [t for t in data.trials if index in t.intermediate_values]
        promoted = [t for t in ran if index + 1 in t.intermediate_values]
        stayed = [t for t in ran if index + 1 not in t.intermediate_values]
        ax.scatter([index] * len(stayed), [t.intermediate_values[index] for t in stayed], s=12, color="#bbbbbb",
                   label="stopped here" if index == 0 else None)
        colour = "#d62728" if index == len(levels) - 1 else "#2ca02c"
        ax.scatter([index] * len(promoted), [t.intermediate_values[index] for t in promoted], s=22, color="#2ca02c",
                   label="promoted" if index == 0 else None)
        if index == len(levels) - 1:
            ax.scatter([index] * len(ran), [t.intermediate_values[index] for t in ran], s=22, color=colour, label="top level")
    ax.set_xticks(range(len(levels)), levels)
    ax.set_xlabel("level")
    ax.set_ylabel(data.metric)
    ax.set_title("configurations per level", fontsize=9)
    ax.legend(loc="best", fontsize=7)
    figure.png = _png(fig)
    sizes = " → ".join(str(sum(1 for t in data.trials if i in t.intermediate_values)) for i in range(len(levels)))
    figure.caption = f"Configurations per level {sizes}. " + "; ".join(rungs) + "."


def _draw_importances(data: _Data, figure: Figure) -> None:
    if len(data.complete) < 2:
        figure.missing = f"Parameter importances need at least 2 complete trials; this study has {len(data.complete)}."
        return
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator, get_param_importances

    evaluators = [("PED-ANOVA (optuna.importance.PedAnovaImportanceEvaluator, Optuna's default: what matters to reach "
                   "the top 10% of trials)", PedAnovaImportanceEvaluator),
                  (f"fANOVA (optuna.importance.FanovaImportanceEvaluator, {FANOVA_TREES} trees of depth {FANOVA_DEPTH})",
                   lambda: FanovaImportanceEvaluator(n_trees=FANOVA_TREES, max_depth=FANOVA_DEPTH, seed=0))]
    errors = []
    for name, make in evaluators:
        try:  # fANOVA needs scikit-learn, which the report extra does not bring
            importances = get_param_importances(data.study, evaluator=make())
        except Exception as error:  # too few trials, a single distinct value, one parameter...
            errors.append(f"{name.split(' (')[0]}: {error}")
            continue
        if importances:
            break
    else:
        figure.missing = "Parameter importances could not be computed: " + "; ".join(errors or ["no parameter varies"])
        return
    fig, (ax,) = _figure(height=max(2.0, 0.45 * len(importances) + 1.0))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="#2b7bba")
    ax.set_xlabel(f"importance for {data.metric} (sums to 1)")
    ax.set_ylabel("parameter")
    figure.png = _png(fig)
    fallback = f" ({'; '.join(errors)})" if errors else ""
    figure.caption = f"Evaluator: {name}, over {len(data.complete)} complete trials{fallback}."


def _draw_parallel(data: _Data, figure: Figure) -> None:
    if len(data.complete) < 2:
        figure.missing = f"The parallel-coordinates plot needs at least 2 complete trials; this study has {len(data.complete)}."
        return
    top = sorted(data.complete, key=lambda t: -t.value if data.maximize else t.value)[:TOP_PARALLEL]
    names = sorted({name for t in top for name in t.params})
    if not names:
        figure.missing = "The complete trials have no parameters."
        return
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    columns = [*names, data.metric]
    scaled: dict[str, list[float | None]] = {}
    ticks: dict[str, tuple[str, str]] = {}
    for name in columns:
        raw = [t.value if name == data.metric and name not in t.params else t.params.get(name) for t in top]
        distribution = next((t.distributions[name] for t in top if name in t.distributions), None)
        if isinstance(distribution, CategoricalDistribution) or any(isinstance(v, str) for v in raw if v is not None):
            choices = list(distribution.choices) if isinstance(distribution, CategoricalDistribution) else sorted({str(v) for v in raw})
            index = {str(c): i for i, c in enumerate(choices)}
            values = [None if v is None else index.get(str(v), 0) for v in raw]
            span = max(len(choices) - 1, 1)
            scaled[name] = [None if v is None else v / span for v in values]
            ticks[name] = (str(choices[0]), str(choices[-1]))
            continue
        log = isinstance(distribution, (FloatDistribution, IntDistribution)) and distribution.log
        numbers = [None if v is None else (math.log10(v) if log and v > 0 else float(v)) for v in raw]
        present = [v for v in numbers if v is not None]
        low, high = (min(present), max(present)) if present else (0.0, 1.0)
        scaled[name] = [None if v is None else (0.5 if high == low else (v - low) / (high - low)) for v in numbers]
        shown = (lambda v: f"{10 ** v:.3g}") if log else (lambda v: f"{v:.3g}")
        ticks[name] = (shown(low), shown(high))
    fig, (ax,) = _figure(width=max(7.0, 1.3 * len(columns)))
    values = [t.value for t in top]
    norm = Normalize(min(values), max(values) if max(values) > min(values) else min(values) + 1e-12)
    cmap = colormaps["viridis_r" if not data.maximize else "viridis"]
    for row, trial in enumerate(top):
        points = [(i, scaled[name][row]) for i, name in enumerate(columns) if scaled[name][row] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], color=cmap(norm(trial.value)), linewidth=1.2, alpha=0.85)
    for i, name in enumerate(columns):
        ax.axvline(i, color="#444444", linewidth=0.8)
        ax.annotate(ticks[name][0], (i, 0), xytext=(2, -2), textcoords="offset points", fontsize=7, va="top")
        ax.annotate(ticks[name][1], (i, 1), xytext=(2, 2), textcoords="offset points", fontsize=7, va="bottom")
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_yticks([0, 1], ["low", "high"])
    ax.set_xlabel("parameter (each axis scaled to the top trials' range; log parameters on a log scale)")
    ax.set_ylabel("position on its axis")
    ax.set_ylim(-0.08, 1.08)
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=data.metric)
    figure.png = _png(fig)
    figure.caption = f"The best {len(top)} complete trials, coloured by {data.metric}."


def _draw_validation(data: _Data, figure: Figure) -> None:
    validation = data.study.user_attrs.get(record.VALIDATION) or {}
    values = validation.get("values") or {}
    if not values or validation.get("mean") is None:
        figure.missing = "No seed validation recorded (spec.validation or a validate stage retrains the best configuration with other seeds)."
        return
    seeds = sorted(values, key=lambda s: int(s) if str(s).isdigit() else s)
    mean, std = validation["mean"], validation["std"]
    fig, (ax,) = _figure(width=5.0, height=3.2)
    ax.bar([f"seed {s}" for s in seeds], [values[s] for s in seeds], color="#9ecae1")
    ax.axhline(mean, color="#08519c", linewidth=1.5, label=f"mean {mean:.4g}")
    ax.axhspan(mean - std, mean + std, color="#08519c", alpha=0.15, label=f"± std {std:.4g}")
    best = next((t for t in data.trials if t.number == validation.get("trial")), None)
    if best is not None and best.value is not None:
        ax.axhline(best.value, color="#d62728", linestyle="--", linewidth=1, label=f"trial {best.number}: {best.value:.4g}")
    ax.set_xlabel("validation run")
    ax.set_ylabel(data.metric)
    ax.legend(loc="best", fontsize=8)
    figure.png = _png(fig)
    figure.caption = f"Trial {validation.get('trial')} retrained with {len(seeds)} seeds: {data.metric} {mean:.4g} ± {std:.4g}."


def _draw_failures(data: _Data, figure: Figure) -> None:
    failed = [t for t in data.trials if t.state == TrialState.FAIL]
    if not failed:
        figure.missing = f"No failed trials ({data.summary()})."
        return
    reasons = Counter(record.fail_reason(t) or "unknown" for t in failed)
    names = [name for name, _ in reasons.most_common()][::-1]
    fig, (ax,) = _figure(height=max(2.0, 0.45 * len(names) + 1.0))
    ax.barh(names, [reasons[n] for n in names], color="#d62728")
    ax.set_xlabel("failed trials")
    ax.set_ylabel("fail reason")
    figure.png = _png(fig)
    interrupted = reasons.get(record.INTERRUPTED, 0)
    figure.caption = (f"{len(failed)} failed trials" + (f", {interrupted} of them interrupted (re-queued, not counted toward maxFailedTrials)"
                                                        if interrupted else "") + ".")


_DRAW: dict[str, Callable[[_Data, Figure], None]] = {
    "history": _draw_history, "compute": _draw_compute, "curves": _draw_curves, "ladder": _draw_ladder,
    "importances": _draw_importances, "parallel": _draw_parallel, "validation": _draw_validation, "failures": _draw_failures,
}


# -- the page -----------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2733;background:#f6f7f9}
header{background:#1d2733;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}header p{margin:0;color:#c9d3de}
main{max-width:1180px;margin:0 auto;padding:18px 28px 40px}
section.card{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:14px 18px;margin:14px 0}
section.card h2{font-size:16px;margin:0 0 8px}
figure{margin:0}figure img{max-width:100%;height:auto;display:block}figcaption{color:#4a5563;font-size:13px;margin-top:6px}
.missing{color:#8a5a00;background:#fff8e6;border-left:4px solid #e6a700;padding:8px 12px;margin:0}
table{border-collapse:collapse;font-size:13px;width:100%}th,td{border-bottom:1px solid #e6e9ee;padding:4px 8px;text-align:right}
th{background:#f0f2f5;position:sticky;top:0}td.l,th.l{text-align:left}
.facts{display:flex;flex-wrap:wrap;gap:10px 26px}.facts div b{display:block;font-size:18px}
.tablewrap{max-height:520px;overflow:auto}
"""


def _html(data: _Data, figures: list[Figure]) -> str:
    e = html.escape
    study = data.study
    best = data.best()
    facts = [("trials", str(len(data.trials))), ("states", data.summary()),
             ("direction", "maximize" if data.maximize else "minimize"),
             (f"best {data.metric}", f"{best.value:.4g} (trial {best.number})" if best else "none yet")]
    running = data.counts.get("RUNNING", 0) + data.counts.get("WAITING", 0)
    notes = []
    if not data.trials:
        notes.append("This study has no trials yet: every figure below says what it is waiting for.")
    elif not data.complete:
        notes.append("No trial has completed: the figures that need a value say so below.")
    if running:
        notes.append(f"In progress: {running} trial(s) running or waiting when this report was written; it shows the study as it was then.")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        # no network at all: images are data URIs, styles inline
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{e(study.study_name)}: study report</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{e(study.study_name)}</h1><p>speechtune study report, objective {e(data.metric)}, "
        f"written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}</p></header><main>",
        '<section class="card" id="summary"><h2>Summary</h2><div class="facts">'
        + "".join(f"<div>{e(k)}<b>{e(v)}</b></div>" for k, v in facts) + "</div>"
        + "".join(f'<p class="missing">{e(n)}</p>' for n in notes) + _stages_html(data) + "</section>",
    ]
    for figure in figures:
        body = (f'<figure><img id="img-{figure.id}" alt="{e(figure.title)}" src="data:image/png;base64,'
                f'{base64.b64encode(figure.png).decode()}"><figcaption>{e(figure.caption)}</figcaption></figure>'
                if figure.png is not None else f'<p class="missing">{e(figure.missing)}</p>')
        state = "drawn" if figure.png is not None else "missing"
        parts.append(f'<section class="card figure-card" id="{figure.id}" data-state="{state}"><h2>{e(figure.title)}</h2>{body}</section>')
    parts.append(_leaderboard_html(data))
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _stages_html(data: _Data) -> str:
    rows = []
    for name, found in data.stages.items():
        from speechtune.schedulers.stages import describe_result

        result = describe_result(found, data.metric) if found.get("state") == "Succeeded" else ""
        rows.append(f"<tr><td class=l>{html.escape(name)}</td><td class=l>{html.escape(str(found.get('kind', '?')))}</td>"
                    f"<td class=l>{html.escape(str(found.get('state', 'Pending')))}</td><td class=l>{html.escape(result)}</td></tr>")
    if not rows:
        return ""
    return ("<h2 style='margin-top:12px'>Stages</h2><table><tr><th class=l>stage</th><th class=l>kind</th><th class=l>state</th>"
            "<th class=l>result</th></tr>" + "".join(rows) + "</table>")


def _leaderboard_html(data: _Data) -> str:
    e = html.escape
    if not data.trials:
        return '<section class="card" id="leaderboard"><h2>Leaderboard</h2><p class="missing">No trials yet.</p></section>'
    board = leaderboard.rows(data.study, TABLE_ROWS)
    names = sorted({name for row in board for name in row.params})
    staged = any(row.stage for row in board)
    head = ["#", data.metric, "state", "step", *(["stage"] if staged else []), *names]
    lines = ["<tr>" + "".join(f"<th{' class=l' if h in ('state', 'stage') else ''}>{e(h)}</th>" for h in head) + "</tr>"]
    for row in board:
        state = row.state if not row.note else f"{row.state} ({row.note})"
        cells = [str(row.number), "" if row.value is None else f"{row.value:.4f}", state, "" if row.step is None else str(row.step),
                 *([row.stage] if staged else []), *(leaderboard._format(row.params.get(name)) for name in names)]
        lines.append("<tr>" + "".join(f"<td{' class=l' if i in (2, 4 if staged else -1) else ''}>{e(c)}</td>"
                                      for i, c in enumerate(cells)) + "</tr>")
    return (f'<section class="card" id="leaderboard"><h2>Leaderboard: top {len(board)} of {len(data.trials)} trials</h2>'
            f'<div class="tablewrap"><table>{"".join(lines)}</table></div></section>')
