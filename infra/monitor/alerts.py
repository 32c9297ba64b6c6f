"""Alert rules evaluated on monitoring values, and their state changes. Pure: the job reads
the values and the current states, and publishes and writes what `transitions` returns.

A rule fires when its condition holds (`value op threshold`, with at least `min_samples`
rows behind the value) and resolves when it stops holding, no data included. Each change is
one `AlertChanged`, whose `event_id` is a hash of the alert, its state and when the firing
began: a change published twice (a run that crashed between the topic and the table) has one
id, so consumers can drop the repeat.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from ragstream.infra.settings import AlertRule
from ragstream.schemas.alerts import AlertChanged, AlertState

__all__ = ["AlertStatus", "Measured", "condition_text", "evaluate", "transitions"]

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


@dataclass(frozen=True, slots=True)
class Measured:
    """A rule's value on its window: None when nothing was measured."""

    value: float | None
    sample_count: int
    window_id: str


@dataclass(frozen=True, slots=True)
class AlertStatus:
    """An alert's last recorded state."""

    state: str
    since: datetime


def alert_id(name: str, rule: AlertRule) -> str:
    return f"{name}/{rule.tenant}/{rule.route}"


def condition_text(rule: AlertRule) -> str:
    what = f"{rule.metric} {rule.stat}" + (f" ({rule.label})" if rule.label else "")
    if rule.table == "drift":
        what = f"drift of {what} vs {rule.comparison}"
    if rule.relative_to_previous:
        what = f"{what} / the window before"
    scope = "" if (rule.tenant, rule.route) == ("*", "*") else f" for tenant {rule.tenant} route {rule.route}"
    return f"{what} {rule.op} {rule.threshold:g} over {rule.window_s}s{scope}"


def evaluate(rule: AlertRule, measured: Measured) -> bool:
    """Whether the rule's condition holds on `measured`."""
    if measured.value is None or measured.sample_count < rule.min_samples:
        return False
    return _OPS[rule.op](measured.value, rule.threshold)


def transitions(
    rules: Mapping[str, AlertRule],
    measured: Mapping[str, Measured],
    states: Mapping[str, AlertStatus],
    now: datetime,
) -> list[AlertChanged]:
    """The alert events of this evaluation: rules that start or stop firing.

    `measured` and `states` are keyed by rule name and alert id; a rule without a
    measurement counts as no data.
    """
    out: list[AlertChanged] = []
    for name, rule in rules.items():
        aid = alert_id(name, rule)
        m = measured.get(name) or Measured(None, 0, "")
        holds = evaluate(rule, m)
        current = states.get(aid)
        firing = current is not None and current.state == "firing"
        if holds == firing:
            continue
        since = now if holds else (current.since if current is not None else now)
        state: AlertState = "firing" if holds else "resolved"
        value = "no data" if m.value is None else f"{m.value:.4g} ({m.sample_count} rows)"
        message = f"{name} {'FIRING' if holds else 'resolved'}: {condition_text(rule)}; measured {value}" + (
            f" — {rule.description}" if rule.description else ""
        )
        out.append(
            AlertChanged(
                event_id=hashlib.sha256(f"{aid}|{state}|{since.isoformat()}".encode()).hexdigest()[:32],
                alert_id=aid,
                rule=name,
                state=state,
                severity=rule.severity,
                slice_tenant=rule.tenant,
                slice_route=rule.route,
                metric=rule.metric,
                stat=rule.stat,
                label=rule.label,
                window_id=m.window_id or "none",
                value=m.value,
                threshold=rule.threshold,
                condition=condition_text(rule)[:300],
                message=message[:1000],
                since=since,
                produced_at=now,
            )
        )
    return out
