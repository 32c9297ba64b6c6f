"""The dashboard's web app (aiohttp): pages, sign-in, static files and errors.

Each page is a GET with query parameters (the range, a tenant, a search) checked by
`params`; its data comes from `data.Warehouse` in a worker thread; its charts are Plotly
specs rendered in the browser by the plotly.js the `plotly` package ships, served from here.
Pages send a Content-Security-Policy that allows scripts from this origin only.

Sign-in uses the platform's own tokens (`ragstream token issue`, or the link `ragstream up`
prints): `/login?token=...` (or the form) verifies the token and keeps it in an HttpOnly,
SameSite=Strict cookie; API clients may send `Authorization: Bearer <token>` instead.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from ragstream.dashboard import charts
from ragstream.dashboard.data import PageData, Scope, Warehouse
from ragstream.dashboard.params import STATUSES, TimeRange, duration_label, parse_params, time_range
from ragstream.infra.auth import TokenVerifier
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import (
    DependencyUnavailable,
    Forbidden,
    InvalidParameter,
    NotFound,
    Unauthenticated,
)

__all__ = ["COOKIE", "PAGES", "create_app"]

log = logging.getLogger(__name__)

COOKIE = "ragstream_dashboard"
PAGES: tuple[tuple[str, str], ...] = (
    ("/", "Overview"),
    ("/guardrails", "Guardrails"),
    ("/judges", "Judges"),
    ("/usage", "Usage"),
    ("/drift", "Drift"),
    ("/alerts", "Alerts"),
    ("/requests", "Requests"),
)
_RANGE_PARAMS = ("range", "since", "until", "tenant")
_RANGES = ("1h", "6h", "24h", "7d", "30d")
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
_SETTINGS = web.AppKey("settings", Settings)
_WAREHOUSE = web.AppKey("warehouse", Warehouse)
_VERIFIER = web.AppKey("verifier", TokenVerifier)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- templates and static files ---------------------------------------------------------
@cache
def _env() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("ragstream.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = _num
    env.filters["when"] = _when
    env.filters["ms"] = lambda v: "–" if v is None else f"{v:,.0f} ms"
    return env


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if digits else (f"{value:,.0f}" if value >= 100 else f"{value:,.3g}")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


@cache
def _plotly_js() -> tuple[str, bytes, bytes]:
    """(version, plotly.min.js, its gzip) from the installed `plotly` package."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    body = path.read_bytes()
    return plotly.__version__, body, gzip.compress(body, compresslevel=6)


def _static(name: str) -> bytes:
    return resources.files("ragstream.dashboard").joinpath("static", name).read_bytes()


def _render(request: web.Request, template: str, *, status: int = 200, **context: Any) -> web.Response:
    settings = request.app[_SETTINGS]
    version = _plotly_js()[0]
    context.setdefault("figures", {})
    html = (
        _env()
        .get_template(template)
        .render(
            pages=PAGES,
            path=request.path,
            plotly_url=f"/static/plotly-{version}.min.js",
            auth_off=settings.auth.mode == "off",
            **context,
        )
    )
    return web.Response(
        text=html, status=status, content_type="text/html", headers={"Content-Security-Policy": _CSP}
    )


# -- identity --------------------------------------------------------------------------
def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.cookies.get(COOKIE) or None


def _scope(request: web.Request) -> Scope:
    """Who is looking, and what they may see.

    Raises:
        Unauthenticated: no token, or one that does not verify.
    """
    settings = request.app[_SETTINGS]
    if settings.auth.mode == "off":
        return Scope(viewer="anyone (auth.mode=off)", tenant=None)
    token = _token(request)
    if not token:
        raise Unauthenticated("sign in with a ragstream token to see the dashboard")
    principal = request.app[_VERIFIER].verify(token)
    if "admin" in principal.scopes:
        return Scope(viewer=f"{principal.user} @ {principal.tenant} (admin)", tenant=None)
    return Scope(
        viewer=f"{principal.user} @ {principal.tenant}", tenant=principal.tenant, user=principal.user
    )


