"""Shared benchmark plumbing: an isolated stack, RSS sampling, result tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from ragstream.infra.settings import Settings

REPO = Path(__file__).resolve().parents[1]
console = Console(width=130)


@dataclass
class BenchStack:
    data_dir: Path
    env: dict[str, str]
    settings: Settings
    up_wall_s: float = 0.0
    ready_after_s: float = 0.0

    @classmethod
    def create(cls, data_dir: Path, **extra_env: str) -> BenchStack:
        from ragstream.stack import isolated_env

        env = isolated_env(data_dir, None, **extra_env)
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(env)
            settings = Settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return cls(data_dir, env, settings)

    def cli(self, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ragstream", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        )

    def up(self) -> None:
        t0 = time.monotonic()
        self.cli("up", "--detach", timeout_s=300)
        self.up_wall_s = time.monotonic() - t0
        state = json.loads((self.settings.run_dir / "stack.json").read_text())
        self.ready_after_s = float(state["ready_after_s"])

    def down(self) -> None:
        self.cli("down", timeout_s=120)

    def supervisor_pid(self) -> int:
        state = json.loads((self.settings.run_dir / "stack.json").read_text())
        return int(state["supervisor_pid"])


class RssSampler:
    """Samples the summed RSS of a process and all its descendants in the background."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_by_name: dict[str, int] = {}
        self.cpu_s_by_name: dict[str, float] = {}
        self._cpu_seen: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mark_cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each labelled process (user + system)."""
        out: dict[str, float] = {}
        for name, cpu in self._cpu_seen.values():
            out[name] = out.get(name, 0.0) + cpu
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            by_name: dict[str, int] = {}
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    t = p.cpu_times()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                name = _label(p)
                self._cpu_seen[p.pid] = (name, t.user + t.system)
                by_name[name] = by_name.get(name, 0) + rss
            if total > self.peak_bytes:
                self.peak_bytes = total
                self.peak_by_name = by_name
            self._stop.wait(self.interval_s)


def _label(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    text = " ".join(cmd)
    if "worker" in cmd:
        return f"worker-{cmd[cmd.index('worker') + 1]}"
    if "tansu" in text:
        return "broker"
    if "triton" in text or "model_server" in text:
        return "triton"
    if "ragstream" in text and " up" in text:
        return "supervisor"
    return os.path.basename(cmd[0]) if cmd else "?"


@dataclass
class Results:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, metric: str, value: str, target: str = "", verdict: str = "") -> None:
        self.rows.append((metric, value, target, verdict))

    def print(self, title: str) -> None:
        table = Table(title=title)
        for col in ("metric", "measured", "target", ""):
            table.add_column(col)
        for r in self.rows:
            table.add_row(*r)
        console.print(table)

    def save(self, name: str) -> Path:
        out = REPO / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.json"
        path.write_text(json.dumps(self.raw, indent=2, default=str))
        return path


def verdict(ok: bool) -> str:
    return "[green]meets[/]" if ok else "[red]misses[/]"
