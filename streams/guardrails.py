"""Guardrails: a named policy's rails run on a text, and what comes out of it.

`Guardrails.check(text, direction, policy)` runs the policy's rails for that direction
concurrently, each within its time budget, and returns one verdict per rail and the action
that wins (block > mask > flag > allow), with the text masked where a rail masks.

Rails: `pii` (Presidio), `safety` (rules + the embedding head), `injection` (rules + head),
`keywords` (invalid words), `topics` (valid topics, by embedding similarity). A detector that
fails or runs past its budget makes the rail act as configured: fail-closed blocks, fail-open
passes and flags. Allow-lists drop findings whose text contains an allowed phrase.

`StreamGuard` applies the output rails to a streamed answer: deltas are held until the window
that contains them (to a sentence end, or `output_window_chars`) has passed, with the end of
the released text as context, so an e-mail or phone number split across deltas is seen whole.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from ragstream.infra import telemetry
from ragstream.infra.embedder import Embedder
from ragstream.infra.guard.base import QUEUE_FACTOR, detect_language, fold
from ragstream.infra.guard.detectors import GuardDetectors
from ragstream.infra.guard.pii import mask_spans
from ragstream.infra.guard.rules import HARM_CATEGORIES, KeywordRules
from ragstream.infra.settings import GuardPolicy, GuardrailsSettings, RailSettings, Settings
from ragstream.schemas.guard import Action, Direction, GuardFinding, GuardVerdict, strongest

__all__ = ["GuardResult", "Guardrails", "StreamGuard", "UnknownPolicy", "opened_guardrails"]

MAX_CHECK_CHARS = 20_000
"""Longer texts are checked in their first and last parts (a question is at most 8,000)."""


@dataclass
class _Opened:
    guard: Guardrails
    users: int
    stack: AsyncExitStack


_shared: dict[int, _Opened] = {}
_shared_lock = asyncio.Lock()


@asynccontextmanager
async def opened_guardrails(
    settings: Settings, embedder: Embedder | None = None
) -> AsyncIterator[Guardrails | None]:
    """The process's guardrails, opened once and shared by its stages (the PII pipelines and
    the head are a few hundred MB and seconds to load). None when guardrails are disabled.

    The head embeds with `embedder`, by default multilingual-e5-small on Triton
    (`triton.guard_embed_model`). A generator client is opened when a policy uses an
    `llm:<route>` detector."""
    if not settings.guardrails.enabled:
        yield None
        return
    key = id(settings)
    async with _shared_lock:
        opened = _shared.get(key)
        if opened is None:
            opened = _shared[key] = await _open(settings, embedder)
        opened.users += 1
    try:
        yield opened.guard
    finally:
        async with _shared_lock:
            opened.users -= 1
            if opened.users == 0:
                del _shared[key]
                await opened.stack.aclose()


async def _open(settings: Settings, embedder: Embedder | None) -> _Opened:
    from ragstream.infra.lifecycle import started

    async with AsyncExitStack() as stack:
        if embedder is None:
            from ragstream.infra.embedder import E5_MODEL_ID, TritonEmbedder

            embedder = await stack.enter_async_context(
                started(
                    TritonEmbedder(settings, model=settings.triton.guard_embed_model, model_id=E5_MODEL_ID)
                )
            )
        generator = None
        if any(
            rail.detector.startswith("llm:")
            for policy in settings.guardrails.policies.values()
            for rails in (policy.input, policy.context, policy.output)
            for rail in rails.values()
        ):
            from ragstream.infra.generator import TritonGenerator

            generator = await stack.enter_async_context(started(TritonGenerator(settings)))
        rails = [
            rail
            for policy in settings.guardrails.policies.values()
            for rails_of in (policy.input, policy.context, policy.output)
            for name, rail in rails_of.items()
            if name == "pii"
        ]
        detectors = await stack.enter_async_context(
            started(
                GuardDetectors(
                    embedder,
                    cache_dir=settings.model_cache_dir / "guard",
                    generator=generator,
                    pii_entities=sorted({e for rail in rails for e in rail.entities}),
                )
            )
        )
        return _Opened(Guardrails(settings.guardrails, detectors), 0, stack.pop_all())
    raise AssertionError("unreachable")


class UnknownPolicy(ValueError):
    """A request or setting names a policy that does not exist, or one it may not choose."""


@dataclass
class GuardResult:
    action: Action
    text: str
    """The text as it may go on: masked where a rail masks (unchanged otherwise)."""
    verdicts: list[GuardVerdict] = field(default_factory=list)

    @property
    def blocked_by(self) -> GuardVerdict | None:
        return next((v for v in self.verdicts if v.action == "block"), None)


class Guardrails:
    """Policies from settings, run with the process's opened detectors."""

    def __init__(self, settings: GuardrailsSettings, detectors: GuardDetectors) -> None:
        self.settings = settings
        self.detectors = detectors
        self._keywords: dict[tuple[str, ...], KeywordRules] = {}

    def policy(
        self, *, tenant: str, route: str | None, requested: str | None = None
    ) -> tuple[str, GuardPolicy]:
        """The policy that applies: the request's choice (if allowed), else its route's, else
        its tenant's, else the default.

        Raises:
            UnknownPolicy: the request names a policy it may not choose.
        """
        s = self.settings
        name = s.applying(tenant=tenant, route=route)
        if name is None:
            return "off", GuardPolicy()
        if requested and requested != name:
            if requested not in s.request_may_choose or requested not in s.policies:
                raise UnknownPolicy(f"policy {requested!r} may not be chosen by a request")
            name = requested
        return name, s.policies[name]

    async def check(
        self,
        text: str,
        direction: Direction,
        policy: GuardPolicy,
        *,
        lang: str | None = None,
        context: str = "",
        window: int | None = None,
    ) -> GuardResult:
        """Run the policy's rails for `direction` on `text` (see the module docstring).

        `context` is text before `text` that was already checked and released: rails see
        both, and act only on findings that reach into `text`.
        """
        rails = {name: r for name, r in getattr(policy, direction).items() if r.enabled}
        if not rails or not text.strip():
            return GuardResult("allow", text)
        whole = context + text
        if len(whole) > MAX_CHECK_CHARS:
            half = MAX_CHECK_CHARS // 2
            whole = whole[:half] + " " + whole[-half:]
            context = ""
        lang = lang or detect_language(whole)
        with telemetry.child_span(f"ragstream.guardrails.{direction}", rails=",".join(rails)) as span:
            ran = await asyncio.gather(
                *(
                    self._run(name, rail, whole, len(context), direction, lang, window)
                    for name, rail in rails.items()
                )
            )
            verdicts = [v for v, _ in ran]
            action = strongest([v.action for v in verdicts])
            if span is not None:
                span.set_attribute("action", action)
        for v in verdicts:
            telemetry.GUARDRAIL_VERDICTS.labels(direction, v.rail, v.action).inc()
        out = text
        masks = [f for v, acting in ran if v.action == "mask" for f in acting if f.start is not None]
        if masks and action == "mask":
            shifted = [
                f.model_copy(update={"start": max(f.start - len(context), 0), "end": f.end - len(context)})
                for f in masks
                if f.start is not None and f.end is not None and f.end > len(context)
            ]
            out = mask_spans(text, shifted)
        return GuardResult(action, out, list(verdicts))

    async def _run(
        self,
        name: str,
        rail: RailSettings,
        text: str,
        offset: int,
        direction: Direction,
        lang: str,
        window: int | None,
    ) -> tuple[GuardVerdict, list[GuardFinding]]:
        """The rail's verdict, and the findings that acted (over the threshold)."""
        started = time.perf_counter()
        detect = self._detector(name, rail, direction)
        budget_s = rail.budget_ms / 1000
        try:
            # Each detector holds itself to the budget from when its work starts, after at
            # most QUEUE_FACTOR budgets of queueing; this bound covers one that does not.
            async with asyncio.timeout(budget_s * (QUEUE_FACTOR + 1)):
                findings = await detect(text, lang, budget_s)
        except Exception as exc:  # noqa: BLE001 - a failed detector acts per its fail mode
            reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            failed = GuardVerdict(
                rail=name,
                direction=direction,
                action="block" if rail.fail == "closed" else "flag",
                category="detector_unavailable",
                latency_ms=(time.perf_counter() - started) * 1000,
                error=f"{name} detector failed ({reason}); fail-{rail.fail}"[:1000],
                window=window,
            )
            return failed, []
        findings = [f for f in findings if f.end is None or f.end > offset]  # reaches into the new text
        findings = _allowed_dropped(findings, text, rail.allow)
        acting = [f for f in findings if f.score >= rail.threshold]
        top = max(acting, key=lambda f: f.score, default=None)
        action: Action = rail.action if top is not None else "allow"
        verdict = GuardVerdict(
            rail=name,
            direction=direction,
            action=action,
            category=top.category if top else None,
            score=round(top.score, 4) if top else None,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            detector=",".join(sorted({f.detector for f in findings})) or rail.detector,
            findings=tuple(findings[:256]),
            window=window,
        )
        return verdict, acting

    def _detector(
        self, name: str, rail: RailSettings, direction: Direction
    ) -> Callable[[str, str, float], Awaitable[list[GuardFinding]]]:
        d = self.detectors
        if rail.detector.startswith("llm:"):
            if name not in ("injection", "safety"):
                raise ValueError(f"the {name} rail has no llm detector (safety and injection do)")
            kind: Literal["safety", "injection"] = "injection" if name == "injection" else "safety"
            route = rail.detector.removeprefix("llm:")

            async def llm(text: str, lang: str, budget_s: float) -> list[GuardFinding]:
                async with asyncio.timeout(budget_s):
                    return await d.llm(route).detect(text, kind=kind, direction=direction, timeout_s=budget_s)

            return llm
        use_rules = rail.detector in ("default", "rules")
        use_head = rail.detector in ("default", "head")
        if name == "pii":

            async def pii(text: str, lang: str, budget_s: float) -> list[GuardFinding]:
                wanted = set(rail.entities) if rail.entities else None
                found = await d.pii.detect(text, lang=lang, budget_s=budget_s)
                return [f for f in found if wanted is None or f.category in wanted]

            return pii
        if name in ("injection", "safety"):
            rules = d.injection_rules if name == "injection" else d.safety_rules
            labels = ("injection",) if name == "injection" else HARM_CATEGORIES

            async def classified(text: str, lang: str, budget_s: float) -> list[GuardFinding]:
                found = rules.scan(text) if use_rules else []
                if use_head:
                    probs = await d.head.scores(text, budget_s=budget_s)
                    label = max(labels, key=lambda k: probs[k])
                    found.append(
                        GuardFinding(
                            rail=name, category=label, score=round(probs[label], 4), detector=d.head.name
                        )
                    )
                return found

            return classified
        if name == "keywords":
            key = tuple(rail.keywords)
            kw = self._keywords.get(key) or self._keywords.setdefault(key, KeywordRules(rail.keywords))

            async def keywords(text: str, lang: str, budget_s: float) -> list[GuardFinding]:
                return kw.scan(text)

            return keywords
        if name == "topics":

            async def topics(text: str, lang: str, budget_s: float) -> list[GuardFinding]:
                if not rail.topics:
                    return []
                similarity, topic = await d.topic_similarity(text, rail.topics, budget_s=budget_s)
                # Score = how far off-topic: acts when similarity < threshold.
                off = similarity < rail.threshold
                score = 1.0 if off else 0.0
                return [
                    GuardFinding(
                        rail="topics",
                        category="off_topic" if off else f"topic:{topic}"[:128],
                        score=score,
                        detector=d.head.name,
                    )
                ]

            return topics
        raise ValueError(f"unknown rail {name!r} (known: pii, safety, injection, keywords, topics)")


