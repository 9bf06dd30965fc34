"""The process a worker pod runs: a warm trainer, fed runs that it asks the operator for.

``python -m speechtune.podworker -- <trainer command>`` starts the trainer as a local warm worker
(SPEECHTUNE_WORKER=1, runs on its stdin, tagged protocol lines on its stdout: docs/engine.md,
"Warm workers") and passes every line it prints to this pod's log, where the operator reads them,
as it reads a trial Job's. The one thing it adds is where runs come from: it long-polls the
operator's dispatch endpoint (SPEECHTUNE_DISPATCH_URL) with this worker's token
(SPEECHTUNE_WORKER_TOKEN, from a Secret), saying which run it executes now and which it was given
last. That state makes every answer idempotent: after a lost reply or an operator restart, the
operator sends a run again only to a worker that says it never got it.

The token lets this pod ask for its own runs and nothing else; it reports only through its log.
No database credentials, no Kubernetes API token. Standard library only: the trainer image has it.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from speechtune.local import die_with
from speechtune.protocol import READY, WORKER_ENV, protocol_object

DISPATCH_URL_ENV = "SPEECHTUNE_DISPATCH_URL"
TOKEN_ENV = "SPEECHTUNE_WORKER_TOKEN"
POLL_SECONDS = 20.0  # how long the operator may hold a poll open; the client waits a little longer
BACKOFF = (0.5, 10.0)  # first and longest wait between polls that failed (the operator restarting)
NOT_A_WORKER_EXIT = 64  # the trainer does not speak the worker protocol: the operator runs this study cold


def token_hash(token: str) -> str:
    """What the operator keeps of a worker's token (the Job's annotation): its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()


class Trainer:
    """The warm trainer process, and what this pod knows of its current run from its output."""

    def __init__(self, command: list[str]):
        env = dict(os.environ, **{WORKER_ENV: "1", "PYTHONUNBUFFERED": "1"})
        env.pop(TOKEN_ENV, None)  # the trainer runs runs, it never asks for them
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=die_with(os.getpid()))  # no trainer outlives its pod's main process
        self.ready = threading.Event()
        self.gone = threading.Event()
        self.not_a_worker = False
        self.current = ""  # the run it executes now ("" when idle)
        self.last = ""  # the last run it was given
        self.stopping = ""  # the run a stop was sent for
        self.changed = threading.Event()  # a run ended: tell the operator now, not at the next poll
        self._lock = threading.Lock()
        threading.Thread(target=self._pass_output, daemon=True).start()

    def _pass_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
            message = protocol_object(line)
            if message is None:
                continue
            if not self.ready.is_set():
                if message.get("worker") == READY:
                    self.ready.set()
                else:
                    self.not_a_worker = True
                    self.process.kill()
                continue
            with self._lock:
                if "end" in message and message.get("run") == self.current:
                    self.current = ""
                    self.changed.set()
        self.process.wait()
        self.gone.set()
        self.ready.set()  # unblock a wait for it
        self.changed.set()

    def give(self, run: dict) -> None:
        with self._lock:
            if run["run"] == self.last:
                return  # already given: a reply that was repeated
            self.current = self.last = run["run"]
        self._send({"run": run["run"], "argv": run.get("argv") or [], "env": run.get("env") or {}})

    def stop(self, run_id: str) -> None:
        if run_id == self.current and run_id != self.stopping:
            self.stopping = run_id
            self._send({"stop": run_id})

    def _send(self, request: dict) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # it died: the operator learns that from this pod's end

    def retire(self) -> int:
        assert self.process.stdin is not None
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        return self.process.wait()

    def rss_mib(self) -> float | None:
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return None


def poll(url: str, token: str, trainer: Trainer) -> dict:
    """One long poll: this worker's state in, the operator's instruction out ({} for none)."""
    query = {"current": trainer.current, "last": trainer.last}
    rss = trainer.rss_mib()
    if rss is not None:
        query["rss_mib"] = f"{rss:.0f}"
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/next?{urllib.parse.urlencode(query)}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=POLL_SECONDS + 15) as reply:
        return json.loads(reply.read() or b"{}")


def serve(command: list[str], url: str, token: str) -> int:
    trainer = Trainer(command)
    trainer.ready.wait()  # set by its ready line, or by its end
    if trainer.not_a_worker or trainer.gone.is_set():
        trainer.gone.wait()
        print(f"speechtune-podworker: {' '.join(command)} does not speak the worker protocol "
              "(docs/engine.md, \"Warm workers\"): the operator runs this study's trials cold", file=sys.stderr, flush=True)
        return NOT_A_WORKER_EXIT
    delay = BACKOFF[0]
    while not trainer.gone.is_set():
        trainer.changed.clear()
        try:
            instruction = poll(url, token, trainer)
        except (OSError, ValueError) as error:  # the operator restarting, or a network hiccup
            print(f"speechtune-podworker: cannot reach the operator at {url}: {error}; retrying in {delay:g} s",
                  file=sys.stderr, flush=True)
            trainer.changed.wait(delay)
            delay = min(delay * 2, BACKOFF[1])
            continue
        delay = BACKOFF[0]
        if instruction.get("retire") and not trainer.current:
            return trainer.retire()
        if isinstance(instruction.get("run"), dict):
            trainer.give(instruction["run"])
        if isinstance(instruction.get("stop"), str):
            trainer.stop(instruction["stop"])
    code = trainer.process.returncode
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    url, token = os.environ.get(DISPATCH_URL_ENV, ""), os.environ.get(TOKEN_ENV, "")
    if not args or not url or not token:
        print(f"usage: {DISPATCH_URL_ENV}=... {TOKEN_ENV}=... python -m speechtune.podworker -- <trainer command>", file=sys.stderr)
        return 2
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashed trainer leaves no core with its runs' env in it
    began = time.monotonic()
    code = serve(args, url, token)
    print(f"speechtune-podworker: done after {time.monotonic() - began:.0f} s, exit code {code}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
