"""One Kafka connection, four client libraries (issue 9).

Every client is built from `KafkaConnection.from_settings(settings.kafka)`: kafka-python (CLI,
tools), aiokafka (SDK client, audit sink), Faust (the workers, through `create_app`) and
librdkafka (confluent-kafka). For each security protocol, each client must connect with that
protocol, the configured SASL mechanism and user, and TLS exactly for SSL and SASL_SSL. Where a
client can be started without a broker, a listener on 127.0.0.1 records the first bytes it
sends: a TLS handshake record (0x16) or a plaintext Kafka request (a 4-byte length).

The bug this guards: the Faust workers ignored `security_protocol`, so with SASL_SSL they
connected as SASL_PLAINTEXT and with SSL they used no TLS at all.
"""

from __future__ import annotations

import datetime
import queue
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import SecretStr

from ragstream.infra.kafka import KafkaConnection, aiokafka_kwargs
from ragstream.infra.settings import KafkaSettings, Settings, load_settings
from ragstream.schemas.errors import ConfigError
from ragstream.streams.app import broker_credentials, broker_url, create_app

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
TLS_PROTOCOLS = {"SSL", "SASL_SSL"}
SASL_PROTOCOLS = {"SASL_PLAINTEXT", "SASL_SSL"}
TLS_RECORD = 0x16  # the first byte of a TLS ClientHello; a Kafka request starts with its length


