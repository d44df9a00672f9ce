"""Open the built book in headless Chromium and check what a reader would see.

    python3 tools/make.py check-site      (or: python3 tools/check_site.py)

It serves ``_build/html`` on 127.0.0.1, loads every page of ``_toc.yml`` with
all other hosts unreachable (as on a machine with no network), and checks the
DOM after the page's scripts have run:

- exists:  the page was built and served;
- math:    MathJax typeset the page's math (``mjx-container`` elements);
- figures: a notebook page shows at least one output image;
- colab:   a notebook page has the "open in Colab" link for its notebook;
- links:   every link to a page of the site leads to a file that exists, and
           to an element with that id when it names one (``page.html#id``);
- widgets: saved ipywidgets were rendered by the widget manager, and their
           figure (the picture the widget showed when the notebook ran) is
           visible inside them: a reader without a kernel still sees it;
- offline: no script or stylesheet comes from a CDN, and no file was missing (404).

``--student`` checks the student site (tools/student_site.py): no Colab
button is expected, and no line of a solution may appear on any page or in
any downloadable source (``solution_leaks``).

It saves screenshots of the landing page and of the first chapter to
``<site>/../screenshots/`` (``_build/screenshots/`` for the default site),
prints a table, and exits 1 if a check failed. ``--site`` checks another build
(the tests build one with the ``ci`` budget, see tests/test_site.py).
Standard library only; needs ``chromium`` (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import functools
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from setup_cell import repository  # noqa: E402  (the repository url lives in _config.yml)

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CDN_HOSTS = ("cdn.jsdelivr.net", "unpkg.com", "cdnjs.cloudflare.com")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=10000",  # let MathJax and the widget manager finish
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no network but ours
]
CHECKS = ("exists", "math", "figures", "colab", "links", "widgets", "offline")
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def toc_pages(toc: Path = ROOT / "_toc.yml") -> list[str]:
    """The document names in ``_toc.yml`` (``root:`` and every ``file:``), in order."""
    pattern = re.compile(r"^\s*(?:-\s*)?(?:root|file):\s*(\S+)")
    return [m.group(1) for line in toc.read_text(encoding="utf-8").splitlines()
            if (m := pattern.match(line))]


class Server:
    """``_build/html`` served on 127.0.0.1 in a background thread, remembering every request."""

    def __init__(self, site: Path):
        self.requests: list[tuple[str, int]] = []  # (path, HTTP status)
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_request(self, code="-", size="-"):
                server.requests.append((self.path.split("?")[0], int(code)))

            def log_message(self, *args):  # keep the table readable
                pass

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # Chromium drops connections it no longer needs (BrokenPipe); not a site error

        self.httpd = QuietServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Tags(HTMLParser):
    """Every start tag of a document, as ``(name, attributes)``, and the classes of its ancestors."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.ancestor_classes: list[str] = []  # per tag: the classes of every element around it
        self._open: list[tuple[str, str]] = []  # (tag, class) of the elements not closed yet
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attrs))
        self.ancestor_classes.append(" ".join(cls for _, cls in self._open))
        if tag not in VOID_TAGS:
            self._open.append((tag, attrs.get("class", "")))

    def handle_endtag(self, tag):
        for depth in range(len(self._open) - 1, -1, -1):  # forgive unclosed children, as browsers do
            if self._open[depth][0] == tag:
                del self._open[depth:]
                return

    def find(self, name: str, inside: str | None = None) -> list[dict]:
        """Attributes of every ``name`` tag (only those within an element of class ``inside``, if given)."""
        return [attrs for (tag, attrs), around in zip(self.tags, self.ancestor_classes)
                if tag == name and (inside is None or inside in around)]


def broken_links(doc: str, dom: Tags, site: Path) -> list[str]:
    """The links of a page that point into the site at a missing file or a missing ``#id``."""
    broken = []
    for href in {a.get("href", "") for a in dom.find("a")}:
        if not href or urlsplit(href).scheme or href.startswith("//"):
            continue  # external (http, mailto, javascript, ...), checked by nobody offline
        target = urlsplit(urljoin(f"/{doc}.html", href))
        path = site / unquote(target.path).lstrip("/")
        if path.is_dir():
            path = path / "index.html"
        if not path.is_file():
            broken.append(href)
        elif target.fragment and path.suffix == ".html" and not _has_id(path, unquote(target.fragment)):
            broken.append(href)
    return sorted(broken)


