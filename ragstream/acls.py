"""Who may do what on the broker: Kafka principals and ACLs, derived from the code's declarations.

The bindings are computed, not hand-kept: each stage's `consumes`/`produces`/`once_per_request`
(`workers.stages.STAGES`), the reply-stream topic (`streams.topics.REPLIES`, one per principal)
and the audit tables' inputs (`infra.audit.tables.TABLES`). A new stage or topic changes them
with no edit here, and `tests/unit/test_acls.py` asks questions of the result with `may()`.

Principals (SASL/SCRAM usernames; Kafka's principal is `User:<username>`):
- `ragstream-<stage>`, one per stage: READ its input topic and its consumer group
  (`<prefix>-<stage>`, the Faust app id), WRITE its output topics and the dead-letter topic.
  Request stages (`once_per_request`) also READ the internal `responses` topic: their
  `CompletedRequests` gate tails it, with no consumer group. A stage that publishes to reply
  streams gets CREATE and WRITE on the PREFIXED pattern `<prefix>.responses.` (trailing dot:
  it does not match the internal `<prefix>.responses`), since it creates a caller's stream on
  first use.
- `ragstream-sink`: READ the topics its tables are built from. No group: the sink assigns
  partitions itself and keeps its offsets in the Iceberg snapshots.
- `<tenant>.<client>`, one per client: WRITE `queries` (scope `query`) and `documents` (scope
  `ingest`), READ its own reply stream (a LITERAL ACL: a PREFIXED one on `...acme.alice`
  would also match `...acme.alice2`), and READ consumer groups under
  `<prefix>.client.<tenant>.<client>.` for plain Kafka consumers that want one. The dot
  keeps it apart from every service principal, whose names have none.
- `admin` (operators: `ragstream init`, `ragstream ingest`, provisioning) and `kafka` (the
  broker itself, on the controller and inter-broker listeners) are super users: no ACLs.

The Faust workers need nothing else: `streams.app.create_app` turns off the assignor leader
topic (`topic_disable_leader`) and topic declaration (`topic_allow_declare=False`), and keeps no
tables, so there is no changelog topic. The broker runs with
`allow.everyone.if.no.acl.found=false`, so anything not granted here is denied.

Nothing here does I/O: `render_*` return shell text for `kafka-configs.sh`/`kafka-acls.sh`
(run by the compose `kafka-acls` job, or by an operator), with passwords read from the
environment when the script runs, never written into it.
"""

from __future__ import annotations

import shlex
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ragstream.infra.audit.tables import TABLES
from ragstream.schemas.identity import SCOPES, Scope, reply_stream_for
from ragstream.streams.stage import Stage
from ragstream.streams.topics import (
    ALERTS,
    ALL_TOPICS,
    DEADLETTER,
    DOCUMENTS,
    QUERIES,
    RESPONSES,
    reply_topic,
)
from ragstream.workers.stages import STAGES

__all__ = [
    "ADMIN_USER",
    "MONITOR_USER",
    "BROKER_USER",
    "SCRAM_MECHANISM",
    "SINK_USER",
    "SUPER_USERS",
    "AclBinding",
    "Operation",
    "PatternType",
    "Permission",
    "ResourceType",
    "client_acls",
    "client_group_prefix",
    "client_user",
    "consumer_group",
    "internal_topics",
    "may",
    "monitor_acls",
    "password_env",
    "render_acl_commands",
    "render_client_script",
    "render_service_script",
    "reply_stream_prefix",
    "service_acls",
    "service_users",
    "sink_acls",
    "stage_acls",
    "stage_user",
]

SCRAM_MECHANISM = "SCRAM-SHA-512"
ADMIN_USER = "admin"
"""Operators' super user: created when the broker's storage is formatted."""
BROKER_USER = "kafka"
"""The broker's own principal (controller and inter-broker listeners): a super user."""
SINK_USER = "ragstream-sink"
MONITOR_USER = "ragstream-monitor"
"""The monitoring job: reads Iceberg, not Kafka; publishes alert events."""
SUPER_USERS: tuple[str, ...] = (f"User:{ADMIN_USER}", f"User:{BROKER_USER}")
"""`super.users` of the broker: they bypass ACLs."""

_COMMAND_SCOPES: dict[Scope, str] = {"query": QUERIES.name, "ingest": DOCUMENTS.name}
"""Which caller-facing command topic each scope may write. `admin` grants nothing on Kafka:
it is about the monitoring data, served by ragstream, not by the broker."""


