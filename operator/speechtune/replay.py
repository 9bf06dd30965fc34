"""Replay recorded learning curves as a backend: the engine's scheduling at many seeds, in seconds.

A *recording* (``bench/record_curves.py`` makes one, JSON) holds real learning curves of a fixed
set of configurations sampled from a search space: for each configuration and each recorded
*kind* of run (``full``, and the non-epoch fidelities such as less data or a smaller model, each
a set of overrides), the per-epoch metrics the trainer reported (``wer``, ``cer``, ``val_loss``,
...), the CPU-seconds and wall-seconds spent up to the end of every epoch, before the first
epoch (set-up), and over the whole run.

``ReplayBackend`` is a backend like the local one (``speechtune.backend``): the real engine
(``Executor``, samplers, pruners, the ladder, promotions, the proxy-correlation check) launches
runs and reads their protocol lines; nothing of the engine is re-implemented. For each launch:

- **Configuration.** The sampler's parameters are snapped to the nearest recorded configuration
  in the normalised search space (log-scaled where the distribution is log, each numeric range
  mapped to [0, 1], a categorical mismatch counting 1), so TPE keeps the real parameter space
  and its structure; ties go to the lower configuration id.
- **Kind.** The launch's overrides other than ``epochs`` and ``checkpoint_dir`` must equal one
  recorded kind's overrides (a fidelity level ``{train_hours: 0.025}`` is the kind recorded
  with exactly that override); ``epochs`` (default: the recording's) picks how much of the
  curve runs. A level that asks for something not recorded fails to launch (``LaunchError``).
- **Resume.** A run whose ``checkpoint_dir`` an earlier run of the same configuration and kind
  left at epoch e continues at epoch e+1, as the NeMo trainer resumes ``last.ckpt``: it prints
  epochs e+1.. and costs the set-up plus those epochs (recorded with the full run's
  ``--schedule-epochs``, so a shorter run is the first epochs of the recorded one).
- **Cost.** Every run is charged its recorded cost on a simulated clock: set-up, the epochs it
  ran, and the tail after the last epoch (evaluation, clean-up) when it ran to its end; a run
  stopped (pruned) after epoch k pays up to epoch k. ``start="cold"`` adds the recorded per-run
  start-up (importing torch and NeMo in a new process) to every run. Each charge is kept in
  ``ReplayBackend.ledger`` with when it ended on the simulated clock.
- **Time.** A run sleeps its recorded cost (``clock="cpu"``, default, or ``"wall"``) times
  ``time_scale``: set-up, then each epoch, then the tail, so runs finish in the order their
  recorded costs say and parallel runs overlap as they would. Under ``VirtualClockLoop``
  (``run_virtual``) those sleeps take no real time: the loop's clock jumps to the next timer
  whenever nothing is ready, so a replayed study is deterministic and fast. The engine's storage
  commits on a writer thread and the engine awaits ``storage.flushed()``; a loop that waited for
  that thread would let simulated time jump meanwhile, by however long the commit took in real
  time. ``ReplayStorage`` waits for the commit in place instead, so a replay on it depends only
  on the recording and the seeds.
"""

from __future__ import annotations

import asyncio
import json
import math
import selectors
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from speechtune import search, spec
from speechtune.backend import Exit, TrialLaunch
from speechtune.local import LaunchError
from speechtune.storage import WriteThroughStorage, open_rdb

RECORDING_FORMAT = 1
EPOCH_KEYS = ("epochs", "max_epochs")
NOT_A_FIDELITY = ("checkpoint_dir",)  # overrides the engine adds that do not change what a run computes
FULL = "full"


# -- the recording ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Curve:
    """One recorded run: ``steps[k-1]`` are the metrics the trainer reported after epoch k."""

    steps: tuple[dict[str, float], ...]
    cpu_s: tuple[float, ...]  # cumulative CPU-s from the run's start to the end of each epoch
    wall_s: tuple[float, ...]
    setup_cpu_s: float  # before the first epoch: building the model, the data loaders
    setup_wall_s: float
    run_cpu_s: float  # the whole run, to its last epoch and what follows it
    run_wall_s: float

    @property
    def epochs(self) -> int:
        return len(self.steps)

    def cost(self, first: int, last: int, clock: str = "cpu", *, finished: bool = True) -> float:
        """What a run that trains epochs ``first``..``last`` costs (``first`` > 1: resumed from epoch first-1).

        Set-up, the epochs, and (``finished``) the tail after the last epoch; a stopped run pays no tail."""
        cumulative, setup, total = (self.cpu_s, self.setup_cpu_s, self.run_cpu_s) if clock == "cpu" else (
            self.wall_s, self.setup_wall_s, self.run_wall_s)
        last = max(last, first - 1)
        before = cumulative[first - 2] if first > 1 else setup
        trained = (cumulative[last - 1] - before) if last >= first else 0.0
        tail = max(0.0, total - cumulative[-1]) if finished else 0.0
        return setup + trained + tail

    def segments(self, first: int, last: int, clock: str = "cpu") -> tuple[float, list[float], float]:
        """(set-up, each epoch's cost, tail) of a run over epochs first..last: how long it sleeps where."""
        cumulative, setup, total = (self.cpu_s, self.setup_cpu_s, self.run_cpu_s) if clock == "cpu" else (
            self.wall_s, self.setup_wall_s, self.run_wall_s)
        epochs = [cumulative[k - 1] - (cumulative[k - 2] if k > 1 else setup) for k in range(first, last + 1)]
        return setup, [max(0.0, cost) for cost in epochs], max(0.0, total - cumulative[-1])


