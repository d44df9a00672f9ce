"""The student website: the book without the solutions, built from the executed instructor notebooks.

    python3 tools/make.py book --edition student [--budget B]      # the usual way
    .venv/bin/python tools/student_site.py --cache _build/.jupyter_cache/cpu --output _build/student

The student edition of a notebook cannot be executed: its assignment cells
raise ``NotImplementedError`` and its checks fail. So this script never runs
it. ``make.py book`` first executes the (instructor) notebooks into the
build's execution cache, as for the instructor site; this script then takes
each executed notebook from that cache and makes it a student page
(``editions.student_page``): every solution region becomes the stub ``# YOUR
CODE HERE`` / ``raise NotImplementedError()``, the solution cell and its check
cells lose their outputs, and every other output (figures, tables, widgets)
stays. The pages are written, with the book's markdown pages and a copy of
``_config.yml`` that turns execution off and drops the Colab button (it would
open the repository's notebook, solutions included), into
``OUTPUT/_build/student-source``; ``jupyter-book build`` then writes
``OUTPUT/_build/html`` from them (``-W -n``: any warning fails, as for the
instructor site). Finally the built site is searched for solution code
(``check_site.solution_leaks``); the script fails if it finds any.

``--unexecuted`` takes the notebooks as they are in the repository, without
outputs, instead of the cache (the test does this: it checks the conversion
and the build in seconds without executing anything).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import editions  # noqa: E402
from check_site import solution_leaks, toc_pages  # noqa: E402

COPIED = ["_toc.yml", "book", "tools/book_ext.py"]  # what the build needs besides the notebooks


class StudentSiteError(RuntimeError):
    """A notebook has not been executed yet, or the built site shows solution code."""


def student_config(config: dict) -> dict:
    """``_config.yml`` for the student site: nothing executed, no Colab button, "student edition" in the title."""
    config = dict(config)
    config["title"] = f"{config.get('title', 'The book')} (student edition)"
    config["execute"] = dict(config.get("execute", {}), execute_notebooks="off")
    config.pop("launch_buttons", None)
    return config


def executed_notebooks(notebooks: list[Path], cache: Path | None) -> dict[Path, nbformat.NotebookNode]:
    """Each notebook with its outputs from the jupyter-cache folder ``cache`` (None: the notebook unexecuted)."""
    found = {path: nbformat.read(path, as_version=4) for path in notebooks}
    if cache is None:
        return found
    from jupyter_cache import get_cache

    store, missing = get_cache(str(cache)), []
    for path, nb in found.items():
        try:
            _, found[path] = store.merge_match_into_notebook(nb)
        except KeyError:
            missing.append(path.name)
    if missing:
        raise StudentSiteError(f"not executed yet (no outputs in {cache}): {', '.join(missing)}; run "
                               "`python3 tools/make.py book` with the same budget first")
    return found


def write_source(staging: Path, cache: Path | None) -> list[Path]:
    """Write the student site's source folder: the student pages, the markdown pages and the configuration."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for name in COPIED:
        source, target = ROOT / name, staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    (staging / "_config.yml").write_text(yaml.safe_dump(student_config(config), sort_keys=False,
                                                        allow_unicode=True), encoding="utf-8")
    if (ROOT / "node_modules").is_dir():  # the offline MathJax and widget scripts (tools/book_ext.py)
        os.symlink(ROOT / "node_modules", staging / "node_modules", target_is_directory=True)
    notebooks = [ROOT / f"{doc}.ipynb" for doc in toc_pages() if (ROOT / f"{doc}.ipynb").exists()]
    written = []
    for path, nb in executed_notebooks(notebooks, cache).items():
        target = staging / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(editions.student_page(nb, path.stem), target)
        written.append(target)
    return written


def build(output: Path, cache: Path | None, jupyter_book: str = "jupyter-book") -> Path:
    """Write the source folder, build ``output/_build/html`` and check it for solution code; return the html folder."""
    output = output.resolve()
    staging = output / "_build" / "student-source"
    pages = write_source(staging, cache)
    print(f"{len(pages)} student pages written to {staging}", flush=True)
    # -W -n: warnings and broken references fail the build; --keep-going lists them all.
    command = [jupyter_book, "build", str(staging), "--path-output", str(output), "-W", "-n", "--keep-going"]
    print("$ " + " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise StudentSiteError("jupyter-book build failed or warned (see above)")
    html = output / "_build" / "html"
    notebooks = [ROOT / f"{doc}.ipynb" for doc in toc_pages() if (ROOT / f"{doc}.ipynb").exists()]
    leaks = solution_leaks(html, notebooks)
    if leaks:
        raise StudentSiteError("solution code on the student site:\n" + "\n".join(leaks[:20]))
    print(f"no solution code in {html}", flush=True)
    return html


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="the jupyter-cache folder of the executed notebooks "
                                                   "(e.g. _build/.jupyter_cache/cpu)")
    parser.add_argument("--unexecuted", action="store_true",
                        help="use the repository's notebooks without outputs instead of a cache")
    parser.add_argument("--output", type=Path, default=ROOT / "_build" / "student",
                        help="build into OUTPUT/_build/html (default: _build/student)")
    args = parser.parse_args(argv)
    if (args.cache is None) == (not args.unexecuted):
        parser.error("give either --cache DIR or --unexecuted")
    jupyter_book = str(Path(sys.executable).parent / "jupyter-book")
    try:
        html = build(args.output, None if args.unexecuted else args.cache, jupyter_book)
    except StudentSiteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"the student site is at {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
