"""Vector stores behind one protocol: LanceDB (embedded default) and Weaviate (production).

Backends are imported lazily by `open_vector_store`, so importing this package never pulls in
lancedb or weaviate-client.
"""

from ragstream.infra.vectorstore.base import (
    DocumentState,
    FingerprintState,
    SearchHit,
    SearchMode,
    SearchQuery,
    VectorStore,
    open_vector_store,
    weighted_rrf,
)

__all__ = [
    "DocumentState",
    "FingerprintState",
    "SearchHit",
    "SearchMode",
    "SearchQuery",
    "VectorStore",
    "open_vector_store",
    "weighted_rrf",
]
