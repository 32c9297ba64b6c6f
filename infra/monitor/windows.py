"""Monitoring windows: fixed-length, aligned to the UTC epoch, named `granularity:start`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = ["Window", "granularity_name", "latest_windows", "window_containing"]


def granularity_name(seconds: int) -> str:
    """300 -> `5m`, 3600 -> `1h`, 86400 -> `1d`, 90 -> `90s`."""
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True, slots=True)
class Window:
    """One monitoring window [start, end) of `length_s` seconds."""

    length_s: int
    start: datetime

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.length_s)

    @property
    def granularity(self) -> str:
        return granularity_name(self.length_s)

    @property
    def window_id(self) -> str:
        return f"{self.granularity}:{self.start.strftime('%Y-%m-%dT%H:%M:%SZ')}"

    def previous(self) -> Window:
        return Window(self.length_s, self.start - timedelta(seconds=self.length_s))

    def complete_at(self, now: datetime) -> bool:
        return now >= self.end


def window_containing(length_s: int, at: datetime) -> Window:
    """The window of `length_s` seconds that holds the instant `at` (timezone-aware)."""
    if at.tzinfo is None:
        raise ValueError("window_containing needs a timezone-aware time")
    epoch_s = int(at.timestamp())
    return Window(length_s, datetime.fromtimestamp(epoch_s - epoch_s % length_s, UTC))


def latest_windows(length_s: int, now: datetime, count: int) -> list[Window]:
    """The `count` latest windows of `length_s` up to `now`, oldest first: the current (open)
    one and the `count - 1` before it."""
    current = window_containing(length_s, now)
    out = [current]
    for _ in range(count - 1):
        out.append(out[-1].previous())
    return out[::-1]
