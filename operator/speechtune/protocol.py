"""The metric protocol: how any trainer reports to speechtune.

A trainer prints one JSON object per line on stdout::

    {"speechtune": 1, "step": 3, "wer": 0.21, "cer": 0.08}
    {"speechtune": 1, "final": true, "wer": 0.19}

Every other line -- logs, other JSON, binary junk, lines over 64 KiB -- is
ignored. This module has no dependencies beyond the standard library, so a
trainer can import it without pulling in Optuna or Kubernetes.
"""

from __future__ import annotations

import json
import math
import sys
import time
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
    if isinstance(raw, bytes):
        if len(raw) > MAX_LINE_BYTES:
            return None
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    elif len(raw) > MAX_LINE_BYTES:
        return None
    text = raw.strip()
    if not text.startswith("{") or '"speechtune"' not in text:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("speechtune") != PROTOCOL_VERSION:
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
