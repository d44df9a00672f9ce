"""The student and the instructor edition of the notebooks.

    python3 tools/make.py editions                        # all notebooks, in the project's .venv
    .venv/bin/python tools/editions.py [--out DIR] [NOTEBOOK ...]

writes ``_build/editions/student/*.ipynb`` and ``_build/editions/instructor/*.ipynb``.

Every chapter ends with assignments. An assignment is a code cell tagged
``solution`` whose answer sits between nbgrader's markers, followed by a cell
that calls a check from ``minilib.checks``::

    def my_modulate(x, shift, scale):
        ### BEGIN SOLUTION
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        ### END SOLUTION

    check_modulate(my_modulate)          # the next cell

The notebooks in the repository are the instructor edition: they contain the
solutions, so the tests (nbval) and the book build run them like any other
cell. The **student edition** replaces each marked region by ``# YOUR CODE
HERE`` and ``raise NotImplementedError()`` at the region's indentation (what
nbgrader's ``ClearSolutions`` does), so every check fails with "not implemented
yet" until the student writes the code; the checks themselves are kept. Both
editions have their outputs cleared. In the instructor edition every solution
cell and check cell also carries nbgrader's cell metadata, so a course that
grades with nbgrader can use it as its source notebook as it is.

The same assignments make the student website (``make.py book --edition
student``, tools/student_site.py: ``student_page`` turns each executed
notebook into its page without solutions) and the Gradescope autograder
(``make.py autograder``, tools/autograder.py, which grades each solution cell
with the checks its assignment calls, ``assignment_checks``).

Why not nbgrader or otter-grader itself: the markers are nbgrader's, but
nbgrader the package is a course-management system (a database, a
JupyterLab extension, a server) that adds about 40 packages, JupyterLab and
the Notebook server among them, to the book's environment, and its
preprocessors import that whole stack. otter-grader brings its own notebook
format, test files and a grader object, pandas, and a Docker client and a
headless browser for PDF export. The editions need neither: clearing
solutions is a few lines of nbformat (which the book's requirements already
install for Jupyter Book, nbclient and nbval), so the command runs wherever
the book builds, in CI and on a laptop. (Checked with nbgrader 0.9.6: its ``generate_assignment`` turns
the instructor edition into notebooks whose cells are the student edition's,
source for source.)
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOLUTION_TAG = "solution"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
CHECK_CALL = re.compile(r"^\s*check_\w+\(", re.MULTILINE)


class EditionError(ValueError):
    """A notebook's assignment cells do not follow the convention above."""


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def is_solution_cell(cell) -> bool:
    return cell.cell_type == "code" and SOLUTION_TAG in _tags(cell)


