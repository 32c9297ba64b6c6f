"""Imports flow one way: schemas <- infra <- streams <- workers <- ragstream (the CLI, SDK
and stack assembly on top) (STYLE.md).

A violation here is a design defect, not a style nit: it is how stage logic ends up needing
Kafka, or contracts end up needing a model server.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("schemas", "infra", "streams", "workers")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _layer_of(module: str) -> str | None:
    """The layer a module belongs to; `ragstream` for the CLI, SDK and stack on top."""
    parts = module.split(".")
    if parts[0] == "ragstream" and len(parts) > 1:
        return parts[1] if parts[1] in LAYERS else "ragstream"
    return parts[0] if parts[0] in LAYERS else None


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_flow_one_way(layer: str) -> None:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no modules under {layer}/"
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in files
        for line, module in _imports(path)
        if (target := _layer_of(module)) is not None and target not in allowed
    ]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "from ragstream.streams.topics import QUERIES\nimport ragstream.workers.sink\nfrom ragstream.client import Client\n"
    )
    layers = [_layer_of(module) for _, module in _imports(src)]
    assert layers == ["streams", "workers", "ragstream"]
