"""Admission: the first stage to read a command verifies who sent it, and from then on the
event carries that verified identity instead of what its body claims.

With `auth.mode=required`, the token's claims give the tenant, user, groups and reply stream.
A body that names another tenant or user, or groups the token does not hold, is refused as
`forbidden`: it is never answered for either side. The token itself is dropped here, so no
credential travels on internal topics or reaches the audit trail.

With `auth.mode=off` (closed networks only), the body's own tenant, user and groups are
taken as they are, and replies go to `<tenant>.anonymous`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pydantic import ValidationError

from ragstream.infra.auth import TokenVerifier
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import BadInputError, Forbidden, SchemaViolation
from ragstream.schemas.events import DocumentSubmitted, Event
from ragstream.schemas.identity import Principal, Scope
from ragstream.schemas.queries import QuerySubmitted
from ragstream.streams.codec import sniff

__all__ = ["ANONYMOUS_CLIENT", "Admission", "opened_admission", "principal_in"]

log = logging.getLogger(__name__)

ANONYMOUS_CLIENT = "anonymous"
"""The client name of every caller with `auth.mode=off`."""


class Admission:
    """Turns a command event's token into its verified identity (see the module docstring).

    Args:
        verifier: Started; None with `auth.mode=off`.
    """

    def __init__(self, settings: Settings, verifier: TokenVerifier | None) -> None:
        self.settings = settings
        self.verifier = verifier
        self.required = settings.auth.mode == "required"
        if self.required and verifier is None:
            raise ValueError("auth.mode=required needs a TokenVerifier")

    def admit(self, event: Event) -> Event:
        """The event as the rest of the pipeline sees it.

        Raises:
            Unauthenticated: the token is missing or invalid.
            Forbidden: the token does not allow this command, or the body disagrees with it.
        """
        if isinstance(event, QuerySubmitted):
            return self._query(event)
        if isinstance(event, DocumentSubmitted):
            return self._document(event)
        raise TypeError(f"{type(event).__name__} is not a command event")

    def caller(self, raw: bytes | None) -> Principal | None:
        """Who sent a command that could not be read (for its error response): the principal
        of its token if the token verifies, else nobody. Never raises."""
        try:
            if not self.required:
                tenant = sniff(raw, "tenant")
                return self._body_principal(tenant if isinstance(tenant, str) else "default", "anonymous", ())
            token = sniff(raw, "token")
            if not isinstance(token, str) or self.verifier is None:
                return None
            return self.verifier.verify(token)
        except (BadInputError, ValidationError, ValueError):
            return None
        except Exception:
            log.exception("identifying the sender of an unreadable command failed")
            return None

    # -- commands ------------------------------------------------------------------------
    def _query(self, q: QuerySubmitted) -> QuerySubmitted:
        p = self._principal(q, "query")
        given = q.model_fields_set
        if self.required:
            if "user" in given and q.user != p.user:
                raise Forbidden(f"the body's user {q.user!r} is not the token's ({p.user!r})", principal=p)
            extra = sorted(set(q.access_groups) - set(p.groups)) if "access_groups" in given else []
            if extra:
                raise Forbidden(f"the token does not hold group(s) {', '.join(extra)}", principal=p)
        groups = q.access_groups if "access_groups" in given else p.groups
        return q.model_copy(
            update={
                "tenant": p.tenant,
                "user": p.user,
                "access_groups": groups,
                "token": None,
                "principal": p,
            }
        )

    def _document(self, d: DocumentSubmitted) -> DocumentSubmitted:
        p = self._principal(d, "ingest")
        return d.model_copy(update={"tenant": p.tenant, "token": None, "principal": p})

    def _principal(self, event: QuerySubmitted | DocumentSubmitted, scope: Scope) -> Principal:
        if not self.required:
            if event.principal is not None:
                raise Forbidden("`principal` is set by ragstream, never by a caller")
            user = event.user if isinstance(event, QuerySubmitted) else "anonymous"
            groups = event.access_groups if isinstance(event, QuerySubmitted) else ()
            return self._body_principal(event.tenant, user, groups)
        assert self.verifier is not None
        p = self.verifier.verify(event.token)
        if event.principal is not None:
            raise Forbidden(
                "`principal` is set by ragstream once the token is verified, never by a caller", principal=p
            )
        if "tenant" in event.model_fields_set and event.tenant != p.tenant:
            raise Forbidden(
                f"the body's tenant {event.tenant!r} is not the token's ({p.tenant!r})", principal=p
            )
        if scope not in p.scopes:
            raise Forbidden(
                f"the token does not grant scope {scope!r} (it grants: {' '.join(p.scopes) or 'none'})",
                principal=p,
            )
        return p

    @staticmethod
    def _body_principal(tenant: str, user: str, groups: Any) -> Principal:
        try:
            return Principal(
                tenant=tenant,
                user=user,
                groups=tuple(groups),
                client=ANONYMOUS_CLIENT,
                reply_to=f"{tenant}.{ANONYMOUS_CLIENT}",
                scopes=("query", "ingest"),
                verified=False,
            )
        except ValidationError as exc:
            raise SchemaViolation(
                f"tenant {tenant!r} cannot name a reply stream (auth.mode=off): use letters, digits, '_' or '-'"
            ) from exc


@asynccontextmanager
async def opened_admission(settings: Settings) -> AsyncIterator[Admission]:
    """An `Admission` with its verifier's keys loaded (and refreshed) while open.

    Raises:
        ConfigError: `auth.mode=required` and no key is configured, or a key is unreadable.
    """
    if settings.auth.mode == "off":
        log.warning(
            "AUTH IS OFF (auth.mode=off): identities are NOT verified. Tenant, user and groups are "
            "whatever each message claims, so any publisher can read any tenant's documents. "
            "Use this only on a closed network."
        )
        yield Admission(settings, None)
        return
    verifier = TokenVerifier(settings)
    await verifier.start()
    try:
        yield Admission(settings, verifier)
    finally:
        await verifier.close()


def principal_in(raw: bytes | None, *path: str) -> Principal | None:
    """The verified principal an earlier stage put in an internal event (e.g. `query.principal`
    of a `ContextRetrieved`), for the error response of an input that could not be read.
    Never raises."""
    value = sniff(raw, *path)
    if not isinstance(value, dict):
        return None
    try:
        return Principal.model_validate(value)
    except ValidationError:
        return None
