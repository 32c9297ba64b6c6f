"""Build `build/typecheck/ragstream`, the package as it is installed, for mypy.

The layers (schemas/ infra/ streams/ workers/) become `ragstream.*` through setuptools'
`package-dir` mapping, which the interpreter follows (the editable install's finder) but a
type checker cannot: it only searches directories. So `make typecheck` lays the installed
shape out as links in a git-ignored folder and points mypy there. The repository itself
holds no links.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"


def main() -> None:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    if TREE.exists():
        shutil.rmtree(TREE)
    package = TREE / "ragstream"
    package.mkdir(parents=True)
    for entry in (ROOT / mapping["ragstream"]).iterdir():
        if entry.suffix in (".py", ".typed"):
            (package / entry.name).symlink_to(entry)
    for name, source in mapping.items():
        if name != "ragstream":
            (package / name.removeprefix("ragstream.")).symlink_to(ROOT / source, target_is_directory=True)


if __name__ == "__main__":
    main()
