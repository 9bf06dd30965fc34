"""Warm workers: a local backend whose trainer processes each execute many runs.

``trialTemplate.workers.mode: warm`` opts a study in. A worker is the template's command started
with SPEECHTUNE_WORKER=1: it says it is ready, then gets one run at a time on stdin and tags its
protocol lines with the run's id (``speechtune.protocol.serve``; docs/engine.md, "Warm workers").
To the engine it is a backend like the local one: a run's lines, how it ended, stop.

What keeps reuse safe:

- a worker executes one run at a time, and a line counts for a run only if it carries the id of
  the run its worker executes now: a line for another run, or for none, is ignored and counted;
- stopping a run is a request; a run that has not ended within ``stopGraceSeconds`` costs its
  worker (SIGKILL), and the next run gets a fresh one;
- a worker is replaced after ``maxRunsPerWorker`` runs, when its RSS or the GPU memory it still
  holds passes its bound, when it asks to be (it ran out of memory), and when it dies;
- a trainer that does not say it is a worker (it exits, or prints protocol lines first) runs
  cold: every run of the study then gets its own process, as without ``workers``.

Workers die with the runner (PR_SET_PDEATHSIG), so ``attach`` finds nothing to follow: the
engine's recovery policy handles the runs that were going.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from speechtune import metrics, spec
from speechtune.backend import Exit, TrialLaunch, TrialRun
from speechtune.local import LaunchError, LocalProcessBackend, die_with, signal_group, split_lines
from speechtune.protocol import READY, WORKER_ENV, protocol_object

log = logging.getLogger(__name__)


class RelayedRun:
    """A run whose output lines a worker's reader relays to it, and whose end that reader reports;
    if the trainer turned out to be no worker, its cold run stands in. Warm runs, local and in pods."""

    def __init__(self) -> None:
        self.cold: TrialRun | None = None
        self._lines: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._over = asyncio.Event()
        self._exit = Exit(False)

    @property
    def over(self) -> bool:
        return self._over.is_set()

    def take(self, line: bytes) -> None:
        self._lines.put_nowait(line)

    def finish(self, exit: Exit, cold: TrialRun | None = None) -> None:
        """The run ended as ``exit`` says (once: a later report of its end changes nothing)."""
        if self.over:
            return
        self._exit, self.cold = exit, cold
        self._lines.put_nowait(None)
        self._over.set()

    async def lines(self) -> AsyncIterator[bytes]:
        while (line := await self._lines.get()) is not None:
            yield line
        if self.cold is not None:
            async for line in self.cold.lines():
                yield line

    async def wait(self) -> Exit:
        await self._over.wait()
        return await self.cold.wait() if self.cold is not None else self._exit


class WarmRun(RelayedRun):
    """One run in a local warm worker, with its own log file."""

    def __init__(self, run_id: str, launch: TrialLaunch, worker: Worker, log_path: Path, grace: float):
        super().__init__()
        self.id = run_id
        self.launch = launch
        self.worker = worker
        self.log_path = log_path
        self.log = open(log_path, "wb", buffering=0)
        self.grace = grace
        self.ignored = 0  # protocol lines its worker printed while it ran that were not for it
        self.began = time.monotonic()
        self.stopping = False

    def finish(self, exit: Exit, cold: TrialRun | None = None) -> None:
        self.log.close()
        super().finish(exit, cold)

    async def stop(self) -> None:
        if not self.over and not self.stopping:
            self.stopping = True
            self.worker.send({"stop": self.id})
            try:
                await asyncio.wait_for(self._over.wait(), self.grace)
            except asyncio.TimeoutError:
                self.worker.kill(f"{self.launch.run_name} did not stop within stopGraceSeconds={self.grace:g}, so its worker was killed")
                await self._over.wait()
        if self.cold is not None:
            await self.cold.stop()


class Worker:
    """One warm trainer process and the run it executes now."""

    def __init__(self, number: int, process: asyncio.subprocess.Process, log_path: Path):
        self.number = number
        self.process = process
        self.log = open(log_path, "wb", buffering=0)  # what it prints between runs
        self.ready = False  # it said it speaks the worker protocol
        self.runs = 0
        self.current: WarmRun | None = None
        self.killed = ""  # why the backend killed it, if it did
        self.idle_since: float | None = None  # up and without a run since (speechtune_worker_idle_seconds)
        self.began = 0.0  # when it was started

    def send(self, request: dict) -> None:
        assert self.process.stdin is not None
        if not self.process.stdin.is_closing():  # a dead worker's reader ends its run
            self.process.stdin.write((json.dumps(request) + "\n").encode())

    def kill(self, why: str) -> None:
        self.killed = why
        signal_group(self.process.pid, signal.SIGKILL)

    def rss_mib(self) -> float | None:
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024 if "VmRSS" in fields else None


class WarmWorkerBackend:
    """Runs trials in warm workers, at most one per running trial; logs as the local backend does,
    ``<workdir>/trial-<n>[-attempt].log`` per run and ``<workdir>/worker-<k>.log`` per worker."""

    recovery_grace_seconds = 0.0  # workers die with the runner (PDEATHSIG): nothing can start late

    def __init__(self, workdir: Path, workers: spec.Workers):
        self.workdir = Path(workdir)
        self.settings = workers
        self.started = 0  # workers started so far: warm mode's saving is the process starts it avoids
        self.runs = 0  # runs launched in workers
        self.run_seconds = 0.0  # their wall time, from being sent to their end
        self.startup_seconds: list[float] = []  # each worker's start until it said ready: what a cold run pays too
        self.ignored_lines = 0  # protocol lines not for the run their worker executed
        self.labels = {"namespace": "", "study": ""}  # the metrics' labels: the executor's, once it has them
        self._workers: set[Worker] = set()  # alive
        self._idle: list[Worker] = []
        self._readers: set[asyncio.Task] = set()
        self._closing: set[asyncio.Task] = set()
        self._runs: dict[tuple[str, int, str], WarmRun] = {}
        self._run_numbers = itertools.count(1)
        self._cold: LocalProcessBackend | None = None  # set once the trainer proved to be no worker

    async def launch(self, launch: TrialLaunch) -> TrialRun:
        key = (launch.study, launch.number, launch.attempt)
        self._runs = {k: run for k, run in self._runs.items() if not run.over}
        if key in self._runs:
            return self._runs[key]
        if self._cold is not None:
            return await self._cold.launch(launch)
        self.workdir.mkdir(parents=True, exist_ok=True)
        worker = self._idle.pop() if self._idle else await self._start(launch)
        self._count_idle(worker)
        worker.idle_since = None
        self.runs += 1
        run = WarmRun(f"{launch.run_name}@{next(self._run_numbers)}", launch, worker,
                      self.workdir / f"{launch.run_name}.log", self.settings.stop_grace_seconds)
        run.log.write(f"# speechtune: run {run.id} in warm worker {worker.number} (pid {worker.process.pid}), "
                      f"its run {worker.runs + 1}\n".encode())
        self._runs[key] = run
        worker.current = run
        worker.send({"run": run.id, "argv": list(launch.argv[len(launch.template.command):]), "env": dict(launch.env)})
        return run

    async def attach(self, study: str, number: int, attempt: str = "") -> None:
        return None  # a worker dies with the runner that started it

    async def close(self) -> None:
        """End every worker and wait for them: an idle one exits when its stdin closes (or is killed
        after the grace); one still executing a run (the runner is going down) is killed."""
        for worker in list(self._idle):
            self._retire(worker, "the study is over")
        for worker in self._workers:
            if worker.current is not None:
                worker.kill("the runner closed its workers while this run was going")
        await asyncio.gather(*self._closing, *self._readers, return_exceptions=True)

    async def _start(self, launch: TrialLaunch) -> Worker:
        env = {**os.environ, **launch.template.env, WORKER_ENV: "1"}
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", os.defpath)])
        try:
            process = await asyncio.create_subprocess_exec(
                *launch.template.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,  # one stream: every line lands in the log of the run it belongs to
                env=env, start_new_session=True, preexec_fn=die_with(os.getpid()),
            )
        except OSError as exc:
            raise LaunchError(f"cannot start trial {launch.number}: {launch.argv[0]}: {exc.strerror}") from exc
        self.started += 1
        worker = Worker(self.started, process, self.workdir / f"worker-{self.started}.log")
        worker.began = time.monotonic()
        self._workers.add(worker)
        reader = asyncio.create_task(self._follow(worker), name=f"warm-worker-{worker.number}")
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        return worker

    async def _follow(self, worker: Worker) -> None:
        assert worker.process.stdout is not None
        async for line in split_lines(worker.process.stdout):
            self._take(worker, line)
        await self._gone(worker, await worker.process.wait())

    def _take(self, worker: Worker, line: bytes) -> None:
        """Credit one output line to the run it is for, or to nobody."""
        run = worker.current
        (run.log if run is not None else worker.log).write(line + b"\n")
        message = protocol_object(line)
        if message is None:
            return  # a log line
        if not worker.ready:
            if message.get("worker") == READY:
                worker.ready = True
                self.startup_seconds.append(time.monotonic() - worker.began)
            else:  # a cold trainer's output: it ignored SPEECHTUNE_WORKER, and its reports count for nothing
                signal_group(worker.process.pid, signal.SIGKILL)
            return
        if run is None or message.get("run") != run.id:
            self._ignore(worker, run, message)
        elif "end" in message:
            self._end(worker, run, message["end"])
        else:
            run.take(line)

    def _count_idle(self, worker: Worker) -> None:
        if worker.idle_since is not None:
            now = time.monotonic()
            metrics.WORKER_IDLE_SECONDS.labels(**self.labels).inc(now - worker.idle_since)
            worker.idle_since = now

    def _ignore(self, worker: Worker, run: WarmRun | None, message: dict) -> None:
        self.ignored_lines += 1
        metrics.WORKER_IGNORED_LINES.labels(**self.labels).inc()
        (run.log if run is not None else worker.log).write(b"# speechtune: ignored the line above: it is not for the run this worker executes\n")
        if run is not None:
            run.ignored += 1
            if run.ignored == 1:
                log.warning("%s: warm worker %d printed a protocol line for run %r while executing %s; ignored (and any more)",
                            run.launch.run_name, worker.number, message.get("run"), run.id)

    def _end(self, worker: Worker, run: WarmRun, end: object) -> None:
        end = end if isinstance(end, dict) else {}
        worker.current = None
        worker.runs += 1
        self.run_seconds += time.monotonic() - run.began
        worker.idle_since = time.monotonic()
        run.finish(exit_of(end))
        why = worn_out(self.settings, worker.runs, worker.rss_mib(), end)
        if why:
            self._retire(worker, why)
        else:
            self._idle.append(worker)

    def _retire(self, worker: Worker, why: str) -> None:
        self._count_idle(worker)
        worker.idle_since = None
        worker.log.write(f"# speechtune: worker retired: {why}\n".encode())
        if worker in self._idle:
            self._idle.remove(worker)
        task = asyncio.create_task(self._close(worker))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, worker: Worker) -> None:
        assert worker.process.stdin is not None
        worker.process.stdin.close()  # the worker exits when its stdin ends
        try:
            await asyncio.wait_for(worker.process.wait(), self.settings.stop_grace_seconds)
        except asyncio.TimeoutError:
            signal_group(worker.process.pid, signal.SIGKILL)

    async def _gone(self, worker: Worker, code: int) -> None:
        """The worker exited: the run it was executing ends with it, or runs cold if it never was a worker."""
        self._workers.discard(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        worker.log.close()
        run, worker.current = worker.current, None
        if run is None:
            return
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        if worker.killed:
            run.finish(Exit(False, 128 + signal.SIGKILL, "Killed", f"{worker.killed}; see {run.log_path}"))
        elif not worker.ready and not run.stopping:
            await self._run_cold(run, how)
        else:
            run.finish(Exit(False, 128 - code if code < 0 else code, "WorkerDied",
                            f"its warm worker (pid {worker.process.pid}) {how} during the run; see {run.log_path}"))

    async def _run_cold(self, run: WarmRun, how: str) -> None:
        if self._cold is None:
            log.warning("%s %s without saying it is a warm worker (docs/engine.md, \"Warm workers\"): "
                        "every run of this study now gets its own process", " ".join(run.launch.template.command), how)
            self._cold = LocalProcessBackend(self.workdir)
        run.log.close()
        try:
            cold = await self._cold.launch(run.launch)
        except LaunchError as error:
            run.finish(Exit(False, None, "LaunchError", str(error)))
            return
        run.finish(Exit(False), cold)


def saving(backend: WarmWorkerBackend) -> str:
    """What warm workers saved in a study, from its own numbers: the start-ups it avoided against
    the time its runs took. Where that share is small, warm mode does not pay (docs/engine.md)."""
    if not backend.startup_seconds or not backend.runs:
        return ""
    startup = sorted(backend.startup_seconds)[len(backend.startup_seconds) // 2]
    avoided = max(0, backend.runs - backend.started)
    share = avoided * startup / (backend.run_seconds + avoided * startup) if backend.run_seconds > 0 else 0.0
    verdict = ("start-ups are a small share of this study's runs: warm mode gains little here"
               if share < 0.2 else "warm mode pays off here")
    return (f"warm workers: {backend.started} started for {backend.runs} runs; a start-up took {startup:.1f} s (median), "
            f"so the {avoided} avoided saved about {avoided * startup:.0f} s, {share:.0%} of what the runs would have "
            f"taken cold; {verdict}")


def worn_out(limits: spec.Workers, runs: int, rss_mib: float | None, end: dict) -> str:
    """Why a worker must not execute another run after this one ended as ``end`` says; empty if it may."""
    if end.get("retire") is True:
        return "it asked to be replaced"
    if runs >= limits.max_runs_per_worker:
        return f"it executed maxRunsPerWorker={limits.max_runs_per_worker} runs"
    if limits.max_rss_mib is not None and (rss_mib or 0) > limits.max_rss_mib:
        return f"its RSS of {rss_mib:.0f} MiB passed maxRssMiB={limits.max_rss_mib}"
    gpu = end.get("gpu_mib")
    if limits.max_gpu_mib is not None and isinstance(gpu, (int, float)) and gpu > limits.max_gpu_mib:
        return f"it still holds {gpu:.0f} MiB of GPU memory, past maxGpuMiB={limits.max_gpu_mib}"
    return ""


def exit_of(end: dict) -> Exit:
    """A run-end line's ``end`` as an Exit; a non-zero exit reads as a cold run's would."""
    code = end.get("exit_code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else 1
    reason = end.get("reason") if isinstance(end.get("reason"), str) else ""
    message = str(end.get("message") or "")[:300]
    if code == 0 and not reason:
        return Exit(True, 0)
    if not reason:
        return Exit(False, code, "Error", f"trainer exited with code {code}" + (f": {message}" if message else ""))
    return Exit(False, code, reason, message)
