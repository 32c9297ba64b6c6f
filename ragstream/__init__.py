"""ragstream: an event-driven platform for production GenAI.

Kafka topics carry documents, queries and responses; Faust workers run each stage; Triton
serves the models; LanceDB or Weaviate hold the vectors; Iceberg holds the audit trail.

Ask questions with `ragstream.Client` (or `ragstream.AsyncClient` from asyncio code).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ragstream.client import AsyncClient, Client, Response

__all__ = ["AsyncClient", "Client", "Response", "__version__"]

__version__ = "0.1.0"

_CLIENT_NAMES = frozenset({"AsyncClient", "Client", "Response"})


def __getattr__(name: str) -> Any:
    # Lazy, so `import ragstream.<submodule>` (workers, the CLI) does not load the client.
    if name in _CLIENT_NAMES:
        from ragstream import client

        return getattr(client, name)
    raise AttributeError(f"module 'ragstream' has no attribute {name!r}")