# -- middleware: errors as pages, and metrics --------------------------------------------
@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    page = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except InvalidParameter as exc:
        status = 400
        return _error_page(request, 400, "Bad request", str(exc))
    except NotFound as exc:
        status = 404
        return _error_page(request, 404, "Not found", str(exc))
    except Unauthenticated as exc:
        status = 401
        return _render(
            request,
            "login.html",
            status=401,
            title="Sign in",
            message=str(exc),
            next=_safe_next(request.path_qs),
        )
    except Forbidden as exc:
        status = 403
        return _error_page(request, 403, "Forbidden", str(exc))
    except DependencyUnavailable as exc:
        status = 503
        return _error_page(request, 503, "The audit tables cannot be read right now", str(exc))
    except web.HTTPException as exc:
        status = exc.status
        if exc.status >= 400 and not exc.content_type.startswith("text/html"):
            text = "No such page." if exc.status == 404 else exc.reason
            return _error_page(request, exc.status, exc.reason, text)
        raise
    except Exception:
        log.exception("dashboard page %s failed", request.path)
        return _error_page(
            request, 500, "Internal error", "The page failed; the dashboard's log has the details."
        )
    finally:
        _observe(page, status, time.perf_counter() - started)


def _observe(page: str, status: int, seconds: float) -> None:
    try:
        from ragstream.infra import telemetry
    except ImportError:  # pragma: no cover - telemetry is part of the package
        return
    requests = getattr(telemetry, "DASHBOARD_REQUESTS", None)
    latency = getattr(telemetry, "DASHBOARD_REQUEST_SECONDS", None)
    if requests is not None:
        requests.labels(page=page, code=str(status)).inc()
    if latency is not None:
        latency.labels(page=page).observe(seconds)


def _error_page(request: web.Request, status: int, title: str, message: str) -> web.Response:
    return _render(request, "error.html", status=status, title=title, message=message, code=status)


# -- pages -------------------------------------------------------------------------------
def _page_params(request: web.Request, extra: tuple[str, ...] = ()) -> tuple[dict[str, str], TimeRange]:
    settings = request.app[_SETTINGS].dashboard
    params = parse_params(request.query, (*_RANGE_PARAMS, *extra))
    rng = time_range(params, default_s=settings.default_range_s, max_s=settings.max_range_s)
    return params, rng


def _context(request: web.Request, scope: Scope, params: dict[str, str], rng: TimeRange) -> dict[str, Any]:
    keep = {k: v for k, v in params.items() if k in _RANGE_PARAMS and v}
    return {
        "scope": scope,
        "rng": rng,
        "params": params,
        "ranges": _RANGES,
        "current_range": params.get("range")
        or (None if "since" in params else duration_label(int(rng.seconds))),
        "query_suffix": ("?" + "&".join(f"{k}={quote(v)}" for k, v in keep.items())) if keep else "",
        "tenant": params.get("tenant", ""),
    }