@functools.lru_cache(maxsize=None)
def _ids(page: Path) -> frozenset[str]:
    tags = Tags(page.read_text(encoding="utf-8")).tags
    return frozenset(attrs[key] for _, attrs in tags for key in ("id", "name") if attrs.get(key))


def _has_id(page: Path, element_id: str) -> bool:
    return element_id in _ids(page)


# ---------------------------------------------------------------------------
# The student site: no solution code (tools/student_site.py)
# ---------------------------------------------------------------------------

BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"  # as in tools/editions.py


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _notebook_cells(path: Path) -> list[dict]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if isinstance(cell.get("source"), list):
            cell["source"] = "".join(cell["source"])
    return cells


def solution_lines(notebook: Path) -> list[str]:
    """The distinctive lines of a notebook's solutions, whitespace normalised.

    A line inside a ``### BEGIN SOLUTION`` region is distinctive when it is at
    least 8 characters long and appears nowhere else in the book's sources: not
    in the notebook's other cells, not in a markdown page, not in minilib's
    code (which the chapters print with ``show_source``). Only such a line on
    the student site shows a solution."""
    inside, lines, elsewhere = False, [], []
    for cell in _notebook_cells(notebook):
        for line in cell["source"].splitlines():
            stripped = line.strip()
            if stripped == BEGIN_SOLUTION:
                inside = True
            elif stripped == END_SOLUTION:
                inside = False
            elif inside:
                lines.append(_normalise(line))
            else:
                elsewhere.append(_normalise(line))
    shared = set(elsewhere)
    for source in [*(ROOT / "minilib").rglob("*.py"), *(ROOT / "book").glob("*.md")]:
        shared.update(_normalise(line) for line in source.read_text(encoding="utf-8").splitlines())
    return sorted({line for line in lines if len(line) >= 8 and line not in shared})


def _site_text(path: Path) -> str:
    """What a reader can see of a built file: an html page without its tags, a notebook's sources and outputs."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".ipynb":
        parts = []
        for cell in json.loads(text).get("cells", []):
            parts.append("".join(cell.get("source", "")))
            for output in cell.get("outputs", []):
                parts.append("".join(output.get("text", "")))
                parts += ["".join(v) if isinstance(v, list) else str(v) for v in output.get("data", {}).values()]
        return "\n".join(parts)
    if path.suffix == ".html":
        return html.unescape(re.sub(r"<[^>]+>", "", text))
    return text


def solution_leaks(site: Path, notebooks: list[Path]) -> list[str]:
    """``"file: line"`` for every distinctive solution line (``solution_lines``) found in the built site's
    html pages and downloadable sources (``.ipynb``, ``.md``, ``.txt``); an empty list for a clean site."""
    wanted = {line: notebook.name for notebook in notebooks for line in solution_lines(notebook)}
    leaks = []
    for path in sorted(site.rglob("*")):
        if path.suffix not in (".html", ".ipynb", ".md", ".txt") or not path.is_file():
            continue
        text = "\n".join(_normalise(line) for line in _site_text(path).splitlines())
        found = [(line, name) for line, name in wanted.items() if line in text]
        # the markers themselves: on a chapter's page or in a notebook (a markdown page may explain them)
        if (path.suffix == ".ipynb" or "notebooks" in path.relative_to(site).parts) and BEGIN_SOLUTION in text:
            found.append((BEGIN_SOLUTION, "the solution markers"))
        leaks += [f"{path.relative_to(site)}: {line}  (from {name})" for line, name in found]
    return leaks


def chromium(binary: str, *args: str) -> str:
    """Run headless Chromium with a fresh profile; return what it printed on stdout."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                                capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def check_page(doc: str, binary: str, colab_base: str, site: Path = SITE, student: bool = False) -> dict[str, str]:
    """Load one page and return ``{check: "ok" | "-" (not applicable) | "FAIL: why"}``.

    ``student``: the student site, which has no Colab button (it would open the notebook with its solutions)."""
    built = site / f"{doc}.html"
    if not built.exists():
        return {name: "FAIL: not built" if name == "exists" else "-" for name in CHECKS}
    static = built.read_text(encoding="utf-8")
    is_notebook = (ROOT / f"{doc}.ipynb").exists()
    server = Server(site)  # one server per page: its requests are this page's
    try:
        dom = Tags(chromium(binary, "--dump-dom", server.url + f"{doc}.html"))
    finally:
        server.close()
    requests = server.requests

    def verdict(applies: bool, passed: bool, why: str) -> str:
        return "-" if not applies else "ok" if passed else f"FAIL: {why}"

    images = [img["src"] for img in dom.find("img")
              if img.get("src", "").startswith("data:image") or "_images/" in img.get("src", "")]
    served = {path for path, status in requests if status == 200}
    missing = sorted({path for path, status in requests if status == 404} - {"/favicon.ico"})
    colab = f"{colab_base}/{doc}.ipynb"
    external = [url for url in [s.get("src", "") for s in dom.find("script")]
                + [link.get("href", "") for link in dom.find("link") if link.get("rel") == "stylesheet"]
                if any(host in url for host in CDN_HOSTS)]
    classes = " ".join(attrs.get("class", "") for _, attrs in dom.tags)
    broken = broken_links(doc, dom, site)
    # interact() saves its figure in an Output widget: the picture a reader without a kernel sees
    interactive = '"OutputModel"' in static
    widget_images = dom.find("img", inside="widget-output")
    return {
        "exists": verdict(True, f"/{doc}.html" in served, "not served"),
        "math": verdict('class="math' in static, any(tag == "mjx-container" for tag, _ in dom.tags),
                        "no mjx-container: MathJax did not run"),
        "figures": verdict(is_notebook, images and all(
            src.startswith("data:") or urljoin(f"/{doc}.html", src) in served for src in images),
            f"{len(images)} output images, or one did not load"),
        "colab": verdict(is_notebook and not student, any(a.get("href") == colab for a in dom.find("a")),
                         f"no link to {colab}"),
        "links": verdict(True, not broken, f"{len(broken)} broken: {broken[:3]}"),
        "widgets": verdict("application/vnd.jupyter.widget-view+json" in static,
                           "jupyter-widgets" in classes and (bool(widget_images) or not interactive),
                           "saved widgets were not rendered" if "jupyter-widgets" not in classes
                           else "the interactive widget shows no figure"),
        "offline": verdict(True, not external and not missing,
                           f"CDN: {external[:2]}" if external else f"404: {missing[:3]}"),
    }


