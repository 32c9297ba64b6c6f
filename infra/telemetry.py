"""Prometheus metrics and OpenTelemetry traces: every metric object, the `/metrics` server,
and trace context across stages in Kafka headers.

Metrics: the objects below are the only ones ragstream defines (`METRIC_NAMES` lists their
names as Prometheus shows them). Each process serves them with `start_metrics_server`; the
dashboard serves them itself. prometheus-client keeps them in its process-wide registry.

Traces are off unless `telemetry.otlp_endpoint` is set. Off, nothing is installed: the
OpenTelemetry API stays a no-op, and the stages skip header inject/extract behind one
`if TRACING.on` (see docs/observability.md for the measured cost). On, `setup_tracing`
installs an SDK `TracerProvider` (batched OTLP/HTTP export, parent-based ratio sampling), and
each stage opens one span per event (`ragstream.<stage>`), child of the W3C `traceparent` in
the consumed record's headers. A record without one (plain Kafka clients publish queries
without headers) gets a parent derived from its request id (`trace_id_for`), so every stage
of one request lands in the same trace, and the request id alone finds it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

from ragstream.infra.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "ALERTS_FIRING",
    "AUDIT_COMMIT_SECONDS",
    "AUDIT_LAG",
    "AUDIT_ROWS",
    "CONSUMER_LAG",
    "DASHBOARD_REQUESTS",
    "DASHBOARD_REQUEST_SECONDS",
    "GENERATED_TOKENS",
    "GUARDRAIL_VERDICTS",
    "JUDGEMENTS",
    "METRIC_NAMES",
    "MONITOR_RUNS",
    "MONITOR_RUN_SECONDS",
    "STAGE_EVENTS",
    "STAGE_HANDLE_SECONDS",
    "TIME_TO_FIRST_TOKEN",
    "TRACING",
    "TRITON_REQUEST_SECONDS",
    "ConsumedHeaders",
    "Headers",
    "caller_headers",
    "child_span",
    "extract_context",
    "inject_headers",
    "metrics_url",
    "setup_tracing",
    "shutdown_tracing",
    "start_metrics_server",
    "start_child_span",
    "start_stage_span",
    "trace_id_for",
]

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
"""Kafka record headers as aiokafka and Faust take them: `[(name, value), ...]`."""
ConsumedHeaders = Sequence[tuple[str, bytes]] | Mapping[str, bytes]
"""Headers of a consumed record, as a client hands them over."""

# -- metrics ---------------------------------------------------------------------------------
_FAST_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SLOW_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

STAGE_EVENTS = Counter(
    "ragstream_stage_events_total",
    "Events a stage finished, by outcome: ok (handled, outputs made), dead_lettered, "
    "retried (one per retry attempt), failed (publishing gave up; the worker restarts and "
    "the event is consumed again), skipped (already answered: the exactly-once gate).",
    ["stage", "outcome"],
)
STAGE_HANDLE_SECONDS = Histogram(
    "ragstream_stage_handle_seconds",
    "Time a stage's handle() took on one batch (one event on the query path), retries included.",
    ["stage"],
    buckets=_FAST_S,
)
CONSUMER_LAG = Gauge(
    "ragstream_consumer_lag_messages",
    "Records on the stage's input partition after its committed offset (highwater - committed).",
    ["stage", "topic", "partition"],
)
TRITON_REQUEST_SECONDS = Histogram(
    "ragstream_triton_request_seconds",
    "Triton calls: an embedding request, or a whole generation stream, by outcome "
    "(ok, error, timeout, cancelled).",
    ["model", "outcome"],
    buckets=_FAST_S,
)
GUARDRAIL_VERDICTS = Counter(
    "ragstream_guardrail_verdicts_total",
    "Verdicts of the guardrails, one per rail and check (allow included).",
    ["direction", "rail", "action"],
)
JUDGEMENTS = Counter(
    "ragstream_judgements_total",
    "Judgements published by the judge stage (rating yes, no, or error when the judge gave none).",
    ["judge", "rating"],
)
GENERATED_TOKENS = Counter(
    "ragstream_generated_tokens_total",
    "Completion tokens of final responses, by route.",
    ["route"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "ragstream_time_to_first_token_seconds",
    "From the start of generation to the first text released to the caller, by route.",
    ["route"],
    buckets=_FAST_S,
)
AUDIT_ROWS = Counter(
    "ragstream_audit_rows_total",
    "Rows the audit sink committed to an Iceberg table.",
    ["table"],
)
AUDIT_COMMIT_SECONDS = Histogram(
    "ragstream_audit_commit_seconds",
    "Time of one Iceberg commit of the audit sink (append with offsets).",
    ["table"],
    buckets=_FAST_S,
)
AUDIT_LAG = Gauge(
    "ragstream_audit_lag_seconds",
    "Age (since its event was produced) of the oldest row of the table's last commit when "
    "it landed; 0 after a commit without rows.",
    ["table"],
)
MONITOR_RUNS = Counter(
    "ragstream_monitor_runs_total",
    "Monitoring runs, by outcome (ok, failed).",
    ["outcome"],
)
MONITOR_RUN_SECONDS = Histogram(
    "ragstream_monitor_run_seconds",
    "Time of one monitoring run.",
    buckets=_SLOW_S,
)
ALERTS_FIRING = Gauge(
    "ragstream_alerts_firing",
    "1 while an alert rule fires, 0 once it resolved (set when this monitor process publishes a change).",
    ["alert", "severity"],
)
DASHBOARD_REQUESTS = Counter(
    "ragstream_dashboard_requests_total",
    "Requests the dashboard served, by page and HTTP status code.",
    ["page", "code"],
)
DASHBOARD_REQUEST_SECONDS = Histogram(
    "ragstream_dashboard_request_seconds",
    "Time the dashboard took to serve a page.",
    ["page"],
    buckets=_FAST_S,
)

_ALL = (
    STAGE_EVENTS,
    STAGE_HANDLE_SECONDS,
    CONSUMER_LAG,
    TRITON_REQUEST_SECONDS,
    GUARDRAIL_VERDICTS,
    JUDGEMENTS,
    GENERATED_TOKENS,
    TIME_TO_FIRST_TOKEN,
    AUDIT_ROWS,
    AUDIT_COMMIT_SECONDS,
    AUDIT_LAG,
    MONITOR_RUNS,
    MONITOR_RUN_SECONDS,
    ALERTS_FIRING,
    DASHBOARD_REQUESTS,
    DASHBOARD_REQUEST_SECONDS,
)


def _exposed_name(metric: Counter | Gauge | Histogram) -> str:
    family = next(iter(metric.describe()))
    return f"{family.name}_total" if family.type == "counter" else family.name


METRIC_NAMES: tuple[str, ...] = tuple(_exposed_name(m) for m in _ALL)
"""Every metric family ragstream defines, as the text exposition's `# TYPE` lines (and
PromQL) name them: counters with their `_total`, histograms without `_bucket`/`_sum`/`_count`."""


# -- the /metrics server -----------------------------------------------------------------------
_server_lock = threading.Lock()
_server_url: str | None = None


def start_metrics_server(settings: Settings) -> str | None:
    """Serve this process's metrics on `telemetry.metrics_host:metrics_port` (0: any free
    port); returns the URL to scrape, or None when `telemetry.metrics_enabled` is false.

    Once per process: a second call returns the first server's URL.

    Raises:
        OSError: the port cannot be bound.
    """
    global _server_url
    t = settings.telemetry
    if not t.metrics_enabled:
        return None
    with _server_lock:
        if _server_url is None:
            from prometheus_client import start_http_server

            server, _thread = start_http_server(t.metrics_port, t.metrics_host)
            port = int(server.server_address[1])
            host = "127.0.0.1" if t.metrics_host in ("0.0.0.0", "") else t.metrics_host
            host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
            _server_url = f"http://{host}:{port}/metrics"
            log.info("metrics on %s", _server_url)
        return _server_url


def metrics_url() -> str | None:
    """The URL `start_metrics_server` returned in this process (None before, or when off)."""
    return _server_url


# -- traces ------------------------------------------------------------------------------------
class _Tracing:
    """Whether this process traces. `on` is the one check the hot paths make."""

    __slots__ = ("on", "provider", "ratio", "tracer")

    def __init__(self) -> None:
        self.on = False
        self.tracer: Tracer | None = None
        self.provider: TracerProvider | None = None
        self.ratio = 1.0


TRACING = _Tracing()
"""This process's tracing state; `TRACING.on` is false until `setup_tracing` installs a provider."""

