"""Hostile input and faults on the real embedded stack (issue 8): nothing stalls, nothing
vanishes, nothing dies silently, exactly one answer per request.

Every scenario gets a stack of its own (killing the session stack's workers would disturb
the other tests); the machinery and the numbers come from `bench.reliability`, which
`python -m bench.reliability` prints as a table. Each test collects every check that failed
and reports them together, so one run shows the whole picture.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from bench.common import BenchStack
from bench.reliability import (
    SDK_GRACE_S,
    broker_restart,
    fresh_starts,
    fuzz,
    hostile_corpus,
    kills,
    running_stack,
)
from ragstream.infra.settings import KafkaSettings
from ragstream.schemas.errors import SchemaViolation
from ragstream.streams.codec import decode
from ragstream.streams.topics import DOCUMENTS, QUERIES
from tests.conftest import processes_using

pytestmark = pytest.mark.integration

FRESH_STARTS = 10


def _no_leftovers(data_dir: Path) -> None:
    deadline = time.monotonic() + 10
    while processes_using(data_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = processes_using(data_dir)
    assert not leftovers, f"`ragstream down` left processes behind: {[p.info['cmdline'] for p in leftovers]}"


@pytest.fixture
def chaos_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BenchStack]:
    """A stack of the test's own, on a fresh data dir, stopped with `ragstream down`. The dir's
    path stays short: Triton's Python backend puts a Unix socket under it (108 bytes at most)."""
    data_dir = tmp_path_factory.mktemp("chaos")
    with running_stack(data_dir) as stack:
        yield stack
    _no_leftovers(data_dir)


def _report(name: str, result: Any) -> str:
    text = json.dumps(asdict(result), indent=1, default=str)
    print(f"\n=== {name}\n{text}")  # shown with -s, and in the failure report
    return text[:6000]


def _check(problems: list[str], ok: bool, what: str) -> None:
    if not ok:
        problems.append(what)


VALID_SHAPED = {
    # Valid events whose content the stage must refuse (dead letter) or cannot route (error).
    ("documents", "unsupported_media_type"),
    ("documents", "empty_text"),
    ("documents", "bad_base64"),
    ("documents", "corrupt_pdf"),
    ("documents", "huge_string"),
    ("queries", "unknown_route"),
}


def test_the_hostile_corpus_is_seeded_and_only_its_valid_shaped_kinds_decode() -> None:
    """No stack: the corpus the fuzz test sends is the same on every run, covers every kind,
    and nothing in it is accidentally a valid event (pydantic's lax mode reads "yes" as true)."""
    limit = KafkaSettings().max_message_bytes
    corpus = hostile_corpus(limit)
    assert [(h.key, h.value) for h in corpus] == [(h.key, h.value) for h in hostile_corpus(limit)]
    assert len(corpus) >= 1000
    assert max(len(h.value or b"") for h in corpus) > limit * 0.9
    assert all(len(h.value or b"") + len(h.key or b"") < limit for h in corpus)
    assert all(h.key is not None or h.value is not None for h in corpus)  # clients refuse those
    kinds = {(h.topic, h.kind) for h in corpus}
    for topic in ("documents", "queries"):
        for kind in ("random_bytes", "empty_value", "null_value", "truncated_json", "deep_whole",
                     "deep_in_field", "huge_string", "huge_array", "invalid_utf8", "wrong_types",
                     "future_schema_version", "unknown_event_type", "extra_fields", "hostile_key"):  # fmt: skip
            assert (topic, kind) in kinds
    assert {("queries", "readable_id_invalid_body"), ("queries", "unknown_route")} <= kinds
    for h in corpus:
        spec = DOCUMENTS if h.topic == "documents" else QUERIES
        if h.kind.startswith("huge_"):
            continue  # decoding them is the stack's job (one takes minutes: an error per item)
        if (h.topic, h.kind) in VALID_SHAPED:
            decode(spec, h.value)
        else:
            with pytest.raises(SchemaViolation):
                decode(spec, h.value)


def test_a_thousand_hostile_messages_are_each_dead_lettered_or_answered_and_nothing_stalls(
    chaos_stack: BenchStack,
) -> None:
    r = fuzz(chaos_stack)
    detail = _report("fuzz", r)
    problems: list[str] = []
    _check(problems, r.sent >= 1000, f"only {r.sent} hostile messages were published")
    _check(
        problems, not r.publish_failed, f"the broker refused {len(r.publish_failed)}: {r.publish_failed[:3]}"
    )
    _check(problems, r.lost == 0, f"{r.lost} lost (no dead letter, no response): {r.lost_by_kind}")
    _check(
        problems,
        r.incomplete == 0,
        f"{r.incomplete} did not get an outcome they are owed: {r.incomplete_by_kind}",
    )
    _check(
        problems,
        r.duplicated == 0,
        f"{r.duplicated} got more than one dead letter or response: {r.duplicated_by_kind}",
    )
    _check(problems, r.not_error == 0, f"{r.not_error} hostile queries were answered with a non-error status")
    _check(
        problems,
        r.canary_documents_indexed == r.canary_documents and r.canary_questions_ok == r.canary_questions,
        f"after them, {r.canary_documents_indexed}/{r.canary_documents} valid documents were indexed and "
        f"{r.canary_questions_ok}/{r.canary_questions} questions answered; stalled: {r.stalled_partitions}",
    )
    _check(problems, not r.restarted, f"workers restarted: {r.restarted} ({r.last_exits})")
    _check(problems, not r.pids_changed, f"processes replaced: {r.pids_changed}")
    _check(problems, not r.crashes, f"crashes in the logs: {r.crashes[:5]}")
    assert not problems, "\n".join(problems) + "\nexamples:\n" + "\n".join(r.examples) + "\n" + detail


