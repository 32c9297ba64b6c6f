"""A stage that crashes is never silent: its worker exits with the reason in its heartbeat,
the supervisor restarts it, counts it and keeps the reason for `ragstream status`.

Real processes, real supervisor; no broker needed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ragstream.infra.settings import Settings
from ragstream.infra.supervisor import Component, Supervisor, read_state
from ragstream.stack import crash_reason
from ragstream.workers.main import CRASH_EXIT_CODE
from ragstream.workers.stages import heartbeat_path


def test_a_crashing_stage_exits_its_worker_with_the_reason_in_its_heartbeat(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from ragstream.infra.settings import Settings
        from ragstream.schemas.errors import StartupError
        from ragstream.streams.runner import StageRunner
        from ragstream.workers.main import _crash

        async def send(*a):
            raise AssertionError
        settings = Settings(data_dir=Path({str(tmp_path)!r}))
        runner = StageRunner(settings, "ingest", send)
        runner.ready = True
        _crash(settings, runner, StartupError("cannot open LanceDB table"))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == CRASH_EXIT_CODE, proc.stderr
    assert "stage ingest crashed" in proc.stderr
    settings = Settings(data_dir=tmp_path)
    hb = json.loads(heartbeat_path(settings, "ingest").read_text())
    assert hb["ready"] is False and hb["crashed"] == "StartupError: cannot open LanceDB table"
    assert crash_reason(settings, ("ingest", "embed")) == (
        "stage ingest crashed: StartupError: cannot open LanceDB table"
    )


def test_the_supervisor_restarts_a_crashed_worker_counts_it_and_keeps_why(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    hb = heartbeat_path(settings, "embed")
    crash_once = textwrap.dedent(
        f"""
        import json, os, sys, time
        from pathlib import Path
        hb, marker = Path({str(hb)!r}), Path({str(tmp_path / "crashed-once")!r})
        hb.parent.mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            marker.touch()
            hb.write_text(json.dumps({{"crashed": "PublishStalled: broker away", "ready": False}}))
            sys.exit({CRASH_EXIT_CODE})
        hb.write_text(json.dumps({{"crashed": None, "ready": True}}))
        time.sleep(60)
        """
    )
    sup = Supervisor(
        [
            Component(
                name="worker-embed",
                argv=[sys.executable, "-c", crash_once],
                exit_reason=lambda: crash_reason(settings, ("embed",)),
            )
        ],
        log_dir=tmp_path / "logs",
        state_path=tmp_path / "run" / "stack.json",
        restart_backoff_s=0.1,
    )
    sup.start()
    try:
        deadline = time.monotonic() + 30
        while sup.components[0].restarts == 0 and time.monotonic() < deadline:
            sup._watch_once()
            time.sleep(0.05)
        state = read_state(tmp_path / "run" / "stack.json")
        assert state is not None
        worker = state["components"]["worker-embed"]
        assert worker["restarts"] == 1
        assert worker["last_exit"] == (
            f"exit code {CRASH_EXIT_CODE} (stage embed crashed: PublishStalled: broker away)"
        )
    finally:
        sup.stop()


def test_status_says_what_is_wrong_with_a_stage_that_still_beats() -> None:
    from ragstream.health import stage_problem as _stage_problem

    assert _stage_problem({"ready": True}) is None
    assert _stage_problem({"crashed": "RecursionError: x"}) == "CRASHED: RecursionError: x"
    stalled = _stage_problem({"stalled_since": time.time(), "stalled_reason": "KafkaTimeoutError"})
    assert stalled is not None and stalled.startswith("STALLED") and "KafkaTimeoutError" in stalled
    assert _stage_problem({"oldest_inflight_s": 1000.0}) == "STUCK: holding work for 1000s"
