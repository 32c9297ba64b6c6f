"""Signed identity: verifying the tokens on command events, and signing them for the CLI/SDK.

Tokens are JWTs (RFC 7519), checked with PyJWT. Three kinds of key are trusted:

- HS256 shared secrets, one per client (`auth.hmac_keys`). A client holding a secret can sign
  any claims, so each key says which tenants and scopes its tokens may assert.
- RS256/ES256 public keys from a JWKS document (`auth.jwks_file`) or an identity provider
  (`auth.jwks_url`, refreshed in the background, never fetched on a request's path).
- The embedded stack's local HS256 key (`data_dir/auth/local-key.json`), created by
  `ragstream up`; the CLI and SDK sign with it, so the quick start works unchanged.

Claims: `sub` (the user), `tenant`, `groups` (list), `client` (names the reply stream
`<tenant>.<client>`; defaults to `sub` where that is a valid name), `scope` (space-separated:
`query`, `ingest`, `admin`), `aud` (`auth.audience`), `exp` and `iat` (required), optional
`nbf`, `iss`, `jti` and `reply_to` (must equal `<tenant>.<client>` when given).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from pydantic import ValidationError

from ragstream.infra.settings import AuthSettings, Settings
from ragstream.schemas.errors import ConfigError, Forbidden, Unauthenticated
from ragstream.schemas.identity import SCOPES, Principal, Scope

__all__ = [
    "LOCAL_KEY_SCOPES",
    "SigningKey",
    "TokenVerifier",
    "ensure_local_key",
    "issue_token",
    "load_signing_key",
]

log = logging.getLogger(__name__)

LOCAL_KEY_SCOPES: tuple[Scope, ...] = SCOPES
"""The local key belongs to whoever runs the stack: it may grant everything."""
_ASYMMETRIC = ("RS256", "ES256")
_CACHE_SIZE = 4096
_UNKNOWN_KID_REFRESH_S = 30.0
"""An unknown key id triggers a JWKS refresh at most this often (never on the request path)."""


@dataclass(frozen=True, slots=True)
class _TrustedKey:
    kid: str
    algorithm: str
    key: Any
    """The secret (bytes) or the public key object PyJWT verifies with."""
    tenants: tuple[str, ...]
    scopes: tuple[str, ...]
    source: str


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A key the CLI and SDK sign with: the local key, or a private JWK given to a client."""

    kid: str
    algorithm: str
    key: Any

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(dict(claims), self.key, algorithm=self.algorithm, headers={"kid": self.kid})


