"""The one settings object: a config file (TOML, YAML or JSON, read by pydantic-settings'
own sources) below `RAGSTREAM_*` environment variables, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragstream.infra.settings import load_settings
from ragstream.schemas.errors import ConfigError


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("ragstream.toml", 'log_level = "DEBUG"\n[kafka]\npartitions = 7\n'),
        ("ragstream.yaml", "log_level: DEBUG\nkafka:\n  partitions: 7\n"),
        ("ragstream.json", '{"log_level": "DEBUG", "kafka": {"partitions": 7}}'),
    ],
)
def test_a_config_file_in_each_format_sets_nested_values(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    s = load_settings(tmp_path / name)
    assert (s.log_level, s.kafka.partitions) == ("DEBUG", 7)


def test_the_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c.toml").write_text("[kafka]\npartitions = 7\n")
    monkeypatch.setenv("RAGSTREAM_KAFKA__PARTITIONS", "9")
    assert load_settings(tmp_path / "c.toml").kafka.partitions == 9


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("bad.toml", "kafka = [", "is not valid"),
        ("list.yaml", "- 1\n- 2\n", "is not valid"),
        ("c.ini", "[kafka]", "must end in"),
        ("typo.toml", "[kafka]\npartitons = 3\n", "partitons"),
    ],
)
def test_a_bad_config_file_is_a_config_error_that_says_why(
    tmp_path: Path, name: str, text: str, says: str
) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=says):
        load_settings(tmp_path / name)
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "missing.toml")
