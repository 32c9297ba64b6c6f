"""Process-wide logging for ragstream's entry points (CLI, workers, sink, model server)."""

from __future__ import annotations

import logging
import sys

from ragstream.infra.settings import Settings

__all__ = ["configure_logging"]

_NOISY = ("kafka", "aiokafka", "faust", "mode", "httpx", "urllib3", "pyiceberg")
"""Libraries that log every connection or request at INFO: WARNING unless we log below it."""


def configure_logging(settings: Settings) -> None:
    """Log to stderr at `settings.log_level`, with the chattiest libraries held at WARNING."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
