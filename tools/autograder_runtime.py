"""The grader inside the Gradescope autograder package (shipped as ``grader.py``; see tools/autograder.py).

    python grader.py --config assignments.json --submission DIR --results results.json

Standard library only; the assignments themselves run in child processes of
the package's Python, which has torch and minilib. For every notebook named in
``assignments.json`` it finds the student's notebook in ``DIR`` (by its file
name, or the only notebook there when the package grades one chapter) and, in
one child process per notebook, runs every assignment in a fresh namespace:

1. the student's solution cell: the cell with the id of the instructor's
   solution cell, else the n-th cell tagged ``solution``, else the last code
   cell that defines the assignment's functions (IPython ``%`` and ``!``
   lines are skipped);
2. each of its checks, as the instructor's notebook calls it (the student's
   check cells are ignored), with ``minilib.checks.grade(check, fn,
   hidden=True)``: the visible and the hidden inputs, part by part.

Each check is worth the points given when the package was built; its parts
share them in proportion to their own points. A check becomes two Gradescope
tests: the visible inputs (visible at once) and, if the check has any, the
hidden inputs (shown after the grades are published). ``results.json`` follows
Gradescope's format: ``tests`` with ``name``, ``number``, ``score``,
``max_score``, ``status``, ``output`` and ``visibility``, and an ``output``
for the whole submission with the CPU seconds and memory each notebook took.

An assignment that raises, runs past its time limit or kills its process
scores 0 with the reason; nothing a submission does can stop the other
notebooks from being graded. The student's code runs with the grader's
rights, as in any Gradescope autograder, so a determined student could tamper
with it; the package checks work, it does not sandbox it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SOLUTION_TAG = "solution"


# ---------------------------------------------------------------------------
# The parent: find the notebooks and cells, run the children, write results.json
# ---------------------------------------------------------------------------


def read_cells(path: Path) -> list[dict]:
    """The cells of a notebook file, sources joined into strings."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if isinstance(cell.get("source"), list):
            cell["source"] = "".join(cell["source"])
    return cells


def find_submission(name: str, submission: Path, only_one: bool) -> Path | None:
    """The submitted notebook for ``name``: a file of that name anywhere in ``submission``, else the only
    notebook submitted when the package grades a single notebook."""
    notebooks = sorted(p for p in submission.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    for path in notebooks:
        if path.name == name:
            return path
    return notebooks[0] if only_one and len(notebooks) == 1 else None


def find_solution_cell(cells: list[dict], assignment: dict) -> str | None:
    """The source of the student's solution cell for ``assignment`` (see the module's docstring), or None."""
    code = [cell for cell in cells if cell.get("cell_type") == "code"]
    for cell in code:
        if cell.get("id") and cell.get("id") == assignment["solution_id"]:
            return cell["source"]
    tagged = [cell for cell in code if SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])]
    if len(tagged) == assignment["of"] and assignment["number"] <= len(tagged):
        return tagged[assignment["number"] - 1]["source"]
    defining = [cell for cell in code
                if all(re.search(rf"^def {re.escape(name)}\(", cell["source"], re.M) for name in assignment["defines"])]
    return defining[-1]["source"] if defining else None


def run_child(python: str, jobs: list[dict], timeout: float) -> tuple[dict, float, float, str]:
    """Run the assignments ``jobs`` in one child process; return its results by key, its CPU seconds, its
    peak memory in MiB and what went wrong with the process itself (or "")."""
    with tempfile.TemporaryDirectory() as folder:
        request, answer, log = Path(folder) / "request.json", Path(folder) / "answer.json", Path(folder) / "log"
        request.write_text(json.dumps(jobs), encoding="utf-8")
        start, problem = time.monotonic(), ""
        with open(log, "w+", encoding="utf-8", errors="replace") as output:
            process = subprocess.Popen([python, os.path.abspath(__file__), "--child", str(request), str(answer)],
                                       stdout=output, stderr=subprocess.STDOUT, cwd=folder)
            while True:  # wait4 gives this child's own peak memory
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() - start > timeout:
                    process.kill()
                    pid, status, usage = os.wait4(process.pid, 0)
                    problem = f"the notebook's assignments took longer than {timeout:.0f} s in all"
                    break
                time.sleep(0.05)
            process.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting
            if not problem and process.returncode != 0:
                output.seek(0)
                problem = (f"the grading process stopped (exit code {process.returncode}), perhaps out of memory:"
                           f"\n{output.read()[-1500:]}")
        results = json.loads(answer.read_text(encoding="utf-8")) if answer.exists() else {}
    return results, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, problem


def split_points(check: dict, parts: list[dict] | None) -> dict[bool, tuple[float, float]]:
    """``{hidden: (score, max_score)}`` of one check: its points shared among its parts as the parts' points."""
    total = sum(part["points"] for part in check["parts"]) or 1.0
    earned = {part["name"]: part["passed"] for part in parts or []}
    split = {}
    for hidden in (False, True):
        mine = [part for part in check["parts"] if part["hidden"] == hidden]
        if mine:
            maximum = check["points"] * sum(part["points"] for part in mine) / total
            score = check["points"] * sum(part["points"] for part in mine if earned.get(part["name"])) / total
            split[hidden] = (round(score, 4), round(maximum, 4))
    return split


def part_lines(parts: list[dict], hidden: bool) -> list[str]:
    lines = []
    for part in parts:
        if part["hidden"] != hidden:
            continue
        lines.append(f"{'✓' if part['passed'] else '✗'} {part['name']} ({part['inputs']} inputs)")
        lines += ["    " + line for line in part["message"].splitlines()]
    return lines


