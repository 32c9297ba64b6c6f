"""Masking PII in what is kept for audit, where no rail saw the text.

The rails mask the question before the model sees it and the answer before the caller does.
Some text reaches the audit trail without passing a rail: the passages quoted in the prompt
(they come from the documents), the question of a request that never got a response, and the
original bytes of a dead letter. `PiiScrubber` masks those with typed placeholders, using
Presidio's recognizers that need no language model (e-mail, phone, IBAN, payment card, NIR,
all validated), so it is cheap (a few ms for a 3 KB prompt) and synchronous.

It follows the policy that applied: text is masked when that policy's PII rail (any
direction) masks or blocks, with that rail's entity types. `PERSON`, which needs a language
model, is masked by the rails only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ragstream.infra.guard.pii import DEFAULT_ENTITIES, REGIONS, mask_spans, pattern_recognizers
from ragstream.infra.settings import GuardrailsSettings
from ragstream.schemas.guard import GuardFinding

__all__ = ["PiiScrubber"]

_MIN_SCORE = 0.35
# Cheap pre-checks: a recognizer runs only when its kind of text could be there.
_HAS_DIGITS = re.compile(r"\d(?:[\s.\-()/]*\d){6,}")
_HAS_AT = re.compile(r"@")
_NEEDS = {"EMAIL_ADDRESS": _HAS_AT}


class PiiScrubber:
    """Masks the PII a policy masks (see the module docstring). `start()` builds the
    recognizers (imports Presidio); the constructor does no I/O."""

    def __init__(self, settings: GuardrailsSettings, *, regions: Sequence[str] = REGIONS) -> None:
        self._settings = settings
        self._regions = tuple(regions)
        self._recognizers: list[Any] = []
        self._entities: dict[str | None, frozenset[str]] = {}

    def start(self) -> None:
        self._recognizers = pattern_recognizers("en", self._regions)

    def entities(self, policy: str | None) -> frozenset[str]:
        """The entity types `policy` masks (empty: it masks nothing)."""
        cached = self._entities.get(policy)
        if cached is not None:
            return cached
        found: set[str] = set()
        p = self._settings.policies.get(policy or "") if self._settings.enabled else None
        if p is not None:
            for rails in (p.input, p.context, p.output):
                rail = rails.get("pii")
                if rail is not None and rail.enabled and rail.action in ("mask", "block"):
                    found.update(rail.entities or DEFAULT_ENTITIES)
        out = self._entities[policy] = frozenset(found)
        return out

    def mask(self, text: str, entities: frozenset[str]) -> str:
        """`text` with every finding of `entities` replaced by `<TYPE>`."""
        if not text or not entities:
            return text
        if not self._recognizers:
            raise RuntimeError("PiiScrubber.start() was not called")
        digits = _HAS_DIGITS.search(text) is not None
        findings: list[GuardFinding] = []
        for r in self._recognizers:
            wanted = [e for e in r.supported_entities if e in entities]
            if not wanted:
                continue
            pre = _NEEDS.get(wanted[0])
            if (pre is not None and not pre.search(text)) or (pre is None and not digits):
                continue
            for res in r.analyze(text, wanted, None):
                if res.score >= _MIN_SCORE:
                    findings.append(
                        GuardFinding(
                            rail="pii", category=res.entity_type, score=1.0, start=res.start, end=res.end
                        )
                    )
        return mask_spans(text, findings) if findings else text

    def mask_bytes(self, data: bytes, entities: frozenset[str]) -> bytes:
        """`mask` on bytes that may not be valid UTF-8: undecodable bytes are kept as they are."""
        if not data or not entities:
            return data
        text = data.decode("utf-8", errors="surrogateescape")
        masked = self.mask(text, entities)
        return data if masked == text else masked.encode("utf-8", errors="surrogateescape")

    def for_tenant(
        self, tenant: str | None, route: str | None = None, requested: str | None = None
    ) -> frozenset[str]:
        return self.entities(self._settings.applying(tenant=tenant or "", route=route, requested=requested))