_TRACEPARENT = "traceparent"
_TRACESTATE = "tracestate"


def setup_tracing(settings: Settings, component: str, *, set_global: bool = True) -> TracerProvider | None:
    """Install tracing for this process when `telemetry.otlp_endpoint` is set; else nothing.

    The provider batches spans to `<otlp_endpoint>/v1/traces` (OTLP/HTTP protobuf), samples
    new traces at `trace_sample_ratio` and follows the parent's decision otherwise; its
    resource is `service.name` = `telemetry.service_name`, `service.instance.id` = `component`.
    `set_global=False` leaves the OpenTelemetry API's global provider alone (tests).
    """
    t = settings.telemetry
    if not t.otlp_endpoint:
        return None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create(
            {
                "service.name": t.service_name,
                "service.instance.id": component,
                "ragstream.component": component,
            }
        ),
        sampler=ParentBased(TraceIdRatioBased(t.trace_sample_ratio)),
    )
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=t.otlp_endpoint.rstrip("/") + "/v1/traces"))
    )
    if set_global:
        trace.set_tracer_provider(provider)
    TRACING.provider = provider
    TRACING.tracer = provider.get_tracer("ragstream")
    TRACING.ratio = t.trace_sample_ratio
    TRACING.on = True
    log.info("tracing to %s/v1/traces (sample ratio %g)", t.otlp_endpoint.rstrip("/"), t.trace_sample_ratio)
    return provider


