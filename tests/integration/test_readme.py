"""The README's plain-Kafka quick start, run as written against the embedded stack.

The token command is taken from README.md and run with the CLI; each snippet is taken from
README.md, its broker address swapped for the test stack's, and run in a fresh interpreter with
the token in its environment, as the README's `export` puts it; it must print an answer. If the
README drifts, this fails."""

from __future__ import annotations

import os
import re
import shlex
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


def token_command() -> list[str]:
    match = re.search(r"export RAGSTREAM_AUTH__TOKEN=\$\(ragstream (token issue [^)]*)\)", README.read_text())
    assert match, "no `export RAGSTREAM_AUTH__TOKEN=$(ragstream token issue ...)` in README.md"
    return shlex.split(match.group(1))


@pytest.mark.parametrize("client", ["With kafka-python:", "With confluent-kafka (librdkafka):"])
def test_the_readme_quick_start_gets_an_answer(stack: Stack, corpus_reports: list[Any], client: str) -> None:
    token = stack.cli(*token_command()).stdout.strip()
    code = snippet(client).replace("127.0.0.1:19092", stack.settings.kafka.servers)
    env = {**os.environ, "RAGSTREAM_AUTH__TOKEN": token}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status, _, answer = proc.stdout.strip().partition(" ")
    assert status == "ok" and answer.strip(), f"the snippet printed no answer: {proc.stdout!r}"
