"""Tenant isolation on the broker: the ACLs, the script that applies them, and the compose wiring.

No broker runs here (the embedded Tansu broker has no ACLs), so these tests ask the ACL model
`ragstream.acls.may()`, which follows Kafka's authorizer rules, the questions that matter:
can a client read someone else's answers, or an internal topic? Can each stage do its job?
They also parse the checked-in script back into ACLs, and check that docker-compose.yml turns
the authorizer on and gives every service its own login with the password the script sets.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from ragstream import acls
from ragstream.acls import (
    ADMIN_USER,
    BROKER_USER,
    MONITOR_USER,
    SINK_USER,
    SUPER_USERS,
    AclBinding,
    Operation,
    PatternType,
    Permission,
    ResourceType,
    client_acls,
    consumer_group,
    may,
    password_env,
    render_service_script,
    service_acls,
    service_users,
    stage_user,
)
from ragstream.acls_cli import acls_app
from ragstream.infra.audit.tables import TABLES
from ragstream.infra.settings import Settings
from ragstream.schemas.identity import Scope
from ragstream.streams.topics import ALL_TOPICS, DEADLETTER, DOCUMENTS, QUERIES, RESPONSES, reply_topic
from ragstream.workers.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
KAFKA_DEPLOY = ROOT / "infra" / "deploy" / "kafka"
SERVICE_SCRIPT = KAFKA_DEPLOY / "service-acls.sh"
P = "ragstream"
ALICE = "User:acme.alice"
ALICE_STREAM = f"{P}.responses.acme.alice"
ALL_OPS = tuple(Operation)
INTERNAL = [spec.full_name(P) for spec in ALL_TOPICS if not spec.caller_facing]


@pytest.fixture(scope="module")
def bindings() -> list[AclBinding]:
    """The services plus a few clients whose names are near-misses of one another."""
    return [
        *service_acls(P),
        *client_acls(P, "acme", "alice", ["query"]),
        *client_acls(P, "acme", "alice2", ["query", "ingest"]),
        *client_acls(P, "other", "alice", ["ingest"]),
        *client_acls(P, "acme", "bob", ["query"]),
    ]


def _may(bindings: list[AclBinding], who: str, op: Operation, topic: str) -> bool:
    return may(bindings, who, op, topic)


# -- clients ----------------------------------------------------------------------------------
def test_a_client_writes_questions_but_reads_no_one_elses(bindings: list[AclBinding]) -> None:
    queries = QUERIES.full_name(P)
    assert _may(bindings, ALICE, Operation.WRITE, queries)
    assert not _may(bindings, ALICE, Operation.READ, queries), "other callers' questions and tokens"
    # Without the ingest scope, no documents either.
    assert not _may(bindings, ALICE, Operation.WRITE, DOCUMENTS.full_name(P))
    assert not _may(bindings, ALICE, Operation.READ, DOCUMENTS.full_name(P))
    assert _may(bindings, "User:acme.alice2", Operation.WRITE, DOCUMENTS.full_name(P))
    assert not _may(bindings, "User:acme.alice2", Operation.READ, DOCUMENTS.full_name(P))


def test_a_client_reads_its_own_reply_stream_and_nobody_elses(bindings: list[AclBinding]) -> None:
    assert _may(bindings, ALICE, Operation.READ, ALICE_STREAM)
    assert _may(bindings, ALICE, Operation.DESCRIBE, ALICE_STREAM)
    for other in (
        f"{P}.responses.acme.alice2",  # a PREFIXED ACL on ...acme.alice would match this
        f"{P}.responses.other.alice",
        f"{P}.responses.acme.bob",
        f"{P}.responses.acme.alice.x",
        f"{P}.responses",  # the internal full record: prompts and passages
        f"{P}.responses.acme",
    ):
        for op in ALL_OPS:
            assert not _may(bindings, ALICE, op, other), f"{ALICE} may {op} {other}"
    # Only the stages write a caller's stream: a client cannot forge its own answers.
    for op in (Operation.WRITE, Operation.CREATE, Operation.DELETE, Operation.ALTER):
        assert not _may(bindings, ALICE, op, ALICE_STREAM)


def test_clients_cannot_touch_internal_topics(bindings: list[AclBinding]) -> None:
    assert INTERNAL and RESPONSES.full_name(P) in INTERNAL and DEADLETTER.full_name(P) in INTERNAL
    clients = {b.principal for b in bindings if not b.principal.startswith("User:ragstream-")}
    assert len(clients) == 4
    for client in clients:
        for topic in INTERNAL:
            for op in ALL_OPS:
                assert not _may(bindings, client, op, topic), f"{client} may {op} {topic}"


def test_no_client_gets_a_prefixed_topic_acl_or_any_cluster_right() -> None:
    scope_sets: list[list[Scope]] = [[], ["query"], ["ingest"], ["query", "ingest", "admin"]]
    for scopes in scope_sets:
        for b in client_acls(P, "acme", "alice", scopes):
            assert b.resource_type is not ResourceType.CLUSTER
            if b.resource_type is ResourceType.TOPIC:
                assert b.pattern is PatternType.LITERAL, b
            assert b.permission is Permission.ALLOW
            assert b.operation in (Operation.READ, Operation.WRITE, Operation.DESCRIBE), b


def test_client_consumer_groups_are_its_own(bindings: list[AclBinding]) -> None:
    def group(who: str, name: str) -> bool:
        return may(bindings, who, Operation.READ, name, ResourceType.GROUP)

    assert group(ALICE, f"{P}.client.acme.alice.dashboard")
    assert not group(ALICE, f"{P}.client.acme.alice2.dashboard")
    assert not group(ALICE, f"{P}.client.other.alice.dashboard")
    assert not group(ALICE, f"{P}.client.acme.alice")
    for stage in STAGES:
        assert not group(ALICE, consumer_group(P, [stage])), "a stage's group: it could steal its input"


def test_client_names_and_scopes_are_checked() -> None:
    # `a.b` + `c` and `a` + `b.c` must not share a principal or a reply stream.
    for tenant, client in (("acme.x", "alice"), ("acme", "al.ice"), ("", "alice"), ("acme", "a" * 65)):
        with pytest.raises(ValueError):
            client_acls(P, tenant, client, ["query"])
    with pytest.raises(ValueError):
        client_acls(P, "acme", "alice", ["superuser"])  # type: ignore[list-item]
    # The admin scope is about ragstream's own monitoring data: nothing on the broker.
    assert client_acls(P, "acme", "alice", ["admin"]) == client_acls(P, "acme", "alice", [])


def test_client_principals_never_collide_with_services() -> None:
    for user in service_users():
        assert "." not in user  # every client principal is `<tenant>.<client>`
    assert acls.client_user("acme", "alice") == "acme.alice"


# -- services ---------------------------------------------------------------------------------
def test_every_stage_may_do_what_its_declaration_says(bindings: list[AclBinding]) -> None:
    for name, stage in STAGES.items():
        user = f"User:{stage_user(name)}"
        assert _may(bindings, user, Operation.READ, stage.consumes.full_name(P)), name
        assert may(bindings, user, Operation.READ, consumer_group(P, [name]), ResourceType.GROUP), name
        for spec in (*stage.produces, DEADLETTER):
            topic = reply_topic(P, "acme.alice") if spec.per_principal else spec.full_name(P)
            assert _may(bindings, user, Operation.WRITE, topic), f"{name} -> {topic}"
            if spec.per_principal:
                assert _may(bindings, user, Operation.CREATE, topic), f"{name} creates {topic} on first use"
        if stage.once_per_request:
            assert _may(bindings, user, Operation.READ, RESPONSES.full_name(P)), f"{name}'s completions gate"


def test_every_stage_may_do_nothing_else(bindings: list[AclBinding]) -> None:
    for name, stage in STAGES.items():
        user = f"User:{stage_user(name)}"
        reads = {stage.consumes.full_name(P)} | (
            {RESPONSES.full_name(P)} if stage.once_per_request else set()
        )
        writes = {s.full_name(P) for s in (*stage.produces, DEADLETTER) if not s.per_principal}
        for spec in ALL_TOPICS:
            topic = spec.full_name(P)
            assert _may(bindings, user, Operation.READ, topic) == (topic in reads), f"{name} reads {topic}"
            assert _may(bindings, user, Operation.WRITE, topic) == (topic in writes), f"{name} writes {topic}"
            for op in (Operation.CREATE, Operation.DELETE, Operation.ALTER, Operation.ALTER_CONFIGS):
                assert not _may(bindings, user, op, topic), f"{name} may {op} {topic}"
        # Nobody but the caller reads a reply stream; only the stages that answer write one.
        assert not _may(bindings, user, Operation.READ, ALICE_STREAM), name
        answers = any(s.per_principal for s in stage.produces)
        assert _may(bindings, user, Operation.WRITE, ALICE_STREAM) == answers, name
        for other in STAGES:
            if other != name:
                group = consumer_group(P, [other])
                assert not may(bindings, user, Operation.READ, group, ResourceType.GROUP), (
                    f"{name} in {group}"
                )
    # The two stages that answer callers: errors from retrieval, deltas and answers from generation.
    answering = {n for n in STAGES if _may(bindings, f"User:{stage_user(n)}", Operation.WRITE, ALICE_STREAM)}
    assert answering == {"retrieve", "generate"}


def test_the_reply_stream_prefix_matches_no_declared_topic() -> None:
    prefixed = [b for b in service_acls(P) if b.pattern is PatternType.PREFIXED]
    assert prefixed and {b.name for b in prefixed} == {f"{P}.responses."}
    for b in prefixed:
        for spec in ALL_TOPICS:
            assert not b.matches(ResourceType.TOPIC, spec.full_name(P)), f"{b.name} matches {spec.name}"


def test_the_audit_sink_reads_its_tables_inputs_and_nothing_else(bindings: list[AclBinding]) -> None:
    user = f"User:{SINK_USER}"
    inputs = {f"{P}.{topic}" for table in TABLES.values() for topic in table.inputs}
    assert inputs == {
        f"{P}.{t}" for t in ("queries", "responses", "documents.indexed", "deadletter", "judgements")
    }
    for spec in ALL_TOPICS:
        topic = spec.full_name(P)
        assert _may(bindings, user, Operation.READ, topic) == (topic in inputs), topic
        assert not _may(bindings, user, Operation.WRITE, topic), topic
    assert not _may(bindings, user, Operation.READ, ALICE_STREAM)
    # No consumer group: it assigns partitions itself and keeps offsets in Iceberg.
    assert not [b for b in service_acls(P) if b.principal == user and b.resource_type is ResourceType.GROUP]


def test_workers_use_no_faust_internal_topics_and_the_group_acls_name(tmp_path: Path) -> None:
    """What the ACLs assume of the Faust app: its group, and no topic of its own to create."""
    from faust.types.enums import ProcessingGuarantee

    from ragstream.workers.main import build_worker_app

    for name, stage in STAGES.items():
        app, _ = build_worker_app(Settings(data_dir=tmp_path), name)
        assert app.conf.id == consumer_group(P, [name])
        assert app.conf.topic_disable_leader, "the assignor leader topic would need CREATE"
        assert not app.conf.topic_allow_declare
        assert not app.tables, "a table's changelog topic would need ACLs"
        # Exactly-once would need TransactionalId ACLs.
        guarantee: Any = app.conf.processing_guarantee
        assert guarantee is ProcessingGuarantee.AT_LEAST_ONCE
        subscribed = {t for agent in app.agents.values() for t in agent.channel.topics}
        assert subscribed == {stage.consumes.full_name(P)}


def test_strangers_may_nothing_and_super_users_anything(bindings: list[AclBinding]) -> None:
    for stranger in ("User:ANONYMOUS", "User:mallory", "User:acme", "User:ragstream"):
        for topic in [*INTERNAL, QUERIES.full_name(P), DOCUMENTS.full_name(P), ALICE_STREAM]:
            assert not _may(bindings, stranger, Operation.DESCRIBE, topic)
            assert not _may(bindings, stranger, Operation.WRITE, topic)
    assert set(SUPER_USERS) == {f"User:{ADMIN_USER}", f"User:{BROKER_USER}"}
    assert _may(bindings, f"User:{ADMIN_USER}", Operation.DELETE, RESPONSES.full_name(P))


def test_may_follows_kafkas_matching_rules() -> None:
    def b(name: str, op: Operation, pattern: PatternType = PatternType.LITERAL, **kw: Any) -> AclBinding:
        return AclBinding(
            kw.get("who", "User:u"), ResourceType.TOPIC, pattern, name, op, kw.get("perm", Permission.ALLOW)
        )

    def ask(rules: list[AclBinding], op: Operation, topic: str, who: str = "User:u") -> bool:
        return may(rules, who, op, topic, super_users=())

    assert ask([b("t", Operation.READ)], Operation.READ, "t")
    assert not ask([b("t", Operation.READ)], Operation.READ, "t2"), "literal is exact"
    assert ask([b("t", Operation.READ, PatternType.PREFIXED)], Operation.READ, "t2"), "prefixed is startswith"
    assert not ask([b("t.", Operation.READ, PatternType.PREFIXED)], Operation.READ, "t")
    assert ask([b("*", Operation.WRITE)], Operation.WRITE, "anything"), "literal * is every topic"
    assert ask([b("t", Operation.READ, who="User:*")], Operation.READ, "t"), "User:* is everyone"
    assert not ask([b("t", Operation.READ, who="User:v")], Operation.READ, "t")
    assert ask([b("t", Operation.ALL)], Operation.DELETE, "t")
    # READ, WRITE, DELETE and ALTER imply DESCRIBE, and nothing implies anything else.
    for op in (Operation.READ, Operation.WRITE, Operation.DELETE, Operation.ALTER):
        assert ask([b("t", op)], Operation.DESCRIBE, "t"), op
    assert not ask([b("t", Operation.DESCRIBE)], Operation.READ, "t")
    assert not ask([b("t", Operation.CREATE)], Operation.DESCRIBE, "t")
    assert not ask([b("t", Operation.WRITE)], Operation.READ, "t")
    assert ask([b("t", Operation.ALTER_CONFIGS)], Operation.DESCRIBE_CONFIGS, "t")
    # DENY wins over ALLOW, for its own operation (or ALL) only.
    deny = Permission.DENY
    rules = [b("t", Operation.ALL), b("t", Operation.READ, PatternType.PREFIXED, perm=deny)]
    assert not ask(rules, Operation.READ, "t")
    assert ask(rules, Operation.WRITE, "t")
    assert not ask([b("t", Operation.READ), b("*", Operation.ALL, perm=deny)], Operation.READ, "t")
    assert not ask([], Operation.DESCRIBE, "t"), "no ACL found: denied"
    assert may([], "User:root", Operation.ALL, "t", super_users=("User:root",))


# -- the script that applies them -------------------------------------------------------------
def _parse_acl_lines(script: str) -> list[AclBinding]:
    """The ACLs `kafka-acls.sh --add` lines create: every operation on every resource listed."""
    out: list[AclBinding] = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if not words or not words[0].endswith("/kafka-acls.sh"):
            continue
        assert "--add" in words and words.count("--command-config") == 1, line
        pairs = list(zip(words[1::1], words[2::1], strict=False))
        principals = [v for k, v in pairs if k == "--allow-principal"]
        assert "--deny-principal" not in words
        ops = [Operation(v) for k, v in pairs if k == "--operation"]
        resources = [(ResourceType(k[2:].upper()), v) for k, v in pairs if k in ("--topic", "--group")]
        pattern = PatternType(dict(pairs)["--resource-pattern-type"])
        assert principals and ops and resources, line
        out += [AclBinding(p, rt, pattern, n, op) for p in principals for rt, n in resources for op in ops]
    return out


def test_checked_in_service_script_is_what_the_code_renders() -> None:
    assert SERVICE_SCRIPT.read_text() == render_service_script(Settings().kafka.topic_prefix), (
        "regenerate: ragstream acls service > infra/deploy/kafka/service-acls.sh"
    )
    result = CliRunner().invoke(acls_app, ["service", "--prefix", P])
    assert result.exit_code == 0, result.output
    assert result.stdout == SERVICE_SCRIPT.read_text()


def test_the_script_grants_exactly_the_service_acls() -> None:
    script = SERVICE_SCRIPT.read_text()
    assert sorted(set(_parse_acl_lines(script))) == service_acls(P)
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script


def test_the_script_creates_every_service_user_with_its_password_from_the_env() -> None:
    script = SERVICE_SCRIPT.read_text()
    created = {}
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0].endswith("/kafka-configs.sh"):
            pairs = dict(zip(words[1::1], words[2::1], strict=False))
            assert pairs["--entity-type"] == "users" and "--alter" in words
            created[pairs["--entity-name"]] = pairs["--add-config"]
    assert set(created) == set(service_users()) == {*(stage_user(s) for s in STAGES), SINK_USER, MONITOR_USER}
    for user, config in created.items():
        env = password_env(user)
        # No password in the file: the shell expands it, and stops if it is unset.
        assert config == f"SCRAM-SHA-512=[password=${{{env}:?set {env}}}]", user


def test_client_onboarding_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["client", "--tenant", "acme", "--client", "alice", "--scope", "query", "--prefix", P]
    result = runner.invoke(acls_app, args, env={"RAGSTREAM_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    script = result.stdout
    assert sorted(set(_parse_acl_lines(script))) == client_acls(P, "acme", "alice", ["query"])
    assert "--entity-name acme.alice" in script
    assert "SCRAM-SHA-512=[password=${KAFKA_CLIENT_PASSWORD:?set KAFKA_CLIENT_PASSWORD}]" in script
    create = next(shlex.split(x) for x in script.splitlines() if "kafka-topics.sh" in x)
    assert create[create.index("--topic") + 1] == ALICE_STREAM
    assert create[create.index("--partitions") + 1] == "1"
    assert "--create" in create and "--if-not-exists" in create
    for bad in (["--client", "al.ice"], ["--client", "alice", "--password-env", "X; rm -rf /"]):
        bad_args = ["client", "--tenant", "acme", *bad, "--prefix", P]
        bad_result = runner.invoke(acls_app, bad_args, env={"RAGSTREAM_DATA_DIR": str(tmp_path)})
        assert bad_result.exit_code != 0, bad


# -- docker-compose ---------------------------------------------------------------------------
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: Any) -> str:
    """Compose's `${NAME:-default}` with an empty environment, as a fresh checkout runs it."""
    return _VAR.sub(lambda m: m.group(2) or "", str(value)).replace("$$", "$")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: _interpolate(v) for k, v in service.get("environment", {}).items()}


