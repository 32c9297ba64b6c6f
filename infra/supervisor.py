"""Process supervision for the embedded stack.

`Supervisor` starts components in order, waits for each to be ready, restarts any that dies
(logging why: exit code or signal, and the tail of its log), and stops everything in reverse
order on request or signal, escalating to SIGKILL of the whole process group so no orphan is
left. A state file under `run/` lets `ragstream status` and `ragstream down` find the stack.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragstream.infra.files import write_json_atomic
from ragstream.schemas.errors import StartupError

__all__ = ["Component", "Supervisor", "pid_alive", "read_state", "stop_stack"]

log = logging.getLogger(__name__)


@dataclass
class Component:
    """A supervised process.

    `ready` is polled until it returns True; `after_start` runs once it is ready (e.g. create
    topics) and again after every restart. Components in the same `wave` start together;
    waves start in order.
    """

    name: str
    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    ready: Callable[[], bool] = lambda: True
    wave: int = 0
    after_start: Callable[[], None] | None = None
    restart_dependents: tuple[str, ...] = ()
    """Components to restart when this one restarts (workers lose their broker state)."""
    stop_timeout_s: float = 15.0
    liveness: Callable[[], bool] | None = None
    """If given and False for `liveness_grace_s` after ready, the process is restarted."""
    liveness_grace_s: float = 30.0
    exit_reason: Callable[[], str | None] | None = None
    """Why the process ended, in its own words (e.g. a crashed stage's heartbeat), if known."""

    # runtime
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_at: float | None = None
    restarts: int = 0
    last_exit: str | None = None
    unhealthy_since: float | None = None


class Supervisor:
    def __init__(
        self,
        components: Sequence[Component],
        *,
        log_dir: Path,
        state_path: Path,
        ready_timeout_s: float = 180.0,
        restart_backoff_s: float = 1.0,
    ) -> None:
        self.components = list(components)
        self.log_dir = log_dir
        self.state_path = state_path
        self.ready_timeout_s = ready_timeout_s
        self.restart_backoff_s = restart_backoff_s
        self._stopping = threading.Event()
        self.started_monotonic = 0.0
        self.ready_after_s: float | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> float:
        """Start every component wave by wave; returns seconds until all were ready.

        Raises:
            StartupError: a component exited or was not ready within `ready_timeout_s`.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_monotonic = time.monotonic()
        deadline = self.started_monotonic + self.ready_timeout_s
        waves = sorted({c.wave for c in self.components})
        try:
            for wave in waves:
                group = [c for c in self.components if c.wave == wave]
                for c in group:
                    self._spawn(c)
                self._write_state("starting")
                self._await_ready(group, deadline)
        except BaseException:
            self.stop()
            raise
        self.ready_after_s = time.monotonic() - self.started_monotonic
        self._write_state("ready")
        return self.ready_after_s

    def run_forever(self, poll_s: float = 0.5) -> None:
        """Watch the children until `request_stop()`; then stop them all."""
        try:
            while not self._stopping.wait(poll_s):
                self._watch_once()
        finally:
            self.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    def stop(self) -> None:
        """Stop in reverse wave order: SIGTERM, wait, then SIGKILL the process group."""
        self._stopping.set()
        for wave in sorted({c.wave for c in self.components}, reverse=True):
            group = [c for c in self.components if c.wave == wave and c.proc is not None]
            for c in group:
                _signal_group(c.proc, signal.SIGTERM)
            for c in group:
                assert c.proc is not None
                try:
                    c.proc.wait(timeout=c.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0fs; killing it", c.name, c.stop_timeout_s)
                _signal_group(c.proc, signal.SIGKILL)  # reaps stragglers in its group
                try:
                    c.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    log.error("%s (pid %d) survived SIGKILL", c.name, c.proc.pid)
                c.proc = None
        self._write_state("stopped")

    # -- internals ---------------------------------------------------------------------
    def _spawn(self, c: Component) -> None:
        logf = open(self.log_dir / f"{c.name}.log", "ab")
        logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {c.name}\n".encode())
        logf.flush()
        env = {**os.environ, **c.env}
        c.proc = subprocess.Popen(
            list(c.argv),
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # own process group: stop() can reach grandchildren
        )
        logf.close()
        c.started_at = time.monotonic()
        c.ready_at = None
        c.unhealthy_since = None
        log.info("started %s (pid %d)", c.name, c.proc.pid)

    def _await_ready(self, group: Sequence[Component], deadline: float) -> None:
        waiting = list(group)
        while waiting:
            for c in list(waiting):
                assert c.proc is not None
                code = c.proc.poll()
                if code is not None:
                    raise StartupError(
                        f"{c.name} exited with {_describe(code)} while starting:\n{self._tail(c)}"
                    )
                if _safe(c.ready):
                    c.ready_at = time.monotonic()
                    log.info("%s ready after %.1fs", c.name, c.ready_at - c.started_at)
                    if c.after_start:
                        c.after_start()
                    waiting.remove(c)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(c.name for c in waiting)
                raise StartupError(f"not ready within {self.ready_timeout_s:.0f}s: {names}")
            if waiting:
                time.sleep(0.05)

    def _watch_once(self) -> None:
        for c in self.components:
            if c.proc is None or self._stopping.is_set():
                continue
            code = c.proc.poll()
            if code is not None:
                c.last_exit = _describe(code)
                reason = _reason(c)
                if reason:
                    c.last_exit += f" ({reason})"
                log.error(
                    "%s exited with %s; restarting. Last log lines:\n%s", c.name, c.last_exit, self._tail(c)
                )
                self._restart(c)
                continue
            if c.ready_at is None and _safe(c.ready):
                c.ready_at = time.monotonic()
                log.info("%s ready again after %.1fs", c.name, c.ready_at - c.started_at)
                if c.after_start:
                    _safe_call(c.after_start, c.name)
                self._write_state("ready")
            if c.liveness is not None and c.ready_at is not None:
                if _safe(c.liveness):
                    c.unhealthy_since = None
                elif c.unhealthy_since is None:
                    c.unhealthy_since = time.monotonic()
                elif time.monotonic() - c.unhealthy_since > c.liveness_grace_s:
                    c.last_exit = f"unresponsive for {c.liveness_grace_s:.0f}s"
                    log.error("%s is %s; killing and restarting it", c.name, c.last_exit)
                    _signal_group(c.proc, signal.SIGKILL)
                    c.proc.wait(timeout=10)
                    self._restart(c)

    def _restart(self, c: Component) -> None:
        c.restarts += 1
        delay = min(self.restart_backoff_s * 2 ** min(c.restarts - 1, 5), 30.0)
        if self._stopping.wait(delay):
            return
        _signal_group(c.proc, signal.SIGKILL)
        self._spawn(c)
        for name in c.restart_dependents:
            dep = next((d for d in self.components if d.name == name), None)
            if dep is not None and dep.proc is not None:
                log.warning("restarting %s because %s restarted", dep.name, c.name)
                _signal_group(dep.proc, signal.SIGTERM)
                try:
                    dep.proc.wait(timeout=dep.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    _signal_group(dep.proc, signal.SIGKILL)
                    dep.proc.wait(timeout=5)
                dep.restarts += 1
                dep.last_exit = f"restarted with {c.name}"
                self._spawn(dep)
        self._write_state("degraded")

    def _tail(self, c: Component, lines: int = 15) -> str:
        path = self.log_dir / f"{c.name}.log"
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(f.tell() - 8192, 0))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join("    " + ln for ln in text.splitlines()[-lines:])

    def _write_state(self, phase: str) -> None:
        state = {
            "phase": phase,
            "supervisor_pid": os.getpid(),
            "updated_at": time.time(),
            "ready_after_s": self.ready_after_s,
            "components": {
                c.name: {
                    "pid": c.proc.pid if c.proc else None,
                    "restarts": c.restarts,
                    "last_exit": c.last_exit,
                    "ready": c.ready_at is not None,
                    "log": str(self.log_dir / f"{c.name}.log"),
                }
                for c in self.components
            },
        }
        write_json_atomic(self.state_path, state, indent=2)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _reason(c: Component) -> str | None:
    if c.exit_reason is None:
        return None
    try:
        return c.exit_reason()
    except Exception:  # noqa: BLE001 - the reason is a courtesy; the exit code stands
        return None


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - a failing probe means "not ready", nothing more
        return False


def _safe_call(fn: Callable[[], None], name: str) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - retried on the component's next restart
        log.error("after-start hook of %s failed: %s", name, exc)


def _signal_group(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def read_state(state_path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return None
    return data


def pid_alive(pid: object) -> bool:
    """True if `pid` names a running process (not a zombie)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def stop_stack(state_path: Path, timeout_s: float = 60.0) -> bool:
    """Stop a stack started by another process. Returns False if none was running."""
    state = read_state(state_path)
    if state is None:
        return False
    sup = state.get("supervisor_pid")
    sup = sup if isinstance(sup, int) else None
    children = [v.get("pid") for v in state.get("components", {}).values()]
    if not pid_alive(sup) and not any(pid_alive(p) for p in children):
        return False
    if sup is not None and pid_alive(sup):
        os.kill(sup, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while pid_alive(sup) and time.monotonic() < deadline:
            time.sleep(0.1)
    # Backstop: whatever the supervisor could not stop (or if it was killed).
    for pid in children:
        if pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return True
