"""Monitoring over the audit trail: profile and drift metric tables computed per window
(`job.run_monitor`), from pure window, profile and drift computations."""

from ragstream.infra.monitor.drift import centroid_cosine_distance, population_stability_index
from ragstream.infra.monitor.job import MonitorReport, firing_alerts, run_monitor, windows_to_compute
from ragstream.infra.monitor.windows import Window, granularity_name, latest_windows, window_containing

__all__ = [
    "MonitorReport",
    "Window",
    "centroid_cosine_distance",
    "firing_alerts",
    "granularity_name",
    "latest_windows",
    "population_stability_index",
    "run_monitor",
    "window_containing",
    "windows_to_compute",
]