# -- signing -------------------------------------------------------------------------------
def ensure_local_key(path: Path) -> SigningKey:
    """The embedded stack's HS256 key, created (mode 0600) if it does not exist yet."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_bytes(32)
        jwk = {
            "kty": "oct",
            "kid": f"local-{secrets.token_hex(4)}",
            "alg": "HS256",
            "k": base64.urlsafe_b64encode(secret).rstrip(b"=").decode("ascii"),
        }
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(jwk, f)
        try:
            os.link(tmp, path)  # fails if another process created it first: keep theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return load_signing_key(path)


def load_signing_key(path: Path) -> SigningKey:
    """A private JWK from a file: `oct` (HS256), `RSA` (RS256) or `EC` P-256 (ES256).

    Raises:
        ConfigError: the file is missing or is not a usable private key.
    """
    try:
        data = json.loads(path.read_text())
        jwk = jwt.PyJWK.from_dict(data)
    except (OSError, ValueError, jwt.PyJWKError) as exc:
        raise ConfigError(f"cannot read a signing key from {path}: {exc}") from exc
    kid = data.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ConfigError(f"the key in {path} has no kid")
    algorithm = jwk.algorithm_name
    if algorithm not in ("HS256", *_ASYMMETRIC):
        raise ConfigError(f"the key in {path} is {algorithm}; use HS256, RS256 or ES256")
    if algorithm != "HS256" and "d" not in data:
        raise ConfigError(f"the key in {path} is a public key; signing needs the private key")
    return SigningKey(kid=kid, algorithm=algorithm, key=jwk.key)


def issue_token(
    key: SigningKey,
    *,
    tenant: str,
    user: str,
    groups: Sequence[str] = (),
    client: str | None = None,
    scopes: Sequence[str] = ("query",),
    ttl_s: float = 3600.0,
    audience: str = "ragstream",
    issuer: str | None = None,
    now: float | None = None,
) -> str:
    """A signed token for these claims.

    Raises:
        ValueError: the claims could not be verified later (bad tenant, client or scope).
    """
    issued = int(time.time() if now is None else now)
    client = client or user
    for scope in scopes:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r} (known: {', '.join(SCOPES)})")
    # Validate as the verifier will, so a token that would be refused is never printed.
    principal = Principal(
        tenant=tenant, user=user, groups=tuple(groups), client=client, reply_to=f"{tenant}.{client}"
    )
    claims: dict[str, Any] = {
        "sub": principal.user,
        "tenant": principal.tenant,
        "groups": list(principal.groups),
        "client": principal.client,
        "scope": " ".join(scopes),
        "aud": audience,
        "iat": issued,
        "exp": issued + max(int(ttl_s), 1),
        "jti": secrets.token_hex(8),
    }
    if issuer:
        claims["iss"] = issuer
    return key.sign(claims)


# -- verifying -----------------------------------------------------------------------------
class TokenVerifier:
    """Checks tokens against the trusted keys and turns their claims into a `Principal`.

    `start()` loads the keys (and begins refreshing a JWKS URL); `verify()` is synchronous,
    CPU only, and caches what it verified (by the exact token) until the token expires.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._auth: AuthSettings = settings.auth
        self._keys: dict[str, _TrustedKey] = {}
        self._jwks_keys: dict[str, _TrustedKey] = {}
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_wanted: asyncio.Event | None = None
        self._last_fetch = 0.0

    @property
    def key_ids(self) -> list[str]:
        return sorted({*self._keys, *self._jwks_keys})

    async def start(self) -> None:
        """Load every configured key.

        Raises:
            ConfigError: a key cannot be read, or no key at all is configured.
        """
        self._keys = _static_keys(self._settings)
        if self._auth.jwks_url:
            self._refresh_wanted = asyncio.Event()
            try:
                await self._fetch_jwks()
            except Exception as exc:  # noqa: BLE001 - the refresher keeps trying
                log.error(
                    "fetching JWKS from %s failed (retrying in the background): %s", self._auth.jwks_url, exc
                )
            self._refresh_task = asyncio.create_task(self._refresh_loop(), name="ragstream-jwks-refresh")
        if not self._keys and not self._auth.jwks_url:
            raise ConfigError(
                "auth.mode=required but no key is configured: set auth.hmac_keys, auth.jwks_file or "
                f"auth.jwks_url, or run `ragstream up` to create the local key ({self._settings.local_key_file})"
            )
        log.info("auth: verifying tokens with keys %s", ", ".join(self.key_ids) or "(none yet)")

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task

    def verify(self, token: str | None, *, now: float | None = None) -> Principal:
        """The principal a token proves.

        Raises:
            Unauthenticated: no token, or one that is oversized, malformed, unsigned, signed by
                an unknown key or wrongly, expired (its principal attached), or lacking claims.
            Forbidden: the key may not sign for the token's tenant or scopes.
        """
        now = time.time() if now is None else now
        if not token:
            raise Unauthenticated("no token: every command must carry a signed token in `token`")
        if len(token) > self._auth.max_token_bytes:
            raise Unauthenticated(
                f"token is {len(token)} bytes, over auth.max_token_bytes ({self._auth.max_token_bytes})"
            )
        cached = self._cache.get(token)
        if cached is not None and now < cached[1] + self._auth.leeway_s:
            self._cache.move_to_end(token)
            return cached[0]
        principal, expires = self._verify(token, now)
        self._cache[token] = (principal, expires)
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return principal

    def _verify(self, token: str, now: float) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise Unauthenticated("token is not a JWT (expected header.payload.signature)") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise Unauthenticated("token is unsigned (alg=none)")
        key = self._key_for(header.get("kid"))
        if alg != key.algorithm:
            raise Unauthenticated(f"token is signed with {alg}, but key {key.kid} is {key.algorithm}")
        options: dict[str, Any] = {"require": ["exp", "iat", "sub"], "verify_exp": False}
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self._auth.audience,
                issuer=list(self._auth.issuers) or None,
                leeway=self._auth.leeway_s,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.InvalidSignatureError:
            raise Unauthenticated(f"token signature does not verify with key {key.kid}") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                f"token is not for this audience (expected aud={self._auth.audience!r})"
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("token issuer is not accepted (auth.issuers)") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token is not valid yet (nbf/iat in the future)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"token is invalid: {type(exc).__name__}") from None
        principal = _principal(claims, key)
        exp, iat = claims["exp"], claims["iat"]
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            raise Unauthenticated("token exp and iat must be numbers")
        if exp - iat > self._auth.max_ttl_s:
            raise Unauthenticated(
                f"token lives {exp - iat:.0f}s, over auth.max_ttl_s ({self._auth.max_ttl_s:.0f})"
            )
        if now > exp + self._auth.leeway_s:
            raise Unauthenticated("token expired", principal=principal)
        _check_grant(principal, key)
        return principal, float(exp)

    def _key_for(self, kid: object) -> _TrustedKey:
        if kid is None:
            keys = {**self._keys, **self._jwks_keys}
            if len(keys) == 1:
                return next(iter(keys.values()))
            raise Unauthenticated("token has no kid, and more than one key is trusted")
        if not isinstance(kid, str):
            raise Unauthenticated("token kid is not a string")
        key = self._keys.get(kid) or self._jwks_keys.get(kid)
        if key is None:
            self._want_refresh()
            raise Unauthenticated(f"token is signed by an unknown key ({kid[:64]!r})")
        return key

    # -- JWKS URL ------------------------------------------------------------------------
    def _want_refresh(self) -> None:
        if self._refresh_wanted is not None and time.monotonic() - self._last_fetch > _UNKNOWN_KID_REFRESH_S:
            self._refresh_wanted.set()

    async def _refresh_loop(self) -> None:
        assert self._refresh_wanted is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._auth.jwks_refresh_s):
                    await self._refresh_wanted.wait()
            self._refresh_wanted.clear()
            try:
                await self._fetch_jwks()
            except Exception as exc:  # noqa: BLE001 - keep the keys we have, try again later
                log.warning(
                    "refreshing JWKS from %s failed (keeping %d keys): %s",
                    self._auth.jwks_url,
                    len(self._jwks_keys),
                    exc,
                )

    async def _fetch_jwks(self) -> None:
        import httpx

        assert self._auth.jwks_url is not None
        self._last_fetch = time.monotonic()
        async with httpx.AsyncClient(timeout=10.0) as http:
            reply = await http.get(self._auth.jwks_url)
            reply.raise_for_status()
            document = reply.json()
        keys = _jwks_keys(document, self._auth.jwks_tenants, self._auth.jwks_url)
        if keys.keys() != self._jwks_keys.keys():
            log.info("auth: JWKS %s now holds keys %s", self._auth.jwks_url, ", ".join(sorted(keys)))
            self._cache.clear()  # a removed key must stop verifying at once
        self._jwks_keys = keys


