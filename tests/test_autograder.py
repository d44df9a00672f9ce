"""The Gradescope autograder (tools/autograder.py, tools/autograder_runtime.py), end to end and in parts.

The main test builds the package of chapter 1 (two assignments, each check
worth 2 points: 1 for the visible inputs, 1 for the hidden ones), then runs
the package's own run_autograder, as Gradescope would, on three submissions:
the instructor edition (every point), the student edition as shipped (no
point, "not implemented yet") and a wrong one (a patchify with the channels
first, which gets its hint and no point, and a sin-cos embedding that passes
the visible inputs but not the hidden negative positions: 1 point of 4).
"""

import json
import stat
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import autograder  # noqa: E402
import autograder_runtime as runtime  # noqa: E402
import editions  # noqa: E402

CHAPTER_1 = ROOT / "notebooks" / "01_images_as_tokens.ipynb"
WRONG_PATCHIFY = '''def my_patchify(x, p):
    B, C, H, W = x.shape  # the channels first inside a patch: (C, p, p) instead of (p, p, C)
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)'''
ABS_SINCOS = '''import torch


def my_sincos_embedding(embed_dim, positions):
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    angles = positions.reshape(-1).double().abs()[:, None] * omega[None]  # wrong for negative positions
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)'''
GRADESCOPE_VISIBILITY = {"visible", "hidden", "after_due_date", "after_published"}


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("autograder")
    return autograder.build([CHAPTER_1], out, None, {}, 2.0)[0]


@pytest.fixture(scope="module")
def submissions(tmp_path_factory):
    folder = tmp_path_factory.mktemp("submissions")
    written = editions.write_editions([CHAPTER_1], folder)
    wrong = nbformat.read(written["student"][0], as_version=4)
    (patchify, _), (sincos, _) = editions.assignments(wrong)
    wrong.cells[patchify].source, wrong.cells[sincos].source = WRONG_PATCHIFY, ABS_SINCOS
    (folder / "wrong").mkdir()
    nbformat.write(wrong, folder / "wrong" / CHAPTER_1.name)
    return dict(correct=written["instructor"][0], unfinished=written["student"][0],
                wrong=folder / "wrong" / CHAPTER_1.name)


def scores(results):
    return {(test["name"].split(": ")[1]): (test["score"], test["max_score"]) for test in results["tests"]}


def assert_gradescope_format(results):
    assert set(results) >= {"tests", "output", "visibility", "stdout_visibility", "execution_time"}
    for test in results["tests"]:
        assert set(test) >= {"name", "number", "score", "max_score", "output", "visibility", "status"}
        assert 0 <= test["score"] <= test["max_score"] and test["visibility"] in GRADESCOPE_VISIBILITY
        assert test["status"] == ("passed" if test["score"] == test["max_score"] else "failed")
    json.dumps(results)  # plain JSON


def test_the_package_has_what_gradescope_runs(package):
    with zipfile.ZipFile(package) as archive:
        names = set(archive.namelist())
        assert {"setup.sh", "run_autograder", "grader.py", "assignments.json", "requirements.txt",
                "minilib-src/minilib/checks/runner.py", "minilib-src/minilib/checks/ch01.py"} <= names
        for script in ("setup.sh", "run_autograder"):
            assert stat.S_IMODE(archive.getinfo(script).external_attr >> 16) & 0o111, f"{script} is not executable"
        setup = archive.read("setup.sh").decode()
        assert "download.pytorch.org/whl/cpu" in setup and '"torch==' in setup
        pins = archive.read("requirements.txt").decode().split()
        assert "numpy==" in " ".join(pins) and not any(p.split("==")[0] in ("torch", "jupyter-book", "pytest") for p in pins)
        config = json.loads(archive.read("assignments.json"))
    [notebook] = config["notebooks"]
    assert config["budget"] == "ci" and notebook["file"] == CHAPTER_1.name
    checks = [check for a in notebook["assignments"] for check in a["checks"]]
    assert [c["call"] for c in checks] == ["check_patchify(my_patchify)", "check_sincos_embedding(my_sincos_embedding)"]
    assert all(c["points"] == 2 and [p["hidden"] for p in c["parts"]] == [False, True] for c in checks)


