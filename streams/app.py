"""The Faust app factory.

One app per stage (`{prefix}-{stage}` is its consumer group), so stages scale and restart
independently. Values travel as raw bytes and are decoded by `ragstream.streams.codec`
inside the stage runner: that way a malformed message becomes a dead-letter record instead
of an exception inside Faust's deserialiser.

Fetch wait: Faust hardcodes `fetch_max_wait_ms=1500` for its consumer. A broker that does
not wake a parked fetch when data arrives (the embedded Tansu broker) then adds up to 1.5 s
per hop. `RagstreamApp` uses a transport whose consumer applies
`settings.kafka.fetch_max_wait_ms` instead - a subclass, not a monkeypatch.
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from ragstream.infra.kafka import KafkaConnection
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import ConfigError
from ragstream.streams.topics import TopicSpec

__all__ = ["RagstreamApp", "broker_credentials", "broker_url", "create_app"]

log = logging.getLogger(__name__)


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        wait_ms = getattr(self.app, "fetch_max_wait_ms", None)
        if wait_ms is not None:
            # aiokafka reads this when it builds its Fetcher in start(); we are before start().
            if not hasattr(consumer, "_fetch_max_wait_ms"):
                raise ConfigError("this aiokafka version has no _fetch_max_wait_ms; pin aiokafka 0.14")
            consumer._fetch_max_wait_ms = int(wait_ms)
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> Any:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class RagstreamApp(faust.App):
    """A Faust app whose Kafka consumer honours our fetch wait."""

    fetch_max_wait_ms: int | None = None

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)

    def _new_producer_transport(self) -> Any:
        return _Transport(self.conf.broker_producer, self)


def create_app(
    settings: Settings, stage: str, *, fetch_max_wait_ms: int | None = None, **conf: Any
) -> RagstreamApp:
    """Build (but do not start) the Faust app of one stage.

    `fetch_max_wait_ms` defaults to `settings.kafka.fetch_max_wait_ms`. The app connects as
    `KafkaConnection.from_settings(settings.kafka)` says, like every other client.

    Raises:
        ConfigError: the Kafka connection settings are inconsistent or its TLS files unreadable.
    """
    kafka = settings.kafka
    connection = KafkaConnection.from_settings(kafka)
    datadir = settings.data_dir / "run" / "faust" / stage
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = RagstreamApp(
        f"{kafka.topic_prefix}-{stage}",
        broker=broker_url(connection),
        broker_credentials=broker_credentials(connection),
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=kafka.session_timeout_s,
        broker_heartbeat_interval=kafka.heartbeat_interval_s,
        broker_max_poll_records=500,
        consumer_max_fetch_size=kafka.max_message_bytes,
        producer_max_request_size=kafka.max_message_bytes,
        producer_acks=-1,
        producer_linger_ms=0,
        web_enabled=False,
        web_bind="127.0.0.1",
        autodiscover=False,
        datadir=str(datadir),
        **conf,
    )
    app.fetch_max_wait_ms = kafka.fetch_max_wait_ms if fetch_max_wait_ms is None else fetch_max_wait_ms
    return app


def faust_topic(app: RagstreamApp, settings: Settings, spec: TopicSpec) -> Any:
    return app.topic(
        spec.full_name(settings.kafka.topic_prefix),
        key_type=bytes,
        value_type=bytes,
        value_serializer="raw",
        key_serializer="raw",
        partitions=settings.kafka.partitions,
    )


def broker_url(connection: KafkaConnection) -> str:
    """Faust's `broker` setting. The scheme picks the aiokafka transport; it carries no
    security (Faust has no TLS scheme): that is `broker_credentials`' job."""
    return ";".join(f"kafka://{server}" for server in connection.bootstrap_servers)


def broker_credentials(connection: KafkaConnection) -> Any:
    """Faust's `broker_credentials` setting: None, `SSLCredentials` or `SASLCredentials`.

    Faust derives aiokafka's `security_protocol` from the credentials' type
    (`faust.transport.drivers.aiokafka.credentials_to_aiokafka_auth`), not from a setting:
    no credentials mean PLAINTEXT, and `SASLCredentials` mean SASL_PLAINTEXT unless they hold
    an `ssl_context`. So TLS must travel inside the credentials.

    Raises:
        ConfigError: the TLS files cannot be loaded.
    """
    context = connection.ssl_context()
    if connection.uses_sasl:
        password = connection.sasl_password
        return faust.SASLCredentials(
            username=connection.sasl_username,
            password=None if password is None else password.get_secret_value(),
            mechanism=connection.sasl_mechanism,
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None
