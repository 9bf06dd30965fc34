"""The metric protocol: how any trainer reports to speechtune.

A trainer prints one JSON object per line on stdout::

    {"speechtune": 1, "step": 3, "wer": 0.21, "cer": 0.08}
    {"speechtune": 1, "final": true, "wer": 0.19}

Every other line -- logs, other JSON, binary junk, lines over 64 KiB -- is
ignored. This module has no dependencies beyond the standard library, so a
trainer can import it without pulling in Optuna or Kubernetes.

A trainer can also be a warm worker (``serve``): one process that executes many
runs, each line tagged with its run id (docs/engine.md, "Warm workers").
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 64 * 1024
MAX_STEP = 2**31 - 1  # the INTEGER column Optuna stores steps in (SQLite, PostgreSQL)


@dataclass(frozen=True)
class Report:
    """One parsed protocol line."""

    step: int | None
    metrics: dict[str, float]
    final: bool = False
    time: float | None = None  # the trainer's wall clock when it printed the line
    extra: dict[str, Any] = field(default_factory=dict)


def report(step: int | None = None, *, final: bool = False, file: IO[str] | None = None, **metrics: float) -> None:
    """Print one protocol line (flushed at once, so the engine sees it live)."""
    line: dict[str, Any] = {"speechtune": PROTOCOL_VERSION}
    run = _RUN.get()
    if run is not None:  # in a warm worker: the run this line belongs to
        line["run"] = run
    if step is not None:
        line["step"] = int(step)
    if final:
        line["final"] = True
    line["time"] = round(time.time(), 3)
    for name, value in metrics.items():
        line[name] = _jsonable(value)
    out = file if file is not None else sys.stdout
    out.write(json.dumps(line, allow_nan=True) + "\n")
    out.flush()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    return value


def parse_line(raw: bytes | str) -> Report | None:
    """Parse one output line; return None for anything that is not a protocol line."""
    obj = protocol_object(raw)
    if obj is None:
        return None
    step = obj.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP):
        return None
    final = obj.get("final") is True
    if step is None and not final:
        return None
    stamp = obj.get("time")
    metrics: dict[str, float] = {}
    extra: dict[str, Any] = {}
    for key, value in obj.items():
        if key in ("speechtune", "step", "final", "time"):
            continue
        number = _number(value)
        if number is not None:
            metrics[key] = number
        else:
            extra[key] = value
    return Report(step=step, metrics=metrics, final=final, time=_number(stamp), extra=extra)


def _number(value: Any) -> float | None:
    """A JSON number as a float; None for anything else, and for an integer too big for a float
    (a hostile or broken trainer must not crash the runner: such a metric is simply not a metric)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


# -- warm workers --------------------------------------------------------------------------------
# The engine starts the trainer's command with SPEECHTUNE_WORKER=1 and writes run requests on its
# stdin, one JSON object a line: {"run": ID, "argv": [...], "env": {...}} and {"stop": ID}. The
# worker says {"speechtune": 1, "worker": "ready"} once, then executes one run at a time: each of
# its protocol lines carries "run": ID, and its last is {"speechtune": 1, "run": ID, "end": {...}}.

WORKER_ENV = "SPEECHTUNE_WORKER"
READY = "ready"
STOPPED_EXIT_CODE = 143  # what a cold run stopped by SIGTERM exits with

# The run of the thread executing it. A thread a run left behind starts with an empty context,
# so its late reports carry no run id, and the engine ignores them instead of crediting the next run.
_RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar("speechtune_run", default=None)
_inbox: _Inbox | None = None


class RunStopped(Exception):
    """Raise at a step boundary once ``stop_requested()``: the run ends as the engine asked."""


def worker_mode() -> bool:
    """Whether the engine started this process as a warm worker."""
    return os.environ.get(WORKER_ENV) == "1"


def stop_requested() -> bool:
    """Whether the engine asked the current run to stop (pruned, study over). Check it at every
    step boundary; always False outside a warm worker, where a stop is a signal."""
    return _inbox is not None and _RUN.get() is not None and _inbox.stopping.is_set()


def pause(seconds: float) -> None:
    """Sleep, waking early if the current run is asked to stop."""
    if _inbox is None or _RUN.get() is None:
        time.sleep(seconds)
    else:
        _inbox.stopping.wait(seconds)


def protocol_object(raw: bytes | str) -> dict[str, Any] | None:
    """An output line as a protocol object (``"speechtune": 1``), else None: lines over 64 KiB,
    bytes that are not UTF-8, and anything but a JSON object of this protocol version."""
    if len(raw) > MAX_LINE_BYTES:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    text = raw.strip()
    if not text.startswith("{") or '"speechtune"' not in text:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and obj.get("speechtune") == PROTOCOL_VERSION else None


