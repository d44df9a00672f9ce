"""Gradescope autograder packages for the book's assignments, built from the same checks as the notebooks.

    python3 tools/make.py autograder                                      # one zip per chapter, 1 point per check
    python3 tools/make.py autograder notebooks/03_adaln_modulation.ipynb --points 5
    python3 tools/make.py autograder notebooks/01_*.ipynb notebooks/02_*.ipynb --name week-1 \\
        --points 2 --points check_patchify=4                               # two chapters in one package
    .venv/bin/python tools/autograder.py grade _build/autograder/03_adaln_modulation.zip submitted.ipynb

``build`` (what ``make.py autograder`` runs) writes ``_build/autograder/NAME.zip``,
ready to upload as a Gradescope "zip file upload" autograder:

- ``setup.sh``: run once by Gradescope when it builds the image: a Python
  virtual environment in /autograder/venv with the CPU build of torch and the
  versions of requirements.txt that minilib needs (Python >= 3.11; on Ubuntu
  22.04 it installs python3.11).
- ``run_autograder``: run for each submission: ``grader.py`` grades the
  submitted notebook(s) and writes /autograder/results/results.json.
- ``grader.py`` (tools/autograder_runtime.py), ``assignments.json`` (which
  assignments, their checks, their points, their parts), ``requirements.txt``
  and ``minilib-src/`` (this checkout's minilib, so the checks are exactly
  the ones the notebooks call).

Each check call of an assignment (``check_patchify(my_patchify)``) is worth
``--points`` (1 by default; ``--points check_name=N`` sets one check), shared
among the check's parts; its hidden inputs are a Gradescope test of their own,
shown to students after the grades are published. Before writing a package,
``build`` grades the instructor's own solutions with it and fails unless they
get full marks.

The grader never runs a whole notebook: it runs only the solution cells, each
with its checks (see tools/autograder_runtime.py), so training cells cost
nothing and a chapter's assignments take a few seconds and about 300 MiB on
one CPU, well within Gradescope's defaults (no GPU, 768 MB, 10 minutes).

``grade`` runs a package's ``run_autograder`` on this machine on the given
notebooks, laid out as Gradescope lays out a submission, with this
environment's Python (torch and minilib already installed), and prints the
score and results.json: an instructor can try a package before uploading it.

Why not otter-grader: it installs with the book's pins (checked with ``pip
install --dry-run``), but it grades by executing the submitted notebook from
top to bottom, and our notebooks train models: at the ``ci`` budget a chapter's
kernel alone peaks at up to about 750 MiB (book/performance.md), above
Gradescope's default 768 MB once otter's own process is added. It would also
need its own test files calling our checks, a plugin to cut the notebooks down
to their assignment cells, and some 25 more packages (pandas, playwright,
python-on-whales, ...) in the environment the tests run in, while what it
would still do for us, writing results.json and the two scripts, is the
small part of the job. The instructor page (book/instructors.md) says the same.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import autograder_runtime as runtime  # noqa: E402
import editions  # noqa: E402

TIMEOUT_PER_ASSIGNMENT = 60  # seconds; a right answer takes well under one
TIMEOUT_PER_NOTEBOOK = 240

SETUP_SH = """\
#!/usr/bin/env bash
# Gradescope runs this once, as root and with network access, when it builds the autograder's image
# (choose an Ubuntu 22.04 or 24.04 base image). It makes the Python environment run_autograder uses.
set -euo pipefail
ROOT="${AUTOGRADER_ROOT:-/autograder}"
SOURCE="$ROOT/source"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    apt-get install -y -qq python3-venv
    PYTHON=python3
else  # Ubuntu 22.04 has Python 3.10; the pinned numpy needs 3.11
    apt-get install -y -qq python3.11 python3.11-venv
    PYTHON=python3.11
fi
"$PYTHON" -m venv "$ROOT/venv"
"$ROOT/venv/bin/python" -m pip install --quiet --upgrade pip
# The CPU build of torch: no CUDA libraries (Gradescope has no GPU), a few hundred MB less to install.
"$ROOT/venv/bin/python" -m pip install --quiet --index-url https://download.pytorch.org/whl/cpu "{torch}"
"$ROOT/venv/bin/python" -m pip install --quiet -r "$SOURCE/requirements.txt"
# A smoke test: the checks import.
PYTHONPATH="$SOURCE/minilib-src" "$ROOT/venv/bin/python" -c "import minilib.checks"
"""

RUN_AUTOGRADER = """\
#!/usr/bin/env bash
# Gradescope runs this for every submission: grader.py grades the notebooks in /autograder/submission
# and writes /autograder/results/results.json. AUTOGRADER_ROOT and AUTOGRADER_PYTHON let
# `tools/autograder.py grade` run it elsewhere.
set -uo pipefail
ROOT="${AUTOGRADER_ROOT:-/autograder}"
SOURCE="$ROOT/source"
PYTHON="${AUTOGRADER_PYTHON:-$ROOT/venv/bin/python}"
export PYTHONPATH="$SOURCE/minilib-src" MINILIB_BUDGET=ci OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg
export CUDA_VISIBLE_DEVICES=""
exec "$PYTHON" "$SOURCE/grader.py" --config "$SOURCE/assignments.json" --submission "$ROOT/submission" \\
    --results "$ROOT/results/results.json" --python "$PYTHON"
