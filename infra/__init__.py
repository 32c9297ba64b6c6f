"""Adapters to the outside world: settings, Kafka, Triton, vector stores, Iceberg.

Nothing here imports Faust; vendor exceptions are translated into `ragstream.schemas.errors`.
"""
