"""What the CLI and SDK put in a command's `token`, and which reply stream they read.

Three cases, in this order:

1. A token was given (`token=` or `RAGSTREAM_AUTH__TOKEN`): it is sent as is. Its claims
   (read, not verified: the pipeline verifies) give the tenant and the reply stream.
2. `auth.mode=required` and the embedded stack's local key exists (`ragstream up` made it):
   a short-lived token is signed for each tenant, user and group set the caller asks as.
3. `auth.mode=off`: no token; replies go to `<tenant>.anonymous`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from ragstream.infra.auth import SigningKey, issue_token, load_signing_key
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import ConfigError
from ragstream.schemas.identity import Scope, reply_stream_for
from ragstream.streams.admission import ANONYMOUS_CLIENT

__all__ = ["Credentials", "Identity"]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a command is sent as: its token (None with auth off) and its reply stream."""

    token: str | None
    tenant: str
    reply_to: str
    fixed: bool
    """The identity comes from a given token: the body must not claim another one."""
    user: str | None = None
    groups: tuple[str, ...] | None = None
    """What a given token claims (read, not verified), so a body can say the same."""


class Credentials:
    """Tokens for the CLI and SDK (see the module docstring). No I/O until first use."""

    def __init__(self, settings: Settings, token: str | None = None) -> None:
        self._settings = settings
        given = token or (settings.auth.token.get_secret_value() if settings.auth.token else None)
        self._token = given
        self._claims: dict[str, Any] | None = None
        self._key: SigningKey | None = None
        self._minted: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], tuple[str, float]] = {}

    @property
    def required(self) -> bool:
        return self._settings.auth.mode == "required"

    def identity(
        self,
        *,
        tenant: str | None = None,
        user: str | None = None,
        groups: Sequence[str] | None = None,
        scopes: Sequence[Scope] = ("query",),
    ) -> Identity:
        """The token and reply stream for a command sent as this tenant, user and groups.

        Raises:
            ConfigError: auth is required and there is neither a token nor a local key, or the
                tenant/client cannot name a reply stream.
        """
        if self._token is not None:
            claims = self._given_claims()
            claimed = str(claims.get("tenant", ""))
            client = str(claims.get("client", claims.get("sub", "")))
            reply = claims.get("reply_to") or f"{claimed}.{client}"
            groups = claims.get("groups")
            return Identity(
                self._token,
                claimed,
                str(reply),
                fixed=True,
                user=str(claims.get("sub", "")) or None,
                groups=tuple(str(g) for g in groups) if isinstance(groups, list) else (),
            )
        tenant = tenant or self._settings.default_tenant
        if not self.required:
            return Identity(None, tenant, self._reply(tenant, ANONYMOUS_CLIENT), fixed=False)
        key = self._local_key()
        client = self._settings.auth.client
        reply = self._reply(tenant, client)
        cache_key = (tenant, user or "anonymous", tuple(groups or ()), tuple(scopes))
        now = time.time()
        minted = self._minted.get(cache_key)
        ttl_s = self._settings.auth.token_ttl_s
        if minted is None or now > minted[1] - ttl_s / 2:  # renewed at half-life: never sent stale
            token = issue_token(
                key,
                tenant=tenant,
                user=user or "anonymous",
                groups=tuple(groups or ()),
                client=client,
                scopes=scopes,
                ttl_s=ttl_s,
                audience=self._settings.auth.audience,
                now=now,
            )
            minted = (token, now + ttl_s)
            self._minted[cache_key] = minted
        return Identity(minted[0], tenant, reply, fixed=False)

    def _given_claims(self) -> dict[str, Any]:
        if self._claims is None:
            assert self._token is not None
            try:
                self._claims = jwt.decode(self._token, options={"verify_signature": False})
            except jwt.InvalidTokenError as exc:
                raise ConfigError(f"the given token is not a JWT: {exc}") from exc
        return self._claims

    def _local_key(self) -> SigningKey:
        if self._key is None:
            path = self._settings.local_key_file
            if not self._settings.auth.local_key or not path.exists():
                raise ConfigError(
                    "auth.mode=required and no token: pass token= (or set RAGSTREAM_AUTH__TOKEN; "
                    "`ragstream token issue` prints one), or start the embedded stack with "
                    f"`ragstream up`, which creates the local signing key {path}"
                )
            self._key = load_signing_key(path)
        return self._key

    @staticmethod
    def _reply(tenant: str, client: str) -> str:
        try:
            return reply_stream_for(tenant, client)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