def clear_solution(source: str, where: str = "a cell") -> str:
    """Replace every ``### BEGIN SOLUTION`` .. ``### END SOLUTION`` region by the stub, at its indentation."""
    lines, out, inside = source.splitlines(), [], False
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise EditionError(f"{where}, line {number}: {BEGIN} inside another solution region")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out += [indent + stub for stub in STUB]
        elif stripped == END:
            if not inside:
                raise EditionError(f"{where}, line {number}: {END} without a {BEGIN} before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise EditionError(f"{where}: {BEGIN} without an {END}")
    return "\n".join(out)


def check_assignments(nb, name: str = "notebook") -> None:
    """Raise an EditionError on a broken assignment: markers outside a solution cell, a solution
    cell without markers, or a solution cell not followed by a code cell calling a ``check_`` function."""
    for index, cell in enumerate(nb.cells):
        where = f"{name}, cell {index}"
        if SOLUTION_TAG in _tags(cell) and cell.cell_type != "code":
            raise EditionError(f"{where}: only code cells can be tagged {SOLUTION_TAG!r}")
        if (BEGIN in cell.source or END in cell.source) and not is_solution_cell(cell):
            raise EditionError(f"{where}: solution markers in a cell that is not tagged {SOLUTION_TAG!r}")
        if is_solution_cell(cell):
            if BEGIN not in cell.source:
                raise EditionError(f"{where}: tagged {SOLUTION_TAG!r} but has no {BEGIN} ... {END} region")
            clear_solution(cell.source, where)  # raises on unbalanced markers
            following = next((c for c in nb.cells[index + 1:] if c.cell_type == "code"), None)
            if following is None or not CHECK_CALL.search(following.source):
                raise EditionError(f"{where}: the code cell after a solution cell must call a check "
                                   "from minilib.checks, e.g. check_modulate(my_modulate)")


def assignments(nb) -> list[tuple[int, int]]:
    """``(solution cell index, check cell index)`` of every assignment of a notebook."""
    pairs = []
    for index, cell in enumerate(nb.cells):
        if is_solution_cell(cell):
            check = next(i for i in range(index + 1, len(nb.cells)) if nb.cells[i].cell_type == "code")
            pairs.append((index, check))
    return pairs


def assignment_checks(nb) -> list[tuple[int, list[int]]]:
    """``(solution cell index, [check cell indices])`` of every assignment: the code cells right after a
    solution cell that call a check (chapter 4, say, checks ``my_sample`` and then ``my_kl``, one per cell)."""
    found = []
    for solution, first in assignments(nb):
        checks = [first]
        for index in range(first + 1, len(nb.cells)):
            cell = nb.cells[index]
            if cell.cell_type != "code":
                continue
            if is_solution_cell(cell) or not CHECK_CALL.search(cell.source):
                break
            checks.append(index)
        found.append((solution, checks))
    return found


def student_page(nb, name: str = "notebook"):
    """An executed notebook as the student website shows it: each solution region replaced by the stub and
    the outputs of the solution cell and of its check cells removed; every other output kept.

    The student site is built from the executed instructor notebooks (see tools/student_site.py), so the
    student edition never has to run (its checks would fail)."""
    check_assignments(nb, name)
    nb = nbformat.from_dict(copy.deepcopy(nb))
    for solution, checks in assignment_checks(nb):
        cell = nb.cells[solution]
        cell.source = clear_solution(cell.source, f"{name}, cell {solution}")
        cell.metadata["tags"] = [tag for tag in _tags(cell) if tag != "hide-input"]
        for index in [solution, *checks]:
            nb.cells[index].outputs, nb.cells[index].execution_count = [], None
    return nb


def edition(nb, kind: str, name: str = "notebook"):
    """A copy of notebook ``nb`` as the ``"student"`` or the ``"instructor"`` edition."""
    if kind not in ("student", "instructor"):
        raise ValueError(f"kind must be 'student' or 'instructor', got {kind!r}")
    check_assignments(nb, name)
    nb = nbformat.from_dict(copy.deepcopy(nb))
    for cell in nb.cells:  # clear the outputs, as nbconvert's ClearOutputPreprocessor does
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            for key in ("execution", "collapsed", "scrolled"):
                cell.metadata.pop(key, None)
    for number, (solution, check) in enumerate(assignments(nb), 1):
        cell = nb.cells[solution]
        if kind == "student":  # nbgrader's ClearSolutions
            cell.source = clear_solution(cell.source, f"{name}, cell {solution}")
            cell.metadata["tags"] = [tag for tag in _tags(cell) if tag != "hide-input"]  # nothing left to fold
        else:  # nbgrader's cell metadata, so that nbgrader can use the notebook as its source
            stem = f"{name}-{number}"
            cell.metadata["nbgrader"] = dict(solution=True, grade=False, locked=False,
                                             grade_id=f"{stem}-solution", schema_version=3)
            nb.cells[check].metadata["nbgrader"] = dict(solution=False, grade=True, locked=True, points=1,
                                                        grade_id=f"{stem}-check", schema_version=3)
    return nb


def write_editions(notebooks: list[Path], out: Path) -> dict[str, list[Path]]:
    """Write both editions of every notebook under ``out/student`` and ``out/instructor``."""
    written = {"student": [], "instructor": []}
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        for kind in written:
            target = out / kind / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(edition(nb, kind, path.stem), target)
            written[kind].append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to convert (default: every notebooks/*.ipynb)")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "editions",
                        help="output folder (default: _build/editions)")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    try:
        written = write_editions(notebooks, args.out)
    except EditionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    total = sum(len(assignments(nbformat.read(p, as_version=4))) for p in notebooks)
    for kind, paths in written.items():
        print(f"{kind:10s} edition: {len(paths)} notebooks in {args.out / kind}")
    print(f"{total} assignments (solution cells tagged {SOLUTION_TAG!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