def _allowed_dropped(findings: list[GuardFinding], text: str, allow: tuple[str, ...]) -> list[GuardFinding]:
    if not allow:
        return findings
    phrases = [fold(a) for a in allow if fold(a)]
    whole = fold(text)
    kept = []
    for f in findings:
        part = fold(text[f.start : f.end]) if f.start is not None and f.end is not None else whole
        if not any(p in part or (f.start is not None and p in whole and _near(whole, p, f)) for p in phrases):
            kept.append(f)
    return kept


def _near(folded: str, phrase: str, f: GuardFinding) -> bool:
    """An allowed phrase overlapping the finding's span (offsets are close after folding)."""
    assert f.start is not None and f.end is not None
    for m in re.finditer(re.escape(phrase), folded):
        if m.start() < f.end and m.end() > f.start:
            return True
    return False


_SENTENCE_END = re.compile(r"[.!?…。](?:[\"')\]»]*)\s|\n")
_TRAILING_RUN = re.compile(r"[\w+@.\-()/]*[\d@][\w+@.\-()/ ]*$")


class StreamGuard:
    """Output rails on a streamed answer (see the module docstring). Feed deltas to `push()`;
    each call returns the text that may be released now. Once a window is blocked, `blocked`
    is set and nothing more is released."""

    def __init__(self, guardrails: Guardrails, policy: GuardPolicy, *, lang: str | None = None) -> None:
        self._g = guardrails
        self._policy = policy
        self._lang = lang
        self._held = ""
        self._released = ""
        self.window = 0
        self.verdicts: list[GuardVerdict] = []
        self.blocked: GuardVerdict | None = None
        self.max_held_chars = 0
        self._early: tuple[str, asyncio.Task[GuardResult]] | None = None

    @property
    def active(self) -> bool:
        return bool(self._policy.output)

    async def push(self, delta: str) -> str:
        if self.blocked is not None:
            return ""
        out = ""
        early, self._early = self._early, None
        if early is not None:
            text, task = early
            if text == self._held and delta[:1].isspace():
                # The first word is complete, and it was already checked while the model
                # wrote the next token: release it now.
                out = self._apply(text, await task, rest="")
                if self.blocked is not None:
                    return ""
            else:
                task.cancel()
        self._held += delta
        self.max_held_chars = max(self.max_held_chars, len(self._held))
        cut = self._cut()
        if cut > 0:
            return out + await self._release(self._held[:cut], rest=self._held[cut:])
        if self.window == 0 and self._held.strip() and _TRAILING_RUN.search(self._held) is None:
            # Check the first word before knowing it is complete; wasted only when the next
            # token continues it.
            self._early = (self._held, asyncio.create_task(self._check(self._held)))
        return out

    async def finish(self) -> str:
        """Check and release whatever is still held (the answer ended)."""
        early, self._early = self._early, None
        if self.blocked is not None or not self._held:
            if early is not None:
                early[1].cancel()
            return ""
        if early is not None and early[0] == self._held:
            return self._apply(self._held, await early[1], rest="")
        if early is not None:
            early[1].cancel()
        return await self._release(self._held, rest="")

    @property
    def released(self) -> str:
        return self._released

    def _cut(self) -> int:
        held = self._held
        p = self._policy
        limit = min(p.output_window_chars, p.output_first_window_chars * 4**self.window)
        ends = [m.end() for m in _SENTENCE_END.finditer(held)]
        cut = ends[-1] if ends else 0
        if cut == 0 and len(held) >= limit:
            # At a word boundary: the last one within the limit, else the first one after it
            # (a word is never released in part), else, for a run-on "word", the hard limit.
            cut = held.rfind(" ", 0, limit) + 1 or held.find(" ", limit) + 1
            if cut == 0 and len(held) >= p.output_window_chars:
                cut = p.output_window_chars
        if cut <= 0:
            return 0
        # Cut mid-sentence at the size limit: never release the start of something that could
        # still become a phone number, an e-mail or an account number (up to 4 full windows).
        if not ends:
            m = _TRAILING_RUN.search(held[:cut].rstrip())
            if m is not None and len(held) < 4 * p.output_window_chars:
                cut = m.start()
        return cut

    def _check(self, window_text: str) -> Coroutine[Any, Any, GuardResult]:
        return self._g.check(
            window_text,
            "output",
            self._policy,
            lang=self._lang,
            context=self._released[-200:],
            window=self.window,
        )

    async def _release(self, window_text: str, *, rest: str) -> str:
        return self._apply(window_text, await self._check(window_text), rest=rest)

    def _apply(self, window_text: str, result: GuardResult, *, rest: str) -> str:
        self.window += 1
        self.verdicts.extend(result.verdicts)
        if result.action == "block":
            self.blocked = result.blocked_by
            self._held = ""
            return ""
        self._held = rest
        self._released += result.text
        return result.text
