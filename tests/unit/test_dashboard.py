"""The dashboard's web app, served over real HTTP (aiohttp's test server) on a real SQLite
Iceberg catalog filled with synthetic audit rows: the numbers it shows equal the same SQL,
each viewer sees only what their token allows, and bad input gets a clear 4xx page.
The browser test (charts rendered, no console errors) is tests/integration/test_dashboard.py."""

from __future__ import annotations

import gzip
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bench.synthetic_audit import write_synthetic_audit
from ragstream.dashboard import create_app
from ragstream.dashboard.app import COOKIE, PAGES
from ragstream.dashboard.params import time_range
from ragstream.infra.audit.query import audit_sql
from ragstream.infra.auth import ensure_local_key, issue_token, load_signing_key
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import InvalidParameter

_KPI = re.compile(r'data-kpi="([a-z0-9_]+)" data-value="([^"]*)"')


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    data_dir = tmp_path_factory.mktemp("dashboard")
    s = Settings(data_dir=data_dir, dashboard={"cache_s": 0})  # type: ignore[arg-type]
    ensure_local_key(s.local_key_file)
    now = datetime.now(UTC)
    write_synthetic_audit(s, 3000, start=now - timedelta(hours=20), span_s=19 * 3600, seed=3)
    return s


def _token(settings: Settings, tenant: str, user: str, scopes: tuple[str, ...] = ("query",)) -> str:
    return issue_token(load_signing_key(settings.local_key_file), tenant=tenant, user=user, scopes=scopes)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(settings))) as c:
        yield c


def _kpis(html: str) -> dict[str, str]:
    return dict(_KPI.findall(html))


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _sql_counts(settings: Settings, tenant: str | None = None) -> dict[str, int]:
    rng = time_range({}, default_s=86_400, max_s=86_400 * 90)
    where = f"submitted_at >= '{rng.start.isoformat()}' AND submitted_at < '{rng.end.isoformat()}'"
    if tenant:
        where += f" AND tenant = '{tenant}'"
    row = audit_sql(
        settings,
        f"""SELECT count(*) AS requests, count(*) FILTER (WHERE status = 'ok') AS ok,
                   count(*) FILTER (WHERE status = 'blocked') AS blocked,
                   count(*) FILTER (WHERE status = 'error') AS error,
                   count(*) FILTER (WHERE status = 'no_response') AS no_response,
                   sum(total_tokens) AS total_tokens
            FROM inference_log WHERE {where}""",
    ).to_pylist()[0]
    return {k: int(v) for k, v in row.items()}


async def test_the_admin_overview_shows_the_counts_sql_gives(
    client: TestClient[Any, Any], settings: Settings
) -> None:
    resp = await client.get("/", headers=_bearer(_token(settings, "acme", "ops", ("admin",))))
    assert resp.status == 200
    kpis = _kpis(await resp.text())
    expected = _sql_counts(settings)
    assert expected["requests"] == 3000
    for name, value in expected.items():
        assert int(kpis[name]) == value, name


async def test_a_tenant_token_sees_its_tenant_only(client: TestClient[Any, Any], settings: Settings) -> None:
    token = _token(settings, "globex", "user03")
    resp = await client.get("/", headers=_bearer(token))
    assert resp.status == 200
    kpis = _kpis(await resp.text())
    expected = _sql_counts(settings, "globex")
    assert 0 < expected["requests"] < 3000
    for name, value in expected.items():
        assert int(kpis[name]) == value, name
    # Asking for another tenant is refused, not silently narrowed.
    resp = await client.get("/?tenant=acme", headers=_bearer(token))
    assert resp.status == 403
    assert "sees only tenant 'globex'" in (await resp.text()).replace("&#39;", "'")
    # Every page answers for this viewer.
    for path, _ in PAGES:
        assert (await client.get(path, headers=_bearer(token))).status == 200, path


