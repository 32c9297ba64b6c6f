"""Small files other processes read while they are written (state, heartbeats, settings)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_json_atomic"]


def write_json_atomic(path: Path, data: Any, *, mode: int = 0o644, indent: int | None = None) -> None:
    """Write `data` as JSON so a reader sees the old file or the new one, never half of one:
    write a temporary file beside it (created with `mode`, so a secret is never readable by
    others even for a moment), then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=indent)
    os.replace(tmp, path)
