"""One error hierarchy. The subtree an error belongs to says what happens next.

- `BadInputError`: the message can never succeed. It goes to the dead-letter topic with its
  `kind` as the reason, and the caller (if one can be identified) gets an error response.
- `TransientError`: a dependency hiccup. The stage retries with backoff, then dead-letters.
- `ConfigError`: the deployment is wrong. The process fails at start with a clear message.
- `FencedError`: another process owns what this one writes. This one stops, before writing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ragstream.schemas.identity import Principal

__all__ = [
    "AuditQueryError",
    "BadInputError",
    "ConfigError",
    "DeadlineExceeded",
    "DependencyUnavailable",
    "DocumentTooLarge",
    "OutputRejected",
    "PublishStalled",
    "RetriesExhausted",
    "EmptyDocument",
    "FencedError",
    "Forbidden",
    "GenerationTimeout",
    "InvalidParameter",
    "NotFound",
    "RagstreamError",
    "SchemaViolation",
    "StartupError",
    "TransientError",
    "Unauthenticated",
    "UnknownRoute",
    "UnreadableDocument",
    "UnsupportedMediaType",
]


class RagstreamError(Exception):
    """Root of every error ragstream raises on purpose."""


# --- dead-letter ------------------------------------------------------------------------
class BadInputError(RagstreamError):
    """The input itself is bad; retrying cannot help. Dead-letter it."""

    kind = "bad_input"


class SchemaViolation(BadInputError):
    """Bytes that are not JSON, or JSON that does not match the topic's event contract."""

    kind = "schema_violation"


class UnsupportedMediaType(BadInputError):
    kind = "unsupported_media_type"


class UnreadableDocument(BadInputError):
    """The bytes claim a media type but cannot be parsed as one (e.g. a corrupt PDF)."""

    kind = "unreadable_document"


class EmptyDocument(BadInputError):
    """Parsing succeeded but left no text to index."""

    kind = "empty_document"


class DocumentTooLarge(BadInputError):
    kind = "document_too_large"


class UnknownRoute(BadInputError):
    """A query names a generation route (or model) that `generation.routes` does not list."""

    kind = "unknown_route"


class OutputRejected(BadInputError):
    """What a stage made of a message cannot be published, whatever the retries: it does not
    serialise, or a record is over the broker's size limit. The input is dead-lettered."""

    kind = "output_rejected"


class RetriesExhausted(BadInputError):
    """A message failed on every one of its bounded retries. It is dead-lettered with the
    last error, so it never blocks its partition."""

    kind = "retries_exhausted"


class Unauthenticated(BadInputError):
    """The command's token is missing, malformed, expired, wrongly signed, unsigned
    (`alg=none`) or signed by an unknown key. Nobody is answered unless the token's signature
    itself verified (an expired token): an unverified token names no caller."""

    kind = "unauthenticated"

    def __init__(self, message: str, *, principal: Principal | None = None) -> None:
        super().__init__(message)
        self.principal = principal
        """Set when the signature verified (e.g. the token only expired): who to tell."""


class Forbidden(BadInputError):
    """The token is valid but does not allow the command: another tenant, a group or user
    the token does not hold, or a missing scope. The caller (the token's principal) is told."""

    kind = "forbidden"

    def __init__(self, message: str, *, principal: Principal | None = None) -> None:
        super().__init__(message)
        self.principal = principal


class InvalidParameter(BadInputError):
    """A query parameter of a page or API call is malformed or out of range (a bad time
    range, an unknown page size). Nothing is retried; the caller gets a 400 naming it."""

    kind = "invalid_parameter"


class NotFound(BadInputError):
    """What the caller asked for does not exist, or is not theirs to see (an unknown request
    id). The caller gets a 404; whether it exists for someone else is not revealed."""

    kind = "not_found"


class AuditQueryError(BadInputError):
    """SQL over the audit tables that cannot run: DuckDB rejects it, or it names a table that
    does not exist. Nothing is retried; the caller (`ragstream sql`) gets the reason and fixes
    the query."""

    kind = "invalid_audit_query"


# --- retry ------------------------------------------------------------------------------
class TransientError(RagstreamError):
    """A dependency failed in a way that may pass. Retry after `retry_after_s`."""

    kind = "transient"

    def __init__(self, message: str, *, retry_after_s: float = 0.5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DependencyUnavailable(TransientError):
    """Triton, the vector store or the catalog did not answer."""

    kind = "dependency_unavailable"


class DeadlineExceeded(DependencyUnavailable):
    """A request or stream ran past its timeout. On the query path the caller gets an error
    response saying so; it is not retried past the caller's deadline."""

    kind = "deadline_exceeded"


class GenerationTimeout(DeadlineExceeded):
    """The generator did not finish the answer within the caller's `timeout_s`. Handled as any
    `DeadlineExceeded`: the caller gets a deadline error response, the answer is not retried."""

    kind = "generation_timeout"


class PublishStalled(TransientError):
    """The broker refused a stage's outputs past `kafka.publish_retry_budget_s`. The worker
    exits so its supervisor restarts it (counted, with this reason); nothing was acked, so the
    inputs are consumed again."""

    kind = "publish_stalled"


# --- fail at start ----------------------------------------------------------------------
class ConfigError(RagstreamError):
    """Settings are invalid or inconsistent. Fix the configuration and start again."""

    kind = "config_error"


class StartupError(RagstreamError):
    """A component of the stack could not be started or did not become ready in time."""

    kind = "startup_error"


# --- stop -------------------------------------------------------------------------------
class FencedError(RagstreamError):
    """Another process writes what this one was about to: a second audit sink committing to
    the same table. This process stops at once, before writing anything, and does not retry:
    the other writer owns the table. Give every table one sink (`audit.sinks`); a restarted
    second sink stops again at its first commit."""

    kind = "fenced"
