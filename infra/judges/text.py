"""Text helpers the non-LLM judges share: sentences, the facts a sentence states (numbers,
dates, names), refusals. English and French.

A fact is what a changed answer changes: a number ("16 weeks", "six months", "2 500 €"), a
month or weekday, or a name ("Lyon", "Voyago"). `facts()` normalises each to one spelling,
so "6" and "six", "2,500" and "2 500", "Mars" and "March" compare equal.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

__all__ = ["Facts", "facts", "fold", "is_refusal", "sentences"]

_SENTENCE = re.compile(
    r"(?<=[.!?…])[\"')\]»]*\s+(?=[\"'(«\[]?[A-ZÀ-Ý0-9])|\n+|(?<=:)\s+(?=[-*•])|\s+(?=[-*•]\s)"
)
_CITATION = re.compile(r"\s*\[\d{1,3}\](?:\s*\[\d{1,3}\])*")


def fold(text: str) -> str:
    """Lower case, accents removed."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def sentences(text: str) -> list[str]:
    """The sentences (and list items) of `text`, citations like `[1]` removed."""
    parts = (_CITATION.sub("", p).strip(" -*•\t") for p in _SENTENCE.split(text.strip()))
    return [p for p in parts if len(p) > 1 and re.search(r"\w", p)]


_NUMBER_WORDS = {
    # English
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
    "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
    "hundred": 100, "thousand": 1000, "twice": 2, "half": 0.5, "dozen": 12,
    # French ("un"/"une" are also articles: not counted)
    "deux": 2, "trois": 3, "quatre": 4, "cinq": 5, "sept": 7, "huit": 8, "neuf": 9, "dix": 10,
    "onze": 11, "douze": 12, "treize": 13, "quatorze": 14, "quinze": 15, "seize": 16, "vingt": 20,
    "trente": 30, "quarante": 40, "cinquante": 50, "soixante": 60, "cent": 100, "mille": 1000,
    "demi": 0.5, "moitie": 0.5, "douzaine": 12,
}  # fmt: skip

_MONTHS = {
    "january": 1, "janvier": 1, "jan": 1, "february": 2, "fevrier": 2, "feb": 2, "march": 3, "mars": 3,
    "april": 4, "avril": 4, "apr": 4, "may": 5, "mai": 5, "june": 6, "juin": 6, "july": 7,
    "juillet": 7, "august": 8, "aout": 8, "aug": 8, "september": 9, "septembre": 9, "sept": 9,
    "october": 10, "octobre": 10, "oct": 10, "november": 11, "novembre": 11, "nov": 11,
    "december": 12, "decembre": 12, "dec": 12,
}  # fmt: skip
_DAYS = {
    "monday": 1, "lundi": 1, "tuesday": 2, "mardi": 2, "wednesday": 3, "mercredi": 3,
    "thursday": 4, "jeudi": 4, "friday": 5, "vendredi": 5, "saturday": 6, "samedi": 6,
    "sunday": 7, "dimanche": 7,
}  # fmt: skip

