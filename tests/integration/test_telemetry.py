"""Metrics and traces on the real embedded stack (the session's `stack`, whose processes
export spans to the session's `otlp_receiver`): every component's `/metrics`, found through
its heartbeat, shows the work it did; one question is one trace across the stages."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ragstream.client import AsyncClient
from ragstream.infra.telemetry import METRIC_NAMES, trace_id_for
from ragstream.schemas.queries import ResponseCompleted
from tests.conftest import OtlpReceiver, ReceivedSpan, Stack

pytestmark = pytest.mark.integration

QUESTION = "How many days of holiday do I get each year?"


def _heartbeats(stack: Stack) -> dict[str, dict[str, Any]]:
    out = {}
    for path in stack.settings.run_dir.glob("worker-*.json"):
        beat = json.loads(path.read_text())
        out[str(beat["stage"])] = beat
    return out


def _scrape(url: str) -> tuple[set[str], dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The families a `/metrics` page declares, and its samples by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    types = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return types, samples


def _total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(
        v for (n, ls), v in samples.items() if n == name and all((k, v2) in ls for k, v2 in labels.items())
    )


async def _ask(stack: Stack) -> ResponseCompleted:
    async with AsyncClient(stack.settings) as client:
        r = await client.ask(QUESTION, tenant="larkspur", top_k=3, max_tokens=24, deadline_ms=90_000)
    assert r.status == "ok", r.error_reason
    return r


async def test_every_component_serves_metrics_that_show_its_work(
    stack: Stack, corpus_reports: list[Any]
) -> None:
    await _ask(stack)
    beats = _heartbeats(stack)
    stages = ("ingest", "embed", "index", "judge", "retrieve", "generate")
    for name in (*stages, "monitor"):
        assert str(beats[name].get("metrics_url", "")).startswith("http://127.0.0.1:"), (name, beats[name])
    sinks = [b for b in beats.values() if "tables" in b]
    assert sinks and all(str(b.get("metrics_url", "")).startswith("http://") for b in sinks)

    query_path = beats["retrieve"]["metrics_url"]
    assert beats["generate"]["metrics_url"] == query_path  # one process, one server
    families, samples = _scrape(query_path)
    assert set(METRIC_NAMES) <= families
    for stage in ("retrieve", "generate"):
        assert _total(samples, "ragstream_stage_events_total", stage=stage, outcome="ok") > 0, stage
        assert _total(samples, "ragstream_stage_handle_seconds_count", stage=stage) > 0, stage
    assert _total(samples, "ragstream_triton_request_seconds_count", outcome="ok") > 0
    assert _total(samples, "ragstream_guardrail_verdicts_total", direction="input") > 0
    assert _total(samples, "ragstream_time_to_first_token_seconds_count") > 0
    assert any(n == "ragstream_consumer_lag_messages" for n, _ in samples)

    _, doc_samples = _scrape(beats["ingest"]["metrics_url"])
    for stage in ("ingest", "embed", "index"):
        assert _total(doc_samples, "ragstream_stage_events_total", stage=stage, outcome="ok") > 0, stage
    assert _total(doc_samples, "ragstream_triton_request_seconds_count", outcome="ok") > 0

    # The sinks commit every `audit.flush_interval_s`: the corpus' ingestion rows, the answer.
    deadline = time.monotonic() + 60
    while True:
        rows = sum(_total(_scrape(b["metrics_url"])[1], "ragstream_audit_rows_total") for b in sinks)
        commits = sum(
            _total(_scrape(b["metrics_url"])[1], "ragstream_audit_commit_seconds_count") for b in sinks
        )
        if rows > 0 and commits > 0:
            break
        assert time.monotonic() < deadline, f"no audit rows committed: rows={rows} commits={commits}"
        time.sleep(1.0)

    monitor_families, _ = _scrape(beats["monitor"]["metrics_url"])
    assert "ragstream_monitor_runs_total" in monitor_families

    status = stack.cli("status").stdout
    assert f"metrics={query_path}" in status, status


def _by_name(spans: list[ReceivedSpan], trace_id: str) -> dict[str, list[ReceivedSpan]]:
    out: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        if s.trace_id == trace_id:
            out.setdefault(s.name, []).append(s)
    return out


async def test_one_question_is_one_trace_across_the_stages(
    stack: Stack, corpus_reports: list[Any], otlp_receiver: OtlpReceiver
) -> None:
    """The SDK client publishes the query without trace context (no span is active here), so
    its trace is `trace_id_for(request_id)`: retrieval is a child of the parent derived from
    the request id, generation a child of retrieval (through the retrievals record's
    headers), and the input guardrails and Triton calls children of retrieval."""
    r = await _ask(stack)
    tid = trace_id_for(r.request_id)
    spans = otlp_receiver.wait_for(
        lambda got: {"ragstream.retrieve", "ragstream.generate"} <= set(_by_name(got, tid)),
        timeout_s=60,
        where=f"for request {r.request_id}",
    )
    mine = _by_name(spans, tid)
    (retrieve,) = mine["ragstream.retrieve"]
    (generate,) = mine["ragstream.generate"]
    assert retrieve.parent_span_id == hashlib.sha256(r.request_id.encode()).digest()[16:24].hex()
    assert generate.parent_span_id == retrieve.span_id
    assert retrieve.attributes["ragstream.request_id"] == r.request_id
    assert retrieve.component == "worker-retrieve+generate" and retrieve.service == "ragstream"
    assert any(s.parent_span_id == retrieve.span_id for s in mine.get("ragstream.guardrails.input", ()))
    assert any(s.parent_span_id == retrieve.span_id for s in mine.get("triton.infer", ()))
    assert any(s.parent_span_id == generate.span_id for s in mine.get("triton.generate", ()))
    # The judge (another process) consumes the response generation published: same trace.
    judged = otlp_receiver.wait_for(
        lambda got: "ragstream.judge" in _by_name(got, tid), timeout_s=120, where="of the judge"
    )
    (judge,) = _by_name(judged, tid)["ragstream.judge"]
    assert judge.parent_span_id == generate.span_id
    assert judge.component == "worker-ingest+embed+index+judge"
