"""`speechtune`: run a study on this machine, validate a spec, show a leaderboard."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from speechtune import leaderboard, record, spec
from speechtune.executor import Event, Executor, Outcome
from speechtune.local import LocalProcessBackend
from speechtune.schedulers import handoff
from speechtune.schedulers.stages import describe_result
from speechtune.storage import StorageUnavailable, WriteThroughStorage, open_rdb, redact
from speechtune.workers import WarmWorkerBackend, saving

DEFAULT_STORAGE = "sqlite:///speechtune.db"
EXIT_FAILED, EXIT_INVALID = 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speechtune", description="Tune speech models with Optuna.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a study on this machine: trials as local processes")
    run.add_argument("file", type=Path)
    run.add_argument("--storage", help=f"Optuna storage URL (default: spec.storage.url, else {DEFAULT_STORAGE})")
    run.add_argument("--parallelism", type=int, help="trials at once (overrides spec.parallelism)")
    run.add_argument("--max-trials", type=int, help="total trials (overrides spec.maxTrials)")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1:PORT")
    run.add_argument("--workdir", type=Path, help="where trial logs go (default: .speechtune/<study>)")
    run.add_argument("--top", type=int, default=10, help="leaderboard rows")

    validate = commands.add_parser("validate", help="check a study file; print every problem")
    validate.add_argument("file", type=Path)

    status = commands.add_parser("status", help="a study's leaderboard, from storage alone")
    status.add_argument("study")
    status.add_argument("--storage", default=DEFAULT_STORAGE)
    status.add_argument("--top", type=int, default=10)

    report_cmd = commands.add_parser("report", help="a study's report: one offline HTML file and a PNG per figure")
    report_cmd.add_argument("study")
    report_cmd.add_argument("--storage", default=DEFAULT_STORAGE)
    report_cmd.add_argument("--out", type=Path, help="where the report goes (default: ./report-<study>)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        if args.command == "validate":
            return _validate(args, console)
        if args.command == "status":
            return _status(args, console)
        if args.command == "report":
            return _report(args, console)
        return _run(args, console)
    except spec.SpecError as error:
        _print_problems(error, console)
        return EXIT_INVALID
    except StorageUnavailable as error:
        console.print(f"[red]error:[/red] {error}")
        return EXIT_FAILED


def _print_problems(error: spec.SpecError, console: Console) -> None:
    console.print(f"[red]invalid study spec: {len(error.problems)} problem(s)[/red]")
    for path, message in error.problems:
        console.print(f"  {path}: {message}", markup=False, highlight=False)


def _validate(args: argparse.Namespace, console: Console) -> int:
    study = spec.load_study(args.file)
    conditional = sum(1 for param in study.search_space if param.when)
    console.print(f"{args.file}: valid study {study.name!r}, {len(study.search_space)} parameters"
                  + (f" ({conditional} conditional)" if conditional else ""))
    return 0


def _check_cli_override(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise spec.SpecError([(flag, f"must be >= 1, got {value}")])


def _run(args: argparse.Namespace, console: Console) -> int:
    study = spec.load_study(args.file)
    _check_cli_override(args.parallelism, "--parallelism")
    _check_cli_override(args.max_trials, "--max-trials")
    study = replace(
        study,
        parallelism=args.parallelism or study.parallelism,
        max_trials=args.max_trials or study.max_trials,
    )
    if study.trial_template.replicas > 1:
        raise spec.SpecError([("spec.trialTemplate.replicas", "runs a trial as that many pods, on a cluster only; locally, "
                               "use 1 (one process, which may use several devices)")])
    if study.storage.secret_name and not args.storage:
        raise spec.SpecError([("spec.storage.secretRef", "names a Kubernetes Secret; locally, pass --storage URL")])
    if study.warm_start and study.warm_start.storage.secret_name:
        raise spec.SpecError([("spec.warmStart.storage.secretRef", "names a Kubernetes Secret; locally, give spec.warmStart.storage.url")])
    url = args.storage or study.storage.url or DEFAULT_STORAGE
    storage = WriteThroughStorage(open_rdb(url))
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr="127.0.0.1")
    workdir = args.workdir or Path(".speechtune") / study.name
    warm = study.trial_template.workers.mode == "warm"
    backend = WarmWorkerBackend(workdir, study.trial_template.workers) if warm else LocalProcessBackend(workdir)
    display = _Display(console, study)
    checkpoints = study.checkpoints.volume or (study.fidelity.checkpoint_volume if study.fidelity else None) or workdir / "checkpoints"
    engine = Executor(study, storage, backend, notify=display.event, checkpoint_root=Path(checkpoints).resolve())
    if warm:
        backend.labels = engine.labels  # its idle-time and ignored-line metrics, under the study's labels
    display.engine = engine
    console.print(f"study [bold]{study.name}[/bold]: storage {redact(url)}, {_budget(study)}, "
                  f"{study.parallelism} at a time{' in warm workers' if warm else ''}, "
                  f"sampler {study.sampler.type}, pruner {study.pruner.type}")
    with Live(display, console=console, refresh_per_second=4, transient=True):
        outcome = asyncio.run(_run_study(engine, backend))
    console.print(leaderboard.table(engine.study, study.objective.metric, args.top))
    _print_results(engine.study, console)
    if warm and (said := saving(backend)):
        console.print(said, highlight=False)
    colour = "green" if outcome.state == "Succeeded" else "red"
    console.print(f"[{colour}]{outcome.state}[/{colour}]: {outcome.message}")
    console.print(f"leaderboard again: speechtune status {engine.study_name} --storage {redact(url)}", highlight=False)
    _end_of_run_report(engine.study, workdir / "report", console)
    return 0 if outcome.state == "Succeeded" else EXIT_FAILED


async def _run_study(engine: Executor, backend: LocalProcessBackend | WarmWorkerBackend) -> Outcome:
    """The study to its end; then warm workers exit (cold trials have all ended with their runs)."""
    try:
        return await engine.run()
    finally:
        if isinstance(backend, WarmWorkerBackend):
            await backend.close()


def _status(args: argparse.Namespace, console: Console) -> int:
    storage = WriteThroughStorage(open_rdb(args.storage))
    try:
        study = optuna.load_study(study_name=args.study, storage=storage)
    except KeyError:
        names = ", ".join(s.study_name for s in storage.get_all_studies()) or "none"
        console.print(f"[red]error:[/red] no study {args.study!r} in {redact(args.storage)} (studies there: {names})")
        return EXIT_FAILED
    metric = study.user_attrs.get("objective", "value")
    console.print(leaderboard.table(study, metric, args.top))
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    console.print(", ".join(f"{state.lower()} {count}" for state, count in sorted(counts.items())))
    _print_results(study, console)
    return 0


def _report(args: argparse.Namespace, console: Console) -> int:
    from speechtune import studyreport as report

    if not report.matplotlib_available():
        console.print(f"error: speechtune report draws with matplotlib, which is not installed: {report.INSTALL_HINT}",
                      style="red", highlight=False, markup=False)
        return EXIT_INVALID
    try:
        study = report.load_study(args.study, args.storage)
    except report.ReportError as error:
        console.print(f"error: {error}", style="red", highlight=False, markup=False)
        return EXIT_INVALID
    written = report.write(study, args.out or Path(f"report-{args.study}"))
    for figure in written.figures:
        if figure.png is None:
            console.print(f"  {figure.id}: {figure.missing}", highlight=False, markup=False)
    console.print(f"report: {written.html} ({len(written.pngs)} figures, {written.seconds:.1f} s)", highlight=False, markup=False)
    return 0


def _end_of_run_report(study: optuna.Study, out: Path, console: Console) -> None:
    """The study's report in the run's workdir; only a hint when matplotlib is missing, never a failed run."""
    from speechtune import studyreport as report

    if not report.matplotlib_available():
        console.print(f"no study report: it needs matplotlib ({report.INSTALL_HINT})", highlight=False, markup=False)
        return
    try:
        written = report.write(study, out)
    except Exception as error:  # the study ran; a report problem must not turn its exit code
        console.print(f"study report not written: {type(error).__name__}: {error}", style="yellow", highlight=False, markup=False)
        return
    console.print(f"report: {written.html.resolve()}", highlight=False, markup=False, soft_wrap=True)


def _budget(study: spec.Study) -> str:
    if study.stages:
        return "stages " + " -> ".join(f"{stage.name} ({stage.kind}{_stage_size(stage)})" for stage in study.stages)
    if study.fidelity:
        return f"ladder {_ladder_size(study.fidelity)} over {len(study.fidelity.levels)} levels"
    return f"{study.max_trials} trials"


def _ladder_size(fidelity: spec.Fidelity) -> str:
    """64 -> 16 -> 4, or with Hyperband brackets each bracket's sizes from its first level: 64 -> 16 -> 4 | 24 -> 6 | 12."""
    return " | ".join(" -> ".join(str(size) for size in sizes if size) for sizes in fidelity.bracket_sizes())