"""


class AutograderError(ValueError):
    """A notebook's assignments cannot be graded as they are (or the instructor's answers do not pass)."""


def check_calls(source: str) -> list[tuple[str, str]]:
    """``(check name, function name)`` of every top-level ``check_x(my_x)`` call in a check cell."""
    calls = []
    for node in ast.parse(source).body:
        call = node.value if isinstance(node, ast.Expr) else None
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id.startswith("check_")
                and len(call.args) == 1 and isinstance(call.args[0], ast.Name)):
            calls.append((call.func.id, call.args[0].id))
    return calls


def defined_functions(source: str) -> list[str]:
    return [node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]


def notebook_config(path: Path, points: dict[str, float], default_points: float) -> dict:
    """What the grader needs to know of one notebook: its assignments, their checks and points."""
    import minilib.checks

    nb = nbformat.read(path, as_version=4)
    editions.check_assignments(nb, path.stem)
    found = editions.assignment_checks(nb)
    if not found:
        raise AutograderError(f"{path.name} has no assignment (a code cell tagged 'solution')")
    assignments = []
    for number, (solution, check_cells) in enumerate(found, 1):
        checks = []
        for index in check_cells:
            for check, function in check_calls(nb.cells[index].source):
                if check not in minilib.checks.__all__:
                    raise AutograderError(f"{path.name}, cell {index}: {check} is not a check of minilib.checks")
                checks.append(dict(check=check, function=function, call=f"{check}({function})",
                                   points=float(points.get(check, default_points))))
        if not checks:
            raise AutograderError(f"{path.name}, cell {check_cells[0]}: no call check_x(my_function) to grade")
        defines = sorted({check["function"] for check in checks} & set(defined_functions(nb.cells[solution].source)))
        assignments.append(dict(number=number, of=len(found), solution_id=nb.cells[solution].get("id", ""),
                                defines=defines or [checks[0]["function"]], checks=checks))
    chapter = re.match(r"\d+[a-z]?", path.stem)
    return dict(name=path.stem, file=path.name, chapter=chapter.group(0).lstrip("0") if chapter else path.stem,
                assignments=assignments)


def add_parts(config: dict, paths: list[Path], python: str) -> None:
    """Grade the instructor's own solutions (the notebooks ``paths``): record each check's parts in ``config``
    and fail unless every part passes (a package whose model answers lose points is of no use)."""
    for notebook, path in zip(config["notebooks"], paths):
        cells = runtime.read_cells(path)
        jobs = [dict(key=str(a["number"]), source=runtime.find_solution_cell(cells, a), checks=a["checks"],
                     timeout=TIMEOUT_PER_ASSIGNMENT) for a in notebook["assignments"]]
        results, _, _, problem = runtime.run_child(python, jobs, TIMEOUT_PER_NOTEBOOK)
        for assignment in notebook["assignments"]:
            result = results.get(str(assignment["number"]), {})
            for check in assignment["checks"]:
                report = result.get("checks", {}).get(check["call"])
                failed = [p["name"] for p in report["parts"] if not p["passed"]] if report else []
                if not report or report["error"] or failed:
                    why = (report or {}).get("error") or result.get("error") or problem or f"parts {failed} failed"
                    raise AutograderError(f"the instructor's solution of {notebook['file']}, assignment "
                                          f"{assignment['number']}, does not pass {check['call']}: {why}")
                check["parts"] = [dict(name=p["name"], points=p["points"], hidden=p["hidden"])
                                  for p in report["parts"]]


def requirements() -> tuple[str, list[str]]:
    """The torch pin and the pinned lines of requirements.txt for minilib's other dependencies."""
    wanted = {re.split(r"[<>=!~ ;\[]", dep)[0].lower()
              for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    torch, lines = "torch", []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name = re.split(r"[<>=!~ ;\[]", line.strip())[0].lower()
        if name == "torch":
            torch = line.strip()
        elif name in wanted:
            lines.append(line.strip())
    return torch, lines


def write_package(config: dict, target: Path) -> Path:
    """Write the zip ``target`` (see the module's docstring)."""
    torch, pins = requirements()
    target.parent.mkdir(parents=True, exist_ok=True)

    def add(archive: zipfile.ZipFile, name: str, text: str, executable: bool = False) -> None:
        info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
        info.external_attr = (0o755 if executable else 0o644) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, text)

    with zipfile.ZipFile(target, "w") as archive:
        add(archive, "setup.sh", SETUP_SH.replace("{torch}", torch), executable=True)
        add(archive, "run_autograder", RUN_AUTOGRADER, executable=True)
        add(archive, "grader.py", (ROOT / "tools" / "autograder_runtime.py").read_text(encoding="utf-8"))
        add(archive, "assignments.json", json.dumps(config, indent=2))
        add(archive, "requirements.txt", "\n".join(pins) + "\n")
        for path in sorted((ROOT / "minilib").rglob("*.py")):
            add(archive, f"minilib-src/{path.relative_to(ROOT).as_posix()}", path.read_text(encoding="utf-8"))
    return target


