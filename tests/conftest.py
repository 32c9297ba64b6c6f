"""Shared fixtures.

`stack` starts the real embedded stack once per test session, through the real commands
(`ragstream up --detach`, `ragstream down`), on free ports and a temporary data dir, and
checks at the end that `down` left no process behind. Its processes export their spans to
`otlp_receiver`, a real OTLP/HTTP endpoint in the test process (tracing costs little, and
one stack start is spared).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest

from ragstream.infra.settings import Settings
from ragstream.stack import free_ports

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "corpus"
CORPORA = [
    (SAMPLES / "larkspur" / "public", "larkspur", ()),
    (SAMPLES / "larkspur" / "hr-restricted", "larkspur", ("hr",)),
    (SAMPLES / "globex", "globex", ()),
]


def free_port() -> int:
    return free_ports(1)[0]


@dataclass
class Stack:
    settings: Settings
    env: dict[str, str]

    def cli(
        self, *args: str, timeout_s: float = 600, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`ragstream ARGS` against this stack; `env` adds to (or overrides) its environment."""
        proc = subprocess.run(
            [sys.executable, "-m", "ragstream", *args],
            env=self.env | (env or {}),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=REPO,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ragstream {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def sql(self, query: str) -> list[dict[str, Any]]:
        """`ragstream sql QUERY --format json` against this stack, as row dicts."""
        out = self.cli("sql", query, "--format", "json").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]  # JSON lines

    def token(
        self,
        tenant: str,
        user: str,
        *,
        groups: tuple[str, ...] = (),
        client: str | None = None,
        scopes: tuple[str, ...] = ("query",),
        ttl_s: float = 3600.0,
        now: float | None = None,
    ) -> str:
        """A token signed with the stack's local key, as `ragstream token issue` prints."""
        from ragstream.infra.auth import issue_token, load_signing_key

        key = load_signing_key(self.settings.local_key_file)
        return issue_token(
            key, tenant=tenant, user=user, groups=groups, client=client, scopes=scopes, ttl_s=ttl_s, now=now
        )


SESSION_RAIL_BUDGET_MS = 6000.0
TEST_KEYWORD = "the"
"""The word the `test-keywords` policy blocks in answers (every English answer has it)."""


def _test_policies() -> dict[str, str]:
    """The default policies plus three a test request may choose: the default rails failing
    open, PII masking of answers only (so a number in a passage reaches the model), and an
    output keyword rail."""
    from ragstream.infra.settings import GuardrailsSettings

    policies = {k: v.model_dump(mode="json") for k, v in GuardrailsSettings().policies.items()}
    default = policies["default"]
    # The session stack shares CI's two cores with workers that neighbouring tests kill and
    # restart (spaCy and the guard head loading at once): there a 2 s budget made fail-closed
    # rails block the next test's good questions. These tests are about what the rails decide;
    # the rails' latency is measured by `make bench` (bench.guard_latency) with the default.
    for rails in (default["input"], default["context"], default["output"]):
        for rail in rails.values():
            rail["budget_ms"] = SESSION_RAIL_BUDGET_MS
    fail_open = json.loads(json.dumps(default))
    for direction in ("input", "context", "output"):
        for rail in fail_open[direction].values():
            rail["fail"] = "open"
    policies["test-fail-open"] = fail_open
    policies["test-output-pii"] = {"output": {"pii": default["output"]["pii"]}, "output_window_chars": 24}
    policies["test-keywords"] = {
        "output": {"keywords": {"action": "block", "keywords": [TEST_KEYWORD]}},
        "output_window_chars": 24,
    }
    return {
        "RAGSTREAM_GUARDRAILS__POLICIES": json.dumps(policies),
        "RAGSTREAM_GUARDRAILS__REQUEST_MAY_CHOOSE": json.dumps(
            ["test-fail-open", "test-output-pii", "test-keywords"]
        ),
    }


def stack_env(data_dir: Path) -> dict[str, str]:
    from ragstream.stack import isolated_env

    return isolated_env(data_dir, RAGSTREAM_LOG_LEVEL="INFO", COLUMNS="200", **_test_policies())


def settings_from_env(env: dict[str, str]) -> Settings:
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def processes_using(data_dir: Path) -> list[psutil.Process]:
    """Processes whose command line or environment points into the data dir."""
    found = []
    needle = str(data_dir)
    for p in psutil.process_iter(["cmdline", "pid"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if (
                needle in cmd
                or needle in str(p.environ().get("RAGSTREAM_DATA_DIR", ""))
                or needle in str(p.environ().get("RAGSTREAM_CONFIG_FILE", ""))
            ):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as an OTLP/HTTP exporter sent it (ids as lowercase hex)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    service: str
    component: str
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0


class OtlpReceiver:
    """A real OTLP/HTTP trace endpoint: `POST /v1/traces` with an `ExportTraceServiceRequest`
    (protobuf, gzip or not). Every span received is kept in `spans`."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                receiver._take(body)
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                    ExportTraceServiceResponse,
                )

                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _take(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        got: list[ReceivedSpan] = []
        for rs in request.resource_spans:
            resource = {kv.key: _any_value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    got.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            service=str(resource.get("service.name", "")),
                            component=str(resource.get("service.instance.id", "")),
                            attributes={kv.key: _any_value(kv.value) for kv in span.attributes},
                            status_code=int(span.status.code),
                        )
                    )
        with self._lock:
            self.requests += 1
            self.spans.extend(got)

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout_s: float, where: str = ""
    ) -> list[ReceivedSpan]:
        """The spans received so far, once `predicate` holds for them.

        Raises:
            AssertionError: it did not hold within `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no such spans {where} after {timeout_s:.0f}s; got "
                    f"{[(s.name, s.trace_id) for s in spans][-20:]}"
                )
            time.sleep(0.2)


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, otlp_receiver: OtlpReceiver) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("ragstream-data")
    env = stack_env(data_dir) | {"RAGSTREAM_TELEMETRY__OTLP_ENDPOINT": otlp_receiver.url}
    s = Stack(settings_from_env(env), env)
    try:
        s.cli("up", "--detach", timeout_s=300)
    except BaseException:
        s.cli("down", check=False)
        for log in sorted((data_dir / "logs").glob("*.log")):
            sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}\n")
        raise
    yield s
    s.cli("down", timeout_s=120)
    deadline = time.monotonic() + 10
    while processes_using(data_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = processes_using(data_dir)
    assert not leftovers, f"`ragstream down` left processes behind: {[p.info['cmdline'] for p in leftovers]}"


@pytest.fixture(scope="session")
def corpus_reports(stack: Stack) -> list[Any]:
    """The sample corpus, ingested once through Kafka (tenants and groups as in samples/)."""
    from ragstream.ingest import ingest

    return [ingest(stack.settings, [root], tenant=t, groups=g, timeout_s=300) for root, t, g in CORPORA]