def grade_submission(config: dict, submission: Path, python: str) -> dict:
    """Grade every notebook of ``config`` in ``submission``; return the results in Gradescope's format."""
    tests, summary = [], []
    only_one = len(config["notebooks"]) == 1
    for notebook in config["notebooks"]:
        path = find_submission(notebook["file"], submission, only_one)
        cells = read_cells(path) if path is not None else None
        jobs, reasons = [], {}
        for assignment in notebook["assignments"]:
            key = f"{notebook['name']}#{assignment['number']}"
            source = find_solution_cell(cells, assignment) if cells is not None else None
            if path is None:
                reasons[key] = f"no notebook named {notebook['file']} in the submission"
            elif source is None:
                reasons[key] = (f"no solution cell for assignment {assignment['number']} (a code cell defining "
                                f"{', '.join(assignment['defines'])}) in {path.name}")
            else:
                jobs.append(dict(key=key, source=source, checks=assignment["checks"],
                                 timeout=config["timeout_per_assignment"]))
        results, seconds, peak, problem = ({}, 0.0, 0.0, "")
        if jobs:
            results, seconds, peak, problem = run_child(python, jobs, config["timeout_per_notebook"])
            summary.append(f"{notebook['name']}: {len(jobs)} assignments graded in {seconds:.1f} s of CPU time, "
                           f"peak memory {peak:.0f} MiB")
        for assignment in notebook["assignments"]:
            key = f"{notebook['name']}#{assignment['number']}"
            result = results.get(key, {})
            for index, check in enumerate(assignment["checks"], 1):
                report = result.get("checks", {}).get(check["call"])
                reason = reasons.get(key) or result.get("error") or problem or "the assignment was not graded"
                parts = report["parts"] if report and not report["error"] else None
                if report and report["error"]:
                    reason = report["error"]
                title = f"{notebook['name']}, assignment {assignment['number']}: {check['call']}"
                number = f"{notebook['chapter']}.{assignment['number']}" + (f".{index}" if len(assignment['checks']) > 1 else "")
                for hidden, (score, maximum) in split_points(check, parts).items():
                    lines = part_lines(parts, hidden) if parts is not None else [reason]
                    tests.append(dict(
                        name=title + (", hidden inputs" if hidden else ""), number=number + ("h" if hidden else ""),
                        score=score, max_score=maximum, status="passed" if score >= maximum else "failed",
                        output="\n".join(lines), visibility="after_published" if hidden else "visible"))
    return dict(tests=tests, output="\n".join(summary), visibility="visible", stdout_visibility="hidden")


# ---------------------------------------------------------------------------
# The child: run assignments in fresh namespaces, grade them with minilib.checks
# ---------------------------------------------------------------------------


class AssignmentTimeout(BaseException):
    """Raised in the student's code when an assignment runs past its time limit (not an Exception, so that
    neither the student's code nor the check can catch it by accident)."""


def _alarm(signum, frame):
    raise AssignmentTimeout()


def runnable(source: str) -> str:
    """A cell's source without IPython's ``%magic`` and ``!shell`` lines, which plain Python cannot run."""
    return "\n".join("pass  # " + line if line.lstrip().startswith(("%", "!")) else line
                     for line in source.splitlines())


def run_assignment(job: dict) -> dict:
    """Execute one solution cell in a fresh namespace and grade each of its checks."""
    import contextlib
    import io

    import minilib.checks as checks

    namespace = {"__name__": "__main__"}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(job["timeout"]))
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                exec(compile(runnable(job["source"]), "<your solution cell>", "exec"), namespace)
            except AssignmentTimeout:
                raise
            except BaseException:  # noqa: BLE001 - the cell itself failed: every check of it scores 0
                lines = traceback.format_exc().strip().splitlines()
                return dict(error="your solution cell raised an error when it ran:\n" + "\n".join(lines[-6:]))
        reports = {}
        for check in job["checks"]:
            function = namespace.get(check["function"])
            if function is None:
                reports[check["call"]] = dict(error=f"{check['function']} is not defined by your solution cell",
                                              parts=[])
                continue
            report = checks.grade(getattr(checks, check["check"]), function, hidden=True)
            reports[check["call"]] = dict(error=report.error, parts=[
                dict(name=p.name, points=p.points, passed=p.passed, hidden=p.hidden, inputs=p.inputs,
                     message=p.message) for p in report.parts])
        return dict(checks=reports)
    except AssignmentTimeout:
        return dict(error=f"the assignment took longer than {job['timeout']} s")
    finally:
        signal.alarm(0)


def child(request: Path, answer: Path) -> int:
    results = {}
    for job in json.loads(request.read_text(encoding="utf-8")):
        results[job["key"]] = run_assignment(job)
        answer.write_text(json.dumps(results), encoding="utf-8")  # what is done survives a crash of the next
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        return child(Path(argv[1]), Path(argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="assignments.json of the package")
    parser.add_argument("--submission", type=Path, required=True, help="the folder of the submitted files")
    parser.add_argument("--results", type=Path, required=True, help="where to write results.json")
    parser.add_argument("--python", default=sys.executable, help="the Python with torch and minilib")
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text(encoding="utf-8"))
    start = time.monotonic()
    results = grade_submission(config, args.submission, args.python)
    results["execution_time"] = round(time.monotonic() - start)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    score = sum(test["score"] for test in results["tests"])
    maximum = sum(test["max_score"] for test in results["tests"])
    print(f"{score:g} of {maximum:g} points; results in {args.results}")
    print(results["output"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
