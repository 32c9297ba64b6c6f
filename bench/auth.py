"""Issue 10: what verified identity costs per query.

The query path differs between `auth.mode=required` and `off` in one place: the first stage
decodes the query (with or without its token) and admits it (verifies the token and takes the
identity from its claims, or takes the body's). Everything after admission is the same code
on the same event. So the added latency per query is measured exactly there, on the real code
(`streams.codec.decode` + `streams.admission.Admission.admit`), with every case interleaved
round-robin in one run so that machine noise hits them alike:

- off: the body's identity, no token;
- HS256, the same token again (what the SDK and a plain client do: one token per session; the
  verifier caches a verified token until it expires);
- HS256, RS256 and ES256 with a new token every query (the worst case: no cache hit);
- the client side: the SDK's per-query identity lookup (a cached, locally signed token).

Target: p50 added latency <= 1 ms per query.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from bench.common import Results, console, verdict
from ragstream.credentials import Credentials
from ragstream.infra.auth import SigningKey, TokenVerifier, ensure_local_key, issue_token
from ragstream.infra.settings import AuthSettings, HmacKey, Settings
from ragstream.streams.admission import Admission
from ragstream.streams.codec import decode
from ragstream.streams.topics import QUERIES

TARGET_MS = 1.0
QUESTION = "How many days of annual leave do I get in my first year, and can I carry any over?"


def _raw(token: str | None) -> bytes:
    body: dict[str, Any] = {
        "request_id": "bench-0000000000000000",
        "question": QUESTION,
        "retrieval": {"top_k": 5, "mode": "hybrid"},
        "generation": {"route": "default", "max_tokens": 256},
        "deadline_ms": 30000,
        "stream": True,
    }
    if token is None:
        body.update(tenant="larkspur", user="dana", access_groups=["staff"])
    else:
        body["token"] = token
    return json.dumps(body).encode()


async def _measure(n: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ec_key = ec.generate_private_key(ec.SECP256R1())
        import jwt

        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
        rsa_jwk.update(kid="rsa", alg="RS256")
        ec_jwk.update(kid="ec", alg="ES256")
        jwks: dict[str, list[dict[str, Any]]] = {"keys": [rsa_jwk, ec_jwk]}
        (data_dir / "jwks.json").write_text(json.dumps(jwks))
        secret = "b" * 48
        required = Settings(
            data_dir=data_dir,
            auth=AuthSettings(
                hmac_keys={"web": HmacKey(secret=SecretStr(secret), tenants=("larkspur",))},
                jwks_file=data_dir / "jwks.json",
                local_key=False,
            ),
        )
        verifier = TokenVerifier(required)
        await verifier.start()
        on = Admission(required, verifier)
        off = Admission(Settings(data_dir=data_dir, auth=AuthSettings(mode="off")), None)

        keys = {
            "HS256": SigningKey("web", "HS256", secret.encode()),
            "RS256": SigningKey("rsa", "RS256", rsa_key),
            "ES256": SigningKey("ec", "ES256", ec_key),
        }

        def token(alg: str) -> str:
            return issue_token(keys[alg], tenant="larkspur", user="dana", groups=("staff",), client="web")

        fresh = {alg: [_raw(token(alg)) for _ in range(n)] for alg in keys}
        reused = _raw(token("HS256"))
        body_only = _raw(None)
        ensure_local_key(data_dir / "auth" / "local-key.json")
        client = Credentials(Settings(data_dir=data_dir))
        client.identity(tenant="larkspur", user="dana", groups=["staff"])  # first one signs

        def admit(admission: Admission, raw: bytes) -> Callable[[], object]:
            return lambda: admission.admit(decode(QUERIES, raw))

        cases: dict[str, Callable[[int], Callable[[], object]]] = {
            "off (body identity)": lambda i: admit(off, body_only),
            "HS256, same token (cached)": lambda i: admit(on, reused),
            "HS256, new token each query": lambda i: admit(on, fresh["HS256"][i]),
            "RS256, new token each query": lambda i: admit(on, fresh["RS256"][i]),
            "ES256, new token each query": lambda i: admit(on, fresh["ES256"][i]),
            "SDK: identity per query": lambda i: (
                lambda: client.identity(tenant="larkspur", user="dana", groups=["staff"])
            ),
        }
        for make in cases.values():  # warm up: validators, caches, lazy imports
            for i in range(20):
                make(i)()
        samples: dict[str, list[float]] = {name: [] for name in cases}
        on_cache = on.verifier._cache if on.verifier else None
        for i in range(n):
            for name, make in cases.items():
                call = make(i)
                t0 = time.perf_counter()
                call()
                samples[name].append((time.perf_counter() - t0) * 1000.0)
            if on_cache is not None and i % 500 == 0:
                on_cache.clear()  # "new token" cases never hit; keep the cache from growing
                on.verifier.verify(json.loads(reused)["token"])  # type: ignore[union-attr]
        await verifier.close()
        sizes = {"query without token (bytes)": len(body_only), "query with HS256 token (bytes)": len(reused)}
        return samples, sizes


def _pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1]


def main(argv: list[str] | None = None) -> None:
    n = int(argv[0]) if argv else 3000
    samples, sizes = asyncio.run(_measure(n))
    res = Results()
    base = statistics.median(samples["off (body identity)"])
    res.raw = {"n": n, "sizes": sizes, "p50_ms": {}, "p95_ms": {}}
    res.add("queries per case (interleaved)", str(n))
    for name, xs in samples.items():
        p50, p95 = statistics.median(xs), _pct(xs, 95)
        res.raw["p50_ms"][name], res.raw["p95_ms"][name] = p50, p95
        if name.startswith("off"):
            res.add(f"{name}: p50 / p95", f"{p50 * 1000:.1f} / {p95 * 1000:.1f} µs")
        elif name.startswith("SDK"):
            res.add(f"{name}: p50", f"{p50 * 1000:.1f} µs", f"<= {TARGET_MS:g} ms", verdict(p50 <= TARGET_MS))
        else:
            added = p50 - base
            res.raw.setdefault("p50_added_ms", {})[name] = added
            res.add(
                f"{name}: p50 / p95, p50 added vs off",
                f"{p50 * 1000:.1f} / {p95 * 1000:.1f} µs, {added * 1000:+.1f} µs",
                f"added <= {TARGET_MS:g} ms",
                verdict(added <= TARGET_MS),
            )
    for label, size in sizes.items():
        res.add(label, str(size))
    res.print("verified identity: cost per query at admission (issue 10)")
    console.print(f"saved {res.save('auth')}")


if __name__ == "__main__":
    main(sys.argv[1:])