def build(notebooks: list[Path], out: Path, name: str | None, points: dict[str, float], default_points: float,
          python: str = sys.executable) -> list[Path]:
    """One package per notebook, or one package ``name`` for all of them; return the zips written."""
    groups = [(name, notebooks)] if name else [(path.stem, [path]) for path in notebooks]
    written = []
    for stem, paths in groups:
        config = dict(budget="ci", timeout_per_assignment=TIMEOUT_PER_ASSIGNMENT,
                      timeout_per_notebook=TIMEOUT_PER_NOTEBOOK,
                      notebooks=[notebook_config(path, points, default_points) for path in paths])
        add_parts(config, paths, python)
        written.append(write_package(config, out / f"{stem}.zip"))
    return written


def grade(package: Path, submitted: list[Path], python: str = sys.executable, keep: Path | None = None) -> dict:
    """Run ``package``'s run_autograder on the ``submitted`` files as Gradescope would; return results.json."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(keep or folder) / "autograder"
        if root.exists():
            shutil.rmtree(root)
        (root / "submission").mkdir(parents=True)
        (root / "results").mkdir()
        with zipfile.ZipFile(package) as archive:
            archive.extractall(root / "source")
        for path in submitted:
            shutil.copy2(path, root / "submission" / path.name)
        env = dict(__import__("os").environ, AUTOGRADER_ROOT=str(root), AUTOGRADER_PYTHON=python)
        done = subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env, capture_output=True,
                              text=True)
        results_file = root / "results" / "results.json"
        if done.returncode != 0 or not results_file.exists():
            raise AutograderError(f"run_autograder failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                                  f"{done.stderr[-2000:]}")
        return json.loads(results_file.read_text(encoding="utf-8"))


def parse_points(values: list[str]) -> tuple[float, dict[str, float]]:
    default, per_check = 1.0, {}
    for value in values:
        check, _, number = value.rpartition("=")
        try:
            points = float(number)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--points takes N or check_name=N, got {value!r}") from None
        if points <= 0:
            raise argparse.ArgumentTypeError(f"--points must be positive, got {value!r}")
        if check:
            per_check[check] = points
        else:
            default = points
    return default, per_check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="write Gradescope autograder zips")
    make.add_argument("notebooks", nargs="*", help="notebooks (default: every notebook with assignments); "
                                                   "shell patterns such as 'notebooks/0[1-3]_*' work too")
    make.add_argument("--out", type=Path, default=ROOT / "_build" / "autograder", help="folder of the zips")
    make.add_argument("--name", help="one package NAME.zip for all the notebooks given (default: one per notebook)")
    make.add_argument("--points", action="append", default=[], metavar="N | check_name=N",
                      help="points per check call (default 1), or for one check; may be repeated")
    try_it = commands.add_parser("grade", help="run a package's grader here on submitted notebooks")
    try_it.add_argument("package", type=Path)
    try_it.add_argument("submitted", nargs="+", type=Path, help="the submitted files")
    try_it.add_argument("--results", type=Path, help="also write results.json here")
    args = parser.parse_args(argv)

    try:
        if args.command == "build":
            default, per_check = parse_points(args.points)
            all_notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
            if args.notebooks:
                notebooks = []
                for pattern in args.notebooks:
                    matches = [p for p in all_notebooks if fnmatch.fnmatch(str(p), str(Path(pattern).resolve()))
                               or p.name == Path(pattern).name]
                    if not matches:
                        parser.error(f"no notebook in notebooks/ matches {pattern}")
                    notebooks += [p for p in matches if p not in notebooks]
            else:
                notebooks = [p for p in all_notebooks if editions.assignments(nbformat.read(p, as_version=4))]
            for path in build(notebooks, args.out, args.name, per_check, default):
                config = json.loads(zipfile.ZipFile(path).read("assignments.json"))
                checks = [c for nb in config["notebooks"] for a in nb["assignments"] for c in a["checks"]]
                print(f"{path}: {len(checks)} checks, {sum(c['points'] for c in checks):g} points "
                      f"({', '.join(c['call'] for c in checks)})")
            return 0
        results = grade(args.package, args.submitted)
    except (AutograderError, argparse.ArgumentTypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.results:
        args.results.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    for test in results["tests"]:
        print(f"{test['score']:g}/{test['max_score']:g}  {test['name']}  [{test['visibility']}]")
        print("\n".join("    " + line for line in test["output"].splitlines()))
    score = sum(t["score"] for t in results["tests"])
    print(f"total: {score:g} of {sum(t['max_score'] for t in results['tests']):g} points\n{results['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