def _page(
    template: str, title: str, figures: Callable[[PageData], dict[str, Any]]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A page of the range, the tenant and charts: `Warehouse.<template name>` gives its data."""
    name = template.removesuffix(".html")

    async def handler(request: web.Request) -> web.Response:
        scope = _scope(request)
        params, rng = _page_params(request)
        fetch = getattr(request.app[_WAREHOUSE], name)
        page: PageData = await asyncio.to_thread(fetch, rng, scope, params.get("tenant") or None)
        return _render(
            request,
            template,
            title=title,
            page=page,
            figures=figures(page),
            **_context(request, scope, params, rng),
        )

    return handler


def _overview_figures(page: PageData) -> dict[str, Any]:
    return {
        "requests": charts.stacked(
            page.series["by_status"],
            x="t",
            group="status",
            y="n",
            title="Requests by status",
            y_title="requests",
        ),
        "latency": charts.lines(
            page.series["latency"],
            x="t",
            ys=("p50", "p95", "ttft_p50"),
            title="Latency (total p50, p95; time to first token p50)",
            y_title="ms",
        ),
        "tokens": charts.lines(
            page.series["tokens"], x="t", ys=("tokens",), title="Tokens", y_title="tokens"
        ),
        "cost": charts.lines(
            page.series["cost"], x="t", ys=("cost",), title="Estimated cost", y_title="cost"
        ),
        "dead_letters": charts.stacked(
            page.series["dead_letters"],
            x="t",
            group="stage",
            y="n",
            title="Dead letters by stage",
            y_title="messages",
        ),
    }


def _guardrails_figures(page: PageData) -> dict[str, Any]:
    return {
        "actions": charts.stacked(
            page.series["actions"],
            x="t",
            group="action",
            y="n",
            title="Findings by action",
            y_title="verdicts",
        ),
        "categories": charts.bars(
            page.series["categories"],
            label="category",
            value="n",
            group="action",
            title="Findings by category",
        ),
    }


def _judges_figures(page: PageData) -> dict[str, Any]:
    return {
        "pass_rate": charts.lines(
            page.series["pass_rate"],
            x="t",
            group="judge",
            y="pass_rate",
            title="Pass rate per judge",
            y_title="pass rate",
            y_range=(0, 1.05),
        ),
        "root_causes": charts.bars(
            page.series["root_causes"], label="root_cause", value="n", title="Root causes of failed answers"
        ),
    }


def _usage_figures(page: PageData) -> dict[str, Any]:
    return {
        "tokens": charts.stacked(
            page.series["tokens_by_route"],
            x="t",
            group="route",
            y="tokens",
            title="Tokens by route",
            y_title="tokens",
        ),
        "cost_tenant": charts.bars(
            page.tables["by_tenant"], label="name", value="estimated_cost", title="Estimated cost by tenant"
        ),
        "cost_user": charts.bars(
            page.tables["by_user"][:15],
            label="name",
            value="estimated_cost",
            title="Estimated cost by user (top 15)",
        ),
    }


overview = _page("overview.html", "Overview", _overview_figures)
guardrails = _page("guardrails.html", "Guardrails", _guardrails_figures)
judges = _page("judges.html", "Judges", _judges_figures)
usage = _page("usage.html", "Usage and cost", _usage_figures)


async def drift(request: web.Request) -> web.Response:
    scope = _scope(request)
    params, rng = _page_params(request, ("granularity",))
    settings = request.app[_SETTINGS]
    choices = [duration_label(g) for g in settings.monitor.granularities_s]
    granularity = params.get("granularity") or choices[0]
    if granularity not in choices:
        raise InvalidParameter(f"granularity={granularity[:16]!r}: one of {', '.join(choices)}")
    page = await asyncio.to_thread(
        request.app[_WAREHOUSE].drift, rng, scope, granularity, params.get("tenant") or None
    )
    figures = {
        "drift": charts.lines(
            page.series["drift"],
            x="t",
            group="name",
            y="value",
            title=f"Drift per {granularity} window",
            y_title="drift",
        )
    }
    ctx = _context(request, scope, params, rng)
    return _render(
        request,
        "drift.html",
        title="Drift",
        page=page,
        figures=figures,
        granularity=granularity,
        granularities=choices,
        **ctx,
    )


async def alerts(request: web.Request) -> web.Response:
    scope = _scope(request)
    params, rng = _page_params(request)
    page = await asyncio.to_thread(request.app[_WAREHOUSE].alerts, rng, scope, params.get("tenant") or None)
    rules = request.app[_SETTINGS].monitor.alerts
    return _render(
        request,
        "alerts.html",
        title="Alerts",
        page=page,
        figures={},
        rules=rules,
        **_context(request, scope, params, rng),
    )


async def requests_page(request: web.Request) -> web.Response:
    scope = _scope(request)
    params, rng = _page_params(request, ("q", "status", "user"))
    limit = request.app[_SETTINGS].dashboard.explorer_limit
    rows = await asyncio.to_thread(
        request.app[_WAREHOUSE].search,
        rng,
        scope,
        q=params.get("q", "").strip(),
        status=params.get("status", ""),
        user=params.get("user", ""),
        tenant=params.get("tenant") or None,
        limit=limit,
    )
    ctx = _context(request, scope, params, rng)
    return _render(
        request,
        "requests.html",
        title="Requests",
        rows=rows,
        limit=limit,
        statuses=STATUSES,
        figures={},
        **ctx,
    )


async def trace_page(request: web.Request) -> web.Response:
    scope = _scope(request)
    parse_params(request.query, ())
    request_id = request.match_info["request_id"]
    found = await asyncio.to_thread(request.app[_WAREHOUSE].trace, request_id, scope)
    row = found["row"]
    latency = _latency_map(row)
    figures = {"waterfall": charts.waterfall(_spans(latency), title="Stages")}
    from ragstream.infra.telemetry import trace_id_for

    trace_id = trace_id_for(request_id)
    template = request.app[_SETTINGS].dashboard.trace_url
    return _render(
        request,
        "trace.html",
        title=f"Request {request_id}",
        request_id=request_id,
        row=row,
        latency=latency,
        verdicts=found["verdicts"],
        judgements=found["judgements"],
        dead_letters=found["dead_letters"],
        trace_id=trace_id,
        trace_link=template.replace("{trace_id}", trace_id) if template else None,
        figures=figures,
        scope=scope,
    )


def _latency_map(row: dict[str, Any]) -> dict[str, float]:
    raw = row.get("latency_ms") or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    out = {str(k): float(v) for k, v in pairs if v is not None}
    for key, value in row.items():
        if key.startswith("latency_") and key.endswith("_ms") and key != "latency_ms" and value is not None:
            out.setdefault(key[len("latency_") : -len("_ms")], float(value))
    return out


def _spans(latency: dict[str, float]) -> list[tuple[str, float, float]]:
    """Where each stage sat in time, from the per-stage durations the workers recorded:
    queueing, then retrieval (embedding and search within it), queueing for generation,
    the prompt, then generation (the first token within it). Stages without a known place
    (guardrail timings and the like) are listed beside the chart, not drawn."""
    spans: list[tuple[str, float, float]] = []
    total = latency.get("total")
    if total is not None:
        spans.append(("total", 0.0, total))
    at = 0.0
    for name in ("queue_retrieval", "retrieval", "queue_generation", "prompt", "generation"):
        duration = latency.get(name)
        if duration is None:
            continue
        spans.append((name, at, duration))
        if name == "retrieval":
            inner = at
            for sub in ("embed_query", "search"):
                if sub in latency:
                    spans.append((f"  {sub}", inner, latency[sub]))
                    inner += latency[sub]
        if name == "generation" and "time_to_first_token" in latency:
            spans.append(("  time_to_first_token", at, latency["time_to_first_token"]))
        at += duration
    if "generation" not in latency and "time_to_first_token" in latency:
        spans.append(("time_to_first_token", at, latency["time_to_first_token"]))
    return spans


# -- sign-in, health, static -------------------------------------------------------------
def _safe_next(target: str | None) -> str:
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def login(request: web.Request) -> web.StreamResponse:
    settings = request.app[_SETTINGS]
    if request.method == "POST":
        form = await request.post()
        token, target = str(form.get("token", "")).strip(), str(form.get("next", "/"))
    else:
        params = parse_params(
            request.query, ("token", "next"), max_chars={"token": settings.auth.max_token_bytes}
        )
        token, target = params.get("token", ""), params.get("next", "/")
    if settings.auth.mode == "off":
        raise web.HTTPSeeOther(_safe_next(target))
    if not token:
        return _render(request, "login.html", title="Sign in", message="", next=_safe_next(target))
    principal = request.app[_VERIFIER].verify(token)
    remaining = (
        (principal.expires_at.timestamp() - time.time())
        if principal.expires_at
        else settings.dashboard.session_ttl_s
    )
    response = web.HTTPSeeOther(_safe_next(target))
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(max(1, min(settings.dashboard.session_ttl_s, remaining))),
        httponly=True,
        samesite="Strict",
        path="/",
        secure=request.secure,
    )
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


async def favicon(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Cache-Control": "public, max-age=86400"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def plotly_js(request: web.Request) -> web.Response:
    version, body, gz = await asyncio.to_thread(_plotly_js)
    if request.match_info["version"] != version:
        raise web.HTTPNotFound()
    headers = {
        "Content-Type": "application/javascript",
        "Cache-Control": "public, max-age=31536000, immutable",
    }
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return web.Response(body=gz, headers=headers)
    return web.Response(body=body, headers=headers)


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    kinds = {"dashboard.js": "application/javascript", "dashboard.css": "text/css"}
    if name not in kinds:
        raise web.HTTPNotFound()
    return web.Response(
        body=_static(name), headers={"Content-Type": kinds[name], "Cache-Control": "no-cache"}
    )


def create_app(settings: Settings) -> web.Application:
    """The dashboard app; nothing is read until a page is asked for."""
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024)
    app[_SETTINGS] = settings
    app[_WAREHOUSE] = Warehouse(settings)
    verifier = TokenVerifier(settings)
    app[_VERIFIER] = verifier

    async def start_verifier(_app: web.Application) -> None:
        if settings.auth.mode != "off":
            await verifier.start()

    async def stop_verifier(_app: web.Application) -> None:
        await verifier.close()

    app.on_startup.append(start_verifier)
    app.on_cleanup.append(stop_verifier)
    app.router.add_get("/", overview)
    app.router.add_get("/guardrails", guardrails)
    app.router.add_get("/judges", judges)
    app.router.add_get("/usage", usage)
    app.router.add_get("/drift", drift)
    app.router.add_get("/alerts", alerts)
    app.router.add_get("/requests", requests_page)
    app.router.add_get("/requests/{request_id}", trace_page)
    app.router.add_route("*", "/login", login)
    app.router.add_get("/logout", logout)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/static/plotly-{version}.min.js", plotly_js)
    app.router.add_get("/static/{name}", static)
    return app
