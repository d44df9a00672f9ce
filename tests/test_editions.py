"""The student and instructor editions (tools/editions.py) and the assignments in the notebooks.

The main test builds both editions of every notebook that has assignments and
runs each assignment, its solution cell and its check cell alone in a fresh
namespace of a real kernel: in the student edition every check must fail with
"not implemented yet", in the instructor edition every check must pass.
"""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import editions  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def notebook(*cells):
    """A small notebook from ``(kind, source, tags)`` triples, with an output on every code cell."""
    nb = nbformat.v4.new_notebook()
    for kind, source, tags in cells:
        cell = nbformat.v4.new_code_cell(source) if kind == "code" else nbformat.v4.new_markdown_cell(source)
        if tags:
            cell.metadata["tags"] = list(tags)
        if kind == "code":
            cell.outputs = [nbformat.v4.new_output("stream", text="old output\n")]
            cell.execution_count = 3
        nb.cells.append(cell)
    return nb


SOLUTION = '''import torch


def my_double(x):
    """Twice x."""
    ### BEGIN SOLUTION
    y = x + x
    return y
    ### END SOLUTION


def my_half(x):
    ### BEGIN SOLUTION
    return x / 2
    ### END SOLUTION'''

EXAMPLE = [("markdown", "# 1. A chapter", ()), ("code", "print('setup')", ("setup",)),
           ("markdown", "### Assignment: write `my_double`", ()),
           ("code", SOLUTION, ("solution", "hide-input")),
           ("code", "check_double(my_double)", ())]