@dataclass(frozen=True)
class Config:
    id: int
    params: dict[str, Any]
    curves: dict[str, Curve]  # by kind


class Recording:
    """A recording's configurations, kinds and costs, with the snapping of sampled parameters."""

    def __init__(self, data: Mapping[str, Any], *, kinds: tuple[str, ...] | None = None):
        meta = data["meta"]
        if meta.get("format") != RECORDING_FORMAT:
            raise ValueError(f"recording format {meta.get('format')!r}, expected {RECORDING_FORMAT}")
        self.data = data
        self.meta = meta
        self.epochs: int = int(meta["epochs"])
        self.objective: str = meta.get("objective", "wer")
        self.kinds: dict[str, dict[str, Any]] = {name: dict(overrides) for name, overrides in meta["kinds"].items()}
        self.space = parse_space(meta["space"])
        self.distributions = search.distributions(self.space)
        startup = meta.get("startup") or {}
        self.startup_cpu_s = float(startup.get("cpu_s_median", 0.0))
        self.startup_wall_s = float(startup.get("wall_s_median", 0.0))
        wanted = kinds or tuple(self.kinds)
        configs = []
        for entry in data["configs"]:
            runs = entry.get("runs", {})
            curves = {kind: curve for kind in self.kinds if (curve := _curve(runs, kind)) is not None}
            if all(kind in curves for kind in wanted):
                configs.append(Config(int(entry["id"]), dict(entry["params"]), curves))
        if not configs:
            raise ValueError(f"no recorded configuration has every kind of {list(wanted)}")
        self.configs: list[Config] = configs
        self._points = [self._normalise(config.params) for config in configs]

    @classmethod
    def load(cls, path: str | Path, *, kinds: tuple[str, ...] | None = None) -> Recording:
        return cls(json.loads(Path(path).read_text()), kinds=kinds)

    def config(self, config_id: int) -> Config:
        return next(config for config in self.configs if config.id == config_id)

    # -- snapping ------------------------------------------------------------------
    def _normalise(self, params: Mapping[str, Any]) -> list[float | Any]:
        return [_unit(self.distributions[name], params[name]) for name in self.distributions]

    def snap(self, params: Mapping[str, Any]) -> Config:
        """The recorded configuration nearest to ``params`` in the normalised search space."""
        point = self._normalise(params)
        best, best_distance = self.configs[0], math.inf
        for config, other in zip(self.configs, self._points):
            distance = 0.0
            for a, b in zip(point, other):
                distance += (a - b) ** 2 if isinstance(a, float) else (0.0 if a == b else 1.0)
            if distance < best_distance:
                best, best_distance = config, distance
        return best

    # -- kinds -------------------------------------------------------------------------
    def kind_of(self, overrides: Mapping[str, Any]) -> str:
        """The recorded kind whose overrides these are (epochs and checkpoint folders aside)."""
        wanted = {key: value for key, value in overrides.items() if key not in EPOCH_KEYS and key not in NOT_A_FIDELITY}
        for name, recorded in self.kinds.items():
            if _same(recorded, wanted):
                return name
        raise LaunchError(f"the recording has no run with the overrides {wanted}; recorded kinds: {self.kinds}")

    def epochs_of(self, values: Mapping[str, Any]) -> int:
        epochs = next((values[key] for key in EPOCH_KEYS if key in values), self.epochs)
        epochs = int(epochs)
        if not 1 <= epochs <= self.epochs:
            raise LaunchError(f"epochs={epochs}: the recording has epochs 1..{self.epochs}")
        return epochs