def test_kill_9_of_every_worker_under_load_loses_nothing_and_duplicates_nothing(
    chaos_stack: BenchStack,
) -> None:
    r = kills(chaos_stack, rounds=2)
    detail = _report("kills", r)
    problems: list[str] = []
    components = sorted(r.kills_by_component)
    _check(
        problems,
        len(components) >= 3 and all(r.kills_by_component[c] == 2 for c in components),
        f"kills made: {r.kills_by_component}",
    )
    _check(
        problems,
        all(k.recovered_s is not None for k in r.kills),
        f"did not come back: {[k.component for k in r.kills if k.recovered_s is None]}",
    )
    _check(
        problems,
        r.restarts_counted == r.kills_by_component,
        f"restarts counted {r.restarts_counted} for kills {r.kills_by_component}",
    )
    _check(problems, not r.document_load_error, f"publishing documents failed: {r.document_load_error}")
    _check(problems, r.documents >= 20, f"only {r.documents} documents were submitted")
    _check(problems, r.documents_lost == 0, f"{r.documents_lost} of {r.documents} documents lost")
    _check(
        problems,
        not r.documents_wrong_chunks,
        f"{len(r.documents_wrong_chunks)} documents stored with the wrong chunk count: {r.documents_wrong_chunks[:5]}",
    )
    _check(problems, r.duplicate_chunk_rows == 0, f"{r.duplicate_chunk_rows} duplicate chunk rows")
    _check(problems, r.requests >= 200, f"only {r.requests} requests were made")
    _check(problems, r.raised == 0, f"{r.raised} SDK calls raised")
    _check(
        problems,
        r.lost_responses == 0,
        f"{r.lost_responses} of {r.requests} requests have no final response on the topic",
    )
    _check(
        problems,
        r.duplicate_responses == 0,
        f"{r.duplicate_responses} duplicate final responses on {r.requests_with_duplicates} of {r.requests} requests",
    )
    _check(problems, r.real_not_ok == 0, f"{r.real_not_ok} generated answers were not ok: {r.sdk_outcomes}")
    _check(
        problems,
        r.judgements_missing == 0 and r.judgement_duplicates == 0 and r.judged_requests > 0,
        f"judgements: {r.judged_requests} answered requests judged, {r.judgements_missing} never judged, "
        f"{r.judgement_duplicates} (request, judge) pairs with several rows",
    )
    _check(
        problems,
        r.audit_rows_min == r.audit_rows_max == 1,
        f"inference_log rows per request min {r.audit_rows_min} max {r.audit_rows_max} "
        f"({r.audit_missing} missing, {r.audit_duplicated} duplicated)",
    )
    assert not problems, "\n".join(problems) + "\n" + "\n".join(r.examples) + "\n" + detail


def test_a_broker_sigkill_mid_load_answers_every_caller_in_time_and_the_stack_recovers(
    chaos_stack: BenchStack,
) -> None:
    r = broker_restart(chaos_stack)
    detail = _report("broker restart", r)
    problems: list[str] = []
    _check(problems, r.in_flight >= 20, f"only {r.in_flight} questions were in flight")
    _check(
        problems,
        r.late == 0,
        f"{r.late} callers waited past their deadline + {SDK_GRACE_S:g}s grace "
        f"(worst by {r.max_over_deadline_s:.1f}s): {r.outcomes}",
    )
    _check(problems, r.broker_ready_s is not None, "the supervisor did not bring the broker back")
    _check(problems, r.workers_ready_s is not None, "the workers did not become ready again")
    _check(problems, r.recovered_s is not None, f"no question was answered again: {r.recovery_attempts[-3:]}")
    _check(problems, r.document_after.startswith("indexed"), f"a document after recovery: {r.document_after}")
    _check(problems, r.restarts_counted.get("broker") == 1, f"restarts counted: {r.restarts_counted}")
    assert not problems, "\n".join(problems) + "\n" + detail


@pytest.mark.timeout(1200)
def test_ten_fresh_starts_each_process_a_document_and_a_question_without_a_crash(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    work = tmp_path_factory.mktemp("fresh")
    r = fresh_starts(work, FRESH_STARTS)
    detail = _report("fresh starts", r)
    for i in range(FRESH_STARTS):
        _no_leftovers(work / f"fresh-{i}")
    assert len(r.starts) == FRESH_STARTS
    failed = [f"start {i}: {asdict(r.starts[i])}" for i in r.failed]
    assert not failed, f"{len(failed)} of {FRESH_STARTS} fresh starts failed:\n" + "\n".join(failed) + detail
