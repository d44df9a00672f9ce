"""The book's two commands (standard library only, any Python >= 3.10).

    python3 tools/make.py test [PYTEST ARGS]   # tests + every notebook (budget "ci") + the website in Chromium
    python3 tools/make.py book [--budget B]    # execute notebooks, build _build/html
    python3 tools/make.py check-site           # open the built site in headless Chromium
    python3 tools/make.py editions             # student and instructor notebooks in _build/editions
    python3 tools/make.py book --edition student   # the website without solutions, in _build/student/_build/html
    python3 tools/make.py autograder [NOTEBOOK ...] # Gradescope autograder zips in _build/autograder

``test``, ``book`` and ``editions`` first create (or reuse) the virtual environment
``.venv`` with the pinned ``requirements.txt`` and ``minilib`` installed in
editable mode. It is reinstalled when ``requirements.txt`` or ``pyproject.toml``
change.

``test`` runs in two stages. First pytest runs ``tests/`` and every notebook
under nbval. Then, if that passed and no pytest arguments narrowed the run, the
site test (tests/test_site.py) builds the website with the ``ci`` budget into
``_build/test-site`` and opens every page in headless Chromium. For that stage
``test`` installs what the site needs: the offline MathJax and widget scripts
(``npm ci``) and, if it is missing, Debian's ``chromium`` (``apt-get``, as root).
``--no-site`` skips the second stage.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from check_site import find_chromium  # tools/ is on the path when this file runs as a script

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
VENV_BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
VENV_PYTHON = VENV_BIN / ("python.exe" if os.name == "nt" else "python")
VENV_STAMP = VENV / "minilib-install.sha256"  # hash of what was installed
NPM_STAMP = ROOT / "node_modules" / "minilib-install.sha256"


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def run(cmd: list, env: dict | None = None) -> int:
    """Run a command in the repository root and return its exit code."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env).returncode


def check(cmd: list) -> None:
    if run(cmd) != 0:
        sys.exit(f"command failed: {' '.join(str(c) for c in cmd)}")


def files_hash(*names: str) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_venv() -> None:
    """Create .venv and install the pinned requirements and minilib, if needed."""
    wanted = files_hash("requirements.txt", "pyproject.toml")
    if VENV_STAMP.exists() and VENV_STAMP.read_text() == wanted:
        step(f"reusing {VENV.name} (requirements unchanged)")
        return
    if not VENV_PYTHON.exists():
        step(f"creating {VENV.name} with Python {sys.version.split()[0]}")
        check([sys.executable, "-m", "venv", VENV])
    step("installing requirements (about 1-2 minutes the first time)")
    pip = [VENV_PYTHON, "-m", "pip", "--disable-pip-version-check"]
    check(pip + ["install", "--quiet", "-r", "requirements.txt"])
    step("installing minilib in editable mode")
    check(pip + ["install", "--quiet", "--no-deps", "-e", "."])
    VENV_STAMP.write_text(wanted)


def venv_env(**variables: str) -> dict:
    """os.environ with .venv activated and the given variables set."""
    env = dict(os.environ, VIRTUAL_ENV=str(VENV), **variables)
    env["PATH"] = str(VENV_BIN) + os.pathsep + env.get("PATH", "")
    return env