class _Inbox:
    """The worker's stdin, read in a thread so that a stop request reaches a run while it trains."""

    def __init__(self, stream: IO[str]):
        self.runs: queue.Queue[dict | None] = queue.Queue()
        self.stopping = threading.Event()  # set while the current run is asked to stop
        self._stopped: set[str] = set()
        self._current: str | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._read, args=(stream,), name="speechtune-inbox", daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                request = json.loads(line)
            except ValueError:
                continue
            if not isinstance(request, dict):
                continue
            if isinstance(request.get("stop"), str):
                with self._lock:
                    self._stopped.add(request["stop"])
                    if request["stop"] == self._current:
                        self.stopping.set()
            elif isinstance(request.get("run"), str):
                self.runs.put(request)
        self.runs.put(None)  # stdin closed: the engine is done with this worker

    def begin(self, run: str) -> None:
        with self._lock:
            self._current = run
            if run in self._stopped:
                self.stopping.set()  # stopped before it began

    def end(self) -> None:
        with self._lock:
            self._stopped.discard(self._current)
            self._current = None
            self.stopping.clear()


class _LastWords:
    """sys.stderr during a run: passes everything on and keeps the tail, for a failed run's message."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.tail = ""

    def write(self, text: str) -> int:
        self.tail = (self.tail + text)[-4096:]
        return self.stream.write(text)

    def last_line(self) -> str:
        lines = [line.strip() for line in self.tail.splitlines() if line.strip()]
        return lines[-1][:300] if lines else ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def serve(run: Callable[[list[str]], int | None], reset: Callable[[], dict[str, Any]] | None = None) -> int:
    """Be a warm worker: execute the engine's runs one at a time in this process, until stdin closes.

    A run is ``run(argv)``, argv being this process's own arguments followed by the request's, with
    the request's environment; its return value is its exit code, as a cold run's would be. After
    each run the worker puts back the environment, working directory, sys.argv and the standard
    streams, then calls ``reset`` (the trainer's own clean-up), whose dict joins the run-end line:
    ``{"retire": True}`` when this process can no longer be trusted, ``{"gpu_mib": n}`` for the GPU
    memory it still holds. A run that raises ends with the exception as its message; the worker lives on.
    """
    global _inbox
    os.environ.pop(WORKER_ENV, None)  # what a run starts is not a worker
    _inbox = _Inbox(sys.stdin)
    out = sys.stdout
    _emit(out, {"worker": READY, "pid": os.getpid()})
    prefix = sys.argv[1:]
    while (request := _inbox.runs.get()) is not None:
        run_id = request["run"]
        _inbox.begin(run_id)
        end = _execute(run, run_id, prefix + [str(arg) for arg in request.get("argv") or []], request.get("env") or {})
        _inbox.end()
        if reset is not None:
            try:
                end.update(reset())
            except Exception:  # the run's outcome stands; a worker that cannot clean up is replaced
                traceback.print_exc()
                end["retire"] = True
        _emit(out, {"run": run_id, "end": end})
    return 0


def _execute(run: Callable[[list[str]], int | None], run_id: str, argv: list[str], env: dict) -> dict[str, Any]:
    """One run, in a context tagged with its id; how it ended, as the run-end line says it."""
    saved = dict(os.environ), os.getcwd(), sys.argv, sys.stdout, sys.stderr
    os.environ.update({str(name): str(value) for name, value in env.items()})
    sys.argv = [sys.argv[0], *argv]
    sys.stderr = last_words = _LastWords(sys.stderr)
    context = contextvars.copy_context()
    try:
        code = context.run(_tagged, run_id, run, argv)
        end: dict[str, Any] = {"exit_code": code, "reason": "", "message": last_words.last_line() if code else ""}
    except RunStopped:
        end = _stopped()
    except MemoryError as error:
        traceback.print_exc()
        end = {"exit_code": 1, "reason": "OutOfMemory", "message": _describe(error), "retire": True}
    except Exception as error:  # the run's failure, not the worker's
        traceback.print_exc()
        end = {"exit_code": 1, "reason": "Exception", "message": _describe(error)}
    finally:
        sys.stdout.flush()
        environ, cwd, sys.argv, sys.stdout, sys.stderr = saved
        _restore_environment(environ)
        os.chdir(cwd)
    return _stopped() if _inbox is not None and _inbox.stopping.is_set() else end


def _restore_environment(environ: dict[str, str]) -> None:
    """Put back the variables a run changed, and only those: setenv races with threads that read the environment."""
    for name in set(os.environ) - set(environ):
        del os.environ[name]
    for name, value in environ.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _stopped() -> dict[str, Any]:
    return {"exit_code": STOPPED_EXIT_CODE, "reason": "Stopped", "message": "stopped at a step boundary, as the engine asked"}


def _tagged(run_id: str, run: Callable[[list[str]], int | None], argv: list[str]) -> int:
    _RUN.set(run_id)
    if stop_requested():
        raise RunStopped
    try:
        code = run(argv)
    except SystemExit as exit:  # argparse's errors, sys.exit() in a trainer's main
        code = exit.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    return code or 0


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def _emit(out: IO[str], message: dict[str, Any]) -> None:
    out.write(json.dumps({"speechtune": PROTOCOL_VERSION, **message}) + "\n")
    out.flush()
