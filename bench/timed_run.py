"""Run a trainer and add what the run cost to its final protocol line.

The trial command of bench/ladder_efficiency.py: `python bench/timed_run.py speechtune-trainer asr ...`.
The engine stores a run's last metrics with its trial (`metrics`, or `metrics_<level>` on the
ladder), so each run's cost lands in Optuna storage next to its WER, and the benchmark reads
both from there: `run_cpu_s` (user + system CPU of the trainer process), `run_wall_s`,
`run_epochs_s` (the trainer's own epoch_seconds summed: training and validation, no start-up)
and `run_end` (when it ended, to order runs). The final line's other fields (a `nas-darts` run's derived
`params`) are passed on unchanged.
"""

from __future__ import annotations

import ctypes
import resource
import signal
import subprocess
import sys
import time

from speechtune.protocol import parse_line, report

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child must not dlopen


def _die_with_parent() -> None:
    """The engine kills this wrapper with its runner; the trainer must not outlive it."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str]) -> int:
    began = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, preexec_fn=_die_with_parent)
    assert process.stdout is not None
    final: dict[str, float] | None = None
    epochs_seconds = 0.0
    for raw in process.stdout:
        line = parse_line(raw)
        if line is not None and line.final:
            final = {**line.metrics, **line.extra}  # printed again below, with the cost added (and params, if any)
            continue
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
        if line is not None:
            epochs_seconds += line.metrics.get("epoch_seconds", 0.0)
    code = process.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code == 0 and final is not None:
        report(final=True, **final, run_cpu_s=round(usage.ru_utime + usage.ru_stime, 3),
               run_wall_s=round(time.monotonic() - began, 3), run_epochs_s=round(epochs_seconds, 3), run_end=time.time())
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