async def test_the_explorer_shows_a_non_admin_their_own_requests_only(
    client: TestClient[Any, Any], settings: Settings
) -> None:
    token = _token(settings, "globex", "user03")
    html = await (await client.get("/requests?range=24h", headers=_bearer(token))).text()
    ids = re.findall(r'href="/requests/([^"]+)"', html)
    assert ids
    users = audit_sql(
        settings,
        'SELECT DISTINCT tenant, "user" FROM inference_log WHERE request_id IN ('
        + ",".join(f"'{i}'" for i in ids)
        + ")",
    ).to_pylist()
    assert users == [{"tenant": "globex", "user": "user03"}]
    mine = await client.get(f"/requests/{ids[0]}", headers=_bearer(token))
    assert mine.status == 200
    html = await mine.text()
    assert 'data-field="question"' in html
    from ragstream.infra.telemetry import trace_id_for

    assert trace_id_for(ids[0]) in html
    other = audit_sql(
        settings,
        "SELECT request_id FROM inference_log WHERE tenant = 'globex' AND \"user\" <> 'user03' LIMIT 1",
    ).to_pylist()[0]["request_id"]
    resp = await client.get(f"/requests/{other}", headers=_bearer(token))
    assert resp.status == 404  # whether it exists for someone else is not revealed
    admin = _bearer(_token(settings, "acme", "ops", ("admin",)))
    assert (await client.get(f"/requests/{other}", headers=admin)).status == 200


async def test_search_by_words_user_and_status(client: TestClient[Any, Any], settings: Settings) -> None:
    admin = _bearer(_token(settings, "acme", "ops", ("admin",)))
    html = await (await client.get("/requests?q=t%C3%A9l%C3%A9travail&status=ok", headers=admin)).text()
    rows = re.findall(r'<tr><td>[^<]*</td><td><a href="/requests/([^"]+)"', html)
    assert rows
    found = audit_sql(
        settings,
        "SELECT DISTINCT status, question LIKE '%télétravail%' AS hit FROM inference_log WHERE request_id IN ("
        + ",".join(f"'{i}'" for i in rows)
        + ")",
    ).to_pylist()
    assert found == [{"status": "ok", "hit": True}]
    html = await (await client.get("/requests?q=user07", headers=admin)).text()
    assert "user07" in html and "user06" not in html


async def test_sign_in_sets_a_strict_http_only_cookie_and_refuses_open_redirects(
    client: TestClient[Any, Any], settings: Settings
) -> None:
    resp = await client.get("/")
    assert resp.status == 401
    assert 'name="token"' in await resp.text()
    resp = await client.get("/", headers=_bearer("not-a-token"))
    assert resp.status == 401
    token = _token(settings, "acme", "ops", ("admin",))
    resp = await client.get(f"/login?token={token}&next=//evil.example/x", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/"
    cookie = resp.headers["Set-Cookie"]
    assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    resp = await client.get("/judges")  # the client keeps the cookie
    assert resp.status == 200
    resp = await client.post(
        "/login", data={"token": token, "next": "/usage?range=7d"}, allow_redirects=False
    )
    assert resp.status == 303 and resp.headers["Location"] == "/usage?range=7d"
    resp = await client.get("/logout", allow_redirects=False)
    assert resp.status == 303


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("/?range=abc", "range='abc'"),
        ("/?range=999d", "at most 90d"),
        ("/?since=yesterday", "not an ISO-8601 time"),
        ("/?until=2026-01-01T00:00:00Z", "until needs since"),
        ("/?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z", "must be after since"),
        ("/?range=1h&since=2026-01-01T00:00:00Z", "either range or since"),
        ("/?colour=red", "unknown parameter 'colour'"),
        ("/?range=1h&range=6h", "given twice"),
        ("/requests?status=weird", "status='weird'"),
        ("/?tenant=bad%20name", "not a tenant name"),
        ("/drift?granularity=2m", "granularity='2m'"),
        ("/requests?q=" + "x" * 300, "at most 256"),
        ("/requests/has%20space", "not a request id"),
    ],
)
async def test_bad_parameters_get_a_400_page_naming_them(
    client: TestClient[Any, Any], settings: Settings, query: str, message: str
) -> None:
    resp = await client.get(query, headers=_bearer(_token(settings, "acme", "ops", ("admin",))))
    assert resp.status == 400, await resp.text()
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert message in html.replace("&#39;", "'")


