"""Tokens an attacker builds by hand (PyJWT refuses to make most of them): shared by the
unit tests of the verifier and the adversarial tests on the stack."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

__all__ = ["claims_now", "hmac_signed", "tampered", "unsigned"]


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims_now(**claims: Any) -> dict[str, Any]:
    """Claims valid for a minute from now, for audience `ragstream`."""
    now = int(time.time())
    return {"aud": "ragstream", "iat": now, "exp": now + 60, **claims}


def tampered(token: str, **changes: Any) -> str:
    """`token` with its claims changed after signing (the signature left as it was)."""
    header, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{header}.{_b64(claims)}.{sig}"


def unsigned(claims: dict[str, Any], **header: Any) -> str:
    """An `alg=none` token."""
    return f"{_b64({'alg': 'none', 'typ': 'JWT', **header})}.{_b64(claims)}."


def hmac_signed(secret: bytes, claims: dict[str, Any], **header: Any) -> str:
    """An HS256 token signed with any bytes, a PEM public key included (key confusion)."""
    signing_input = f"{_b64({'alg': 'HS256', **header})}.{_b64(claims)}"
    sig = base64.urlsafe_b64encode(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()).rstrip(
        b"="
    )
    return f"{signing_input}.{sig.decode()}"
