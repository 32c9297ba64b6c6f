"""Metrics and traces (`ragstream.infra.telemetry`): the `/metrics` server, the trace id of a
request, W3C context through Kafka record headers, and spans exported to a real OTLP/HTTP
endpoint (`otlp_receiver`, tests/conftest.py) by the provider our setup installs."""

from __future__ import annotations

import asyncio
import hashlib
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from ragstream.infra import telemetry
from ragstream.infra.settings import Settings, TelemetrySettings
from ragstream.infra.telemetry import METRIC_NAMES, TRACING, trace_id_for
from ragstream.schemas.events import Event
from ragstream.schemas.queries import QuerySubmitted, ResponseCompleted
from ragstream.streams.codec import encode
from ragstream.streams.runner import Message, StageRunner
from ragstream.streams.topics import QUERIES, RESPONSES
from tests.conftest import OtlpReceiver


def _settings(**telemetry_settings: Any) -> Settings:
    return Settings(telemetry=TelemetrySettings(**telemetry_settings))


@pytest.fixture
def tracing(otlp_receiver: OtlpReceiver) -> Iterator[TracerProvider]:
    """Tracing on in this process, exporting to the session's receiver, off again after."""
    provider = telemetry.setup_tracing(
        _settings(otlp_endpoint=otlp_receiver.url, service_name="ragstream-unit"),
        "unit-test",
        set_global=False,
    )
    assert provider is not None
    try:
        yield provider
    finally:
        telemetry.shutdown_tracing()


class Broker:
    """Stands in for the producer: records every send with its arguments."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    async def send(self, *args: Any) -> Any:
        self.sent.append(args)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


def _answer(q: QuerySubmitted) -> ResponseCompleted:
    return ResponseCompleted(request_id=q.request_id, trace_id=q.request_id, status="ok")


async def _answering(events: Sequence[Event]) -> Sequence[Event]:
    out: list[Event] = []
    for e in events:
        assert isinstance(e, QuerySubmitted)
        out.append(_answer(e))
    return out


def _kafka_round_trip(headers: list[tuple[str, bytes]] | None) -> list[tuple[str, bytes]]:
    """The headers as a consumer reads them back from a Kafka v2 record batch."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    builder.append(0, timestamp=None, key=b"k", value=b"{}", headers=headers or [])
    (record,) = list(DefaultRecordBatch(bytes(builder.build())))
    return list(record.headers)


# -- metrics ---------------------------------------------------------------------------------
def test_the_metrics_server_on_port_0_serves_every_family() -> None:
    telemetry.STAGE_EVENTS.labels("unit", "ok").inc(3)
    telemetry.TRITON_REQUEST_SECONDS.labels("unit-model", "ok").observe(0.02)
    url = telemetry.start_metrics_server(_settings(metrics_port=0))
    assert url is not None and url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    assert not url.startswith("http://127.0.0.1:0/")
    assert telemetry.start_metrics_server(_settings(metrics_port=0)) == url  # once per process
    assert telemetry.metrics_url() == url

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    types = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert set(METRIC_NAMES) <= types, set(METRIC_NAMES) - types
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("ragstream_stage_events_total", (("outcome", "ok"), ("stage", "unit")))] >= 3
    key = ("ragstream_triton_request_seconds_count", (("model", "unit-model"), ("outcome", "ok")))
    assert samples[key] >= 1


def test_metrics_disabled_start_no_server() -> None:
    assert telemetry.start_metrics_server(_settings(metrics_enabled=False)) is None


def test_metric_names_are_the_contract_of_the_dashboards() -> None:
    for name in (
        "ragstream_stage_events_total",
        "ragstream_stage_handle_seconds",
        "ragstream_consumer_lag_messages",
        "ragstream_triton_request_seconds",
        "ragstream_guardrail_verdicts_total",
        "ragstream_judgements_total",
        "ragstream_generated_tokens_total",
        "ragstream_time_to_first_token_seconds",
        "ragstream_audit_rows_total",
        "ragstream_audit_commit_seconds",
        "ragstream_audit_lag_seconds",
        "ragstream_monitor_runs_total",
        "ragstream_monitor_run_seconds",
        "ragstream_alerts_firing",
        "ragstream_dashboard_requests_total",
        "ragstream_dashboard_request_seconds",
    ):
        assert name in METRIC_NAMES
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)


async def test_the_runner_counts_outcomes_per_stage() -> None:
    def value(outcome: str) -> float:
        return float(telemetry.STAGE_EVENTS.labels("count-test", outcome)._value.get())

    before_ok, before_dead = value("ok"), value("dead_lettered")
    runner = StageRunner(Settings(), "count-test", Broker().send)
    q = QuerySubmitted(question="q?")
    good = Message("ragstream.queries", 0, 0, b"k", encode(q))
    junk = Message("ragstream.queries", 0, 1, b"k", b"not json")
    await runner.process_batch(QUERIES, [good, junk], _answering)
    assert value("ok") == before_ok + 1
    assert value("dead_lettered") == before_dead + 1