async def test_unknown_request_ids_and_pages_are_404_pages(
    client: TestClient[Any, Any], settings: Settings
) -> None:
    admin = _bearer(_token(settings, "acme", "ops", ("admin",)))
    for path in ("/requests/no-such-request", "/nowhere"):
        resp = await client.get(path, headers=admin)
        assert resp.status == 404 and resp.content_type == "text/html", path
        assert 'data-error="404"' in await resp.text()


async def test_pages_load_scripts_from_this_server_only(
    client: TestClient[Any, Any], settings: Settings
) -> None:
    import plotly

    resp = await client.get("/guardrails", headers=_bearer(_token(settings, "acme", "ops", ("admin",))))
    html = await resp.text()
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    sources = re.findall(r'<script[^>]* src="([^"]+)"', html)
    assert sources == [f"/static/plotly-{plotly.__version__}.min.js", "/static/dashboard.js"]
    assert not re.search(r'(src|href)="(https?:)?//', html)
    js = await client.get(sources[0], headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert js.status == 200 and js.headers["Content-Encoding"] == "gzip"
    body = gzip.decompress(await js.read())
    assert b"plotly.js" in body[:2000] and len(body) > 1_000_000
    assert (await client.get("/static/plotly-0.0.0.min.js")).status == 404
    assert (await client.get("/static/../app.py")).status == 404


async def test_metrics_and_health_need_no_token(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/metrics")
    assert resp.status == 200 and "text/plain" in resp.headers["Content-Type"]


async def test_a_reload_sees_rows_appended_since(client: TestClient[Any, Any], settings: Settings) -> None:
    admin = _bearer(_token(settings, "acme", "ops", ("admin",)))
    before = int(_kpis(await (await client.get("/", headers=admin)).text())["requests"])
    write_synthetic_audit(settings, 10, start=datetime.now(UTC) - timedelta(minutes=30), span_s=60, seed=99)
    after = int(_kpis(await (await client.get("/", headers=admin)).text())["requests"])
    assert after == before + 10


def test_relative_ranges_end_on_a_bucket_boundary() -> None:
    now = datetime(2026, 12, 6, 10, 7, 31, tzinfo=UTC)
    rng = time_range({"range": "24h"}, default_s=3600, max_s=86_400 * 7, now=now)
    assert rng.end == datetime(2026, 12, 6, 10, 15, tzinfo=UTC) and rng.bucket_s == 900
    assert rng.label == "24h"
    rng = time_range({}, default_s=3600, max_s=86_400, now=now)
    assert (rng.end - rng.start) == timedelta(hours=1) and rng.bucket_s == 60
    with pytest.raises(InvalidParameter):
        time_range({"range": "0h"}, default_s=3600, max_s=86_400, now=now)


def test_auth_off_serves_everyone_as_admin(tmp_path: Path) -> None:
    from ragstream.dashboard.app import _scope

    class _Req:
        app = {}

    settings = Settings(data_dir=tmp_path, auth={"mode": "off"})  # type: ignore[arg-type]
    app = create_app(settings)
    req: Any = _Req()
    req.app = app
    assert _scope(req).admin


def test_a_malformed_alert_rule_stops_the_dashboard_at_start_naming_the_field(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGSTREAM_")}
    env |= {
        "RAGSTREAM_DATA_DIR": str(tmp_path),
        "RAGSTREAM_MONITOR__ALERTS": json.dumps(
            {"slow": {"metric": "latency_total_ms", "op": "~", "threshold": 1}}
        ),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "ragstream", "dashboard", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "monitor.alerts.slow.op" in proc.stderr and "monitor.alerts.slow.stat" in proc.stderr
