"""ragstream: an event-driven platform for production GenAI.

Kafka topics carry documents, queries and responses; Faust workers run each stage; Triton
serves the models; LanceDB or Weaviate hold the vectors; Iceberg holds the audit trail.
"""

__version__ = "0.1.0"