def ensure_offline_assets(required: bool = False) -> None:
    """``npm ci`` the offline MathJax and widget scripts (see tools/book_ext.py)."""
    npm = shutil.which("npm")
    if npm is None and required:
        sys.exit("the site test needs npm (Node.js) to install the offline MathJax and widget scripts; "
                 "install Node.js, or skip the site test with: python3 tools/make.py test --no-site")
    if npm is None:
        step("WARNING: npm not found, so the offline MathJax and widget scripts cannot be "
             "installed: the pages will load them from a CDN and need a network connection")
        return
    wanted = files_hash("package-lock.json")
    if NPM_STAMP.exists() and NPM_STAMP.read_text() == wanted:
        step("reusing node_modules (package-lock.json unchanged)")
        return
    step("installing offline MathJax and ipywidgets scripts with npm")
    check([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"])
    NPM_STAMP.write_text(wanted)


def ensure_chromium() -> None:
    """Install Debian's chromium for the site test if no Chromium is on the PATH."""
    if find_chromium() is not None:
        step(f"using {find_chromium()} for the site test")
        return
    apt_get = shutil.which("apt-get")
    if apt_get is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        sys.exit("the site test needs Chromium and this script can only install it with apt-get as root; "
                 "install chromium yourself (Debian/Ubuntu: sudo apt-get install -y chromium), "
                 "or skip the site test with: python3 tools/make.py test --no-site")
    step("installing chromium for the site test (apt-get, about a minute)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in ([apt_get, "update", "-qq"], [apt_get, "install", "-y", "-qq", "--no-install-recommends", "chromium"]):
        if run(cmd, env=env) != 0:
            sys.exit(f"command failed: {' '.join(cmd)}")


def cmd_test(pytest_args: list[str], site: bool) -> int:
    ensure_venv()
    step("running the tests and the notebooks with MINILIB_BUDGET=ci")
    env = venv_env(MINILIB_BUDGET="ci", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    folders = [name for name in ("tests", "notebooks") if (ROOT / name).is_dir()]
    code = run([VENV_PYTHON, "-m", "pytest", "-n", "2", "--dist", "loadfile",
                "--nbval-lax", *folders, *pytest_args], env=env)
    if code != 0 or pytest_args or not site:
        return code
    ensure_offline_assets(required=True)
    ensure_chromium()
    step("site test: build the website with the gpu budget in miniature and open every page in Chromium "
         "(tests/test_site.py)")
    env["MINILIB_SITE_TEST"] = "1"
    env.pop("MPLBACKEND")  # the notebooks' figures must use the inline backend
    return run([VENV_PYTHON, "-m", "pytest", "-v", ROOT / "tests" / "test_site.py"], env=env)


def cmd_book(budget: str, jobs: int, output: Path = ROOT, miniature: bool = False, timeout: int = 0,
             edition: str = "instructor") -> int:
    """Execute the notebooks whose code changed, then build ``<output>/_build/html``.

    ``edition="student"``: build the site without solutions from the executed notebooks
    (tools/student_site.py), into ``_build/student/_build/html`` unless ``output`` is given.

    ``miniature``: run the budget's configuration with capped step counts (``MINILIB_MINIATURE=1``, see
    minilib/budget.py) on tiny stand-ins of the real datasets written into the build folder (so nothing is downloaded).
    ``timeout``: seconds one cell may run (0: no limit)."""
    ensure_venv()
    ensure_offline_assets()
    env = venv_env(MINILIB_BUDGET=budget)
    env.pop("MPLBACKEND", None)  # figures must use the notebook's inline backend
    # Kernels running side by side share the cores; more threads than cores would only slow them down.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    build = output.resolve() / "_build"
    cache_name = budget
    if miniature:
        data = build / "miniature-data"
        check([VENV_PYTHON, "-c", "import sys; from minilib.datasets import write_miniature_files; "
                                  "write_miniature_files(sys.argv[1], 256)", data])
        env.update(MINILIB_MINIATURE="1", MINILIB_DATA=str(data))
        cache_name += "-miniature"
    step(f"executing the notebooks whose code changed since the last build, MINILIB_BUDGET={budget}"
         f"{' (miniature)' if miniature else ''}, {jobs} at a time")
    cache = build / ".jupyter_cache" / cache_name  # the build's cache for this budget (tools/book_ext.py)
    code = run([VENV_PYTHON, ROOT / "tools" / "execute_notebooks.py", "--cache", cache, "--jobs", jobs,
                "--timeout", timeout, "--timings", build / f"timings-{cache_name}.json"], env=env)
    if code != 0:
        return code
    if edition == "student":
        step("building the student edition of the site from the executed notebooks (tools/student_site.py)")
        target = ROOT / "_build" / "student" if output == ROOT else output
        return run([VENV_PYTHON, ROOT / "tools" / "student_site.py", "--cache", cache, "--output", target], env=env)
    step("building the book")
    # -W -n: warnings and broken references fail the build; --keep-going lists them all.
    code = run([VENV_BIN / "jupyter-book", "build", ".", "--path-output", output.resolve(), "-W", "-n",
                "--keep-going"], env=env)
    if code == 0:
        step(f"the book is at {build / 'html' / 'index.html'}")
    return code


def cmd_check_site(edition: str = "instructor") -> int:
    if edition == "student":
        return run([sys.executable, ROOT / "tools" / "check_site.py", "--student",
                    "--site", ROOT / "_build" / "student" / "_build" / "html"])
    return run([sys.executable, ROOT / "tools" / "check_site.py"])


def cmd_autograder(arguments: list[str]) -> int:
    ensure_venv()
    step("building Gradescope autograder packages from the notebooks' assignments (see tools/autograder.py)")
    return run([VENV_PYTHON, ROOT / "tools" / "autograder.py", "build", *arguments])


def cmd_editions() -> int:
    ensure_venv()
    step("writing the student edition (solutions replaced by stubs) and the instructor edition "
         "of every notebook (see tools/editions.py)")
    return run([VENV_PYTHON, ROOT / "tools" / "editions.py", "--out", ROOT / "_build" / "editions"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    test = commands.add_parser("test", help="run tests/ and notebooks/ under nbval (budget ci), then the site "
                                            "test; other arguments go to pytest (e.g. -k patch) and skip the site test")
    test.add_argument("--no-site", action="store_true", help="skip the site test (building and opening the website)")
    book = commands.add_parser("book", help="execute the notebooks and build _build/html")
    book.add_argument("--budget", choices=["ci", "cpu", "gpu"], default="cpu")
    book.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                      help="notebooks executed at the same time (default: 2 on a machine with 2 or more cores); "
                           "each kernel gets cores / jobs threads")
    book.add_argument("--output", type=Path, default=ROOT,
                      help="build into OUTPUT/_build (default: the repository; the site test uses _build/test-site)")
    book.add_argument("--miniature", action="store_true",
                      help="run the budget's configuration with every step count capped at 2, on tiny offline "
                           "stand-ins of the real datasets (e.g. --budget gpu --miniature)")
    book.add_argument("--timeout", type=int, default=0, help="seconds one cell may run (default 0: no limit)")
    book.add_argument("--edition", choices=["instructor", "student"], default="instructor",
                      help="student: the site without solutions, from the executed notebooks, in "
                           "_build/student/_build/html (default: instructor, the book as it is)")
    site = commands.add_parser("check-site", help="check _build/html in headless Chromium")
    site.add_argument("--edition", choices=["instructor", "student"], default="instructor",
                      help="student: check _build/student/_build/html, and that it shows no solution code")
    commands.add_parser("autograder", add_help=False,
                        help="build Gradescope autograder zips in _build/autograder (arguments: "
                             "tools/autograder.py build --help)")
    commands.add_parser("editions", help="write the student and instructor editions of the notebooks "
                                         "to _build/editions")
    args, extra = parser.parse_known_args()
    if extra and args.command not in ("test", "autograder"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    start = time.monotonic()
    if args.command == "test":
        code = cmd_test(extra, site=not args.no_site)
    elif args.command == "book":
        code = cmd_book(args.budget, args.jobs, args.output, args.miniature, args.timeout, args.edition)
    elif args.command == "editions":
        code = cmd_editions()
    elif args.command == "autograder":
        code = cmd_autograder(extra)
    else:
        code = cmd_check_site(args.edition)
    minutes, seconds = divmod(round(time.monotonic() - start), 60)
    step(f"{args.command} {'passed' if code == 0 else 'FAILED'} in {minutes} min {seconds} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
