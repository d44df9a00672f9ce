"""The first code cell of every notebook, generated from ``_config.yml``.

Every chapter starts with the same cell: on Colab it installs ``minilib`` from
the book's repository (whose url lives only in ``_config.yml``) without its
dependencies, then those dependencies except torch (read from
``pyproject.toml``), so that the runtime's PyTorch is never replaced; it checks
that everything was installed and stops with a clear message if not. Then it
calls ``minilib.budget.setup_notebook()``. The cell is tagged ``setup``.

    python3 tools/setup_cell.py           # print the cell
    python3 tools/setup_cell.py --write   # put it into every notebooks/*.ipynb
    python3 tools/setup_cell.py --check   # fail if a notebook's cell differs

Standard library only, so it runs with any Python >= 3.10.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAG = "setup"

TEMPLATE = '''\
# Setup. Where minilib is missing (on Colab), install the book's library from
# GitHub, then its dependencies except PyTorch (the runtime's own is kept).
try:
    import minilib
except ImportError:
    %pip install --quiet --no-deps "git+{url}@{branch}"
    %pip install --quiet {requirements}
    import importlib, importlib.metadata
    importlib.invalidate_caches()
    missing = []
    for package in ["minilib",
                    {packages}]:
        try:
            importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
    if missing:
        raise RuntimeError(f"Installing {{', '.join(missing)}} failed (pip's messages are above). Check "
                           "the internet connection, then run this cell again.")
from minilib.budget import setup_notebook

device = setup_notebook()  # seed everything; print the run budget and the device'''


def dependencies(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """minilib's requirements (``[project] dependencies``) without PyTorch, e.g. ``["numpy", "einops"]``.

    A tiny reader for the one list this needs (``tomllib`` is missing from
    Python 3.10). The setup cell installs these after minilib itself, which it
    installs with ``--no-deps`` so that pip never touches the runtime's torch.
    """
    text = pyproject.read_text(encoding="utf-8")
    start = text.find("\ndependencies = [")
    if start < 0:
        raise ValueError(f"{pyproject} has no `dependencies = [` list")
    block = text[text.index("[", start) + 1:text.index("]", start)]
    requirements = [line.split("#", 1)[0].strip().rstrip(",").strip().strip("\"'")
                    for line in block.splitlines()]
    return [r for r in requirements if r and _name(r) != "torch"]


def _name(requirement: str) -> str:
    """The distribution name of a requirement such as ``"numpy>=1.24"``."""
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


def repository(config: Path = ROOT / "_config.yml") -> tuple[str, str]:
    """``(url, branch)`` from the ``repository:`` section of ``_config.yml``.

    A tiny reader for this one flat section, so that no YAML library is needed.
    """
    section, values = None, {}
    for line in config.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            section = line.split(":", 1)[0].strip()
        elif section == "repository":
            key, _, value = line.strip().partition(":")
            values[key.strip()] = value.split(" #", 1)[0].strip().strip("\"'")
    if "url" not in values:
        raise ValueError(f"{config} has no `repository: url:` entry")
    return values["url"], values.get("branch", "main")


def cell_source(config: Path = ROOT / "_config.yml", pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The canonical setup cell's source."""
    url, branch = repository(config)
    requirements = dependencies(pyproject)
    packages = textwrap.wrap(", ".join(f'"{_name(r)}"' for r in requirements), width=72,
                             break_on_hyphens=False, break_long_words=False)
    return TEMPLATE.format(url=url, branch=branch,
                           requirements=" ".join(f'"{r}"' for r in requirements),
                           packages=("\n" + " " * 20).join(packages))


def _source_text(cell: dict) -> str:
    source = cell.get("source", "")
    return source if isinstance(source, str) else "".join(source)


def _first_code_cell(nb: dict) -> int | None:
    return next((i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"), None)


def is_up_to_date(nb: dict, source: str) -> bool:
    """Whether the notebook's first code cell is the tagged, canonical setup cell."""
    i = _first_code_cell(nb)
    if i is None:
        return False
    cell = nb["cells"][i]
    return TAG in cell.get("metadata", {}).get("tags", []) and _source_text(cell) == source


def write_setup_cell(nb: dict, source: str) -> None:
    """Make the first code cell the setup cell.

    A first code cell tagged ``setup`` gets the new source (its outputs are
    cleared); otherwise a new setup cell is inserted before the first code cell.
    """
    i = _first_code_cell(nb)
    if i is not None and TAG in nb["cells"][i].get("metadata", {}).get("tags", []):
        cell = nb["cells"][i]
    else:
        cell = {"cell_type": "code", "metadata": {"tags": [TAG]}}
        if (nb["nbformat"], nb["nbformat_minor"]) >= (4, 5):  # cell ids exist since 4.5
            taken = any(c.get("id") == TAG for c in nb["cells"])
            cell["id"] = f"{TAG}-{uuid.uuid4().hex[:8]}" if taken else TAG
        nb["cells"].insert(len(nb["cells"]) if i is None else i, cell)
    cell["source"] = source.splitlines(keepends=True)
    cell["outputs"] = []
    cell["execution_count"] = None


def notebooks(folder: Path = ROOT / "notebooks") -> list[Path]:
    return sorted(folder.glob("*.ipynb"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _save(nb: dict, path: Path) -> None:
    # The same layout as nbformat.write, so that diffs stay small.
    path.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="update notebooks/*.ipynb")
    mode.add_argument("--check", action="store_true", help="exit 1 if a notebook differs")
    args = parser.parse_args(argv)
    source = cell_source()
    if not (args.write or args.check):
        print(source)
        return 0
    stale = [p for p in notebooks() if not is_up_to_date(_load(p), source)]
    for path in stale:
        if args.write:
            nb = _load(path)
            write_setup_cell(nb, source)
            _save(nb, path)
            print(f"updated {path.name}")
        else:
            print(f"{path.name}: first code cell is not the current setup cell "
                  "(run `python3 tools/setup_cell.py --write`)")
    if not stale:
        print(f"all {len(notebooks())} notebooks start with the current setup cell")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