def _server_properties(env: dict[str, str]) -> dict[str, str]:
    """The broker config the apache/kafka image renders from KAFKA_* (KafkaDockerWrapper)."""
    skip = {"KAFKA_VERSION", "KAFKA_HEAP_OPTS", "KAFKA_LOG4J_OPTS", "KAFKA_OPTS", "KAFKA_JMX_OPTS"}
    skip |= {"KAFKA_JVM_PERFORMANCE_OPTS", "KAFKA_GC_LOG_OPTS", "KAFKA_LOG4J_ROOT_LOGLEVEL"}
    skip |= {"KAFKA_LOG4J_LOGGERS", "KAFKA_TOOLS_LOG4J_LOGLEVEL", "KAFKA_JMX_HOSTNAME"}
    props = {}
    for key, value in env.items():
        if key.startswith("KAFKA_") and key not in skip:
            name = key.removeprefix("KAFKA_").lower().replace("_", ".").replace("...", "-").replace("..", "_")
            props[name] = value
    return props


def test_the_broker_authenticates_everyone_and_denies_without_an_acl(
    services: dict[str, dict[str, Any]],
) -> None:
    props = _server_properties(_env(services["kafka"]))
    assert props["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert set(props["super.users"].split(";")) == set(SUPER_USERS)
    protocols = dict(item.split(":") for item in props["listener.security.protocol.map"].split(","))
    listeners = [item.split("://")[0] for item in props["listeners"].split(",")]
    assert {protocols[name] for name in listeners} == {"SASL_PLAINTEXT"}, "no unauthenticated listener"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    # The broker itself logs in as a super user on the controller and inter-broker listeners.
    controller = props["controller.listener.names"].lower()
    assert props["sasl.mechanism.controller.protocol"] == "PLAIN"
    assert props[f"listener.name.{controller}.sasl.enabled.mechanisms"] == "PLAIN"
    jaas = props[f"listener.name.{controller}.plain.sasl.jaas.config"]
    assert f'username="{BROKER_USER}"' in jaas and f"user_{BROKER_USER}=" in jaas
    inter = props["inter.broker.listener.name"].lower()
    assert props["sasl.mechanism.inter.broker.protocol"] == "SCRAM-SHA-512"
    assert f'username="{BROKER_USER}"' in props[f"listener.name.{inter}.scram-sha-512.sasl.jaas.config"]
    for name in listeners:
        if name.lower() != controller:
            key = f"listener.name.{name.lower()}.scram-sha-512.sasl.jaas.config"
            assert "ScramLoginModule required" in props[key], name
    # Secrets for the start script stay out of the broker properties.
    assert not [k for k in props if "password" in k]


def test_every_ragstream_service_logs_in_as_its_own_principal(services: dict[str, dict[str, Any]]) -> None:
    acl_job = _env(services["kafka-acls"])
    logins: dict[str, str] = {}
    for name, service in services.items():
        env = _env(service)
        if not any(k.startswith("RAGSTREAM_") for k in env):
            continue
        if name == "dashboard":
            # It reads Iceberg only: no Kafka principal, so no Kafka password to leak.
            assert "RAGSTREAM_KAFKA__SASL_PASSWORD" not in env
            continue
        assert env["RAGSTREAM_KAFKA__SECURITY_PROTOCOL"] == "SASL_PLAINTEXT", name
        assert env["RAGSTREAM_KAFKA__SASL_MECHANISM"] == "SCRAM-SHA-512", name
        user, password = env["RAGSTREAM_KAFKA__SASL_USERNAME"], env["RAGSTREAM_KAFKA__SASL_PASSWORD"]
        assert password, name
        logins[name] = user
        if name.startswith("worker-"):
            assert user == stage_user(name.removeprefix("worker-")), name
        elif name.startswith("audit-sink"):
            assert user == SINK_USER, name
        elif name == "monitor":
            assert user == MONITOR_USER, name
        else:
            assert name == "ragstream-init" and user == ADMIN_USER, name
        if user == ADMIN_USER:
            assert (
                password == acl_job["SCRAM_ADMIN_PASSWORD"] == _env(services["kafka"])["SCRAM_ADMIN_PASSWORD"]
            )
        else:
            # The password the ACL job sets for the user is the one the service logs in with.
            assert acl_job[password_env(user)] == password, name
    workers = {n: u for n, u in logins.items() if n.startswith("worker-")}
    assert len(set(workers.values())) == len(workers) == len(STAGES), "one principal per stage"
    assert set(logins.values()) == {*service_users(), ADMIN_USER}
    passwords = [acl_job[password_env(u)] for u in service_users()]
    assert len(set(passwords)) == len(passwords), "each service its own password"


def test_workers_start_after_the_acl_job_which_runs_the_checked_in_script(
    services: dict[str, dict[str, Any]],
) -> None:
    job = services["kafka-acls"]
    assert job["image"] == services["kafka"]["image"], "the broker's own tools"
    assert job.get("restart") == "no"
    assert job["command"] == ["bash", "/opt/ragstream/kafka/service-acls.sh"]
    assert "./infra/deploy/kafka:/opt/ragstream/kafka:ro" in job["volumes"]
    assert job["depends_on"]["kafka"]["condition"] == "service_healthy"
    env = _env(job)
    assert env["KAFKA_ADMIN_CONFIG"] == "/opt/ragstream/kafka/admin.properties"
    needed = set(re.findall(r"\$\{(\w+):\?", SERVICE_SCRIPT.read_text()))
    assert needed and needed <= env.keys()
    for name, service in services.items():
        if name.startswith(("worker-", "audit-sink", "monitor")):
            assert service["depends_on"]["kafka-acls"]["condition"] == "service_completed_successfully", name


def test_admin_client_config_holds_no_secret(services: dict[str, dict[str, Any]]) -> None:
    props = dict(
        line.split("=", 1)
        for line in (KAFKA_DEPLOY / "admin.properties").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert props["security.protocol"] == "SASL_PLAINTEXT" and props["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (
        props["config.providers.env.class"] == "org.apache.kafka.common.config.provider.EnvVarConfigProvider"
    )
    assert f'username="{ADMIN_USER}" password="${{env:SCRAM_ADMIN_PASSWORD}}"' in props["sasl.jaas.config"]
    assert "SCRAM_ADMIN_PASSWORD" in _env(services["kafka"])
    assert "/opt/ragstream/kafka/admin.properties" in " ".join(services["kafka"]["healthcheck"]["test"])


def _fake_kafka(tmp_path: Path, services: dict[str, dict[str, Any]]) -> tuple[dict[str, str], Path]:
    calls = tmp_path / "calls"
    tool = tmp_path / "kafka-storage.sh"
    # Records its arguments and the config it was given, and marks the directory formatted.
    tool.write_text(
        "#!/usr/bin/env bash\n"
        'printf "%s\\n" "$@" >> "$CALLS"\n'
        'while [[ $# -gt 0 ]]; do if [[ $1 == --config ]]; then cp "$2" "$CALLS.properties"; fi; shift; done\n'
        'touch "$KAFKA_LOG_DIRS/meta.properties"\n'
    )
    tool.chmod(0o755)
    data = tmp_path / "data"
    data.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        **_env(services["kafka"]),
        "KAFKA_LOG_DIRS": str(data),
        "STORAGE_TOOL": str(tool),
        "IMAGE_START": "/bin/true",
        "CALLS": str(calls),
    }
    return env, calls


def test_kafka_start_formats_the_storage_with_the_admin_and_broker_users(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    kafka = services["kafka"]
    assert kafka["command"] == ["bash", "/opt/ragstream/kafka/start-kafka.sh"]
    assert "./infra/deploy/kafka:/opt/ragstream/kafka:ro" in kafka["volumes"]
    env, calls = _fake_kafka(tmp_path, services)
    start = ["bash", str(KAFKA_DEPLOY / "start-kafka.sh")]
    subprocess.run(start, env=env, check=True, timeout=60, capture_output=True)

    args = calls.read_text().splitlines()
    assert args[0] == "format" and args[args.index("--cluster-id") + 1] == env["CLUSTER_ID"]
    scram = [args[i + 1] for i, a in enumerate(args) if a == "--add-scram"]
    assert scram == [
        f"SCRAM-SHA-512=[name={ADMIN_USER},password={env['SCRAM_ADMIN_PASSWORD']}]",
        f"SCRAM-SHA-512=[name={BROKER_USER},password={env['SCRAM_BROKER_PASSWORD']}]",
    ]
    # Formatted with the config the image itself renders from the same variables.
    formatted = dict(
        line.split("=", 1) for line in Path(f"{calls}.properties").read_text().splitlines() if line
    )
    assert formatted == _server_properties(env)

    # Formatted once: a restart leaves the stored users alone.
    calls.unlink()
    subprocess.run(start, env=env, check=True, timeout=60, capture_output=True)
    assert not calls.exists()


def test_the_monitor_may_publish_alerts_and_nothing_else() -> None:
    from ragstream.acls import monitor_acls

    acls = monitor_acls(P)
    assert [(a.principal, a.name, a.operation) for a in acls] == [
        (f"User:{MONITOR_USER}", f"{P}.alerts", Operation.WRITE)
    ]
    assert set(acls) <= set(service_acls(P))