def _curve(runs: Mapping[str, Any], kind: str, seen: tuple[str, ...] = ()) -> Curve | None:
    run = runs.get(kind)
    if run is None or kind in seen:
        return None
    if "same_as" in run:  # the kind's overrides left this configuration as another kind's run: the same run
        return _curve(runs, run["same_as"], (*seen, kind))
    return Curve(steps=tuple(dict(step) for step in run["steps"]), cpu_s=tuple(run["cpu_s"]), wall_s=tuple(run["wall_s"]),
                 setup_cpu_s=float(run["setup_cpu_s"]), setup_wall_s=float(run["setup_wall_s"]),
                 run_cpu_s=float(run["run_cpu_s"]), run_wall_s=float(run["run_wall_s"]))


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool) and not isinstance(y, bool):
            if not math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif str(x) != str(y):
            return False
    return True


def _unit(distribution: BaseDistribution, value: Any) -> float | Any:
    """A parameter value in [0, 1] (log-scaled for log distributions); a categorical stays itself."""
    if isinstance(distribution, CategoricalDistribution):
        return str(value)
    assert isinstance(distribution, (FloatDistribution, IntDistribution))
    low, high, value = float(distribution.low), float(distribution.high), float(value)
    if distribution.log:
        low, high, value = math.log(low), math.log(high), math.log(max(value, 1e-300))
    return (value - low) / (high - low) if high > low else 0.0


def parse_space(space: list[dict[str, Any]]) -> tuple[spec.Param, ...]:
    """A searchSpace list, as in a study spec, validated by the spec's own parser."""
    study = spec.parse_study({"metadata": {"name": "recording"},
                              "spec": {"searchSpace": space, "trialTemplate": {"command": ["replay"]}}})
    return study.search_space


# -- the backend ---------------------------------------------------------------------------------
@dataclass
class Charge:
    """What one replayed run cost, and what it was."""

    study: str
    number: int
    attempt: str
    config: int
    kind: str
    first: int  # the first epoch it trained (> 1: resumed)
    last: int  # the last epoch it reported
    epochs: int  # the epochs it was asked for
    recorded_epochs: int  # the recording's full fidelity
    stopped: bool
    cpu_s: float
    wall_s: float
    end: float  # on the loop's clock
    metrics: dict[str, float] = field(default_factory=dict)  # at its last epoch

    @property
    def full_fidelity(self) -> bool:
        """A run of the full kind to the recording's last epoch: what the study's result means."""
        return self.kind == FULL and self.last == self.recorded_epochs and not self.stopped

    def cost(self, clock: str = "cpu") -> float:
        return self.cpu_s if clock == "cpu" else self.wall_s


class ReplayRun:
    """One replayed run: its curve as protocol lines, paced by its recorded cost."""

    def __init__(self, backend: ReplayBackend, launch: TrialLaunch, config: Config, kind: str, first: int, last: int):
        self.backend = backend
        self.launch = launch
        self.config = config
        self.kind = kind
        self.curve = config.curves[kind]
        self.first = first
        self.last = last
        self.reached = first - 1  # the last epoch it reported
        self.charge: Charge | None = None
        self._ended = asyncio.Event()

    async def lines(self) -> AsyncIterator[bytes]:
        backend = self.backend
        setup, epochs, tail = self.curve.segments(self.first, self.last, backend.clock)
        if backend.start == "cold":
            setup += backend.recording.startup_cpu_s if backend.clock == "cpu" else backend.recording.startup_wall_s
        if self.charge is not None:
            return
        await backend.sleep(setup)
        for epoch, cost in zip(range(self.first, self.last + 1), epochs):
            await backend.sleep(cost)
            if self.charge is not None:  # stopped meanwhile
                return
            self.reached = epoch
            backend.leave_checkpoint(self)
            yield _line(self.curve.steps[epoch - 1], step=epoch)
        await backend.sleep(tail)
        if self.charge is not None:
            return
        self._finish(stopped=False)
        yield _line(self.curve.steps[self.last - 1], final=True, run_cpu_s=self.charge.cpu_s, run_wall_s=self.charge.wall_s)

    async def wait(self) -> Exit:
        await self._ended.wait()
        assert self.charge is not None
        return Exit(False, 143, "Stopped", "stopped") if self.charge.stopped else Exit(True, 0)

    async def stop(self) -> None:
        if self.charge is None:
            self._finish(stopped=True)

    def _finish(self, stopped: bool) -> None:
        finished = not stopped
        cpu = self.curve.cost(self.first, self.reached, "cpu", finished=finished)
        wall = self.curve.cost(self.first, self.reached, "wall", finished=finished)
        if self.backend.start == "cold":
            cpu += self.backend.recording.startup_cpu_s
            wall += self.backend.recording.startup_wall_s
        step = self.curve.steps[self.reached - 1] if self.reached >= 1 else {}
        self.charge = Charge(study=self.launch.study, number=self.launch.number, attempt=self.launch.attempt, config=self.config.id,
                             kind=self.kind, first=self.first, last=self.reached, epochs=self.last,
                             recorded_epochs=self.backend.recording.epochs, stopped=stopped,
                             cpu_s=cpu, wall_s=wall, end=asyncio.get_running_loop().time(), metrics=dict(step))
        self._ended.set()
        self.backend.charged(self.charge)


