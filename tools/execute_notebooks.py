"""Execute the book's notebooks in parallel into the build's execution cache.

    python tools/execute_notebooks.py --cache _build/.jupyter_cache/ci --jobs 2

Jupyter Book (``execute_notebooks: cache``) runs the notebooks that have no
cached outputs one after the other. This script fills the same cache first,
``--jobs`` notebooks at a time, so the build that follows only reads it. It
does what myst-nb's cache mode does for one notebook (the same
``single_nb_execution``, in the notebook's own folder, widget state kept) and
writes the results to the cache from this process only (the workers just
execute), so the cache's database has a single writer.

A notebook whose code is already in the cache is skipped; a notebook that
fails is reported with its traceback and makes the script exit 1. The workers
are started with ``spawn``, not ``fork``: a forked copy of this process (with
its threads and open database) is not a safe place to start kernels from. A
notebook whose kernel dies or hangs past the cell timeout is run once more
before it counts as failed, since that is a fault of the machinery, not of the
notebook's code; a notebook that raises an error fails at once. The budget
comes from ``MINILIB_BUDGET`` in the environment, as in the build. Run it with
the virtual environment's Python (it needs jupyter-cache and nbclient).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nbformat
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn
from jupyter_cache.executors.utils import single_nb_execution

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from check_site import toc_pages  # noqa: E402


def book_notebooks() -> list[Path]:
    """The notebooks listed in ``_toc.yml``, in the book's order."""
    return [ROOT / f"{doc}.ipynb" for doc in toc_pages() if (ROOT / f"{doc}.ipynb").exists()]


def children_cpu_seconds() -> float:
    """User plus system CPU time of this process's finished child processes (the notebook kernels)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def execute(path: Path, timeout: int | None) -> tuple[Path, nbformat.NotebookNode | None, float, float, str | None]:
    """Run one notebook in its folder; return it with its outputs, the wall seconds, the kernel's CPU
    seconds (other jobs on the machine do not inflate these) and any error."""
    notebook = nbformat.read(path, as_version=4)
    cpu_before = children_cpu_seconds()
    result = single_nb_execution(notebook, cwd=str(path.parent), timeout=timeout, allow_errors=False,
                                 meta_override=True)
    error = None if result.err is None else result.exc_string
    return path, notebook, result.time, children_cpu_seconds() - cpu_before, error


# nbclient's errors for a kernel that died or stopped answering (not an error raised by a cell)
MACHINERY_ERRORS = ("DeadKernelError", "CellTimeoutError", "TimeoutError")


def execute_with_retry(path: Path, timeout: int | None,
                       ) -> tuple[Path, nbformat.NotebookNode | None, float, float, str | None]:
    """``execute``, run a second time if the first attempt ended in a dead or hung kernel."""
    path, notebook, seconds, cpu, error = execute(path, timeout)
    if error is not None and any(name in error for name in MACHINERY_ERRORS):
        print(f"RETRYING  {path.relative_to(ROOT)}: its kernel died or hung ({error.strip().splitlines()[-1]})",
              flush=True)
        path, notebook, more_seconds, more_cpu, error = execute(path, timeout)
        seconds, cpu = seconds + more_seconds, cpu + more_cpu
    return path, notebook, seconds, cpu, error


def print_timings(rows: list[dict]) -> None:
    """The table of this run: wall time, the kernel's CPU time and the load around each notebook."""
    print("\n| notebook | wall time | kernel CPU time | load after |\n|---|---|---|---|")
    for row in sorted(rows, key=lambda row: row["notebook"]):
        print(f"| {row['notebook']} | {row['seconds']:.0f} s | {row['cpu_seconds']:.0f} s | {row['load_after']:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="the build's jupyter-cache folder")
    parser.add_argument("--jobs", type=int, default=2, help="notebooks executed at the same time")
    parser.add_argument("--timeout", type=int, default=0,
                        help="seconds one cell may run; 0 (the default): no limit, so a slow machine "
                             "only makes the build slower")
    parser.add_argument("--timings", type=Path, help="write the timings of the executed notebooks to this JSON file")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    cache = get_cache(str(args.cache))
    todo = []
    for path in book_notebooks():
        try:
            cache.match_cache_notebook(nbformat.read(path, as_version=4))
            print(f"cached    {path.relative_to(ROOT)}", flush=True)
        except KeyError:
            todo.append(path)
    failures, rows = [], []
    start = time.monotonic()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(execute_with_retry, path, args.timeout or None) for path in todo]
        for future in as_completed(futures):
            path, notebook, seconds, cpu, error = future.result()
            name = path.relative_to(ROOT)
            if error is not None:
                failures.append(name)
                print(f"FAILED    {name} after {seconds:.0f} s\n{error}", flush=True)
                continue
            cache.cache_notebook_bundle(CacheBundleIn(notebook, str(path), data={"execution_seconds": seconds}),
                                        check_validity=False, overwrite=True)
            print(f"executed  {name} in {seconds:.0f} s ({cpu:.0f} s of CPU)", flush=True)
            rows.append(dict(notebook=path.stem, seconds=round(seconds, 1), cpu_seconds=round(cpu, 1),
                             load_after=os.getloadavg()[0]))
    print(f"{len(todo)} notebooks executed in {time.monotonic() - start:.0f} s with {args.jobs} jobs; "
          f"{len(failures)} failed", flush=True)
    if rows:
        print_timings(rows)
    if args.timings:
        args.timings.parent.mkdir(parents=True, exist_ok=True)
        args.timings.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
