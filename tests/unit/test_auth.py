"""Verified identity: tokens, keys, admission and what leaves a stage (no broker needed)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ragstream.infra.auth import SigningKey, TokenVerifier, ensure_local_key, issue_token
from ragstream.infra.settings import AuthSettings, HmacKey, Settings
from ragstream.schemas.errors import ConfigError, Forbidden, Unauthenticated
from ragstream.schemas.events import DocumentSubmitted
from ragstream.schemas.identity import Principal
from ragstream.schemas.queries import PromptMessage, QuerySubmitted, ResponseCompleted, TokenGenerated
from ragstream.streams.admission import Admission
from ragstream.streams.deadletter import Message, dead_letter_record, redact_secrets
from ragstream.streams.topics import REPLIES, reply_topic
from ragstream.workers import generate, retrieve
from tests.forgery import claims_now, hmac_signed, tampered, unsigned

SECRET = "s" * 40
OTHER_SECRET = "o" * 40


def _settings(tmp_path: Path, **auth: Any) -> Settings:
    keys = {
        "acme-web": HmacKey(secret=SECRET, tenants=("acme",)),
        "any-tenant": HmacKey(secret=OTHER_SECRET, tenants=("*",), scopes=("query",)),
    }
    return Settings(data_dir=tmp_path, auth=AuthSettings(hmac_keys=keys, **auth))


def _hs(kid: str = "acme-web", secret: str = SECRET) -> SigningKey:
    return SigningKey(kid=kid, algorithm="HS256", key=secret.encode())


def _token(key: SigningKey | None = None, **claims: Any) -> str:
    base: dict[str, Any] = {
        "tenant": "acme",
        "user": "alice",
        "groups": ("hr",),
        "scopes": ("query", "ingest"),
    }
    base.update(claims)
    return issue_token(key or _hs(), **base)


@pytest.fixture
async def verifier(tmp_path: Path) -> Any:
    v = TokenVerifier(_settings(tmp_path))
    await v.start()
    yield v
    await v.close()


async def test_a_valid_token_gives_the_principal_its_claims_name(verifier: TokenVerifier) -> None:
    p = verifier.verify(_token())
    assert (p.tenant, p.user, p.groups, p.client, p.reply_to) == (
        "acme",
        "alice",
        ("hr",),
        "alice",
        "acme.alice",
    )
    assert p.scopes == ("query", "ingest") and p.key_id == "acme-web" and p.verified
    assert verifier.verify(_token()).tenant == "acme"  # another token, same claims


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: _token(_hs(secret="x" * 40)), "signature does not verify"),
        (lambda: tampered(_token(), tenant="globex"), "signature does not verify"),
        (lambda: tampered(_token(), groups=["hr", "finance"]), "signature does not verify"),
        (lambda: unsigned(claims_now(sub="alice", tenant="acme"), kid="acme-web"), "alg=none"),
        (lambda: _token(now=time.time() - 7200), "expired"),
        (lambda: "not-a-jwt", "not a JWT"),
        (lambda: "a" * 1_048_576, "over auth.max_token_bytes"),
        (lambda: _token(_hs(kid="nobody")), "unknown key"),
        (lambda: _token(audience="someone-else"), "audience"),
        (lambda: _token(ttl_s=30 * 86400), "max_ttl_s"),
        (lambda: None, "no token"),
        (lambda: "", "no token"),
    ],
)
async def test_bad_tokens_are_unauthenticated_with_a_reason(
    verifier: TokenVerifier, make: Any, reason: str
) -> None:
    with pytest.raises(Unauthenticated, match=reason):
        verifier.verify(make())


async def test_an_expired_token_still_names_who_to_tell(verifier: TokenVerifier) -> None:
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(_token(now=time.time() - 7200))
    assert info.value.principal is not None and info.value.principal.reply_to == "acme.alice"


async def test_a_key_signs_only_for_its_tenants_and_scopes(verifier: TokenVerifier) -> None:
    with pytest.raises(Forbidden, match="tenant 'globex'"):
        verifier.verify(_token(tenant="globex"))
    with pytest.raises(Forbidden, match="scope ingest"):
        verifier.verify(_token(_hs("any-tenant", OTHER_SECRET), tenant="globex"))
    assert (
        verifier.verify(_token(_hs("any-tenant", OTHER_SECRET), tenant="globex", scopes=("query",))).tenant
        == "globex"
    )


async def test_claims_that_cannot_name_a_reply_stream_are_refused(verifier: TokenVerifier) -> None:
    key = _hs()
    now = int(time.time())
    base = {"sub": "alice", "tenant": "acme", "aud": "ragstream", "iat": now, "exp": now + 60}
    with pytest.raises(Unauthenticated, match="reply_to"):
        verifier.verify(key.sign({**base, "reply_to": "globex.alice"}))
    with pytest.raises(Unauthenticated, match="client"):
        verifier.verify(key.sign({**base, "client": "a.b"}))  # would share acme.a.b with tenant acme.a
    with pytest.raises(Unauthenticated, match="exp"):
        verifier.verify(key.sign({**base, "exp": 10**20}))


def _rsa_and_ec() -> tuple[Any, Any]:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048), ec.generate_private_key(
        ec.SECP256R1()
    )


def _jwks(*pairs: tuple[str, Any]) -> dict[str, Any]:
    keys = []
    for kid, private in pairs:
        algo = (
            jwt.algorithms.RSAAlgorithm
            if isinstance(private, rsa.RSAPrivateKey)
            else jwt.algorithms.ECAlgorithm
        )
        jwk = json.loads(algo.to_jwk(private.public_key()))
        jwk.update(kid=kid, alg="RS256" if algo is jwt.algorithms.RSAAlgorithm else "ES256", use="sig")
        keys.append(jwk)
    return {"keys": keys}


async def test_rs256_and_es256_from_a_jwks_file_and_no_algorithm_confusion(tmp_path: Path) -> None:
    rsa_key, ec_key = _rsa_and_ec()
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(_jwks(("rsa-1", rsa_key), ("ec-1", ec_key))))
    v = TokenVerifier(Settings(data_dir=tmp_path, auth=AuthSettings(jwks_file=path, local_key=False)))
    await v.start()
    assert v.verify(_token(SigningKey("rsa-1", "RS256", rsa_key))).key_id == "rsa-1"
    assert v.verify(_token(SigningKey("ec-1", "ES256", ec_key), tenant="globex")).tenant == "globex"
    # HS256 "signed" with the RSA public key as the secret: the classic key-confusion forgery.
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = hmac_signed(
        pem, claims_now(sub="mallory", tenant="acme"), kid="rsa-1"
    )  # built by hand: PyJWT refuses a PEM as an HMAC secret
    with pytest.raises(Unauthenticated, match="signed with HS256"):
        v.verify(forged)
    await v.close()


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, dict[str, Any]]]:
    state: dict[str, Any] = {"doc": {"keys": []}, "hits": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["hits"] += 1
            body = json.dumps(state["doc"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks", state
    server.shutdown()


async def test_a_jwks_url_is_fetched_at_start_and_refreshed_for_a_new_key_off_the_request_path(
    tmp_path: Path, jwks_server: tuple[str, dict[str, Any]]
) -> None:
    import asyncio

    import ragstream.infra.auth as auth_mod

    url, state = jwks_server
    first, second = _rsa_and_ec()
    state["doc"] = _jwks(("k1", first))
    v = TokenVerifier(Settings(data_dir=tmp_path, auth=AuthSettings(jwks_url=url, local_key=False)))
    await v.start()
    assert v.verify(_token(SigningKey("k1", "RS256", first))).key_id == "k1"
    state["doc"] = _jwks(("k1", first), ("k2", second))  # the provider rotates in a new key
    token = _token(SigningKey("k2", "ES256", second))
    original = auth_mod._UNKNOWN_KID_REFRESH_S
    auth_mod._UNKNOWN_KID_REFRESH_S = 0.0
    try:
        with pytest.raises(Unauthenticated, match="unknown key"):
            v.verify(token)  # never waits on the network: refused now, refresh scheduled
        for _ in range(50):
            await asyncio.sleep(0.05)
            if "k2" in v.key_ids:
                break
        assert v.verify(token).key_id == "k2"
    finally:
        auth_mod._UNKNOWN_KID_REFRESH_S = original
        await v.close()
    assert state["hits"] == 2


async def test_required_mode_without_any_key_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no key is configured"):
        await TokenVerifier(Settings(data_dir=tmp_path)).start()


async def test_the_local_key_is_created_once_private_and_trusted(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    key = ensure_local_key(settings.local_key_file)
    assert ensure_local_key(settings.local_key_file).kid == key.kid
    assert settings.local_key_file.stat().st_mode & 0o077 == 0
    v = TokenVerifier(settings)
    await v.start()
    p = v.verify(issue_token(key, tenant="globex", user="ops", scopes=("query", "ingest", "admin")))
    assert p.scopes == ("query", "ingest", "admin")


# -- admission -------------------------------------------------------------------------------
@pytest.fixture
async def admission(verifier: TokenVerifier, tmp_path: Path) -> Admission:
    return Admission(_settings(tmp_path), verifier)


def _query(**fields: Any) -> QuerySubmitted:
    return QuerySubmitted.model_validate_json(json.dumps({"question": "What is the leave policy?", **fields}))


async def test_admission_takes_identity_from_the_token_and_drops_the_token(admission: Admission) -> None:
    q = admission.admit(_query(token=_token()))
    assert isinstance(q, QuerySubmitted)
    assert (q.tenant, q.user, q.access_groups, q.token) == ("acme", "alice", ("hr",), None)
    assert q.principal is not None and q.principal.reply_to == "acme.alice"
    narrowed = admission.admit(_query(token=_token(), tenant="acme", user="alice", access_groups=[]))
    assert isinstance(narrowed, QuerySubmitted) and narrowed.access_groups == ()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"tenant": "globex"}, "tenant 'globex'"),
        ({"user": "bob"}, "user 'bob'"),
        ({"access_groups": ["hr", "finance"]}, "group"),
        (
            {
                "principal": {
                    "tenant": "acme",
                    "user": "alice",
                    "client": "alice",
                    "reply_to": "acme.alice",
                    "groups": ["hr", "exec"],
                }
            },
            "principal",
        ),
    ],
)
async def test_a_body_that_disagrees_with_the_token_is_forbidden(
    admission: Admission, body: dict[str, Any], reason: str
) -> None:
    with pytest.raises(Forbidden, match=reason) as info:
        admission.admit(_query(token=_token(), **body))
    assert info.value.principal is not None and info.value.principal.tenant == "acme"  # who to tell


async def test_documents_need_the_ingest_scope_in_their_own_tenant(admission: Admission) -> None:
    doc = {"document_id": "d1", "content": "x"}
    ok = admission.admit(DocumentSubmitted.model_validate({**doc, "token": _token()}))
    assert isinstance(ok, DocumentSubmitted) and ok.tenant == "acme" and ok.token is None
    with pytest.raises(Forbidden, match="scope 'ingest'"):
        admission.admit(DocumentSubmitted.model_validate({**doc, "token": _token(scopes=("query",))}))
    with pytest.raises(Forbidden, match="tenant 'globex'"):
        admission.admit(
            DocumentSubmitted.model_validate({**doc, "tenant": "globex", "deleted": True, "token": _token()})
        )


async def test_the_caller_of_an_unreadable_command_is_its_verified_token_only(admission: Admission) -> None:
    raw = json.dumps({"question": "", "token": _token()}).encode()
    caller = admission.caller(raw)
    assert caller is not None and caller.reply_to == "acme.alice"
    assert admission.caller(json.dumps({"token": _token(_hs(secret="x" * 40))}).encode()) is None
    assert admission.caller(b"\xff not json") is None


async def test_auth_off_trusts_the_body_and_replies_to_the_tenants_anonymous_stream(tmp_path: Path) -> None:
    off = Admission(Settings(data_dir=tmp_path, auth=AuthSettings(mode="off")), None)
    q = off.admit(_query(tenant="globex", user="bob", access_groups=["hr"]))
    assert isinstance(q, QuerySubmitted) and q.principal is not None
    assert (q.principal.reply_to, q.principal.verified, q.access_groups) == (
        "globex.anonymous",
        False,
        ("hr",),
    )


# -- what leaves a stage ---------------------------------------------------------------------
def test_dead_letters_keep_no_token() -> None:
    token = _token()
    raw = json.dumps({"question": "q" * 10, "token": token, "tenant": "acme"}).encode()
    record = dead_letter_record(
        "retrieve", Message("ragstream.queries", 0, 1, b"k", raw), "unauthenticated", "bad"
    )
    assert token.encode() not in record.original and b"<redacted>" in record.original
    assert token.encode() not in redact_secrets(b"garbage " + token.encode() + b" more")
    assert redact_secrets(b'{"token": "unterminated') == b'{"token": "<redacted>"'


def test_the_callers_copy_has_no_prompt_and_goes_to_the_callers_stream() -> None:
    p = Principal(tenant="acme", user="alice", client="web", reply_to="acme.web", groups=("hr",))
    full = ResponseCompleted(
        request_id="r1",
        status="ok",
        answer="Ten days [1].",
        prompt_messages=(PromptMessage(role="user", content="[1] SECRET HR PASSAGE"),),
        principal=p,
    )
    copy = full.for_caller()
    assert copy is not None and copy.prompt_messages == () and copy.principal is None
    assert "SECRET" not in copy.model_dump_json()
    assert generate.STAGE.route(copy) is REPLIES and generate.STAGE.route(full).name == "responses"
    assert (
        REPLIES.topic_name("ragstream", copy)
        == reply_topic("ragstream", "acme.web")
        == "ragstream.responses.acme.web"
    )
    delta = TokenGenerated(request_id="r1", sequence=0, delta="Ten", reply_to="acme.web")
    assert retrieve.STAGE.route(delta) is REPLIES
    assert ResponseCompleted(request_id="r2", status="error").for_caller() is None  # nobody to tell


async def test_a_query_built_with_the_contract_model_claims_only_what_it_sets(admission: Admission) -> None:
    from ragstream.streams.codec import decode, encode
    from ragstream.streams.topics import DOCUMENTS, QUERIES

    # Left at their defaults, tenant/user/groups are not written: the token's claims apply.
    q = decode(QUERIES, encode(QuerySubmitted(question="Where can I park?", token=_token())))
    admitted = admission.admit(q)
    assert isinstance(admitted, QuerySubmitted) and (admitted.tenant, admitted.user) == ("acme", "alice")
    assert admitted.access_groups == ("hr",)
    # Set, they are a claim the token must match, even when the value is the default.
    q = decode(QUERIES, encode(QuerySubmitted(question="Where?", tenant="default", token=_token())))
    with pytest.raises(Forbidden, match="tenant 'default'"):
        admission.admit(q)
    d = decode(DOCUMENTS, encode(DocumentSubmitted(document_id="d", content="x", token=_token())))
    assert "tenant" not in d.model_fields_set


async def test_auth_off_says_so_loudly_when_a_stage_opens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ragstream.streams.admission import opened_admission

    with caplog.at_level("WARNING"):
        async with opened_admission(Settings(data_dir=tmp_path, auth=AuthSettings(mode="off"))) as admission:
            assert admission.verifier is None
    assert any("AUTH IS OFF" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