def _stage_size(stage: spec.Stage) -> str:
    if stage.kind in ("baseline", "validate"):
        return f", {stage.seeds} seed{'s' if stage.seeds > 1 else ''}"
    if stage.fidelity:
        return f", ladder {_ladder_size(stage.fidelity)}"
    return f", {stage.max_trials} trials"


def _print_results(study: optuna.Study, console: Console) -> None:
    """Stage results, proxy rank correlations and seed validation, as the study recorded them."""
    metric = study.user_attrs.get(record.OBJECTIVE, "value")
    for name, found in record.stages(study.user_attrs).items():
        state = found.get("state", "Pending")
        console.print(f"stage {name} ({found.get('kind', '?')}): {state}"
                      + (f", {describe_result(found, metric)}" if state == "Succeeded" else ""), highlight=False)
        if found.get("handoff"):
            console.print(f"  {handoff.describe(name, found['handoff'])}", highlight=False)
    for pair, found in study.user_attrs.get(record.CORRELATIONS, {}).items():
        warning = "  [red]ProxyUnreliable[/red]" if found["unreliable"] else ""
        console.print(f"proxy rank correlation {pair}: Spearman rho {found['rho']:.2f} over {found['pairs']} configurations{warning}")
    for level, found in study.user_attrs.get(record.COSTS, {}).items():
        warning = "  [red]ProxyCostly[/red]" if found["costly"] else ""
        console.print(f"proxy cost {level}: {found['share']:.2f} of the top level's, {found['startupShare']:.0%} of a run before "
                      f"its first epoch, over {found['runs']} runs{warning}", highlight=False)
    spend = study.user_attrs.get(record.SPEND)
    if spend and spend.get("fullRuns") is not None:
        console.print(f"ladder spend: {spend['fullRuns']:.1f} full runs' worth of compute for {spend['configurations']} configurations, "
                      f"{spend['atTop']} of them trained at the top (a full-fidelity search would have trained "
                      f"{spend['fullRuns']:.1f})", highlight=False)
    validation = study.user_attrs.get(record.VALIDATION)
    if validation and validation.get("mean") is not None:
        console.print(f"validation of trial {validation['trial']}: {metric} {validation['mean']:.4f} ± {validation['std']:.4f} "
                      f"over {len(validation['values'])} seeds")


