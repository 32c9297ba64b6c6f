"""Monitoring: windows and drift statistics (pure), and the monitoring job on a real
pyiceberg SQLite catalog with synthetic audit rows (no Kafka needed): profile values equal
the same counts in SQL, re-running a window replaces it, and query drift rises for a shifted
stream (another language and topic) and stays low for an unshifted one."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ragstream.infra.audit.tables import arrow_schema
from ragstream.infra.monitor import (
    centroid_cosine_distance,
    granularity_name,
    latest_windows,
    population_stability_index,
    run_monitor,
    window_containing,
)
from ragstream.infra.settings import Settings

NOW = datetime(2026, 12, 6, 10, 7, 30, tzinfo=UTC)


# -- pure ------------------------------------------------------------------------------------
def test_windows_align_to_the_epoch_and_name_their_granularity() -> None:
    w = window_containing(300, NOW)
    assert (w.start, w.end) == (
        datetime(2026, 12, 6, 10, 5, tzinfo=UTC),
        datetime(2026, 12, 6, 10, 10, tzinfo=UTC),
    )
    assert w.window_id == "5m:2026-12-06T10:05:00Z"
    assert [granularity_name(s) for s in (300, 3600, 86400, 90)] == ["5m", "1h", "1d", "90s"]
    latest = latest_windows(3600, NOW, 3)
    assert [x.start.hour for x in latest] == [8, 9, 10]
    assert not latest[-1].complete_at(NOW) and latest[0].complete_at(NOW)
    with pytest.raises(ValueError):
        window_containing(300, NOW.replace(tzinfo=None))


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(100, 10, 2000)
    same = population_stability_index(rng.normal(100, 10, 2000), base)
    shifted = population_stability_index(rng.normal(130, 10, 2000), base)
    assert same is not None and shifted is not None
    assert same < 0.05 < 0.25 < shifted
    assert population_stability_index([1.0, 2.0], base) is None  # too few values: no value
    assert population_stability_index([5.0] * 50, [5.0] * 50) == pytest.approx(0.0)  # one bin


def test_centroid_distance() -> None:
    a = np.eye(4, dtype=np.float32)[[0] * 6]
    b = np.eye(4, dtype=np.float32)[[1] * 6]
    assert centroid_cosine_distance(a, a) == pytest.approx(0.0)
    assert centroid_cosine_distance(a, b) == pytest.approx(1.0)
    assert centroid_cosine_distance(a[:2], b) is None


def test_settings_reject_a_bad_baseline_and_granularities() -> None:
    with pytest.raises(ValueError, match="baseline"):
        Settings(monitor={"baseline_start_at": "2026-11-01T00:00:00Z"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="baseline"):
        Settings(
            monitor={"baseline_start_at": "2026-11-02T00:00:00Z", "baseline_end_at": "2026-11-01T00:00:00Z"}
        )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="granularities"):
        Settings(monitor={"granularities_s": [3600, 300]})  # type: ignore[arg-type]


# -- the job on a real catalog ---------------------------------------------------------------
EN = [
    "How many days of holiday do I get each year?",
    "Where can I park my bike at the Tillbury office?",
    "What is the payload of the QR-208 Quill robot?",
    "Who approves expense claims over 500 pounds?",
    "How do I set up the VPN on my laptop?",
    "What should I do when a robot reports error E-517?",
    "When are performance reviews held?",
    "What is the policy on working from home?",
    "How much can I spend on a hotel when travelling?",
    "What does the onboarding checklist ask me to do in week one?",
    "Which laptops are approved by IT?",
    "How do I report a security incident?",
    "What is the maximum speed of the LX-4471 Lynx?",
    "How many hours make up a standard working week?",
    "Can I carry over unused holiday to next year?",
    "Who do I contact about the HB330 Harbour dock?",
]
FR = [
    "Combien de jours de télétravail par semaine sont autorisés ?",
    "Quel est le plafond des frais de repas en France ?",
    "Quelles chaussures de sécurité faut-il porter à l'entrepôt de Lyon ?",
    "Qui valide les notes de frais au-delà de 500 euros ?",
    "Comment déclarer un accident dans l'entrepôt ?",
    "Les jours de télétravail sont-ils reportables ?",
    "Quel est le délai pour envoyer une note de frais ?",
    "Faut-il un casque dans la zone de chargement ?",
]


def _settings(tmp_path: Path, **monitor: Any) -> Settings:
    return Settings(data_dir=tmp_path, monitor={"granularities_s": [300, 3600], **monitor})  # type: ignore[arg-type]


def _inference_row(i: int, at: datetime, question: str, *, tenant: str, status: str = "ok") -> dict[str, Any]:
    rng = random.Random(i)
    return {
        "request_id": f"req-{i:05d}",
        "tenant": tenant,
        "user": "dana",
        "submitted_at": at,
        "completed_at": at + timedelta(seconds=2),
        "question": question,
        "answer": "x" * rng.randint(80, 120) if status == "ok" else "",
        "status": status,
        "route": "default",
        "finish_reason": "stop" if status == "ok" else None,
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "retrieved_scores": [0.5 + rng.random() / 10, 0.4],
        "latency_total_ms": 1000.0 + i % 100,
        "latency_time_to_first_token_ms": 500.0,
        "event_date": at.date(),
        "logged_at": at + timedelta(seconds=3),
    }


def _append(settings: Settings, name: str, rows: list[dict[str, Any]]) -> None:
    from ragstream.infra.audit.buffer import rows_to_arrow
    from ragstream.infra.audit.creation import ensure_tables

    table = ensure_tables(settings, names=[name])[name]
    table.append(rows_to_arrow(rows, table.schema().as_arrow()))


def _profile(settings: Settings) -> Any:
    from ragstream.infra.audit.query import audit_sql

    return audit_sql(settings, "SELECT * FROM monitor_profile").to_pylist()


async def test_profile_counts_equal_sql_and_a_rerun_replaces_its_windows(tmp_path: Path) -> None:
    from ragstream.infra.audit.query import audit_sql

    settings = _settings(tmp_path)
    start = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    rows = []
    for i in range(60):
        status = "blocked" if i % 10 == 0 else ("error" if i % 15 == 1 else "ok")
        rows.append(
            _inference_row(
                i,
                start + timedelta(seconds=10 * i),
                EN[i % len(EN)],
                tenant=("acme", "globex")[i % 2],
                status=status,
            )
        )
    _append(settings, "inference_log", rows)
    _append(
        settings,
        "judgements",
        [
            {
                "judged_at": start + timedelta(seconds=10 * i + 5),
                "request_id": f"req-{i:05d}",
                "judge": judge,
                "judge_version": "1",
                "event_id": f"ev-{i}-{judge}",
                "rating": "yes" if (i + len(judge)) % 3 else "no",
                "root_cause": "groundedness" if judge == "overall" and (i + 7) % 3 == 0 else None,
                "tenant": ("acme", "globex")[i % 2],
                "route": "default",
                "source": "stream",
                "event_date": start.date(),
                "logged_at": start,
            }
            for i in range(60)
            for judge in ("groundedness", "overall")
        ],
    )
    _append(
        settings,
        "dead_letters",
        [
            {
                "event_time": start + timedelta(seconds=30 * i),
                "tenant": None,
                "stage": "retrieve",
                "error_kind": "schema_violation",
                "event_date": start.date(),
                "logged_at": start,
            }
            for i in range(4)
        ],
    )
    now = start + timedelta(minutes=12)
    report = await run_monitor(settings, now=now)
    # 2 windows of 5 min and 2 of 1 h (10:00-10:15 holds everything, 09:00 is empty).
    assert len(report.windows) == 4 and report.requests_read == 60
    profile = _profile(settings)

    def value(
        window_id: str, metric: str, stat: str, label: str = "", tenant: str = "*", route: str = "*"
    ) -> Any:
        got = [
            r["value"]
            for r in profile
            if (r["window_id"], r["metric"], r["stat"], r["label"], r["tenant"], r["route"])
            == (window_id, metric, stat, label, tenant, route)
        ]
        assert len(got) == 1, (window_id, metric, stat, label, tenant, route, got)
        return got[0]

    hour = "1h:2026-12-06T10:00:00Z"
    sql = audit_sql(
        settings,
        "SELECT count(*) AS n, avg((status = 'blocked')::INT) AS blocked, "
        "quantile_cont(latency_total_ms, 0.95) AS p95 FROM inference_log WHERE tenant = 'acme'",
    ).to_pylist()[0]
    assert value(hour, "requests", "count") == 60
    assert value(hour, "requests", "count", tenant="acme") == sql["n"] == 30
    assert value(hour, "requests", "count", tenant="acme", route="default") == 30
    assert value(hour, "status", "rate", "blocked", tenant="acme") == pytest.approx(sql["blocked"])
    assert value(hour, "latency_total_ms", "p95", tenant="acme") == pytest.approx(sql["p95"])
    assert value(hour, "total_tokens", "sum") == 60 * 120
    assert value(hour, "audit_lag_ms", "p95") == pytest.approx(1000.0)  # logged 1 s after completion
    judged = audit_sql(
        settings, "SELECT avg((rating = 'yes')::INT) AS r FROM judgements WHERE judge = 'groundedness'"
    ).to_pylist()[0]["r"]
    assert value(hour, "judge_pass", "rate", "groundedness") == pytest.approx(judged)
    assert value(hour, "judge_root_cause", "count", "groundedness") == 20
    assert value(hour, "dead_letters", "count") == 4
    assert value(hour, "dead_letters", "count", "retrieve", tenant="unknown") == 4
    # The empty hour still says zero requests.
    assert value("1h:2026-12-06T09:00:00Z", "requests", "count") == 0
    # 10:05-10:10: requests 30..59 (10 s apart from 10:00).
    assert value("5m:2026-12-06T10:05:00Z", "requests", "count") == 30
    assert value("5m:2026-12-06T10:05:00Z", "requests", "per_min") == pytest.approx(6.0)
    open_window = {r["complete"] for r in profile if r["window_id"] == "5m:2026-12-06T10:10:00Z"}
    assert open_window == {False}

    # Late rows arrive; the re-run replaces the windows' rows instead of adding to them.
    _append(
        settings,
        "inference_log",
        [_inference_row(100 + i, start + timedelta(minutes=11), EN[0], tenant="acme") for i in range(5)],
    )
    again = await run_monitor(settings, now=now)
    assert again.profile_rows == len(_profile(settings))  # nothing from the first run is left
    profile = _profile(settings)
    assert value(hour, "requests", "count") == 65
    keys = [(r["window_id"], r["tenant"], r["route"], r["metric"], r["stat"], r["label"]) for r in profile]
    assert len(keys) == len(set(keys))


async def test_query_drift_rises_for_a_shifted_stream_and_not_for_an_unshifted_one(tmp_path: Path) -> None:
    from ragstream.infra.audit.query import audit_sql
    from ragstream.infra.embedder import InProcessEmbedder

    # The rule a user would write on query drift, per tenant: centroid distance over 0.4.
    rule = {
        "table": "drift",
        "metric": "query_embedding",
        "stat": "centroid_cosine_distance",
        "op": ">",
        "threshold": 0.4,
        "window_s": 3600,
    }
    rules = {f"query_drift_{t}": {**rule, "tenant": t} for t in ("acme", "globex")}
    settings = _settings(tmp_path, alerts=rules)
    base = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
    rows = []
    # 09:00-10:00 English HR and product questions; 10:00-11:00 the same kind for tenant
    # acme, French warehouse and expense questions for tenant globex.
    # Each window draws its English questions at random from the same pool.
    pick = random.Random(7)
    for i in range(80):
        rows.append(
            _inference_row(
                i, base + timedelta(seconds=45 * i), pick.choice(EN), tenant=("acme", "globex")[i % 2]
            )
        )
    for i in range(80, 160):
        tenant = ("acme", "globex")[i % 2]
        question = pick.choice(EN) if tenant == "acme" else pick.choice(FR)
        rows.append(
            _inference_row(i, base + timedelta(hours=1, seconds=45 * (i - 80)), question, tenant=tenant)
        )
    _append(settings, "inference_log", rows)
    embedder = InProcessEmbedder(settings)
    await embedder.start()
    changes: list[Any] = []

    async def publish(batch: list[Any]) -> None:
        changes.extend(batch)

    try:
        # A scheduled run at 10:59: the latest hour windows are 09:00 and 10:00.
        report = await run_monitor(
            settings, embedder=embedder, now=base + timedelta(hours=1, minutes=59), on_alerts=publish
        )
    finally:
        await embedder.close()
    assert report.questions_embedded >= 160
    # The shifted tenant's rule fires; the unshifted one's does not.
    assert [(c.rule, c.state, c.slice_tenant) for c in changes] == [
        ("query_drift_globex", "firing", "globex")
    ]
    drift = {
        r["tenant"]: r
        for r in audit_sql(
            settings,
            "SELECT * FROM monitor_drift WHERE metric = 'query_embedding' AND comparison = 'previous' "
            "AND window_id = '1h:2026-12-06T10:00:00Z'",
        ).to_pylist()
    }
    shifted, unshifted = drift["globex"]["value"], drift["acme"]["value"]
    assert drift["acme"]["model"] == settings.embed.model_id
    assert drift["globex"]["sample_count"] == 40 and drift["globex"]["baseline_count"] == 40
    # Sampling noise of 40 questions from a pool of 16 measured 0.16 here; a change of
    # language and topic 0.94. A rule on this metric wants a threshold between the two.
    threshold = 0.4
    assert 0.0 < unshifted < threshold < shifted, (unshifted, shifted)
    assert drift["*"]["value"] > unshifted


def test_monitor_tables_have_the_window_key() -> None:
    for name in ("monitor_profile", "monitor_drift"):
        names = arrow_schema(name).names
        assert {"window_id", "window_start", "tenant", "route", "metric", "stat", "label", "value"} <= set(
            names
        )


# -- alerts ----------------------------------------------------------------------------------
def _rule(**kw: Any) -> Any:
    from ragstream.infra.settings import AlertRule

    base: dict[str, Any] = {
        "metric": "status",
        "stat": "rate",
        "label": "blocked",
        "op": ">",
        "threshold": 0.3,
    }
    return AlertRule(**(base | kw))


def test_alert_transitions_fire_once_and_resolve_on_no_data() -> None:
    from ragstream.infra.monitor.alerts import AlertStatus, Measured, transitions

    rules = {"blocks": _rule(min_samples=3, severity="critical")}
    fired = transitions(rules, {"blocks": Measured(0.5, 10, "w")}, {}, NOW)
    assert [(c.state, c.severity, c.since) for c in fired] == [("firing", "critical", NOW)]
    state = {fired[0].alert_id: AlertStatus("firing", NOW)}
    assert transitions(rules, {"blocks": Measured(0.9, 10, "w")}, state, NOW) == []  # still firing: no event
    assert transitions(rules, {"blocks": Measured(0.5, 2, "w")}, {}, NOW) == []  # too few samples
    later = NOW + timedelta(minutes=5)
    resolved = transitions(rules, {}, state, later)  # no data resolves
    assert [(c.state, c.since, c.produced_at) for c in resolved] == [("resolved", NOW, later)]
    again = transitions(rules, {"blocks": Measured(0.5, 10, "w")}, {}, NOW)
    assert again[0].event_id == fired[0].event_id, "the same change has the same id"


def test_a_malformed_alert_rule_fails_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="threshold"):
        Settings(monitor={"alerts": {"x": {"metric": "judge_pass", "stat": "rate", "op": "<"}}})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="op"):
        Settings(
            monitor={"alerts": {"x": {"metric": "judge_pass", "stat": "rate", "op": "<>", "threshold": 1}}}
        )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window_s"):
        Settings(
            monitor={
                "alerts": {
                    "x": {
                        "metric": "answer_chars",
                        "stat": "psi",
                        "table": "drift",
                        "op": ">",
                        "threshold": 0.2,
                        "window_s": 120,
                    }
                }
            }  # type: ignore[arg-type]
        )


async def test_an_alert_fires_on_the_real_catalog_is_recorded_after_publishing_and_resolves(
    tmp_path: Path,
) -> None:
    from ragstream.infra.audit.query import audit_sql

    rules = {
        "blocks": {
            "metric": "status",
            "stat": "rate",
            "label": "blocked",
            "op": ">",
            "threshold": 0.3,
            "window_s": 300,
        },
        "block_jump": {
            "metric": "status",
            "stat": "rate",
            "label": "blocked",
            "op": ">",
            "threshold": 2,
            "window_s": 300,
            "relative_to_previous": True,
        },
    }
    settings = _settings(tmp_path, alerts=rules)
    start = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    rows = [
        _inference_row(
            i,
            start + timedelta(seconds=10 * i),
            EN[0],
            tenant="acme",
            status="blocked" if i % 10 == 0 else "ok",
        )
        for i in range(30)
    ]
    rows += [
        _inference_row(
            100 + i,
            start + timedelta(minutes=5, seconds=10 * i),
            EN[0],
            tenant="acme",
            status="blocked" if i % 2 else "ok",
        )
        for i in range(30)
    ]
    _append(settings, "inference_log", rows)
    now = start + timedelta(minutes=10)

    published: list[Any] = []

    async def broken(changes: list[Any]) -> None:
        raise RuntimeError("broker down")

    with pytest.raises(RuntimeError):
        await run_monitor(settings, now=now, on_alerts=broken)
    assert audit_sql(settings, "SELECT * FROM alerts").num_rows == 0, "not recorded when not published"

    async def publish(changes: list[Any]) -> None:
        published.extend(changes)

    report = await run_monitor(settings, now=now, on_alerts=publish)
    # Last 5 min: 15 of 30 blocked (0.5); the 5 min before: 3 of 30 (0.1), a jump of x5.
    assert sorted(report.alerts) == ["block_jump: firing", "blocks: firing"]
    by_rule = {c.rule: c for c in published}
    assert by_rule["blocks"].value == pytest.approx(0.5) and by_rule["block_jump"].value == pytest.approx(5.0)
    again = await run_monitor(settings, now=now + timedelta(seconds=30), on_alerts=publish)
    assert again.alerts == [], "a firing alert is not re-announced"
    # A restarted monitor knows what fires from the table (its Prometheus gauge starts right).
    from prometheus_client import REGISTRY

    from ragstream.infra.monitor import firing_alerts
    from ragstream.workers.monitor import set_firing_gauges

    assert firing_alerts(settings) == {"blocks", "block_jump"}
    set_firing_gauges(settings)
    labels = {"alert": "blocks", "severity": "warning"}
    assert REGISTRY.get_sample_value("ragstream_alerts_firing", labels) == 1.0
    quiet = await run_monitor(settings, now=now + timedelta(minutes=6), on_alerts=publish)
    assert sorted(quiet.alerts) == ["block_jump: resolved", "blocks: resolved"]
    assert firing_alerts(settings) == set()
    table = audit_sql(settings, "SELECT rule, state, since FROM alerts ORDER BY changed_at, rule").to_pylist()
    assert [(r["rule"], r["state"]) for r in table] == [
        ("block_jump", "firing"),
        ("blocks", "firing"),
        ("block_jump", "resolved"),
        ("blocks", "resolved"),
    ]
    assert table[1]["since"] == table[3]["since"] == now


def test_the_webhook_is_retried_until_it_takes_the_alert_and_a_dead_one_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from ragstream.infra.monitor.alerts import Measured, transitions
    from ragstream.workers.monitor import post_webhook

    bodies: list[dict[str, Any]] = []
    statuses = [503, 200]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(statuses.pop(0) if statuses else 500)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        settings = Settings(monitor={"webhook_url": url, "webhook_attempts": 3})  # type: ignore[arg-type]
        changes = transitions({"blocks": _rule()}, {"blocks": Measured(0.9, 5, "w")}, {}, NOW)
        post_webhook(settings, changes)
        assert len(bodies) == 2 and bodies[1]["state"] == "firing" and bodies[1]["rule"] == "blocks"
        # Every answer from now on is 500: three attempts, then a warning, no exception.
        post_webhook(settings, changes)
        assert len(bodies) == 5
        assert "alert webhook" in caplog.text
    finally:
        server.shutdown()


def test_monitor_run_refuses_bad_times_and_backfills_a_range(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from ragstream.cli import app

    env = {"RAGSTREAM_DATA_DIR": str(tmp_path), "RAGSTREAM_MONITOR__GRANULARITIES_S": "[3600]"}
    runner = CliRunner()
    bad = runner.invoke(app, ["monitor", "run", "--since", "yesterday"], env=env)
    assert bad.exit_code == 2 and "expected an ISO time" in bad.output
    backwards = runner.invoke(
        app, ["monitor", "run", "--since", "2026-12-06T10:00:00Z", "--until", "2026-12-06T09:00:00Z"], env=env
    )
    assert backwards.exit_code == 2 and "before --until" in backwards.output
    wide = runner.invoke(app, ["monitor", "run", "--since", "1990-01-01T00:00:00Z"], env=env)
    assert wide.exit_code == 2 and "narrow the range" in wide.output
    ok = runner.invoke(
        app,
        [
            "monitor",
            "run",
            "--since",
            "2026-12-06T08:30:00Z",
            "--until",
            "2026-12-06T11:00:00Z",
            "--json",
            "--no-query-drift",
        ],
        env=env,
    )
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    # 08:00, 09:00, 10:00: every hour the range touches, each with zero requests, no alerts.
    assert report["windows"] == [
        "1h:2026-12-06T08:00:00Z",
        "1h:2026-12-06T09:00:00Z",
        "1h:2026-12-06T10:00:00Z",
    ]
    assert report["requests_read"] == 0 and report["profile_rows"] == 6 and report["alerts"] == []