# -- trace ids and headers ---------------------------------------------------------------------
def test_trace_id_for_is_stable_and_derived_from_the_request_id() -> None:
    tid = trace_id_for("req-123")
    assert tid == hashlib.sha256(b"req-123").hexdigest()[:32]
    assert tid == trace_id_for("req-123") and len(tid) == 32 and int(tid, 16) != 0
    assert trace_id_for("req-124") != tid


def test_tracing_off_installs_nothing_and_adds_no_header() -> None:
    assert telemetry.setup_tracing(_settings(otlp_endpoint=None), "off-test") is None
    assert not TRACING.on and TRACING.tracer is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    # Even inside a valid span (made by someone else's provider), the stages add nothing.
    with trace.use_span(trace.NonRecordingSpan(_context_of("x"))):
        assert telemetry.inject_headers() is None


async def test_tracing_off_the_runner_sends_records_without_headers() -> None:
    assert not TRACING.on
    broker = Broker()
    runner = StageRunner(Settings(), "generate", broker.send)
    q = QuerySubmitted(question="q?")
    message = Message("ragstream.queries", 0, 0, b"k", encode(q))
    outputs = await runner.process_batch(QUERIES, [message], _answering)
    assert [o.headers for o in outputs] == [None]
    await runner.deliver([message], outputs)
    assert [len(args) for args in broker.sent] == [3]  # topic, key, value: no headers argument


def _context_of(request_id: str) -> trace.SpanContext:
    return trace.SpanContext(
        int(trace_id_for(request_id), 16), 0x1234, is_remote=True, trace_flags=trace.TraceFlags(1)
    )


def test_context_survives_a_round_trip_through_kafka_record_headers(tracing: TracerProvider) -> None:
    tracer = tracing.get_tracer("test")
    with tracer.start_as_current_span("producer") as span:
        headers = telemetry.inject_headers()
    assert headers is not None and [k for k, _ in headers] == ["traceparent"]
    read_back = _kafka_round_trip(headers)
    context = telemetry.extract_context(read_back, "ignored: the header wins")
    assert context is not None
    parent = trace.get_current_span(context).get_span_context()
    assert parent.trace_id == span.get_span_context().trace_id
    assert parent.span_id == span.get_span_context().span_id
    assert parent.is_remote and parent.trace_flags.sampled


def test_a_record_without_trace_headers_gets_a_parent_derived_from_its_request_id(
    tracing: TracerProvider,
) -> None:
    context = telemetry.extract_context(_kafka_round_trip(None), "req-abc")
    assert context is not None
    parent = trace.get_current_span(context).get_span_context()
    assert format(parent.trace_id, "032x") == trace_id_for("req-abc")
    assert parent.is_remote and parent.trace_flags.sampled  # ratio 1.0
    again = telemetry.extract_context([], "req-abc")
    assert again is not None
    assert trace.get_current_span(again).get_span_context() == parent  # every stage alike
    assert telemetry.extract_context([("traceparent", b"garbage")], None) is None


# -- spans to a real OTLP/HTTP receiver ------------------------------------------------------------
async def test_two_stages_of_one_request_export_one_trace_to_an_otlp_receiver(
    tracing: TracerProvider, otlp_receiver: OtlpReceiver
) -> None:
    """A query without headers (as a plain Kafka client sends it) through a first stage, its
    output with the headers that stage gave it through a second: both spans reach the
    receiver in the trace of `trace_id_for(request_id)`, the second a child of the first."""
    broker = Broker()
    first = StageRunner(Settings(), "retrieve", broker.send)
    q = QuerySubmitted(question="where is the trace?")
    outputs = await first.process_batch(
        QUERIES, [Message("ragstream.queries", 0, 7, b"k", encode(q))], _answering
    )
    await first.deliver([], outputs)
    ((topic, key, value, headers),) = broker.sent
    assert topic == "ragstream.responses"
    assert dict(headers)["traceparent"].decode().split("-")[1] == trace_id_for(q.request_id)

    async def judge(events: Sequence[Event]) -> Sequence[Event]:
        return []

    second = StageRunner(Settings(), "judge", Broker().send)
    consumed = Message("ragstream.responses", 0, 0, key, value, _kafka_round_trip(headers))
    await second.process_batch(RESPONSES, [consumed], judge)
    telemetry.shutdown_tracing()  # flushes the batch processor

    tid = trace_id_for(q.request_id)
    spans = otlp_receiver.wait_for(
        lambda got: {s.name for s in got if s.trace_id == tid} >= {"ragstream.retrieve", "ragstream.judge"},
        timeout_s=10,
    )
    mine = {s.name: s for s in spans if s.trace_id == tid}
    retrieve, judged = mine["ragstream.retrieve"], mine["ragstream.judge"]
    assert judged.parent_span_id == retrieve.span_id
    assert retrieve.parent_span_id == hashlib.sha256(q.request_id.encode()).digest()[16:24].hex()
    assert retrieve.service == "ragstream-unit" and retrieve.component == "unit-test"
    assert retrieve.attributes["ragstream.request_id"] == q.request_id
    assert retrieve.attributes["messaging.kafka.offset"] == 7
