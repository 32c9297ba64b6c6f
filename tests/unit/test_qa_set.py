"""The question-answering evaluation set (`bench/data/qa`) is sound: every row has the
schema the bench reads, every expected fact occurs in its expected document as ragstream's
own parser extracts it, and the language mix is what the README says."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from ragstream.infra.parsing import media_type_for_path, parse_document

REPO = Path(__file__).parents[2]
CORPUS = REPO / "samples" / "corpus"
ROWS = [
    json.loads(line)
    for line in (REPO / "bench/data/qa/qa_eval.jsonl").read_text(encoding="utf-8").splitlines()
    if line.strip()
]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\u00a0", " ").replace("\u202f", " ")).casefold()


def test_the_set_has_the_mix_it_promises() -> None:
    assert len(ROWS) >= 120 and len({r["request_id"] for r in ROWS}) == len(ROWS)
    mix = Counter((r["lang"], r["doc_lang"]) for r in ROWS if not r["unanswerable"])
    assert mix[("en", "en")] >= 40 and mix[("fr", "fr")] >= 30
    assert mix[("en", "fr")] >= 15 and mix[("fr", "en")] >= 15, "questions across languages"
    assert sum(r["unanswerable"] for r in ROWS) >= 8


def test_every_expected_fact_is_in_its_document_as_parsed() -> None:
    texts: dict[str, str] = {}
    missing = []
    for row in ROWS:
        if row["unanswerable"]:
            assert row["expected_facts"] == [] and row["expected_doc"] is None
            continue
        path = CORPUS / row["expected_doc"]
        if row["expected_doc"] not in texts:
            media = media_type_for_path(path)
            assert media is not None, path
            texts[row["expected_doc"]] = _norm(parse_document(path.read_bytes(), media).text)
        text = texts[row["expected_doc"]]
        assert row["expected_facts"], row["request_id"]
        for fact in row["expected_facts"]:
            if not any(_norm(alt) in text for alt in fact):
                missing.append((row["request_id"], fact))
    assert not missing, missing
