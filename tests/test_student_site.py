"""The student website (tools/student_site.py) and its check for solution code (check_site.solution_leaks).

The build test makes the student site from the repository's notebooks without
outputs (``--unexecuted``): it checks the conversion and a real ``jupyter-book
build -W -n`` in well under a minute, without executing a notebook. The
executed path (pages from the build's execution cache) is checked on a cache
filled by hand.
"""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import check_site  # noqa: E402
import editions  # noqa: E402
import student_site  # noqa: E402

NOTEBOOKS = [ROOT / f"{doc}.ipynb" for doc in check_site.toc_pages() if (ROOT / f"{doc}.ipynb").exists()]
CHAPTER_1 = ROOT / "notebooks" / "01_images_as_tokens.ipynb"


def test_every_assignment_has_solution_lines_the_leak_check_can_look_for():
    for path in NOTEBOOKS:
        lines = check_site.solution_lines(path)
        assert all(len(line) >= 8 and "  " not in line for line in lines)
        assert all(BEGIN not in line for line in lines for BEGIN in ("### BEGIN", "### END"))
    assert len(check_site.solution_lines(CHAPTER_1)) >= 2


def test_solution_leaks_finds_solution_code_in_pages_and_sources(tmp_path):
    line = check_site.solution_lines(CHAPTER_1)[0]
    words = line.split(" ")
    highlighted = "".join(f'<span class="n">{word.replace("<", "&lt;").replace(">", "&gt;")}</span> '
                          for word in words)  # as Pygments writes code, entities and all
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "clean.html").write_text("<pre># YOUR CODE HERE\nraise NotImplementedError()</pre>")
    (tmp_path / "notebooks" / "leaky.html").write_text(f"<div><pre>{highlighted}</pre></div>")
    assert check_site.solution_leaks(tmp_path, [CHAPTER_1]) == [f"notebooks/leaky.html: {line}  (from {CHAPTER_1.name})"]

    (tmp_path / "notebooks" / "leaky.html").unlink()
    source = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")])
    nbformat.write(source, tmp_path / "notebooks" / "page.ipynb")
    (tmp_path / "book").mkdir()  # a page that explains the markers is no leak
    (tmp_path / "book" / "instructors.html").write_text("<p>between <code>### BEGIN SOLUTION</code> and</p>")
    assert check_site.solution_leaks(tmp_path, [CHAPTER_1]) == [
        "notebooks/page.ipynb: ### BEGIN SOLUTION  (from the solution markers)"]


def test_the_student_config_turns_execution_and_colab_off():
    config = student_site.student_config({"title": "T", "execute": {"execute_notebooks": "cache", "timeout": 9},
                                          "launch_buttons": {"colab_url": "x"}})
    assert config == {"title": "T (student edition)", "execute": {"execute_notebooks": "off", "timeout": 9}}


def test_executed_notebooks_come_from_the_build_cache(tmp_path):
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    executed = nbformat.read(CHAPTER_1, as_version=4)
    for cell in executed.cells:
        if cell.cell_type == "code":
            cell.outputs = [nbformat.v4.new_output("stream", text=f"ran {cell.get('id')}\n")]
    get_cache(str(tmp_path / "cache")).cache_notebook_bundle(CacheBundleIn(executed, str(CHAPTER_1)),
                                                             check_validity=False)
    found = student_site.executed_notebooks([CHAPTER_1], tmp_path / "cache")[CHAPTER_1]
    page = editions.student_page(found, CHAPTER_1.stem)
    (solution, checks), _ = editions.assignment_checks(page)
    assert page.cells[solution].outputs == [] and all(page.cells[c].outputs == [] for c in checks)
    assert page.cells[solution - 1].cell_type != "code" or page.cells[solution - 1].outputs
    assert sum(bool(c.get("outputs")) for c in page.cells) > 10  # every other cell keeps its output
    with pytest.raises(student_site.StudentSiteError, match="not executed yet.*02_timestep"):
        student_site.executed_notebooks([CHAPTER_1, ROOT / "notebooks" / "02_timestep_embedding.ipynb"],
                                        tmp_path / "cache")


def test_the_student_site_builds_without_solutions(tmp_path):
    done = subprocess.run([sys.executable, ROOT / "tools" / "student_site.py", "--unexecuted", "--output", tmp_path],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-3000:]}"
    html = tmp_path / "_build" / "html"
    assert "no solution code in" in done.stdout and check_site.solution_leaks(html, NOTEBOOKS) == []
    page = (html / "notebooks" / "01_images_as_tokens.html").read_text(encoding="utf-8")
    assert "(student edition)" in page and "NotImplementedError" in page and "colab.research.google.com" not in page
    for path in NOTEBOOKS:  # the download button gives the student page
        source = (html / "_sources" / "notebooks" / path.name).read_text(encoding="utf-8")
        assert "BEGIN SOLUTION" not in source and "raise NotImplementedError()" in source, path.name
    assert (html / "book" / "using-this-book.html").is_file() and (html / "index.html").is_file()