class ReplayBackend:
    """Runs launched by the engine replay a recording (see the module's docstring)."""

    recovery_grace_seconds = 0.0

    def __init__(self, recording: Recording, *, start: str = "warm", clock: str = "cpu", time_scale: float = 1.0,
                 on_charge: Callable[[Charge], None] | None = None):
        if start not in ("warm", "cold") or clock not in ("cpu", "wall"):
            raise ValueError("start is warm or cold, clock is cpu or wall")
        self.recording = recording
        self.start = start
        self.clock = clock
        self.time_scale = time_scale
        self.on_charge = on_charge
        self.ledger: list[Charge] = []
        self._checkpoints: dict[str, tuple[int, str, int]] = {}  # checkpoint_dir -> (config, kind, epoch it holds)
        self._runs: dict[tuple[str, int, str], ReplayRun] = {}

    @property
    def spent_cpu_s(self) -> float:
        return sum(charge.cpu_s for charge in self.ledger)

    async def launch(self, launch: TrialLaunch) -> ReplayRun:
        key = (launch.study, launch.number, launch.attempt)
        if key in self._runs and self._runs[key].charge is None:
            return self._runs[key]  # launching the same run twice starts it once
        config = self.recording.snap(launch.params)
        kind = self.recording.kind_of(launch.overrides)
        last = self.recording.epochs_of(launch.values)
        first = 1
        folder = launch.values.get("checkpoint_dir")
        if folder is not None:
            held = self._checkpoints.get(str(folder))
            if held is not None and held[:2] == (config.id, kind) and held[2] < last:
                first = held[2] + 1
        run = ReplayRun(self, launch, config, kind, first, last)
        self._runs[key] = run
        return run

    async def attach(self, study: str, number: int, attempt: str = "") -> None:
        return None  # nothing outlives the engine that launched it

    async def sleep(self, cost: float) -> None:
        await asyncio.sleep(cost * self.time_scale)

    def leave_checkpoint(self, run: ReplayRun) -> None:
        folder = run.launch.values.get("checkpoint_dir")
        if folder is not None:
            self._checkpoints[str(folder)] = (run.config.id, run.kind, run.reached)

    def charged(self, charge: Charge) -> None:
        self.ledger.append(charge)
        if self.on_charge is not None:
            self.on_charge(charge)


def _line(metrics: Mapping[str, float], *, step: int | None = None, final: bool = False, **extra: float) -> bytes:
    line: dict[str, Any] = {"speechtune": 1}
    if step is not None:
        line["step"] = step
    if final:
        line["final"] = True
    line.update(metrics)
    line.update(extra)
    return json.dumps(line).encode()


# -- a loop whose clock jumps ------------------------------------------------------------------
class ReplayStorage(WriteThroughStorage):
    """The engine's storage for a replay: ``flushed`` waits for the writer thread in place (blocking the loop for
    the few milliseconds of a commit) instead of letting the loop wait, so a simulated clock never runs while
    a commit is in flight, and the order of events on the loop does not depend on how fast the disk is."""

    @classmethod
    def open(cls, url: str) -> ReplayStorage:
        return cls(open_rdb(url))

    async def flushed(self) -> None:
        self._drain()  # every write made so far committed (StorageUnavailable if it could not be), without yielding



class _JumpingSelector(selectors.BaseSelector):
    """The loop's selector: real I/O is polled without waiting; a wait for a timer moves the clock instead."""

    def __init__(self, loop_clock: list[float]):
        self._real = selectors.DefaultSelector()
        self._clock = loop_clock

    def register(self, fileobj, events, data=None):
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj):
        return self._real.unregister(fileobj)

    def modify(self, fileobj, events, data=None):
        return self._real.modify(fileobj, events, data)

    def select(self, timeout=None):
        ready = self._real.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # no timer at all: only I/O (another thread) can wake the loop
            return self._real.select(None)
        self._clock[0] += timeout
        return ready

    def close(self):
        self._real.close()

    def get_key(self, fileobj):
        return self._real.get_key(fileobj)

    def get_map(self):
        return self._real.get_map()


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop on a simulated clock: when nothing is ready, time jumps to the next timer.

    ``asyncio.sleep(3600)`` returns at once in real time and ``loop.time()`` reads 3600 later;
    callbacks still run in the order of their due times, so concurrency follows the sleeps."""

    def __init__(self) -> None:
        self._virtual_now = [0.0]
        super().__init__(_JumpingSelector(self._virtual_now))

    def time(self) -> float:
        return self._virtual_now[0]


T = TypeVar("T")


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on a ``VirtualClockLoop``."""
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(main)
