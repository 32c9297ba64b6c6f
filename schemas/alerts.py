"""The alert event: a monitoring rule started or stopped firing (`alerts` topic, `alerts` table)."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field

from ragstream.schemas.events import Event

__all__ = ["AlertChanged", "AlertSeverity", "AlertState"]

AlertState = Literal["firing", "resolved"]
AlertSeverity = Literal["info", "warning", "critical"]


class AlertChanged(Event):
    """Published when a rule's condition starts holding (`firing`) or stops (`resolved`) for
    one slice. Keyed by `alert_id` (the rule and its slice), so one alert's changes stay in
    order on one partition."""

    event_type: Literal["alert.changed"] = "alert.changed"
    schema_version: Literal[1] = 1
    alert_id: str = Field(min_length=1, max_length=300)
    """`<rule>/<tenant>/<route>`: one alert per rule and slice."""
    rule: str = Field(min_length=1, max_length=64)
    state: AlertState
    severity: AlertSeverity
    slice_tenant: str = Field(min_length=1, max_length=128)
    """The tenant the rule watches, or `*` for all tenants together."""
    slice_route: str = Field(min_length=1, max_length=128)
    metric: str = Field(min_length=1, max_length=128)
    stat: str = Field(min_length=1, max_length=64)
    label: str = Field(default="", max_length=128)
    window_id: str = Field(min_length=1, max_length=64)
    """The monitoring window the condition was evaluated on."""
    value: float | None = None
    """The measured value (for a ratio rule, the ratio); None when nothing was measured."""
    threshold: float
    condition: str = Field(max_length=300)
    """The rule as text, e.g. `judge_pass rate (overall) < 0.7 over 15m`."""
    message: str = Field(max_length=1000)
    since: datetime
    """When the alert started firing (for `resolved`, when the firing began)."""

    key_field: ClassVar[str] = "alert_id"
