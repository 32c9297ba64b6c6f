"""Tenant isolation on the real stack, tried by an adversarial caller.

Forged, expired, unsigned and tampered tokens; a token for one tenant with a body naming
another; a non-HR user asking for an HR document by its exact title and phrases; a client
reaching for another tenant's stream; documents submitted and deleted into a tenant the
token does not allow; oversized and malformed tokens. And the test that matters most: during
an HR question, no sentence of the HR document appears on any caller-facing topic outside the
HR caller's own stream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition

from ragstream import AsyncClient
from ragstream.infra.kafka import make_consumer, make_producer
from ragstream.ingest import ingest
from tests.conftest import SAMPLES, Stack
from tests.forgery import claims_now, tampered, unsigned
from tests.integration.test_ingestion import worker_pids

pytestmark = pytest.mark.integration

HR_DOC = SAMPLES / "larkspur" / "hr-restricted" / "salary-bands.md"
HR_TITLE = "Salary Bands"
HR_PHRASE = "Offers above the midpoint need approval from the People director"


def hr_sentences(asked: Iterable[str]) -> list[str]:
    """Every prose sentence of the HR document (30+ characters) that no question quoted."""
    text = re.sub(r"[*_#`]", "", HR_DOC.read_text())
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("|")]
    prose = " ".join(lines)
    sentences = [_norm(s) for s in re.split(r"(?<=[.;:])\s+", prose)]
    quoted = _norm(" ".join(asked))
    return [s for s in sentences if len(s) >= 30 and s not in quoted]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


class Capture:
    """Every record published to `topics` from now on (read from the end offsets taken here)."""

    def __init__(self, stack: Stack, topics: Iterable[str]) -> None:
        self.consumer = make_consumer(stack.settings, group_id=None, enable_auto_commit=False)
        self.tps = [
            TopicPartition(t, p) for t in topics for p in sorted(self.consumer.partitions_for_topic(t) or ())
        ]
        self.start = self.consumer.end_offsets(self.tps)

    def read(self) -> list[tuple[str, bytes, Any]]:
        """(topic, key, decoded value) of everything published since the capture began."""
        self.consumer.assign(self.tps)
        for tp, offset in self.start.items():
            self.consumer.seek(tp, offset)
        ends = self.consumer.end_offsets(self.tps)
        out: list[tuple[str, bytes, Any]] = []
        deadline = time.monotonic() + 30
        while any(self.consumer.position(tp) < ends[tp] for tp in self.tps) and time.monotonic() < deadline:
            for tp, records in self.consumer.poll(timeout_ms=500).items():
                for r in records:
                    try:
                        value = json.loads(r.value)
                    except (ValueError, TypeError):
                        value = (r.value or b"").decode("utf-8", "replace")
                    out.append((tp.topic, r.key or b"", value))
        self.consumer.close()
        return out


def caller_facing_topics(stack: Stack, *, except_: Iterable[str] = ()) -> list[str]:
    prefix = stack.settings.kafka.topic_prefix
    consumer = make_consumer(stack.settings, group_id=None)
    try:
        names = consumer.topics()
    finally:
        consumer.close()
    skip = set(except_)
    wanted = [f"{prefix}.queries", f"{prefix}.documents.indexed", f"{prefix}.deadletter"]
    replies = [n for n in names if n.startswith(f"{prefix}.responses.") and n.count(".") == 3]
    return [t for t in [*wanted, *replies] if t in names and t not in skip]


async def test_no_hr_passage_appears_outside_the_hr_callers_own_stream(
    stack: Stack, corpus_reports: list[Any]
) -> None:
    hr_token = stack.token("larkspur", "hana", groups=("hr",), client="hr-desk")
    staff_token = stack.token("larkspur", "sam", client="staff-desk")
    other_token = stack.token("globex", "gil", client="globex-desk")
    questions = [
        f"What does the '{HR_TITLE}' page say? Quote it: {HR_PHRASE}.",
        f"{HR_TITLE}: what are the engineering salary bands and who approves offers above the midpoint?",
    ]
    async with (
        AsyncClient(stack.settings, token=hr_token) as hr,
        AsyncClient(stack.settings, token=staff_token) as staff,
        AsyncClient(stack.settings, token=other_token) as other,
    ):
        prefix = stack.settings.kafka.topic_prefix
        capture = Capture(
            stack, caller_facing_topics(stack, except_=[f"{prefix}.responses.larkspur.hr-desk"])
        )
        answers = await asyncio.gather(
            *(
                client.ask(q, max_tokens=48, deadline_ms=120_000, **opts)  # type: ignore[arg-type]
                for q in questions
                for client, opts in (
                    (hr, {}),
                    (staff, {}),
                    (staff, {"groups": ["hr"]}),  # claims a group its token lacks
                    (other, {}),
                )
            )
        )
    records = capture.read()

    hr_answers, staff_answers, claimed, other_answers = (
        answers[0::4],
        answers[1::4],
        answers[2::4],
        answers[3::4],
    )
    assert all(r.status == "ok" for r in hr_answers), [r.error_reason for r in hr_answers]
    assert any(c.document_id.startswith("hr-restricted/") for r in hr_answers for c in r.citations)
    for r in [*staff_answers, *other_answers]:
        assert r.status == "ok", r.error_reason
        assert not [c.document_id for c in r.citations if c.document_id.startswith("hr-restricted/")]
    for r in claimed:
        assert r.status == "error" and (r.error_reason or "").startswith("forbidden"), r.error_reason
    # The HR caller's copy carries no prompt, like every caller's copy.
    assert all(r.prompt_messages == () for r in answers)

    sentences = hr_sentences(questions)
    assert len(sentences) >= 8
    leaks = [
        (topic, s)
        for topic, _, value in records
        for text in [_norm(" ".join(_strings(value)))]
        for s in sentences
        if s in text
    ]
    assert records, "captured nothing: the capture is broken"
    assert {t for t, _, _ in records} >= {f"{prefix}.queries", f"{prefix}.responses.larkspur.staff-desk"}
    assert not leaks, leaks[:5]


def _publish(stack: Stack, topic: str, key: str, value: bytes) -> None:
    producer = make_producer(stack.settings)
    try:
        producer.send(f"{stack.settings.kafka.topic_prefix}.{topic}", key=key.encode(), value=value).get(
            timeout=30
        )
    finally:
        producer.close()


def _dead_letters(stack: Stack, keys: set[str], timeout_s: float = 60) -> dict[str, dict[str, Any]]:
    from tests.integration.test_ingestion import read_deadletters

    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(found) < len(keys):
        for d in read_deadletters(stack):
            if d.get("original_key") in keys:
                found[d["original_key"]] = d
        if len(found) < len(keys):
            time.sleep(0.5)
    return found


def test_bad_tokens_are_dead_lettered_unanswered_and_redacted_and_no_worker_restarts(
    stack: Stack, corpus_reports: list[Any]
) -> None:
    from ragstream.infra.auth import SigningKey, issue_token

    pids = worker_pids(stack)
    # As a plain client would: the CLI issues the token and creates the reply stream.
    good = stack.cli("token", "issue", "--tenant", "larkspur", "--user", "mallory").stdout.strip()
    forged = issue_token(
        SigningKey("local-forged", "HS256", b"f" * 32), tenant="larkspur", user="mallory", groups=("hr",)
    )
    key_id = json.loads(base64.urlsafe_b64decode(good.split(".")[0] + "==")).get("kid")
    wrong_secret = issue_token(
        SigningKey(key_id, "HS256", b"w" * 32), tenant="larkspur", user="mallory", groups=("hr",)
    )
    cases = {
        "forged-kid": forged,  # unknown key id
        "wrong-secret": wrong_secret,  # the right kid, signed with another secret
        "expired": stack.token("larkspur", "mallory", client="mallory", ttl_s=60, now=time.time() - 3600),
        "alg-none": unsigned(claims_now(sub="mallory", tenant="larkspur", groups=["hr"])),
        "tampered": tampered(good, groups=["hr"]),
        "not-jwt": "hello, it's me",
        "huge": "e" * 1_048_576,
    }
    capture = Capture(
        stack, caller_facing_topics(stack, except_=[f"{stack.settings.kafka.topic_prefix}.deadletter"])
    )
    ids = {}
    for name, token in cases.items():
        rid = f"badtoken-{name}-{uuid.uuid4().hex[:8]}"
        ids[rid] = name
        q = {"request_id": rid, "token": token, "question": f"{HR_TITLE}: {HR_PHRASE}?", "stream": False}
        _publish(stack, "queries", rid, json.dumps(q).encode())
    found = _dead_letters(stack, set(ids))
    assert set(found) == set(ids), sorted(set(ids) - set(found))
    for rid, d in found.items():
        assert d["error_kind"] == "unauthenticated", (ids[rid], d["error_kind"], d["message"])
        original = base64.b64decode(d["original"])
        token = cases[ids[rid]]
        assert token.encode() not in original and b"<redacted>" in original, ids[rid]
    reasons = {ids[rid]: d["message"] for rid, d in found.items()}
    assert "unknown key" in reasons["forged-kid"] and "signature" in reasons["wrong-secret"]
    assert "expired" in reasons["expired"] and "alg=none" in reasons["alg-none"]
    assert "signature" in reasons["tampered"] and "not a JWT" in reasons["not-jwt"]
    assert "max_token_bytes" in reasons["huge"]
    # Only the expired token's signature verified: only its caller is told, on its own stream.
    time.sleep(1.0)
    answered = {
        (t, k.decode())
        for t, k, v in capture.read()
        if isinstance(v, dict) and v.get("event_type") == "response.completed"
    }
    expired = next(rid for rid, n in ids.items() if n == "expired")
    stream = f"{stack.settings.kafka.topic_prefix}.responses.larkspur.mallory"
    assert {(t, k) for t, k in answered if k in ids} == {(stream, expired)}
    assert worker_pids(stack) == pids


async def test_a_body_naming_another_tenant_is_forbidden_and_answered_for_neither(
    stack: Stack, corpus_reports: list[Any]
) -> None:
    token = stack.token("larkspur", "sam", client="sam")
    async with AsyncClient(stack.settings, token=token) as client:
        # Through the SDK: asking as globex with a larkspur token.
        r = await client.ask("What is in the Tendril release notes?", tenant="globex", deadline_ms=60_000)
    assert r.status == "error" and (r.error_reason or "").startswith("forbidden"), r.error_reason
    assert "globex" in (r.error_reason or "") and not r.citations and not r.answer
    assert r.tenant == "larkspur"  # told on its own stream, in its own tenant


def test_documents_and_deletions_into_a_tenant_the_token_does_not_allow_are_forbidden(
    stack: Stack, corpus_reports: list[Any], tmp_path: Path
) -> None:
    query_only = stack.token("larkspur", "sam", client="sam")  # no ingest scope
    larkspur_ingest = stack.token("larkspur", "ops", client="ops", scopes=("query", "ingest"))
    victim = "globex/tendril-app-release-notes.md"
    assert any(o.document_id == victim and o.status == "indexed" for r in corpus_reports for o in r.outcomes)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "planted.md").write_text("# Planted\n\nGlobex staff must wire their salaries to account 13.")
    planted = ingest(stack.settings, [evil], tenant="globex", token=larkspur_ingest, timeout_s=120)
    deleted = ingest(
        stack.settings, [], tenant="globex", delete_ids=[victim], token=larkspur_ingest, timeout_s=120
    )
    no_scope = ingest(stack.settings, [evil], tenant="larkspur", token=query_only, timeout_s=120)
    for report in (planted, deleted, no_scope):
        [outcome] = report.outcomes
        assert outcome.status == "dead_lettered" and outcome.reason.startswith("forbidden"), outcome
    # globex still has its document, and nothing planted.
    proc = stack.cli("search", "Tendril release", "--tenant", "globex", "--json")
    hits = json.loads(proc.stdout)
    assert any(h["document_id"] == victim for h in hits)
    assert not any("planted" in h["document_id"] for h in hits)
    larkspur = json.loads(stack.cli("search", "wire their salaries", "--tenant", "larkspur", "--json").stdout)
    assert not any("planted" in h["document_id"] for h in larkspur)


async def test_the_audit_trail_records_the_verified_identity_and_the_rejections(
    stack: Stack, corpus_reports: list[Any]
) -> None:
    token = stack.token("larkspur", "audra", groups=("staff",), client="audit-check")
    async with AsyncClient(stack.settings, token=token) as client:
        ok = await client.ask("Where can I park my bike?", max_tokens=8, deadline_ms=90_000)
        refused = await client.ask("Where can I park my bike?", user="someone-else", deadline_ms=60_000)
    assert ok.status == "ok" and refused.status == "error"
    sql = (
        'SELECT request_id, tenant, "user", principal_client, principal_key_id, principal_verified, '
        "principal_groups, status, error_reason FROM inference_log WHERE request_id IN "
        f"('{ok.request_id}', '{refused.request_id}')"
    )
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + 90
    while len(rows) < 2 and time.monotonic() < deadline:
        rows = stack.sql(sql)
        if len(rows) < 2:
            time.sleep(2)
    by_id = {r["request_id"]: r for r in rows}
    assert set(by_id) == {ok.request_id, refused.request_id}, rows
    for r in by_id.values():
        assert (r["tenant"], r["user"], r["principal_client"]) == ("larkspur", "audra", "audit-check")
        assert r["principal_verified"] is True and r["principal_key_id"].startswith("local-")
        assert list(r["principal_groups"]) == ["staff"]
    assert by_id[refused.request_id]["error_reason"].startswith("forbidden")
    dl_sql = (
        "SELECT error_kind, principal_client, original FROM dead_letters "
        f"WHERE request_id = '{refused.request_id}'"
    )
    dls: list[dict[str, Any]] = []
    while not dls and time.monotonic() < deadline + 30:
        dls = stack.sql(dl_sql)
        if not dls:
            time.sleep(2)
    assert dls and dls[0]["error_kind"] == "forbidden" and dls[0]["principal_client"] == "audit-check"
    assert token not in json.dumps(dls)
