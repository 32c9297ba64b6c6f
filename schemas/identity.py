"""Who sent a command: the verified identity that rides on every request after admission.

A caller proves who it is with a signed token (JWT) in the command event's `token` field. The
first stage that reads the command (retrieval for questions, ingestion for documents)
verifies it, and from then on the event carries a `Principal` built from the token's claims,
never the token itself. The principal names the one reply stream the caller may read:
`{prefix}.responses.{reply_to}`, where `reply_to` is `<tenant>.<client>`.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from ragstream.schemas.ids import Identifier

__all__ = [
    "REPLY_PART_RE",
    "SCOPES",
    "Principal",
    "ReplyPart",
    "Scope",
    "reply_stream_for",
]

REPLY_PART_CHARS = "A-Za-z0-9_-"
REPLY_PART_MAX_CHARS = 64
REPLY_PART_RE = re.compile(f"[{REPLY_PART_CHARS}]{{1,{REPLY_PART_MAX_CHARS}}}")
"""A tenant or client as it appears in a reply stream's topic name (use with `fullmatch`).

No dots: `<tenant>.<client>` must split one way only, or tenant `a` client `b.c` and tenant
`a.b` client `c` would share a stream."""

ReplyPart = Annotated[
    str, StringConstraints(min_length=1, max_length=REPLY_PART_MAX_CHARS, pattern=f"^[{REPLY_PART_CHARS}]+$")
]

Scope = Literal["query", "ingest", "admin"]
SCOPES: tuple[Scope, ...] = ("query", "ingest", "admin")
"""`query`: ask questions. `ingest`: submit and delete documents. `admin`: read every tenant's
monitoring data (the dashboard)."""


def reply_stream_for(tenant: str, client: str) -> str:
    """`<tenant>.<client>`: the reply stream's name under `{prefix}.responses.`.

    Raises:
        ValueError: the tenant or client cannot appear in a topic name unambiguously.
    """
    for what, part in (("tenant", tenant), ("client", client)):
        if not REPLY_PART_RE.fullmatch(part):
            raise ValueError(
                f"{what} {part!r} cannot name a reply stream: use 1-{REPLY_PART_MAX_CHARS} "
                "letters, digits, '_' or '-'"
            )
    return f"{tenant}.{client}"


class Principal(BaseModel):
    """A caller's identity, from a verified token (or, with `auth.mode=off`, from the body)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    tenant: Identifier
    user: str = Field(min_length=1, max_length=256)
    """The token's `sub`."""
    groups: tuple[Identifier, ...] = Field(default=(), max_length=256)
    client: ReplyPart
    reply_to: str = Field(min_length=3, max_length=2 * REPLY_PART_MAX_CHARS + 1)
    """`<tenant>.<client>`: responses go to `{prefix}.responses.{reply_to}`."""
    scopes: tuple[Scope, ...] = ()
    key_id: str | None = Field(default=None, max_length=256)
    """The `kid` of the key that verified the token."""
    issuer: str | None = Field(default=None, max_length=1024)
    token_id: str | None = Field(default=None, max_length=256)
    """The token's `jti`, when it has one."""
    expires_at: datetime | None = None
    verified: bool = True
    """False only with `auth.mode=off`: the identity is the body's own claim."""

    @model_validator(mode="after")
    def _reply_is_own(self) -> Principal:
        if self.reply_to != reply_stream_for(self.tenant, self.client):
            raise ValueError(f"reply_to must be {self.tenant}.{self.client}, not {self.reply_to!r}")
        return self