def _static_keys(settings: Settings) -> dict[str, _TrustedKey]:
    auth = settings.auth
    keys: dict[str, _TrustedKey] = {}
    for kid, hk in auth.hmac_keys.items():
        if hk.secret is not None:
            secret = hk.secret.get_secret_value().encode()
        else:
            assert hk.secret_file is not None
            try:
                secret = hk.secret_file.read_bytes().strip()
            except OSError as exc:
                raise ConfigError(f"auth.hmac_keys.{kid}: cannot read {hk.secret_file}: {exc}") from exc
        if len(secret) < 32:
            raise ConfigError(f"auth.hmac_keys.{kid}: an HS256 secret needs at least 32 bytes")
        keys[kid] = _TrustedKey(kid, "HS256", secret, hk.tenants, hk.scopes, "auth.hmac_keys")
    if auth.jwks_file is not None:
        try:
            document = json.loads(auth.jwks_file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"auth.jwks_file: cannot read {auth.jwks_file}: {exc}") from exc
        keys.update(_jwks_keys(document, auth.jwks_tenants, str(auth.jwks_file)))
    if auth.local_key and settings.local_key_file.exists():
        local = load_signing_key(settings.local_key_file)
        keys[local.kid] = _TrustedKey(local.kid, "HS256", local.key, ("*",), LOCAL_KEY_SCOPES, "local key")
    return keys