# Digits with thousands separators (2 500, 2,500, 2.500, 2 500) or a decimal part (1,5 / 1.5).
_NUMERAL = re.compile(r"(?<![\w.,])(\d{1,3}(?:[ \u00a0\u202f.,]\d{3})+(?![\d])|\d+(?:[.,]\d+)?)")
_ELISION = re.compile(r"^(?:[ldjmnstc]|qu)['’](?=\w)", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-zÀ-ÖØ-öø-ÿ][\w'’-]*")

_STOP = frozenset(
    fold(w)
    for w in (
        "The A An And Or But If When Where What Which Who Whom Whose Why How In On At To For From By "
        "With Without Of Off Up As Is Are Was Were Be Been It Its This That These Those There Here "
        "You Your We Our They Their He She His Her I My Me Us Them Yes No Not Do Does Did Can Could "
        "Should Would Will Must May Might Also Only All Any Each Every Some Most Many Much More Less "
        "After Before During Between Within Per Please Note However Employees Employee Staff "
        "Le La Les L Un Une Des Du De D Et Ou Mais Si Quand Ou Que Qui Quoi Quel Quelle Quels Quelles "
        "Comment Pourquoi Combien Dans Sur Sous Pour Par Avec Sans Au Aux En Est Sont Etait Il Elle "
        "Ils Elles On Nous Vous Je Tu Ce Cet Cette Ces Ceci Cela Ca Son Sa Ses Leur Leurs Votre Vos "
        "Notre Nos Oui Non Ne Pas Plus Moins Tout Tous Toute Toutes Chaque Apres Avant Pendant Entre "
        "Selon Merci Les Salaries Salarie Collaborateurs Collaborateur"
    ).split()
)


@dataclass(frozen=True)
class Facts:
    numbers: frozenset[str]
    names: frozenset[str]

    def __bool__(self) -> bool:
        return bool(self.numbers or self.names)


def _canonical_number(raw: str) -> str:
    compact = re.sub(r"[ \u00a0\u202f]", "", raw)
    if re.fullmatch(r"\d{1,3}(?:[.,]\d{3})+", compact):
        compact = re.sub(r"[.,]", "", compact)  # thousands separators
    value = float(compact.replace(",", "."))
    return f"{value:g}"


def facts(text: str) -> Facts:
    """The numbers, dates and names `text` states, normalised (see the module docstring)."""
    numbers: set[str] = set()
    for m in _NUMERAL.finditer(text):
        numbers.add(_canonical_number(m.group(1)))
    names: set[str] = set()
    for sentence in sentences(text) or [text]:
        for i, m in enumerate(_WORD.finditer(sentence)):
            word = _ELISION.sub("", m.group(0)).strip("'’-")
            folded = fold(word)
            if folded in _NUMBER_WORDS:
                numbers.add(f"{_NUMBER_WORDS[folded]:g}")
            elif folded in _MONTHS:
                names.add(f"month:{_MONTHS[folded]}")
            elif folded in _DAYS:
                names.add(f"day:{_DAYS[folded]}")
            elif word[:1].isupper() and folded not in _STOP and len(folded) > 1:
                # Capitalised words: names, places, products. A sentence's first word is one
                # only when its shape says so (NaOH, CACES, R489): "Hotels must..." is not.
                if i > 0 or any(c.isupper() or c.isdigit() for c in word[1:]):
                    names.add(folded)
    return Facts(frozenset(numbers), frozenset(names))


_REFUSAL = re.compile(
    r"\b(i (do not|don't|cannot|can't|could not|couldn't|did not|didn't) (know|find|say|answer|tell|see)"
    r"|(can't|cannot|could not|couldn't|unable to) (tell|say|answer|find|determine)"
    r"|(do|does|did) not (say|mention|state|specify|contain|cover|include|explain|tell|address|describe)"
    r"|(don't|doesn't|didn't) (say|mention|state|specify|contain|cover|include|explain|tell|address|describe)"
    r"|(is|are) not (mentioned|specified|stated|covered|addressed|described|in the (documents|sources|passages|context))"
    r"|no (information|mention|answer)|not enough information|nothing (in|about)"
    r"|je (ne|n') ?(sais|trouve|peux|ai) (pas|trouve)|je n'ai pas (trouve|d'information|de reponse)"
    r"|ne (precise|precisent|mentionne|mentionnent|dit|disent|contient|contiennent|parle|parlent|traite|traitent"
    r"|indique|indiquent|couvre|couvrent|aborde|abordent) pas"
    r"|ne (dispose|disposons|possede|possedons) pas|(information|reponse) (n'est pas|non) disponible"
    r"|(aucune|pas d') ?(information|mention|reponse)|pas assez d'information"
    r"|n'(est|y a) pas (mentionne|precise|indique|d'information|de reponse))",
)


def is_refusal(text: str) -> bool:
    """The answer says the sources do not tell (English or French)."""
    return _REFUSAL.search(fold(text).replace("’", "'")) is not None