class ResourceType(StrEnum):
    TOPIC = "TOPIC"
    GROUP = "GROUP"
    CLUSTER = "CLUSTER"


class PatternType(StrEnum):
    LITERAL = "LITERAL"
    """The name exactly (or `*`, every resource of the type)."""
    PREFIXED = "PREFIXED"
    """Every name that starts with it."""


class Operation(StrEnum):
    """Kafka's ACL operations; the value is the name `kafka-acls.sh --operation` takes."""

    ALL = "All"
    READ = "Read"
    WRITE = "Write"
    CREATE = "Create"
    DELETE = "Delete"
    ALTER = "Alter"
    DESCRIBE = "Describe"
    CLUSTER_ACTION = "ClusterAction"
    DESCRIBE_CONFIGS = "DescribeConfigs"
    ALTER_CONFIGS = "AlterConfigs"
    IDEMPOTENT_WRITE = "IdempotentWrite"


class Permission(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"


# Kafka's authorizer (StandardAuthorizerData): an ALLOW of any of these also allows DESCRIBE,
# and ALTER_CONFIGS allows DESCRIBE_CONFIGS. DENY implies nothing beyond its own operation.
_IMPLIES_DESCRIBE = frozenset({Operation.READ, Operation.WRITE, Operation.DELETE, Operation.ALTER})
_IMPLIES_DESCRIBE_CONFIGS = frozenset({Operation.ALTER_CONFIGS})


@dataclass(frozen=True, order=True, slots=True)
class AclBinding:
    """One Kafka ACL: `principal` may (or may not) do `operation` on the matching resources."""

    principal: str
    """`User:<name>`, or `User:*` for everyone."""
    resource_type: ResourceType
    pattern: PatternType
    name: str
    operation: Operation
    permission: Permission = Permission.ALLOW

    def matches(self, resource_type: ResourceType, name: str) -> bool:
        """Whether this binding's resource pattern covers the resource `name`."""
        if self.resource_type is not resource_type:
            return False
        if self.pattern is PatternType.PREFIXED:
            return name.startswith(self.name)
        return self.name in ("*", name)


# -- names ----------------------------------------------------------------------------------
def stage_user(stage: str) -> str:
    """The SCRAM username of a stage's workers."""
    return f"ragstream-{stage}"


def client_user(tenant: str, client: str) -> str:
    """The SCRAM username of a client: `<tenant>.<client>`, the name of its reply stream.

    Raises:
        ValueError: the tenant or client cannot name a reply stream.
    """
    return reply_stream_for(tenant, client)


def consumer_group(prefix: str, stages: Sequence[str]) -> str:
    """The consumer group of a worker running `stages`: its Faust app id, which
    `streams.app.create_app` names `<prefix>-<stage>[-<stage>...]`."""
    return f"{prefix}-{'-'.join(stages)}"


def reply_stream_prefix(prefix: str) -> str:
    """`<prefix>.responses.`: every reply stream starts with it; the internal `responses`
    topic does not (no trailing dot)."""
    return reply_topic(prefix, "")


def client_group_prefix(prefix: str, tenant: str, client: str) -> str:
    """Consumer groups a client may use: names starting `<prefix>.client.<tenant>.<client>.`."""
    return f"{prefix}.client.{client_user(tenant, client)}."


def password_env(username: str) -> str:
    """The environment variable the rendered scripts read a service user's password from."""
    return "SCRAM_PASSWORD_" + username.upper().replace("-", "_").replace(".", "_")


# -- bindings -------------------------------------------------------------------------------
def _topic(principal: str, name: str, *ops: Operation, prefixed: bool = False) -> list[AclBinding]:
    pattern = PatternType.PREFIXED if prefixed else PatternType.LITERAL
    return [AclBinding(principal, ResourceType.TOPIC, pattern, name, op) for op in ops]


def _group(principal: str, name: str, *, prefixed: bool = False) -> AclBinding:
    pattern = PatternType.PREFIXED if prefixed else PatternType.LITERAL
    return AclBinding(principal, ResourceType.GROUP, pattern, name, Operation.READ)


def stage_acls(prefix: str, stage: Stage[Any]) -> list[AclBinding]:
    """What one stage's workers need, from its declaration."""
    user = f"User:{stage_user(stage.name)}"
    out = _topic(user, stage.consumes.full_name(prefix), Operation.READ)
    out.append(_group(user, consumer_group(prefix, [stage.name])))
    for spec in (*stage.produces, DEADLETTER):
        if spec.per_principal:
            # Created on first use (the caller's stream may not exist yet), then written.
            out += _topic(
                user,
                reply_stream_prefix(prefix),
                Operation.CREATE,
                Operation.WRITE,
                Operation.DESCRIBE,
                prefixed=True,
            )
        else:
            out += _topic(user, spec.full_name(prefix), Operation.WRITE)
    if stage.once_per_request:
        out += _topic(user, RESPONSES.full_name(prefix), Operation.READ)
    return out


def sink_acls(prefix: str) -> list[AclBinding]:
    """The audit sink reads every topic an audit table is built from; it has no group."""
    user = f"User:{SINK_USER}"
    inputs = sorted({topic for table in TABLES.values() for topic in table.inputs})
    return [b for topic in inputs for b in _topic(user, f"{prefix}.{topic}", Operation.READ)]


def monitor_acls(prefix: str) -> list[AclBinding]:
    """The monitor writes the alerts topic; it reads the audit tables, not Kafka."""
    return _topic(f"User:{MONITOR_USER}", ALERTS.full_name(prefix), Operation.WRITE)


def service_users() -> list[str]:
    """Every service principal's username: one per stage, the sink and the monitor."""
    return [stage_user(name) for name in STAGES] + [SINK_USER, MONITOR_USER]


def service_acls(prefix: str) -> list[AclBinding]:
    """Every ACL of ragstream's own principals, sorted and without duplicates."""
    out: list[AclBinding] = []
    for stage in STAGES.values():
        out += stage_acls(prefix, stage)
    out += sink_acls(prefix)
    out += monitor_acls(prefix)
    return sorted(set(out))


def client_acls(prefix: str, tenant: str, client: str, scopes: Collection[Scope]) -> list[AclBinding]:
    """The ACLs of one client principal, `User:<tenant>.<client>`.

    Raises:
        ValueError: an unknown scope, or a tenant or client that cannot name a reply stream.
    """
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope(s) {unknown}; known: {', '.join(SCOPES)}")
    user = f"User:{client_user(tenant, client)}"
    out: list[AclBinding] = []
    for scope in sorted(set(scopes)):
        if scope in _COMMAND_SCOPES:
            out += _topic(user, f"{prefix}.{_COMMAND_SCOPES[scope]}", Operation.WRITE)
    out += _topic(user, reply_topic(prefix, client_user(tenant, client)), Operation.READ, Operation.DESCRIBE)
    out.append(_group(user, client_group_prefix(prefix, tenant, client), prefixed=True))
    return sorted(set(out))


def internal_topics(prefix: str) -> list[str]:
    """Topics no client may touch: every declared topic that is not caller-facing."""
    return [spec.full_name(prefix) for spec in ALL_TOPICS if not spec.caller_facing]


# -- questions ------------------------------------------------------------------------------
def _covers(binding: AclBinding, operation: Operation) -> bool:
    if binding.operation in (Operation.ALL, operation):
        return True
    if binding.permission is Permission.DENY:
        return False
    if operation is Operation.DESCRIBE:
        return binding.operation in _IMPLIES_DESCRIBE
    if operation is Operation.DESCRIBE_CONFIGS:
        return binding.operation in _IMPLIES_DESCRIBE_CONFIGS
    return False


def may(
    bindings: Iterable[AclBinding],
    principal: str,
    operation: Operation,
    name: str,
    resource_type: ResourceType = ResourceType.TOPIC,
    *,
    super_users: Collection[str] = SUPER_USERS,
) -> bool:
    """Whether Kafka's authorizer lets `principal` do `operation` on a resource, given `bindings`.

    Kafka's rules: a super user may do anything; a LITERAL pattern matches its name exactly
    (`*` matches all), a PREFIXED one every name starting with it; `User:*` is everyone; a
    matching DENY wins over any ALLOW; READ, WRITE, DELETE and ALTER imply DESCRIBE; and with
    `allow.everyone.if.no.acl.found=false`, no matching ALLOW means denied.
    """
    if principal in super_users:
        return True
    allowed = False
    for b in bindings:
        if b.principal not in (principal, "User:*") or not b.matches(resource_type, name):
            continue
        if not _covers(b, operation):
            continue
        if b.permission is Permission.DENY:
            return False
        allowed = True
    return allowed


# -- rendering ------------------------------------------------------------------------------
_PREAMBLE = """\
set -euo pipefail
BIN="${KAFKA_BIN:-/opt/kafka/bin}"
BOOTSTRAP="${KAFKA_BOOTSTRAP_SERVER:-kafka:9092}"
ADMIN_CONFIG="${KAFKA_ADMIN_CONFIG:-/opt/ragstream/kafka/admin.properties}"
"""


def _scram_user_command(username: str, env: str) -> str:
    # Double quotes: the shell expands the password when the script runs; `:?` stops the
    # script if it is unset. kafka-configs.sh splits on `,` and `]`: keep them out of passwords.
    config = f'"{SCRAM_MECHANISM}=[password=${{{env}:?set {env}}}]"'
    return (
        '"$BIN/kafka-configs.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" '
        f"--alter --add-config {config} --entity-type users --entity-name {shlex.quote(username)}"
    )


def render_acl_commands(bindings: Iterable[AclBinding]) -> list[str]:
    """`kafka-acls.sh --add` command lines that add exactly `bindings`.

    The tool adds every listed operation on every listed resource, so one line covers the
    resources of one principal, type and pattern that share the same set of operations (each
    line starts a JVM: fewer lines, a faster job).
    """
    per_resource: dict[tuple[str, Permission, ResourceType, PatternType, str], set[Operation]]
    per_resource = defaultdict(set)
    for b in bindings:
        per_resource[(b.principal, b.permission, b.resource_type, b.pattern, b.name)].add(b.operation)
    per_ops: dict[tuple[str, Permission, ResourceType, PatternType, tuple[Operation, ...]], list[str]]
    per_ops = defaultdict(list)
    for (principal, permission, rtype, pattern, name), granted in sorted(per_resource.items()):
        per_ops[(principal, permission, rtype, pattern, tuple(sorted(granted)))].append(name)
    lines = []
    for (principal, permission, rtype, pattern, ops), names in sorted(per_ops.items()):
        who = "--allow-principal" if permission is Permission.ALLOW else "--deny-principal"
        if rtype is ResourceType.CLUSTER:
            resources = "--cluster"
        else:
            resources = " ".join(f"--{rtype.lower()} {shlex.quote(name)}" for name in names)
        operations = " ".join(f"--operation {op.value}" for op in ops)
        lines.append(
            '"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" '
            f"--add {who} {shlex.quote(principal)} {operations} {resources} "
            f"--resource-pattern-type {pattern.value}"
        )
    return lines


def render_service_script(prefix: str) -> str:
    """The shell script that creates the service principals' SCRAM users and their ACLs.

    Runs as the admin super user (`ADMIN_CONFIG`); each user's password comes from
    `password_env(user)`. Idempotent: re-running resets the passwords and re-adds the ACLs.
    """
    lines = [
        "#!/usr/bin/env bash",
        "# Generated by `ragstream acls service` from the stage declarations: do not edit.",
        "# Regenerate: ragstream acls service > infra/deploy/kafka/service-acls.sh",
        f"# Topic prefix: {prefix}. Needs the admin client config and, for each user below, its",
        "# password in the environment variable named after it.",
        _PREAMBLE,
        "# SCRAM users, one per service principal.",
    ]
    lines += [_scram_user_command(user, password_env(user)) for user in service_users()]
    lines += ["", "# ACLs (the broker denies anything not granted here)."]
    lines += render_acl_commands(service_acls(prefix))
    lines += ["", 'echo "service principals and ACLs are in place"']
    return "\n".join(lines) + "\n"


def render_client_script(
    prefix: str,
    tenant: str,
    client: str,
    scopes: Collection[Scope],
    *,
    partitions: int = 1,
    replication_factor: int = 1,
    password_var: str = "KAFKA_CLIENT_PASSWORD",
) -> str:
    """Shell commands that onboard one client: its SCRAM user, its reply stream and its ACLs.

    Raises:
        ValueError: an unknown scope, or a tenant or client that cannot name a reply stream.
    """
    user = client_user(tenant, client)
    bindings = client_acls(prefix, tenant, client, scopes)
    topic = reply_topic(prefix, user)
    lines = [
        "#!/usr/bin/env bash",
        f"# Client {user} (scopes: {', '.join(sorted(set(scopes))) or 'none'}): its SCRAM user, its reply",
        f"# stream and its ACLs. Run as the Kafka admin; the password comes from ${password_var}.",
        _PREAMBLE,
        _scram_user_command(user, password_var),
        '"$BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" '
        f"--create --if-not-exists --topic {shlex.quote(topic)} --partitions {partitions} "
        f"--replication-factor {replication_factor}",
        *render_acl_commands(bindings),
    ]
    return "\n".join(lines) + "\n"