def _jwks_keys(document: Any, tenants: Iterable[str], source: str) -> dict[str, _TrustedKey]:
    """The RS256/ES256 verification keys of a JWKS document (others are skipped, loudly).

    Raises:
        ConfigError: the document is not a JWKS.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ConfigError(f"{source} is not a JWKS document (no 'keys' list)")
    keys: dict[str, _TrustedKey] = {}
    for entry in document["keys"]:
        try:
            jwk = jwt.PyJWK.from_dict(entry)
        except (jwt.PyJWKError, ValueError, TypeError) as exc:
            log.warning("%s: skipping a key that cannot be used: %s", source, exc)
            continue
        if jwk.algorithm_name not in _ASYMMETRIC or not jwk.key_id:
            log.warning(
                "%s: skipping key %r (%s): only RS256/ES256 keys with a kid are used",
                source,
                jwk.key_id,
                jwk.algorithm_name,
            )
            continue
        keys[jwk.key_id] = _TrustedKey(
            jwk.key_id, jwk.algorithm_name, jwk.key, tuple(tenants), SCOPES, source
        )
    return keys


def _principal(claims: Mapping[str, Any], key: _TrustedKey) -> Principal:
    tenant, user = claims.get("tenant"), claims.get("sub")
    if not isinstance(tenant, str) or not isinstance(user, str):
        raise Unauthenticated("token lacks a string 'tenant' or 'sub' claim")
    groups = claims.get("groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise Unauthenticated("token 'groups' claim is not a list of strings")
    client = claims.get("client", user)
    scope = claims.get("scope", "query")
    scopes = scope.split() if isinstance(scope, str) else scope
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise Unauthenticated("token 'scope' claim is not a space-separated string")
    reply_to = claims.get("reply_to", f"{tenant}.{client}")
    expires_at: datetime | None = None
    try:
        expires_at = datetime.fromtimestamp(claims["exp"], UTC)
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        raise Unauthenticated("token 'exp' claim is not a usable time") from None
    try:
        return Principal(
            tenant=tenant,
            user=user,
            groups=tuple(groups),
            client=client,
            reply_to=reply_to,
            scopes=tuple(s for s in scopes if s in SCOPES),
            key_id=key.kid,
            issuer=claims.get("iss") if isinstance(claims.get("iss"), str) else None,
            token_id=claims.get("jti") if isinstance(claims.get("jti"), str) else None,
            expires_at=expires_at,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'claims'}: {e['msg']}" for e in exc.errors()[:3]
        )
        raise Unauthenticated(f"token claims are not usable: {problems}") from None


def _check_grant(principal: Principal, key: _TrustedKey) -> None:
    if "*" not in key.tenants and principal.tenant not in key.tenants:
        raise Forbidden(f"key {key.kid} may not sign for tenant {principal.tenant!r}", principal=principal)
    extra = [s for s in principal.scopes if s not in key.scopes]
    if extra:
        raise Forbidden(f"key {key.kid} may not grant scope {', '.join(extra)}", principal=principal)