def test_correct_unfinished_and_wrong_notebooks_get_their_scores(package, submissions):
    correct = autograder.grade(package, [submissions["correct"]])
    assert_gradescope_format(correct)
    assert scores(correct) == {
        "check_patchify(my_patchify)": (1, 1), "check_patchify(my_patchify), hidden inputs": (1, 1),
        "check_sincos_embedding(my_sincos_embedding)": (1, 1),
        "check_sincos_embedding(my_sincos_embedding), hidden inputs": (1, 1)}
    hidden = [t for t in correct["tests"] if t["name"].endswith("hidden inputs")]
    assert len(hidden) == 2 and all(t["visibility"] == "after_published" for t in hidden)
    peak = float(correct["output"].split("peak memory ")[1].split()[0])
    assert 0 < peak < 500, correct["output"]  # MiB: far below Gradescope's default 768 MB

    unfinished = autograder.grade(package, [submissions["unfinished"]])
    assert_gradescope_format(unfinished)
    assert sum(t["score"] for t in unfinished["tests"]) == 0
    assert all("is not implemented yet" in t["output"] for t in unfinished["tests"])

    wrong = autograder.grade(package, [submissions["wrong"]])
    assert_gradescope_format(wrong)
    assert scores(wrong) == {
        "check_patchify(my_patchify)": (0, 1), "check_patchify(my_patchify), hidden inputs": (0, 1),
        "check_sincos_embedding(my_sincos_embedding)": (1, 1),
        "check_sincos_embedding(my_sincos_embedding), hidden inputs": (0, 1)}
    by_name = {t["name"]: t["output"] for t in wrong["tests"]}
    assert "(row, column, channel)" in by_name["01_images_as_tokens, assignment 1: check_patchify(my_patchify)"]
    assert "negative positions" in by_name[
        "01_images_as_tokens, assignment 2: check_sincos_embedding(my_sincos_embedding), hidden inputs"]


def test_points_are_shared_among_a_checks_parts():
    check = dict(points=6.0, parts=[dict(name="a", points=1.0, hidden=False), dict(name="b", points=2.0, hidden=False),
                                    dict(name="h", points=3.0, hidden=True)])
    assert runtime.split_points(check, [dict(name="a", passed=True), dict(name="b", passed=False),
                                        dict(name="h", passed=True)]) == {False: (1.0, 3.0), True: (3.0, 3.0)}
    assert runtime.split_points(check, None) == {False: (0.0, 3.0), True: (0.0, 3.0)}  # nothing ran


def test_the_solution_cell_is_found_by_id_then_by_tag_then_by_its_functions():
    assignment = dict(number=2, of=2, solution_id="b", defines=["my_f"])
    cells = [dict(cell_type="code", id="a", source="def my_g(x): pass", metadata={"tags": ["solution"]}),
             dict(cell_type="code", id="b", source="def my_f(x): return 1", metadata={})]
    assert runtime.find_solution_cell(cells, assignment) == "def my_f(x): return 1"
    cells[1]["id"] = "new"  # a copied cell gets a new id: the second cell tagged 'solution'
    cells[1]["metadata"]["tags"] = ["solution"]
    assert runtime.find_solution_cell(cells, assignment) == "def my_f(x): return 1"
    cells[1]["metadata"] = {}  # no tags either: the last cell defining my_f
    cells.append(dict(cell_type="code", id="c", source="x = 1\ndef my_f(x):\n    return 2", metadata={}))
    assert runtime.find_solution_cell(cells, assignment) == "x = 1\ndef my_f(x):\n    return 2"
    assert runtime.find_solution_cell(cells, dict(assignment, defines=["my_h"])) is None


def test_a_broken_a_missing_and_an_endless_answer_score_zero_with_the_reason():
    check = [dict(check="check_modulate", function="my_modulate", call="check_modulate(my_modulate)")]
    result = runtime.run_assignment(dict(key="k", source="def my_modulate(x, shift, scale):\n  return (", checks=check,
                                         timeout=30))
    assert "SyntaxError" in result["error"]
    result = runtime.run_assignment(dict(key="k", source="%matplotlib inline\nx = 1", checks=check, timeout=30))
    assert result["checks"]["check_modulate(my_modulate)"]["error"] == "my_modulate is not defined by your solution cell"
    result = runtime.run_assignment(dict(key="k", source="while True:\n    pass", checks=check, timeout=1))
    assert result == {"error": "the assignment took longer than 1 s"}


def test_a_submission_without_the_notebook_scores_zero(package, tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("no notebook")
    results = autograder.grade(package, [other])
    assert sum(t["score"] for t in results["tests"]) == 0 and len(results["tests"]) == 4
    assert all("no notebook named 01_images_as_tokens.ipynb" in t["output"] for t in results["tests"])


def test_check_calls_and_points_are_read_as_written():
    assert autograder.check_calls("from minilib.checks import check_kl\n\ncheck_kl(my_kl)\nprint(1)") == [
        ("check_kl", "my_kl")]
    assert autograder.parse_points(["3", "check_kl=5"]) == (3.0, {"check_kl": 5.0})
    with pytest.raises(Exception, match="check_name=N"):
        autograder.parse_points(["check_kl=lots"])

