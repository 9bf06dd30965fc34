"""The local backend: each trial is a subprocess of `speechtune run`.

Trials die with the runner (PR_SET_PDEATHSIG), so a killed runner leaves no
orphans behind; the engine's recovery policy then handles the trials that were
running. Each trial's stdout and stderr go to ``<workdir>/trial-<n>.log``.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from speechtune.backend import Exit, TrialLaunch
from speechtune.protocol import MAX_LINE_BYTES, parse_line

_PR_SET_PDEATHSIG = 1
STOP_GRACE_SECONDS = 10.0


class LaunchError(RuntimeError):
    """The trial's command could not be started at all (e.g. not found)."""


try:
    _LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a forked child must not dlopen
except OSError:  # not Linux: orphans possible, recovery still correct
    _LIBC = None


def die_with(parent: int):
    def prepare_child() -> None:
        if _LIBC is not None and hasattr(_LIBC, "prctl"):
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the runner died before prctl took effect
            os._exit(1)

    return prepare_child


async def split_lines(read: "asyncio.StreamReader", on_chunk=None) -> AsyncIterator[bytes]:
    """Lines of a byte stream; a line longer than MAX_LINE_BYTES is dropped whole."""
    buffer = b""
    oversized = False
    while True:
        chunk = await read.read(65536)
        if not chunk:
            break
        if on_chunk is not None:
            on_chunk(chunk)
        buffer += chunk
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                break
            line, buffer = buffer[:newline], buffer[newline + 1 :]
            if not oversized and len(line) <= MAX_LINE_BYTES:
                yield line
            oversized = False
        if len(buffer) > MAX_LINE_BYTES:
            buffer, oversized = b"", True
    if buffer and not oversized and len(buffer) <= MAX_LINE_BYTES:
        yield buffer


class LocalRun:
    def __init__(self, process: asyncio.subprocess.Process, log_path: Path):
        self.process = process
        self.log_path = log_path
        self._stopping = False

    async def lines(self) -> AsyncIterator[bytes]:
        assert self.process.stdout is not None
        with open(self.log_path, "ab", buffering=0) as log:
            async for line in split_lines(self.process.stdout, on_chunk=log.write):
                yield line

    async def wait(self) -> Exit:
        code = await self.process.wait()
        if code == 0:
            return Exit(succeeded=True, exit_code=0)
        if code < 0:
            name = signal.Signals(-code).name
            reason = "Killed" if code == -signal.SIGKILL else "Signaled"
            return Exit(False, 128 - code, reason, f"trainer killed by {name}; see {self.log_path}")
        return Exit(False, code, "Error", f"trainer exited with code {code}{_last_words(self.log_path)}")

    async def stop(self) -> None:
        if self.process.returncode is not None or self._stopping:
            return
        self._stopping = True
        signal_group(self.process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), STOP_GRACE_SECONDS)
        except asyncio.TimeoutError:
            signal_group(self.process.pid, signal.SIGKILL)
            await self.process.wait()


def signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _last_words(log_path: Path) -> str:
    """The last non-protocol line the trainer wrote, so a failure says why at a glance."""
    try:
        with open(log_path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 4096))
            text = log.read().decode("utf-8", "replace")
        lines = [line.strip() for line in text.splitlines() if line.strip() and parse_line(line) is None]
    except OSError:
        return ""
    return f": {lines[-1][:300]}" if lines else ""


class LocalProcessBackend:
    """Runs trials as subprocesses, their output logged under ``workdir``."""

    recovery_grace_seconds = 0.0  # trials die with the runner (PDEATHSIG): nothing can start late

    def __init__(self, workdir: Path, extra_env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.extra_env = extra_env or {}
        self._runs: dict[tuple[str, int, str], LocalRun] = {}

    async def launch(self, launch: TrialLaunch) -> LocalRun:
        key = (launch.study, launch.number, launch.attempt)
        self._runs = {k: run for k, run in self._runs.items() if run.process.returncode is None}
        if key in self._runs:
            return self._runs[key]
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"{launch.run_name}.log"
        env = {**os.environ, **self.extra_env, **launch.env}
        # Trials see the runner's own interpreter first, so `python -m ...` finds the same packages.
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", os.defpath)])
        log_path.write_bytes(b"")
        with open(log_path, "ab") as stderr:  # append mode: stdout is appended to the same file
            try:
                process = await asyncio.create_subprocess_exec(
                    *launch.argv, stdout=asyncio.subprocess.PIPE, stderr=stderr, stdin=asyncio.subprocess.DEVNULL,
                    env=env, start_new_session=True, preexec_fn=die_with(os.getpid()),
                )
            except OSError as exc:
                raise LaunchError(f"cannot start trial {launch.number}: {launch.argv[0]}: {exc.strerror}") from exc
        run = LocalRun(process, log_path)
        self._runs[key] = run
        return run

    async def attach(self, study: str, number: int, attempt: str = "") -> LocalRun | None:
        run = self._runs.get((study, number, attempt))
        return run if run is not None and run.process.returncode is None else None
