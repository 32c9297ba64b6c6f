"""A dashboard page's query parameters, parsed and checked: anything malformed is an
`InvalidParameter` (a 400 page that names the parameter), never a 500 or a silent default."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ragstream.schemas.errors import InvalidParameter
from ragstream.schemas.ids import IDENTIFIER_RE

__all__ = [
    "BUCKETS_S",
    "STATUSES",
    "TimeRange",
    "duration_label",
    "parse_duration_s",
    "parse_params",
    "time_range",
]

BUCKETS_S: tuple[int, ...] = (60, 300, 900, 3600, 6 * 3600, 86_400)
"""Chart bucket widths; a range gets the narrowest one giving at most `_MAX_BUCKETS` points."""
_MAX_BUCKETS = 120
STATUSES = ("ok", "error", "blocked", "no_response")
_DURATION_RE = re.compile(r"^([1-9][0-9]{0,5})(m|h|d)$")
_UNIT_S = {"m": 60, "h": 3600, "d": 86_400}
_MAX_TEXT_CHARS = 256


@dataclass(frozen=True, slots=True)
class TimeRange:
    """[start, end) in UTC, and the chart bucket width that suits it."""

    start: datetime
    end: datetime
    bucket_s: int
    label: str
    """What the page shows as the range: `24h`, or `<start> to <end>`."""

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


def parse_duration_s(text: str, what: str = "range") -> int:
    """`15m`, `6h`, `7d` in seconds.

    Raises:
        InvalidParameter: anything else.
    """
    m = _DURATION_RE.match(text)
    if not m:
        raise InvalidParameter(f"{what}={text!r}: use a number and m, h or d, such as 15m, 24h or 7d")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def duration_label(seconds: int) -> str:
    """`24h`, `7d`, `15m`: days from two days up, hours below."""
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and (unit != "d" or seconds >= 2 * 86_400):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _instant(text: str, what: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise InvalidParameter(
            f"{what}={text[:64]!r} is not an ISO-8601 time (e.g. 2026-12-06T08:00:00Z)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _bucket_for(seconds: float) -> int:
    for width in BUCKETS_S:
        if seconds / width <= _MAX_BUCKETS:
            return width
    return BUCKETS_S[-1]


def time_range(
    params: Mapping[str, str], *, default_s: int, max_s: int, now: datetime | None = None
) -> TimeRange:
    """The range a page shows: `range=24h` (the last day, the default), or `since` and
    optionally `until` (ISO-8601). A relative range ends at the next bucket boundary, so
    repeated loads read (and cache) the same range.

    Raises:
        InvalidParameter: malformed, inverted, or wider than `max_s`.
    """
    now = now or datetime.now(UTC)
    since, until, rng = params.get("since"), params.get("until"), params.get("range")
    if rng is not None and (since is not None or until is not None):
        raise InvalidParameter("give either range or since/until, not both")
    if since is not None:
        start = _instant(since, "since")
        end = _instant(until, "until") if until is not None else now
        if end <= start:
            raise InvalidParameter(f"until ({end.isoformat()}) must be after since ({start.isoformat()})")
        seconds = (end - start).total_seconds()
        label = f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
    elif until is not None:
        raise InvalidParameter("until needs since")
    else:
        seconds = parse_duration_s(rng) if rng is not None else default_s
        width = _bucket_for(seconds)
        epoch = now.timestamp()
        end = datetime.fromtimestamp(math.ceil(epoch / width) * width, UTC)
        start = end - timedelta(seconds=seconds)
        label = duration_label(int(seconds))
    if seconds > max_s:
        raise InvalidParameter(
            f"the range is {duration_label(int(seconds))}; at most {duration_label(max_s)}"
        )
    return TimeRange(start=start, end=end, bucket_s=_bucket_for(seconds), label=label)


def parse_params(
    query: Mapping[str, str], allowed: tuple[str, ...], *, max_chars: Mapping[str, int] | None = None
) -> dict[str, str]:
    """The page's parameters, each given once, known, and plain text of sane length; the
    values of `tenant`, `status` and `user` are checked here too.

    Raises:
        InvalidParameter: an unknown, repeated, overlong or malformed parameter.
    """
    out: dict[str, str] = {}
    getall = getattr(query, "getall", None)  # a multidict (the URL's query) holds repeats
    for key in list(query.keys()):
        if key not in allowed:
            raise InvalidParameter(f"unknown parameter {key[:64]!r}; this page takes: {', '.join(allowed)}")
        if key in out or (getall is not None and len(getall(key)) > 1):
            raise InvalidParameter(f"parameter {key!r} is given twice")
        value = query[key]
        limit = (max_chars or {}).get(key, _MAX_TEXT_CHARS)
        if len(value) > limit:
            raise InvalidParameter(f"{key} is {len(value)} characters; at most {limit}")
        if any(ord(c) < 32 for c in value):
            raise InvalidParameter(f"{key} holds control characters")
        out[key] = value
    tenant = out.get("tenant")
    if tenant is not None and tenant != "" and not IDENTIFIER_RE.fullmatch(tenant):
        raise InvalidParameter(f"tenant={tenant[:64]!r} is not a tenant name")
    status = out.get("status")
    if status is not None and status != "" and status not in STATUSES:
        raise InvalidParameter(f"status={status[:32]!r}: one of {', '.join(STATUSES)}")
    return out
