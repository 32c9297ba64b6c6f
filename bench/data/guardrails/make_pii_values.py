"""Checksum-valid PII values for the guardrail evaluation set, and the checker for that set.

The evaluation cases in ``eval.jsonl`` were written by hand; the IBANs, French social
security numbers (NIR), payment card numbers and French phone numbers in them come from
this script, so that every checksum is valid. The same validators then check the file:

    python bench/data/guardrails/make_pii_values.py              # print a seeded batch
    python bench/data/guardrails/make_pii_values.py --seed 7 --count 4
    python bench/data/guardrails/make_pii_values.py --check bench/data/guardrails/eval.jsonl
    python bench/data/guardrails/make_pii_values.py --check bench/data/guardrails/eval.jsonl \\
        --train infra/guard/data/train.jsonl

``--check`` validates the schema and enums of every line, that each listed PII value occurs
in its text and is valid for its type, that no case carries a checksum-valid card, IBAN or
NIR (or an e-mail address or French phone number) that its ``pii`` list does not declare, and
that the benign look-alikes really fail their checksum. ``--train`` also validates the training
file and fails if any training text shares a 6-word shingle with an evaluation text.
It exits 0 when everything holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_SEED = 20251011

# ---------------------------------------------------------------------------------------------
# Validators
# ---------------------------------------------------------------------------------------------

_SEPARATORS = re.compile(r"[\s.\-]")


def _compact(value: str) -> str:
    """The value without spaces, dots or dashes."""
    return _SEPARATORS.sub("", value)


def luhn_valid(number: str) -> bool:
    """True for a 12-19 digit number (spaces and dashes allowed) whose Luhn checksum holds."""
    digits = _compact(number)
    if not digits.isdigit() or not 12 <= len(digits) <= 19:
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = int(char)
        if position % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


# Lengths of the IBANs this script makes or accepts (ISO 13616 registry).
IBAN_LENGTHS: dict[str, int] = {
    "BE": 16,
    "CH": 21,
    "DE": 22,
    "ES": 24,
    "FR": 27,
    "GB": 22,
    "IT": 27,
    "LU": 20,
    "NL": 18,
}


def _iban_number(text: str) -> int:
    """Letters as 10..35, digits as themselves, read as one integer (ISO 7064 mod 97-10)."""
    return int("".join(str(int(char, 36)) for char in text))


def iban_valid(iban: str) -> bool:
    """True for an IBAN of a known country, of the right length, whose mod-97 check holds."""
    compact = re.sub(r"\s", "", iban).upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]+", compact):
        return False
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    return _iban_number(compact[4:] + compact[:4]) % 97 == 1


def _nir_body(nir: str) -> str | None:
    """The first 13 characters of a compact NIR as digits (Corsica 2A/2B mapped), or None."""
    compact = re.sub(r"\s", "", nir).upper()
    if len(compact) != 15:
        return None
    body = compact[:13]
    if body[5:7] == "2A":
        body = body[:5] + "19" + body[7:]
    elif body[5:7] == "2B":
        body = body[:5] + "18" + body[7:]
    if not body.isdigit() or not compact[13:].isdigit():
        return None
    return body


def nir_key(body13: str) -> int:
    """The NIR control key: 97 - (first 13 digits mod 97)."""
    return 97 - int(body13) % 97


def nir_valid(nir: str) -> bool:
    """True for a 15-character French NIR (spaces allowed) with a plausible sex/month and a valid key."""
    body = _nir_body(nir)
    if body is None:
        return False
    if body[0] not in "12378":
        return False
    month = int(body[3:5])
    if not (1 <= month <= 12 or 20 <= month <= 42 or 50 <= month <= 99):
        return False
    key = int(re.sub(r"\s", "", nir)[13:])
    return key == nir_key(body)


_FR_PHONE = re.compile(r"(?:\+33\s?(?:\(0\)\s?)?[1-79]|0[1-79])(?:[\s.\-]?\d{2}){4}")
_UK_PHONE = re.compile(r"(?:\+44\s?(?:\(0\)\s?)?|0)(?:20\s?\d{4}\s?\d{4}|7\d{3}\s?\d{6})")
_US_PHONE = re.compile(r"(?:\+1[\s\-]?)?(?:\([2-9]\d{2}\)|[2-9]\d{2})[\s.\-]?\d{3}[\s.\-]\d{4}")


def phone_valid(phone: str) -> bool:
    """True for a French, UK or US phone number written in one of the usual formats."""
    return any(pattern.fullmatch(phone) for pattern in (_FR_PHONE, _UK_PHONE, _US_PHONE))


_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")


def email_valid(email: str) -> bool:
    """True for a plain addr-spec e-mail address."""
    return _EMAIL.fullmatch(email) is not None


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------


def _group(text: str, size: int = 4) -> str:
    return " ".join(text[i : i + size] for i in range(0, len(text), size))


def _digits(rng: random.Random, count: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(count))


def luhn_check_digit(partial: str) -> str:
    """The digit that makes ``partial`` + digit Luhn-valid."""
    for digit in "0123456789":
        if luhn_valid(partial + digit):
            return digit
    raise AssertionError("unreachable: one of ten digits always completes a Luhn number")


def make_card(rng: random.Random, prefix: str, length: int = 16) -> str:
    """A Luhn-valid card number with the given issuer prefix, grouped 4-4-4-4 (or 4-6-5 for 15)."""
    partial = prefix + _digits(rng, length - len(prefix) - 1)
    number = partial + luhn_check_digit(partial)
    if length == 15:
        return f"{number[:4]} {number[4:10]} {number[10:]}"
    return _group(number)


def make_iban_from_bban(country: str, bban: str) -> str:
    """The IBAN, grouped by four, for a country code and a national account number (BBAN)."""
    check = 98 - _iban_number(bban + country + "00") % 97
    iban = f"{country}{check:02d}{bban}"
    if IBAN_LENGTHS.get(country) != len(iban):
        raise ValueError(f"{country} BBAN of the wrong length: {bban}")
    return _group(iban)


def _fr_rib_key(bank: str, branch: str, account: str) -> str:
    """The French RIB key, so the FR BBAN is itself consistent (digits-only accounts)."""
    return f"{97 - (89 * int(bank) + 15 * int(branch) + 3 * int(account)) % 97:02d}"


def make_iban(rng: random.Random, country: str) -> str:
    """A mod-97-valid IBAN for FR, DE, GB, BE, CH or LU (national check digits where cheap)."""
    if country == "FR":
        bank, branch, account = _digits(rng, 5), _digits(rng, 5), _digits(rng, 11)
        return make_iban_from_bban("FR", bank + branch + account + _fr_rib_key(bank, branch, account))
    if country == "DE":
        return make_iban_from_bban("DE", _digits(rng, 18))
    if country == "GB":
        bank = rng.choice(["NWBK", "BARC", "LOYD", "HBUK", "MIDL"])
        return make_iban_from_bban("GB", bank + _digits(rng, 14))
    if country == "BE":
        first = _digits(rng, 10)
        check = int(first) % 97 or 97
        return make_iban_from_bban("BE", f"{first}{check:02d}")
    if country == "CH":
        return make_iban_from_bban("CH", _digits(rng, 17))
    if country == "LU":
        return make_iban_from_bban("LU", _digits(rng, 16))
    raise ValueError(f"no generator for {country}")


def make_nir(rng: random.Random, spaced: bool = True) -> str:
    """A NIR with a valid key: sex, year, month, département, commune, order number, key."""
    sex = rng.choice("12")
    year = f"{rng.randint(55, 99):02d}" if rng.random() < 0.7 else f"{rng.randint(0, 5):02d}"
    month = f"{rng.randint(1, 12):02d}"
    dept = rng.choice(["75", "69", "13", "33", "59", "44", "67", "31", "35", "2A", "92", "93", "78"])
    commune = f"{rng.randint(1, 399):03d}"
    order = f"{rng.randint(1, 999):03d}"
    body = sex + year + month + dept + commune + order
    numeric = body.replace("2A", "19") if dept == "2A" else body
    key = f"{nir_key(numeric):02d}"
    if spaced:
        return f"{sex} {year} {month} {dept} {commune} {order} {key}"
    return body + key


# ARCEP keeps these blocks for fiction, so the numbers belong to nobody.
_FR_FICTION_BLOCKS = ["01 99 00", "02 61 91", "03 53 01", "04 65 71", "05 36 49", "06 39 98"]


def make_fr_phone(rng: random.Random, style: str = "spaced") -> str:
    """A French number from an ARCEP fiction block: spaced, dotted, compact or +33."""
    block = rng.choice(_FR_FICTION_BLOCKS)
    digits = block.replace(" ", "") + _digits(rng, 4)
    pairs = [digits[i : i + 2] for i in range(0, 10, 2)]
    if style == "dotted":
        return ".".join(pairs)
    if style == "compact":
        return digits
    if style == "intl":
        return "+33 " + digits[1] + " " + " ".join(pairs[1:])
    return " ".join(pairs)


def generate(seed: int, count: int) -> dict[str, list[str]]:
    """A deterministic batch of values of every kind."""
    rng = random.Random(seed)
    styles = ["spaced", "dotted", "compact", "intl"]
    return {
        "IBAN_CODE": [make_iban(rng, c) for c in ["FR", "DE", "GB", "BE", "CH", "LU"] for _ in range(count)],
        "FR_NIR": [make_nir(rng, spaced=i % 2 == 0) for i in range(count * 2)],
        "CREDIT_CARD": [make_card(rng, p) for p in ["4", "51", "53", "2221", "497"] for _ in range(count)]
        + [make_card(rng, "37", 15) for _ in range(count)],
        "PHONE_NUMBER": [make_fr_phone(rng, styles[i % len(styles)]) for i in range(count * 2)],
    }


# ---------------------------------------------------------------------------------------------
# Checking eval.jsonl (and train.jsonl)
# ---------------------------------------------------------------------------------------------

LANGS = {"en", "fr"}
CATEGORIES = {"benign", "pii", "injection", "harmful", "toxic"}
DIRECTIONS = {"input", "output"}
ACTIONS = {"allow", "mask", "block"}
ACTION_FOR = {"benign": "allow", "pii": "mask", "injection": "block", "harmful": "block", "toxic": "block"}
PII_TYPES = {"EMAIL_ADDRESS", "PHONE_NUMBER", "IBAN_CODE", "FR_NIR", "CREDIT_CARD", "PERSON"}
HARM_SUBCATEGORIES = {"violence_weapons", "self_harm", "hate_harassment", "crime_drugs", "sexual"}
INJECTION_SUBCATEGORIES = {
    "ignore_instructions",
    "role_play_jailbreak",
    "system_prompt_extraction",
    "indirect",
    "obfuscated",
    "multilingual",
}
TOXIC_SUBCATEGORIES = {"hate_harassment", "insult"}
TRAIN_LABELS = {"benign", "injection"} | HARM_SUBCATEGORIES
EVAL_KEYS = {"id", "lang", "category", "subcategory", "direction", "text", "expected_action", "pii", "tricky"}
TRAIN_KEYS = {"lang", "label", "text"}

VALIDATORS = {
    "EMAIL_ADDRESS": email_valid,
    "PHONE_NUMBER": phone_valid,
    "IBAN_CODE": iban_valid,
    "FR_NIR": nir_valid,
    "CREDIT_CARD": luhn_valid,
}

# Candidates found by scanning a text: runs that may hold a checksum-valid value.
_CARD_CANDIDATE = re.compile(r"(?<![\w])\d(?:[ \-]?\d){11,18}(?![\w])")
_IBAN_CANDIDATE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){10,30}")
_NIR_CANDIDATE = re.compile(r"(?<![\w])[12378](?: ?\d){4} ?(?:\d{2}|2[AB])(?: ?\d){8}(?![\w])")
_EMAIL_SCAN = re.compile(r"(?<![\w.+\-])" + _EMAIL.pattern)
_FR_PHONE_SCAN = re.compile(r"(?<![\w+])" + _FR_PHONE.pattern + r"(?!\d)")


def _iban_candidates(text: str) -> Iterable[tuple[re.Match[str], str]]:
    for match in _IBAN_CANDIDATE.finditer(text):
        # Cut the run at the registry length, so trailing words do not spoil a match.
        compact = match.group(0).replace(" ", "")
        length = IBAN_LENGTHS.get(compact[:2])
        if length is not None and len(compact) >= length:
            yield match, compact[:length]


def undeclared_values(text: str, declared: Sequence[str]) -> list[str]:
    """Checksum-valid cards/IBANs/NIRs, e-mails and French phones in ``text`` outside the ``declared`` values."""
    spans = [(m.start(), m.end()) for value in declared for m in re.finditer(re.escape(value), text)]

    def undeclared(start: int, end: int) -> bool:
        return not any(start < span_end and span_start < end for span_start, span_end in spans)

    found: list[str] = []
    for match in _CARD_CANDIDATE.finditer(text):
        if luhn_valid(match.group(0)) and undeclared(*match.span()):
            found.append(match.group(0))
    for match, candidate in _iban_candidates(text):
        if iban_valid(candidate) and undeclared(*match.span()):
            found.append(candidate)
    for match in _NIR_CANDIDATE.finditer(text):
        if nir_valid(match.group(0)) and undeclared(*match.span()):
            found.append(match.group(0))
    for pattern in (_EMAIL_SCAN, _FR_PHONE_SCAN):
        found.extend(m.group(0) for m in pattern.finditer(text) if undeclared(*m.span()))
    return found


def _read_jsonl(path: Path, errors: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            errors.append(f"{path}:{number}: blank line")
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{path}:{number}: not JSON: {exc}")
            continue
        if not isinstance(row, dict):
            errors.append(f"{path}:{number}: not an object")
            continue
        rows.append(row)
    return rows


def _check_eval_row(row: dict[str, Any], errors: list[str]) -> None:
    where = str(row.get("id", "?"))
    if set(row) != EVAL_KEYS:
        errors.append(f"{where}: keys {sorted(row)} != {sorted(EVAL_KEYS)}")
        return
    category = row["category"]
    checks = [
        (isinstance(row["id"], str) and re.fullmatch(r"[a-z0-9\-]+", row["id"]) is not None, "bad id"),
        (row["lang"] in LANGS, "bad lang"),
        (category in CATEGORIES, "bad category"),
        (row["direction"] in DIRECTIONS, "bad direction"),
        (row["expected_action"] in ACTIONS, "bad expected_action"),
        (row["expected_action"] == ACTION_FOR.get(category), "expected_action does not fit category"),
        (isinstance(row["tricky"], bool), "tricky is not a bool"),
        (isinstance(row["text"], str) and row["text"].strip() == row["text"] != "", "bad text"),
        (isinstance(row["subcategory"], str) and row["subcategory"] != "", "bad subcategory"),
        (isinstance(row["pii"], list), "pii is not a list"),
    ]
    for ok, message in checks:
        if not ok:
            errors.append(f"{where}: {message}")
    if category == "harmful" and row["subcategory"] not in HARM_SUBCATEGORIES:
        errors.append(f"{where}: harmful subcategory {row['subcategory']!r}")
    if category == "injection":
        if row["subcategory"] not in INJECTION_SUBCATEGORIES:
            errors.append(f"{where}: injection subcategory {row['subcategory']!r}")
        if row["direction"] != "input":
            errors.append(f"{where}: injection cases are inputs")
    if category == "toxic" and row["subcategory"] not in TOXIC_SUBCATEGORIES:
        errors.append(f"{where}: toxic subcategory {row['subcategory']!r}")
    if not isinstance(row["pii"], list) or not isinstance(row["text"], str):
        return
    if (category == "pii") != bool(row["pii"]):
        errors.append(f"{where}: pii list must be non-empty exactly for category pii")
    declared: list[str] = []
    for item in row["pii"]:
        if not isinstance(item, dict) or set(item) != {"type", "value"}:
            errors.append(f"{where}: bad pii item {item!r}")
            continue
        kind, value = item["type"], item["value"]
        if kind not in PII_TYPES or not isinstance(value, str):
            errors.append(f"{where}: bad pii item {item!r}")
            continue
        if value not in row["text"]:
            errors.append(f"{where}: {kind} {value!r} is not in the text")
        validator = VALIDATORS.get(kind)
        if validator is not None and not validator(value):
            errors.append(f"{where}: {kind} {value!r} fails its check")
        declared.append(value)
    for value in undeclared_values(row["text"], declared):
        errors.append(f"{where}: undeclared PII-like value {value!r}")


def _check_eval(path: Path, errors: list[str]) -> list[dict[str, Any]]:
    rows = _read_jsonl(path, errors)
    for row in rows:
        _check_eval_row(row, errors)
    ids = Counter(str(row.get("id")) for row in rows)
    errors.extend(f"duplicate id {key}" for key, n in ids.items() if n > 1)
    texts = Counter(_normalise(str(row.get("text", ""))) for row in rows)
    errors.extend(f"duplicate eval text {key!r}" for key, n in texts.items() if n > 1)
    return rows


def _check_train(path: Path, errors: list[str]) -> list[dict[str, Any]]:
    rows = _read_jsonl(path, errors)
    for number, row in enumerate(rows, start=1):
        if set(row) != TRAIN_KEYS:
            errors.append(f"train row {number}: keys {sorted(row)}")
            continue
        if row["lang"] not in LANGS or row["label"] not in TRAIN_LABELS:
            errors.append(f"train row {number}: bad lang or label")
        if not isinstance(row["text"], str) or row["text"].strip() != row["text"] or not row["text"]:
            errors.append(f"train row {number}: bad text")
    texts = Counter(_normalise(str(row.get("text", ""))) for row in rows)
    errors.extend(f"duplicate train text {key!r}" for key, n in texts.items() if n > 1)
    return rows


def _normalise(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text.casefold())
    return "".join(char for char in folded if not unicodedata.combining(char))


def shingles(text: str, size: int = 6) -> set[tuple[str, ...]]:
    """Word n-grams of a case- and accent-folded text."""
    words = re.findall(r"\w+", _normalise(text))
    return {tuple(words[i : i + size]) for i in range(len(words) - size + 1)}


def overlap(train: Sequence[str], evaluation: Sequence[str], size: int = 6) -> list[tuple[str, str, str]]:
    """(shingle, train text, eval text) for every train/eval pair sharing a ``size``-word shingle."""
    index: dict[tuple[str, ...], list[str]] = {}
    for text in evaluation:
        for shingle in shingles(text, size):
            index.setdefault(shingle, []).append(text)
    hits: list[tuple[str, str, str]] = []
    for text in train:
        for shingle in sorted(shingles(text, size)):
            hits.extend((" ".join(shingle), text, other) for other in index.get(shingle, []))
    return hits


def check(eval_path: Path, train_path: Path | None) -> list[str]:
    """Every problem found in the evaluation (and training) file."""
    errors: list[str] = []
    rows = _check_eval(eval_path, errors)
    if train_path is not None:
        train_rows = _check_train(train_path, errors)
        train_texts = [str(row.get("text", "")) for row in train_rows]
        eval_texts = [str(row.get("text", "")) for row in rows]
        for shingle, train_text, eval_text in overlap(train_texts, eval_texts):
            errors.append(f"train/eval share {shingle!r}: {train_text!r} / {eval_text!r}")
        eval_norm = {_normalise(text) for text in eval_texts}
        errors.extend(f"train text is an eval text: {t!r}" for t in train_texts if _normalise(t) in eval_norm)
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--count", type=int, default=6, help="values per kind (and per country)")
    parser.add_argument("--check", type=Path, help="eval.jsonl to validate instead of generating")
    parser.add_argument("--train", type=Path, help="with --check: train.jsonl to validate and compare")
    args = parser.parse_args(argv)
    if args.check is None:
        if args.train is not None:
            parser.error("--train needs --check")
        print(json.dumps(generate(args.seed, args.count), indent=2, ensure_ascii=False))
        return 0
    errors = check(args.check, args.train)
    for error in errors:
        print(error, file=sys.stderr)
    print(f"{len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
