"""A librdkafka client (confluent-kafka) asks a question through Kafka and gets the answer.

The same round trip as `test_a_plain_kafka_python_client_gets_an_answer`, with the client
connecting as `KafkaConnection.librdkafka_config()` says: the properties documented for
non-Python clients are the ones that work.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from ragstream.infra.kafka import KafkaConnection
from ragstream.schemas.queries import ResponseCompleted
from tests.conftest import Stack

pytestmark = pytest.mark.integration


def test_a_confluent_kafka_client_gets_an_answer(stack: Stack, corpus_reports: list[Any]) -> None:
    from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

    config = KafkaConnection.from_settings(stack.settings.kafka).librdkafka_config()
    token = stack.cli(
        "token", "issue", "--tenant", "larkspur", "--user", "alice", "--client", "rdkafka"
    ).stdout.strip()
    queries, responses = stack.settings.topic("queries"), stack.settings.topic("responses.larkspur.rdkafka")
    request_id = uuid.uuid4().hex

    # Its own reply stream only. No group join (half a session timeout on the embedded broker):
    # assign every partition from its current end. The embedded broker can report an end
    # slightly short, so a few older responses may come first; they are skipped by key.
    consumer = Consumer(
        config
        | {
            "group.id": f"test-confluent-{request_id}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    producer = Producer(config | {"linger.ms": 0})
    try:
        partitions = consumer.list_topics(responses, timeout=30).topics[responses].partitions
        assert partitions, f"{responses} has no partitions"
        starts = []
        for p in sorted(partitions):
            _, high = consumer.get_watermark_offsets(TopicPartition(responses, p), timeout=30)
            starts.append(TopicPartition(responses, p, high))
        consumer.assign(starts)

        delivered: list[Any] = []
        query = {
            "request_id": request_id,
            "token": token,
            "question": "Where can I leave my bicycle at headquarters?",
            "generation": {"max_tokens": 32},
            "stream": False,
        }
        producer.produce(
            queries,
            key=request_id.encode(),
            value=json.dumps(query).encode(),
            on_delivery=lambda err, _msg: delivered.append(err),
        )
        assert producer.flush(30) == 0, "the query was not delivered within 30 s"
        assert delivered == [None], delivered

        answer = None
        deadline = time.monotonic() + 90
        while answer is None and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err
                continue
            if msg.key() == request_id.encode():
                answer = ResponseCompleted.model_validate_json(msg.value())
    finally:
        consumer.close()
        producer.flush(5)

    assert answer is not None, f"no response for {request_id} within 90 s"
    assert answer.status == "ok", answer.error_reason
    assert (answer.tenant, answer.user, answer.prompt_messages) == ("larkspur", "alice", ())
    assert answer.answer.strip()
    assert "public/office-tillbury-guide.html" in [c.document_id for c in answer.citations]