def test_the_student_edition_replaces_each_region_by_a_stub_at_its_indentation():
    student = editions.edition(notebook(*EXAMPLE), "student")
    assert student.cells[3].source == '''import torch


def my_double(x):
    """Twice x."""
    # YOUR CODE HERE
    raise NotImplementedError()


def my_half(x):
    # YOUR CODE HERE
    raise NotImplementedError()'''
    assert student.cells[3].metadata["tags"] == ["solution"]  # nothing left to fold on a website
    for original, cell in zip(notebook(*EXAMPLE).cells, student.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
        if "solution" not in cell.metadata.get("tags", []):
            assert cell.source == original.source  # everything else, the checks included, is kept


def test_the_instructor_edition_keeps_the_solutions_and_adds_nbgrader_metadata():
    instructor = editions.edition(notebook(*EXAMPLE), "instructor", name="01_chapter")
    assert instructor.cells[3].source == SOLUTION
    assert instructor.cells[3].metadata["tags"] == ["solution", "hide-input"]
    assert instructor.cells[3].metadata["nbgrader"] == dict(solution=True, grade=False, locked=False,
                                                            grade_id="01_chapter-1-solution", schema_version=3)
    assert instructor.cells[4].metadata["nbgrader"]["grade"] is True
    assert all(c.outputs == [] for c in instructor.cells if c.cell_type == "code")
    assert editions.assignments(instructor) == [(3, 4)]


@pytest.mark.parametrize("cells, message", [
    ([("code", "x = 1\n### BEGIN SOLUTION\ny = 2", ("solution",)), ("code", "check_x(x)", ())], "without an"),
    ([("code", "### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n### END SOLUTION", ("solution",)),
      ("code", "check_x(x)", ())], "without a ### BEGIN"),
    ([("code", "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", ("solution",)),
      ("code", "check_x(x)", ())], "inside another"),
    ([("code", "x = 1", ("solution",)), ("code", "check_x(x)", ())], "has no ### BEGIN SOLUTION"),
    ([("code", "### BEGIN SOLUTION\nx = 1\n### END SOLUTION", ())], "not tagged 'solution'"),
    ([("markdown", "An answer", ("solution",))], "only code cells"),
    ([("code", "### BEGIN SOLUTION\nx = 1\n### END SOLUTION", ("solution",)), ("code", "print(x)", ())],
     "must call a check"),
])
def test_broken_assignments_are_rejected_with_the_cell_named(cells, message):
    for kind in ("student", "instructor"):
        with pytest.raises(editions.EditionError, match=message) as info:
            editions.edition(notebook(*cells), kind, name="07_chapter")
        assert "07_chapter, cell 0" in str(info.value)


def test_every_chapter_has_at_least_two_assignments_that_follow_the_convention():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        editions.edition(nb, "student", path.stem)  # raises on a broken assignment
        found = editions.assignments(nb)
        assert len(found) >= 2, f"{path.name} has {len(found)} assignment(s) (cells tagged 'solution'); 2 expected"


def test_the_command_writes_both_editions(tmp_path):
    sources = [p for p in NOTEBOOKS if p.stem.startswith(("01_", "03_"))]
    result = subprocess.run([sys.executable, ROOT / "tools" / "editions.py", "--out", tmp_path, *sources],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "4 assignments" in result.stdout  # two in chapter 1, two in chapter 3
    for kind in ("student", "instructor"):
        assert sorted(p.name for p in (tmp_path / kind).iterdir()) == [p.name for p in sources]
    student = (tmp_path / "student" / sources[0].name).read_text()
    assert "BEGIN SOLUTION" not in student and "raise NotImplementedError()" in student
    assert "BEGIN SOLUTION" in (tmp_path / "instructor" / sources[0].name).read_text()


# Empty the kernel's namespace, as %reset -f does but without its slow garbage collection,
# so that an assignment cannot use what the previous one imported or defined.
FORGET = """\
for _name in [name for name in get_ipython().user_ns if not name.startswith("_")
              and name not in get_ipython().user_ns_hidden]:
    del get_ipython().user_ns[_name]"""


def run_assignments(paths: list[Path], tmp_path: Path) -> list[tuple[str, dict]]:
    """Run every assignment of the given notebooks, each in a fresh namespace of one kernel.

    Returns ``(name, check cell)`` pairs, the check cells with their outputs.
    """
    runner, names = nbformat.v4.new_notebook(), []
    runner.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        for number, (solution, check) in enumerate(editions.assignments(nb), 1):
            runner.cells.append(nbformat.v4.new_code_cell(FORGET))
            runner.cells += [nb.cells[solution], nb.cells[check]]
            names.append(f"{path.parent.name} {path.stem} #{number}")
    NotebookClient(runner, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    return list(zip(names, runner.cells[2::3]))


def test_student_checks_fail_as_shipped_and_instructor_checks_pass(tmp_path):
    sources = [p for p in NOTEBOOKS if editions.assignments(nbformat.read(p, as_version=4))]
    written = editions.write_editions(sources, tmp_path / "editions")
    results = run_assignments(written["student"] + written["instructor"], tmp_path)  # one kernel start
    student, instructor = results[:len(results) // 2], results[len(results) // 2:]
    assert len(student) == len(instructor) >= 10

    for name, cell in student:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert errors, f"{name}: the student edition's check passed without a solution"
        assert errors[0].ename == "ExerciseError" and "is not implemented yet" in errors[0].evalue, \
            f"{name}: {errors[0].ename}: {errors[0].evalue}"

    for name, cell in instructor:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        assert text.count("✓") == text.count("\n") >= 1, f"{name}: {text!r}"


def test_every_check_has_a_cell_of_its_own():
    """Two checks in one cell would hide the second result until the first passes (in the student edition)."""
    for path in NOTEBOOKS:
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
            calls = [line for line in cell.source.splitlines() if line.startswith("check_")]
            assert cell.cell_type != "code" or len(calls) <= 1, f"{path.name}, cell {index}: {calls}"


def test_assignment_checks_lists_every_check_cell_after_a_solution():
    cells = EXAMPLE + [("code", "check_half(my_half)", ()), ("code", "print('more')", ()),
                       ("code", "check_double(my_double)", ())]
    assert editions.assignment_checks(notebook(*cells)) == [(3, [4, 5])]


def test_a_student_page_drops_the_solution_and_its_check_outputs_and_keeps_every_other_output():
    executed = notebook(*EXAMPLE, ("code", "check_half(my_half)", ()), ("code", "plot(my_double)", ()))
    page = editions.student_page(executed, "01_chapter")
    assert "raise NotImplementedError()" in page.cells[3].source and "x + x" not in page.cells[3].source
    assert page.cells[3].metadata["tags"] == ["solution"]
    for index in (3, 4, 5):  # the solution cell and both of its check cells
        assert page.cells[index].outputs == [] and page.cells[index].execution_count is None
    for index in (1, 6):  # the setup cell and a later cell keep what they showed
        assert page.cells[index].outputs[0].text == "old output\n" and page.cells[index].execution_count == 3
    assert executed.cells[3].outputs  # the executed notebook itself is left alone
