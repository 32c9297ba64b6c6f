"""Identifiers and timestamps shared by every contract."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated

from pydantic import StringConstraints

__all__ = ["IDENTIFIER_CHARS", "IDENTIFIER_MAX_CHARS", "IDENTIFIER_RE", "Identifier", "new_id", "utcnow"]


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


IDENTIFIER_CHARS = "A-Za-z0-9._:/@+=-"
"""What an id may contain (it starts with a letter or digit): the one definition, for the
contracts, the dead-letter builder and file-name-derived document ids."""
IDENTIFIER_MAX_CHARS = 256
IDENTIFIER_RE = re.compile(f"[A-Za-z0-9][{IDENTIFIER_CHARS}]{{0,{IDENTIFIER_MAX_CHARS - 1}}}")
"""Use with `fullmatch`."""

Identifier = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=IDENTIFIER_MAX_CHARS, pattern=f"^[A-Za-z0-9][{IDENTIFIER_CHARS}]*$"
    ),
]
"""Ids and tenant names: printable, no spaces, safe in filters and file names."""
