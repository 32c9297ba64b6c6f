"""A real package: the layers map into `ragstream` by setuptools' package-dir, with no links
in the repository, and the wheel carries exactly what it needs."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_repository_holds_no_symlinks() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    links = [line.split("\t", 1)[1] for line in tracked if line.startswith("120000")]
    assert links == []


def test_every_python_package_in_the_layers_is_listed() -> None:
    mapping: dict[str, str] = SETUPTOOLS["package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert sorted(found) == sorted(SETUPTOOLS["packages"])


def test_the_wheel_has_the_layers_under_ragstream_and_leaves_the_model_repository_out(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("ragstream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "ragstream/cli.py",
        "ragstream/py.typed",
        "ragstream/schemas/events.py",
        "ragstream/infra/generator/wire.py",
        "ragstream/streams/runner.py",
        "ragstream/workers/generate.py",
    ):
        assert module in names
    assert not [n for n in names if n.split("/")[0] in ("infra", "schemas", "streams", "workers")]
    assert not [n for n in names if "deploy" in n or n.endswith(".pbtxt")]