def shutdown_tracing() -> None:
    """Export what is buffered and turn tracing off in this process."""
    provider, TRACING.provider = TRACING.provider, None
    TRACING.on = False
    TRACING.tracer = None
    if provider is not None:
        provider.shutdown()


def trace_id_for(request_id: str) -> str:
    """The trace id (32 hex characters) of a request whose records carry no trace context:
    the first 16 bytes of sha256(request id). Stable across processes and runs."""
    return hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:32]


def _header_text(headers: ConsumedHeaders | None) -> dict[str, str]:
    if not headers:
        return {}
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for name, value in items:
        key = name.lower() if isinstance(name, str) else str(name).lower()
        if key in (_TRACEPARENT, _TRACESTATE) and value is not None:
            out[key] = value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)
    return out


@functools.cache
def _propagator() -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def _derived_context(request_id: str) -> Context:
    """A remote parent for a request that arrived without trace context: trace id from
    `trace_id_for`, span id from the next 8 bytes of the hash, sampled by the same rule as
    `TraceIdRatioBased` (so every stage of the request decides alike)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    digest = hashlib.sha256(request_id.encode("utf-8")).digest()
    trace_id = int.from_bytes(digest[:16], "big")
    span_id = int.from_bytes(digest[16:24], "big") or 1
    sampled = (trace_id & 0xFFFFFFFFFFFFFFFF) < TraceIdRatioBased.get_bound_for_rate(TRACING.ratio)
    context = SpanContext(
        trace_id=trace_id,
        span_id=span_id,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
    )
    return trace.set_span_in_context(NonRecordingSpan(context))


def extract_context(headers: ConsumedHeaders | None, request_id: str | None) -> Context | None:
    """The parent context of a consumed record: its `traceparent`/`tracestate` headers, else
    one derived from `request_id`, else None (a new trace)."""
    from opentelemetry import trace

    carrier = _header_text(headers)
    if _TRACEPARENT in carrier:
        context = _propagator().extract(carrier)
        if trace.get_current_span(context).get_span_context().is_valid:
            return context  # type: ignore[no-any-return]
    return _derived_context(request_id) if request_id else None


def inject_headers(span: Span | None = None) -> list[tuple[str, bytes]] | None:
    """Headers carrying `span`'s context (default: the current one); None when tracing is
    off or there is no valid span."""
    if not TRACING.on:
        return None
    from opentelemetry import trace

    context = trace.set_span_in_context(span) if span is not None else None
    carrier: dict[str, str] = {}
    _propagator().inject(carrier, context=context)
    return [(k, v.encode("latin-1")) for k, v in carrier.items()] or None


def caller_headers() -> list[tuple[str, bytes]] | None:
    """Headers carrying the caller's current span, whatever provider made it (the SDK client
    puts a query into the application's trace); None without a valid current span."""
    from opentelemetry import trace

    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _propagator().inject(carrier)
    return [(k, v.encode("latin-1")) for k, v in carrier.items()] or None


def start_stage_span(
    stage: str,
    headers: ConsumedHeaders | None,
    request_id: str | None,
    attributes: Mapping[str, str | int] | None = None,
) -> Span:
    """Start (not activate) the span `ragstream.<stage>` for one consumed event; the caller
    ends it. Only call it with `TRACING.on`."""
    from opentelemetry.trace import SpanKind

    tracer = TRACING.tracer
    if tracer is None:
        raise RuntimeError("start_stage_span called with tracing off")
    return tracer.start_span(
        f"ragstream.{stage}",
        context=extract_context(headers, request_id),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    )


def start_child_span(name: str, **attributes: str | int | float) -> Span | None:
    """Start (not activate) a span under the current one, for work that spans several
    awaits of a generator (a generation stream); None while tracing is off. End it."""
    tracer = TRACING.tracer
    if not TRACING.on or tracer is None:
        return None
    return tracer.start_span(name, attributes=attributes)


@contextlib.contextmanager
def child_span(name: str, **attributes: str | int | float) -> Iterator[Span | None]:
    """A span under the current one while tracing is on (Triton calls, guardrail checks);
    nothing at all when it is off."""
    tracer = TRACING.tracer
    if not TRACING.on or tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name, attributes=attributes) as span:
        yield span
