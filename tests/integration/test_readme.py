"""The README's plain-Kafka quick start, run as written against the embedded stack.

Each snippet is taken from README.md, its broker address swapped for the test stack's, and
run in a fresh interpreter; it must print an answer. If the README drifts, this fails."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def snippet(after: str) -> str:
    text = README.read_text()
    match = re.search(re.escape(after) + r"\s*```python\n(.*?)```", text, re.S)
    assert match, f"no python block after {after!r} in README.md"
    return match.group(1)


@pytest.mark.parametrize("client", ["With kafka-python:", "With confluent-kafka (librdkafka):"])
def test_the_readme_quick_start_gets_an_answer(stack: Stack, corpus_reports: list[Any], client: str) -> None:
    code = snippet(client).replace("127.0.0.1:19092", stack.settings.kafka.servers)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "the snippet printed no answer"
