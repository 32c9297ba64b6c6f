"""Every stage, registered explicitly. Each is declared at the end of its own module:

| stage    | module                | consumes             | produces                        |
|----------|-----------------------|----------------------|---------------------------------|
| ingest   | `workers/ingest.py`   | documents            | chunks, documents.indexed       |
| embed    | `workers/embed.py`    | chunks               | chunks.embedded                 |
| index    | `workers/index.py`    | chunks.embedded      | documents.indexed               |
| retrieve | `workers/retrieve.py` | queries              | retrievals, responses           |
| generate | `workers/generate.py` | retrievals           | responses.tokens, responses     |

Every stage may also write to the dead-letter topic. No Faust here, so the supervisor and the
CLI can read the registry cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragstream.infra.settings import Settings
from ragstream.schemas.errors import ConfigError
from ragstream.streams.stage import Stage
from ragstream.workers import embed, generate, index, ingest, judge, retrieve

__all__ = ["STAGES", "heartbeat_path", "parse_stages"]

STAGES: dict[str, Stage[Any]] = {
    s.name: s for s in (ingest.STAGE, embed.STAGE, index.STAGE, retrieve.STAGE, generate.STAGE, judge.STAGE)
}
"""Every stage, by name."""


def heartbeat_path(settings: Settings, stage: str) -> Path:
    return settings.run_dir / f"worker-{stage}.json"


def parse_stages(spec: str | Sequence[str]) -> tuple[str, ...]:
    """`"ingest,embed,index"` -> the stages one worker process runs, validated.

    Raises:
        ConfigError: an unknown or repeated stage.
    """
    stages = tuple(s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"unknown stage(s) {unknown or spec!r}; known: {', '.join(STAGES)}")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"stage listed twice in {spec!r}")
    return stages
