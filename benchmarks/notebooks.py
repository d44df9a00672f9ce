"""How long does each chapter take to run? Wall time and peak memory of every notebook in one budget.

    python benchmarks/notebooks.py                          # all notebooks, budget ci (about 1 min each)
    python benchmarks/notebooks.py --budget cpu --only 05,07 --json cpu.json
    OMP_NUM_THREADS=1 python benchmarks/notebooks.py --budget cpu --only 06 --executed /tmp/executed

Each notebook (``notebooks/NN_*.ipynb``) is executed from top to bottom with
nbclient in a fresh ``python3`` kernel, as the book build does: with
``MINILIB_BUDGET`` set to the budget, in the ``notebooks/`` folder, skipping the
cells tagged ``skip-execution``. Nothing is written back to the notebooks.

What is measured:

- wall time: from starting the kernel to the end of the last cell (the kernel's
  start, a second or two, included);
- CPU time: the kernel process's user plus system time (``/proc/<pid>/stat``),
  read after the last cell. Other jobs on the machine do not inflate it, so with
  ``OMP_NUM_THREADS=1`` it is what the wall time would be on an idle machine
  with one thread, and an upper bound for an idle 2-core machine with two;
- peak memory: the kernel process's resident set size high-water mark,
  ``VmHWM`` in ``/proc/<pid>/status``, read after the last cell, while the kernel
  still runs (Linux; elsewhere the column says n/a).

The script inherits ``OMP_NUM_THREADS`` and the other variables from its own
environment, so ``OMP_NUM_THREADS=1 python benchmarks/notebooks.py`` times the
notebooks on one thread, as the tests run them. The load average (``uptime``) is
printed with each row: other jobs on the machine make the times longer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
BUDGETS = ("ci", "cpu", "gpu")


def select_notebooks(only: str | None) -> list[Path]:
    """``notebooks/NN_*.ipynb``, all of them or those whose number is in ``only`` ("05,07")."""
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]*_*.ipynb"))
    if only:
        wanted = {number.strip().zfill(2) for number in only.split(",")}
        paths = [path for path in paths if path.name.split("_")[0] in wanted]
        missing = wanted - {path.name.split("_")[0] for path in paths}
        if missing:
            raise SystemExit(f"no notebook numbered {', '.join(sorted(missing))} in {NOTEBOOKS}")
    return paths


def peak_rss_bytes(pid: int) -> int | None:
    """The high-water mark of a process's resident set size (VmHWM), or None where /proc has none."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process (fields 14 and 15 of /proc/<pid>/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def load_average() -> str:
    """The 1-minute load average, as ``uptime`` prints it, or n/a."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def run_notebook(path: Path, budget: str, timeout: int, executed_dir: Path | None = None) -> dict:
    """Execute one notebook in a fresh kernel; returns its wall time, peak memory and load."""
    os.environ["MINILIB_BUDGET"] = budget  # the kernel inherits this process's environment
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=timeout,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    load_before = load_average()
    start = time.perf_counter()
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)
        peak = peak_rss_bytes(client.km.provisioner.pid)
        cpu = cpu_seconds(client.km.provisioner.pid)
    seconds = time.perf_counter() - start
    if executed_dir is not None:
        executed_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, executed_dir / path.name)
    return dict(notebook=path.stem, budget=budget, seconds=round(seconds, 1),
                cpu_seconds=None if cpu is None else round(cpu, 1), peak_rss_bytes=peak,
                load_before=load_before, load_after=load_average())


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = os.environ.get("OMP_NUM_THREADS", "unset (torch's default)")
    return (f"{os.cpu_count()} CPU(s), {cpu}; torch {torch.__version__}; OMP_NUM_THREADS {threads}"
            + (f"; {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", choices=BUDGETS, default="ci")
    parser.add_argument("--only", help="comma-separated notebook numbers, e.g. 05,07 (default: all)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--executed", type=Path, metavar="DIR",
                        help="write each executed notebook (with its outputs) into DIR, to read the numbers it printed")
    args = parser.parse_args()

    print(f"budget {args.budget}; {describe_machine()}\n")
    rows, failed = [], []
    for path in select_notebooks(args.only):
        print(f"  running {path.name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(run_notebook(path, args.budget, args.timeout, args.executed))
        except Exception as error:  # report it and go on with the next notebook
            failed.append(path.name)
            print(f"  FAILED {path.name}: {type(error).__name__}: {str(error)[-2000:]}", file=sys.stderr, flush=True)
            continue
        print(f"  {rows[-1]['seconds']:.0f} s wall, {rows[-1]['cpu_seconds']} s CPU", file=sys.stderr, flush=True)

    print("| notebook | budget | wall time | CPU time | peak memory (kernel RSS) | load before / after |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        peak = "n/a" if row["peak_rss_bytes"] is None else f"{row['peak_rss_bytes'] / 2**20:,.0f} MiB"
        cpu = "n/a" if row["cpu_seconds"] is None else f"{row['cpu_seconds']:.0f} s"
        print(f"| {row['notebook']} | {row['budget']} | {row['seconds']:.0f} s | {cpu} | {peak} | "
              f"{row['load_before']} / {row['load_after']} |")
    print(f"\ntotal {sum(row['seconds'] for row in rows) / 60:.1f} min. Load: the 1-minute load average "
          "before and after each notebook (the number of busy cores).")
    if args.json:
        args.json.write_text(json.dumps(dict(machine=describe_machine(), rows=rows, failed=failed), indent=1) + "\n")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