# -- TLS material ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    client_cert: Path
    client_key: Path
    client_key_encrypted: Path  # password "key-pass"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A self-made CA and a client certificate it signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    root = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> Any:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA256())
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    pem = serialization.Encoding.PEM
    files = TLSFiles(root / "ca.pem", root / "client.pem", root / "client.key", root / "client-encrypted.key")
    files.ca.write_bytes(
        cert("ragstream test CA", ca_key, "ragstream test CA", ca_key, True).public_bytes(pem)
    )
    files.client_cert.write_bytes(
        cert("ragstream-worker", client_key, "ragstream test CA", ca_key, False).public_bytes(pem)
    )
    pkcs8 = serialization.PrivateFormat.PKCS8
    files.client_key.write_bytes(client_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    files.client_key_encrypted.write_bytes(
        client_key.private_bytes(pem, pkcs8, serialization.BestAvailableEncryption(b"key-pass"))
    )
    return files


# -- a listener that records what a client sends first ---------------------------------------
class Sniffer:
    """Accepts connections on 127.0.0.1, keeps the first bytes of each, and hangs up."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.05)  # so that the thread sees `close()` soon
        self.port: int = self._server.getsockname()[1]
        self._seen: queue.Queue[bytes] = queue.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    self._seen.put(conn.recv(8))
                except OSError:
                    self._seen.put(b"")

    def forget(self) -> None:
        while not self._seen.empty():
            self._seen.get_nowait()

    def first_bytes(self) -> bytes:
        return self._seen.get(timeout=10)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._server.close()


@pytest.fixture
def sniffer() -> Iterator[Sniffer]:
    s = Sniffer()
    yield s
    s.close()


def speaks_tls(first: bytes) -> bool:
    assert first, "the client connected but sent nothing"
    return first[0] == TLS_RECORD


# -- settings per protocol -------------------------------------------------------------------
def kafka_settings(protocol: str, tls: TLSFiles, port: int = 19092) -> KafkaSettings:
    kw: dict[str, Any] = {"bootstrap_servers": f"127.0.0.1:{port}", "security_protocol": protocol}
    if protocol in SASL_PROTOCOLS:
        kw |= {"sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "worker", "sasl_password": "s3cret"}
    if protocol in TLS_PROTOCOLS:
        kw["ssl_cafile"] = tls.ca
    return KafkaSettings(**kw)


def settings_for(protocol: str, tls: TLSFiles, data_dir: Path, port: int = 19092) -> Settings:
    return Settings(data_dir=data_dir, kafka=kafka_settings(protocol, tls, port))


def network_client(client: Any) -> Any:
    """aiokafka's connection state of a consumer or producer: what it will connect with."""
    return client._client if hasattr(client, "_client") else client.client


def assert_tls_context(context: Any, protocol: str) -> None:
    if protocol in TLS_PROTOCOLS:
        assert isinstance(context, ssl.SSLContext)
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    else:
        assert context is None


# -- PLAINTEXT stays as it was -----------------------------------------------------------------
def test_plaintext_connections_are_unchanged(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    connection = KafkaConnection.from_settings(settings.kafka)
    assert connection.kafka_python_kwargs() == {
        "bootstrap_servers": ["127.0.0.1:19092"],
        "security_protocol": "PLAINTEXT",
    }
    assert connection.aiokafka_kwargs() == connection.kafka_python_kwargs()
    assert aiokafka_kwargs(settings.kafka) == connection.aiokafka_kwargs()
    assert connection.librdkafka_config() == {
        "bootstrap.servers": "127.0.0.1:19092",
        "security.protocol": "plaintext",
    }
    app = create_app(settings, "test")
    assert app.conf.broker_credentials is None
    assert [str(u) for u in app.conf.broker] == ["kafka://127.0.0.1:19092"]


def test_several_bootstrap_servers_reach_every_client() -> None:
    connection = KafkaConnection.from_settings(KafkaSettings(bootstrap_servers="k1:9092, k2:9093"))
    assert connection.kafka_python_kwargs()["bootstrap_servers"] == ["k1:9092", "k2:9093"]
    assert connection.librdkafka_config()["bootstrap.servers"] == "k1:9092,k2:9093"
    assert broker_url(connection) == "kafka://k1:9092;kafka://k2:9093"


# -- each client, each protocol ------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_kafka_python_clients_connect_as_configured(protocol: str, tls_files: TLSFiles) -> None:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    kwargs = KafkaConnection.from_settings(kafka_settings(protocol, tls_files)).kafka_python_kwargs()
    assert kwargs["security_protocol"] == protocol
    # kafka-python uses a given context as is (its own would differ from aiokafka's).
    assert_tls_context(kwargs.get("ssl_context"), protocol)
    if protocol in SASL_PROTOCOLS:
        assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
        assert kwargs["sasl_plain_username"] == "worker"
        assert kwargs["sasl_plain_password"] == "s3cret"
    else:
        assert not {k for k in kwargs if k.startswith("sasl_")}
    for client in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        assert set(kwargs) <= set(client.DEFAULT_CONFIG), client  # no name kafka-python would reject


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_aiokafka_clients_connect_as_configured(
    protocol: str, tls_files: TLSFiles, sniffer: Sniffer
) -> None:
    """The SDK client and the audit sink build their aiokafka clients from these kwargs."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.errors import KafkaConnectionError

    kwargs = KafkaConnection.from_settings(
        kafka_settings(protocol, tls_files, sniffer.port)
    ).aiokafka_kwargs()
    for client in (AIOKafkaConsumer(**kwargs, group_id=None), AIOKafkaProducer(**kwargs)):
        state = network_client(client)
        assert state._security_protocol == protocol
        assert_tls_context(state._ssl_context, protocol)
        if protocol in SASL_PROTOCOLS:
            assert (state._sasl_mechanism, state._sasl_plain_username) == ("SCRAM-SHA-512", "worker")
        sniffer.forget()
        with pytest.raises(KafkaConnectionError):
            await client.start()
        await client.stop()
        assert speaks_tls(sniffer.first_bytes()) == (protocol in TLS_PROTOCOLS)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_faust_workers_connect_as_configured(
    protocol: str, tls_files: TLSFiles, sniffer: Sniffer, tmp_path: Path
) -> None:
    """With SASL_SSL the workers must not connect as SASL_PLAINTEXT; with SSL they must use TLS."""
    from aiokafka.errors import KafkaConnectionError

    app = create_app(settings_for(protocol, tls_files, tmp_path, sniffer.port), "test")
    # What Faust's aiokafka driver passes to every consumer and producer it creates.
    auth = credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)
    assert auth["security_protocol"] == protocol
    assert_tls_context(auth.get("ssl_context"), protocol)
    if protocol in SASL_PROTOCOLS:
        assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
        assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("worker", "s3cret")
    else:
        assert "sasl_mechanism" not in auth

    # The clients themselves: the stage's consumer (through ragstream's own consumer thread,
    # which also sets the fetch wait) and its producer.
    consumer = app.consumer._new_consumer_thread()._create_worker_consumer(app.transport)
    assert consumer._fetch_max_wait_ms == app.fetch_max_wait_ms
    producer = app.producer._new_producer()
    for client in (consumer, producer):
        assert network_client(client)._security_protocol == protocol
        sniffer.forget()
        with pytest.raises(KafkaConnectionError):
            await client.start()
        await client.stop()
        assert speaks_tls(sniffer.first_bytes()) == (protocol in TLS_PROTOCOLS)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_librdkafka_clients_connect_as_configured(
    protocol: str, tls_files: TLSFiles, sniffer: Sniffer
) -> None:
    import confluent_kafka

    config = KafkaConnection.from_settings(
        kafka_settings(protocol, tls_files, sniffer.port)
    ).librdkafka_config()
    assert config["security.protocol"] == protocol.lower()
    if protocol in TLS_PROTOCOLS:
        assert config["ssl.ca.location"] == str(tls_files.ca)
        assert config["ssl.endpoint.identification.algorithm"] == "https"
    else:
        assert not {k for k in config if k.startswith("ssl.")}
    if protocol in SASL_PROTOCOLS:
        assert (config["sasl.mechanism"], config["sasl.username"], config["sasl.password"]) == (
            "SCRAM-SHA-512",
            "worker",
            "s3cret",
        )
    else:
        assert not {k for k in config if k.startswith("sasl.")}
    # librdkafka rejects unknown properties and unreadable CA files here, and connects at once.
    producer = confluent_kafka.Producer(config | {"log_level": 0})
    try:
        assert speaks_tls(sniffer.first_bytes()) == (protocol in TLS_PROTOCOLS)
    finally:
        producer.flush(0)
        del producer


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_client_agrees(protocol: str, tls_files: TLSFiles, tmp_path: Path) -> None:
    settings = settings_for(protocol, tls_files, tmp_path)
    connection = KafkaConnection.from_settings(settings.kafka)
    faust_auth = credentials_to_aiokafka_auth(create_app(settings, "test").conf.broker_credentials)
    protocols = {
        "kafka-python": connection.kafka_python_kwargs()["security_protocol"],
        "aiokafka": connection.aiokafka_kwargs()["security_protocol"],
        "faust": faust_auth["security_protocol"],
        "librdkafka": connection.librdkafka_config()["security.protocol"].upper(),
    }
    assert set(protocols.values()) == {protocol}, protocols


# -- settings that cannot connect as written fail at start ---------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p"}, "SASL settings"),
        ({"security_protocol": "SSL", "sasl_username": "u"}, "SASL settings"),
        ({"security_protocol": "SASL_SSL", "sasl_username": "u"}, "sasl_username and sasl_password"),
        (
            {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "GSSAPI", "sasl_username": "u"},
            "sasl_mechanism",
        ),
        ({"ssl_cafile": "/etc/ssl/ca.pem"}, "TLS settings"),
        (
            {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_username": "u",
                "sasl_password": "p",
                "ssl_cafile": "/etc/ssl/ca.pem",
            },
            "TLS settings",
        ),
        ({"security_protocol": "SSL", "ssl_keyfile": "/etc/ssl/client.key"}, "need ssl_certfile"),
    ],
)
def test_inconsistent_settings_are_a_config_error(
    fields: dict[str, Any], message: str, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, kafka=KafkaSettings(**fields))
    with pytest.raises(ConfigError, match=message):
        KafkaConnection.from_settings(settings.kafka)
    with pytest.raises(ConfigError, match=message):
        create_app(settings, "test")


def test_a_sasl_protocol_without_a_mechanism_means_plain_everywhere(tmp_path: Path) -> None:
    kafka = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password="p")
    connection = KafkaConnection.from_settings(kafka)
    assert connection.kafka_python_kwargs()["sasl_mechanism"] == "PLAIN"
    assert connection.librdkafka_config()["sasl.mechanism"] == "PLAIN"
    app = create_app(Settings(data_dir=tmp_path, kafka=kafka), "test")
    assert credentials_to_aiokafka_auth(app.conf.broker_credentials)["sasl_mechanism"] == "PLAIN"


def test_an_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    missing = KafkaSettings(security_protocol="SSL", ssl_cafile=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="TLS files"):
        create_app(Settings(data_dir=tmp_path, kafka=missing), "test")
    (tmp_path / "junk.pem").write_text("not a certificate")
    junk = KafkaSettings(security_protocol="SSL", ssl_cafile=tmp_path / "junk.pem")
    with pytest.raises(ConfigError, match="TLS files"):
        KafkaConnection.from_settings(junk).kafka_python_kwargs()


# -- client certificates ------------------------------------------------------------------------
def test_a_client_certificate_reaches_every_client(tls_files: TLSFiles, tmp_path: Path) -> None:
    kafka = KafkaSettings(
        security_protocol="SSL",
        ssl_cafile=tls_files.ca,
        ssl_certfile=tls_files.client_cert,
        ssl_keyfile=tls_files.client_key_encrypted,
        ssl_key_password=SecretStr("key-pass"),
    )
    connection = KafkaConnection.from_settings(kafka)
    assert isinstance(connection.ssl_context(), ssl.SSLContext)  # the key decrypted and matched
    assert (
        connection.librdkafka_config().items()
        >= {
            "ssl.ca.location": str(tls_files.ca),
            "ssl.certificate.location": str(tls_files.client_cert),
            "ssl.key.location": str(tls_files.client_key_encrypted),
            "ssl.key.password": "key-pass",
        }.items()
    )
    import confluent_kafka

    # librdkafka loads (and decrypts) the certificate and key when the client is made.
    confluent_kafka.Producer(
        connection.librdkafka_config() | {"bootstrap.servers": "127.0.0.1:1", "log_level": 0}
    ).flush(0)
    assert create_app(Settings(data_dir=tmp_path, kafka=kafka), "test").conf.broker_credentials is not None


def test_an_encrypted_key_without_its_password_fails_instead_of_prompting(tls_files: TLSFiles) -> None:
    """OpenSSL would otherwise ask on the terminal, and a worker would hang there."""
    for password in (None, SecretStr("wrong")):
        connection = KafkaConnection.from_settings(
            KafkaSettings(
                security_protocol="SSL",
                ssl_certfile=tls_files.client_cert,
                ssl_keyfile=tls_files.client_key_encrypted,
                ssl_key_password=password,
            )
        )
        with pytest.raises(ConfigError, match="TLS files"):
            connection.ssl_context()


def test_tls_settings_come_from_the_environment(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAGSTREAM_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("RAGSTREAM_KAFKA__SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("RAGSTREAM_KAFKA__SASL_USERNAME", "worker")
    monkeypatch.setenv("RAGSTREAM_KAFKA__SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("RAGSTREAM_KAFKA__SSL_CAFILE", str(tls_files.ca))
    monkeypatch.setenv("RAGSTREAM_KAFKA__SSL_CERTFILE", str(tls_files.client_cert))
    monkeypatch.setenv("RAGSTREAM_KAFKA__SSL_KEYFILE", str(tls_files.client_key))
    connection = KafkaConnection.from_settings(load_settings(data_dir=tmp_path).kafka)
    assert (
        connection.librdkafka_config().items()
        >= {
            "security.protocol": "sasl_ssl",
            "sasl.mechanism": "SCRAM-SHA-256",
            "ssl.ca.location": str(tls_files.ca),
            "ssl.certificate.location": str(tls_files.client_cert),
            "ssl.key.location": str(tls_files.client_key),
        }.items()
    )
    assert isinstance(connection.ssl_context(), ssl.SSLContext)


def test_secrets_stay_out_of_reprs(tls_files: TLSFiles) -> None:
    kafka = kafka_settings("SASL_SSL", tls_files)
    connection = KafkaConnection.from_settings(kafka)
    assert "s3cret" not in repr(connection)
    assert "s3cret" not in repr(broker_credentials(connection))
