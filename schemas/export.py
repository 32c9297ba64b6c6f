"""JSON Schema export, so producers in any language can validate before publishing."""

from __future__ import annotations

import json
from pathlib import Path

from ragstream.schemas.registry import EVENT_TYPES

__all__ = ["export_json_schemas"]


def export_json_schemas(directory: Path) -> list[Path]:
    """Write `<event_type>.schema.json` for every event; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for event_type, cls in sorted(EVENT_TYPES.items()):
        schema = cls.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://ragstream.dev/schemas/{event_type}.schema.json"
        path = directory / f"{event_type}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
