"""Resuming a pod's log exactly where it dropped, and how soon to reopen it (pure).

Logs are read with ``timestamps=true``. After a drop, the read is resumed
with ``sinceTime`` -- which the API rounds down to whole seconds -- and the
lines that the cursor has already passed on are skipped, so the reader sees
each line once. A stream that ends (or fails) without a new line is reopened
after a delay that doubles, up to a bound (``Backoff``): a pod whose status
lags behind its end must not cost a log request in a loop.
"""

from __future__ import annotations

import datetime


class LogCursor:
    """Where a reader is in one container's log."""

    def __init__(self) -> None:
        self.last = 0  # the newest timestamp passed on, ns since the epoch (0: none yet)
        self.same = 0  # how many lines passed on carry exactly that timestamp
        self._skip = 0

    def since_time(self) -> str | None:
        """The ``sinceTime`` for the next read, None to read from the start."""
        self._skip = self.same
        return rfc3339_seconds(self.last) if self.last else None

    def accept(self, raw: bytes) -> bytes | None:
        """The line without its timestamp, or None when it was already passed on."""
        stamp, text = split_stamp(raw, self.last)
        if stamp < self.last:
            return None
        if stamp == self.last and self._skip:
            self._skip -= 1
            return None
        self.last, self.same = (stamp, self.same + 1) if stamp == self.last else (stamp, 1)
        return text


class Backoff:
    """Delays before reopening a log stream: ``first`` s, doubling up to ``limit`` s; ``reset`` when lines arrive."""

    def __init__(self, first: float = 0.5, limit: float = 10.0):
        self.first = first
        self.limit = limit
        self._next = first

    def next(self) -> float:
        """The delay before the next attempt; the one after is twice as long, up to ``limit``."""
        delay = self._next
        self._next = min(self._next * 2, self.limit)
        return delay

    def reset(self) -> None:
        self._next = self.first


def split_stamp(raw: bytes, fallback: int) -> tuple[int, bytes]:
    """(nanoseconds since the epoch, line) from a `timestamps=true` log line."""
    stamp, _, text = raw.partition(b" ")
    try:
        return parse_nanos(stamp.decode()), text
    except (ValueError, UnicodeDecodeError):
        return fallback, raw


def parse_nanos(stamp: str) -> int:
    """RFC 3339 with up to nanosecond precision (Python's datetime stops at microseconds)."""
    if not stamp.endswith("Z"):
        raise ValueError(stamp)
    whole, _, fraction = stamp[:-1].partition(".")
    seconds = datetime.datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc).timestamp()
    return int(seconds) * 1_000_000_000 + int((fraction or "0").ljust(9, "0")[:9])


def rfc3339_seconds(nanos: int) -> str:
    return datetime.datetime.fromtimestamp(nanos // 1_000_000_000, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