def screenshot(binary: str, url: str, path: Path, height: int = 1000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    chromium(binary, f"--screenshot={path}", f"--window-size=1280,{height}", "--hide-scrollbars", url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, default=SITE, help=f"the built html folder (default {SITE})")
    parser.add_argument("--only", default="", help="check only the pages whose name contains this text")
    parser.add_argument("--jobs", type=int, default=4, help="pages loaded at the same time")
    parser.add_argument("--student", action="store_true",
                        help="the student site (tools/student_site.py): no Colab button, and no solution code")
    args = parser.parse_args(argv)
    site = args.site.resolve()
    screenshots = SCREENSHOTS if site == SITE else site.parent / "screenshots"
    binary = find_chromium()
    if binary is None:
        print("chromium not found; on Debian: apt-get install -y chromium", file=sys.stderr)
        return 2
    if not (site / "index.html").exists():
        print(f"{site / 'index.html'} not found; build the book first: python3 tools/make.py book",
              file=sys.stderr)
        return 2
    url, branch = repository()
    colab_base = f"https://colab.research.google.com/github/{url.split('github.com/')[1]}/blob/{branch}"
    pages = [doc for doc in toc_pages() if args.only in doc]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(zip(pages, pool.map(lambda doc: check_page(doc, binary, colab_base, site, args.student), pages)))
    chapter = next((d for d in toc_pages() if (ROOT / f"{d}.ipynb").exists()))
    server = Server(site)
    try:
        screenshot(binary, server.url + "index.html", screenshots / "landing.png")
        screenshot(binary, server.url + f"{chapter}.html", screenshots / "chapter.png", height=2600)  # to its figures
    finally:
        server.close()

    width = max(map(len, pages))
    print(f"{'page':<{width}}  " + "  ".join(f"{name:<7}" for name in CHECKS))
    failures = []
    for doc, checks in results.items():
        print(f"{doc:<{width}}  " + "  ".join(f"{v[:4]:<7}" for v in checks.values()))
        failures += [f"{doc}: {name}: {v[6:]}" for name, v in checks.items() if v.startswith("FAIL")]
    if args.student:
        notebooks = [ROOT / f"{doc}.ipynb" for doc in toc_pages() if (ROOT / f"{doc}.ipynb").exists()]
        failures += [f"solution code on the student site: {leak}" for leak in solution_leaks(site, notebooks)]
    print("\n".join(["", *failures]) if failures else f"\nall checks passed on {len(pages)} pages")
    print(f"screenshots: {screenshots}/landing.png, chapter.png ({chapter})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