class _Display:
    """The live progress view: a bar, counts and the best value so far, plus an event log."""

    def __init__(self, console: Console, study: spec.Study):
        self.console = console
        self.study = study
        self.engine: Executor | None = None
        self.started = time.monotonic()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        )
        self.task = self.progress.add_task("trials", total=study.max_trials)

    def event(self, event: Event) -> None:
        if event.kind in ("started", "level-done"):
            return
        style = {"pruned": "yellow", "completed": "green", "failed": "red", "study-failed": "bold red",
                 "promoted": "cyan", "proxy-unreliable": "bold red", "proxy-costly": "bold red", "stage-started": "bold", "stage-finished": "bold",
                 "handoff": "bold"}.get(event.kind, "")
        prefix = f"trial {event.number} " if event.number is not None else ""
        self.console.print(Text(f"{time.strftime('%H:%M:%S')} {prefix}{event.kind}: {event.message}", style=style))

    def __rich__(self) -> Group:
        line = Text("")
        if self.engine is not None:
            counts = self.engine.counts()
            done = counts["COMPLETE"] + counts["PRUNED"] + counts["FAIL"]
            self.progress.update(self.task, completed=done, total=self.engine.scheduler.total_trials())
            best = self.engine.best_trial()
            best_text = f"best {self.study.objective.metric} {best.value:.4f} (trial {best.number})" if best else "no complete trial yet"
            stage = self.engine.scheduler.stage_now()
            line = Text(
                (f"stage {stage}  |  " if stage else "")
                + f"running {counts['RUNNING']}  complete {counts['COMPLETE']}  pruned {counts['PRUNED']}  "
                f"failed {counts['FAIL']}  |  {best_text}"
            )
        return Group(self.progress, line)


if __name__ == "__main__":
    sys.exit(main())
