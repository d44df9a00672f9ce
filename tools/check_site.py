"""Open the built book in headless Chromium and check what a reader would see.

    python3 tools/make.py check-site      (or: python3 tools/check_site.py)

It serves ``_build/html`` on 127.0.0.1, loads every page of ``_toc.yml`` with
all other hosts unreachable (as on a machine with no network), and checks the
DOM after the page's scripts have run:

- exists:  the page was built and served;
- math:    MathJax typeset the page's math (``mjx-container`` elements);
- figures: a notebook page shows at least one output image;
- colab:   a notebook page has the "open in Colab" link for its notebook;
- widgets: saved ipywidgets were rendered by the widget manager;
- offline: no script or stylesheet comes from a CDN, and no file was missing (404).

It saves screenshots of the landing page and of the first chapter to
``_build/screenshots/``, prints a table, and exits 1 if a check failed.
Standard library only; needs ``chromium`` (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin

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
CHECKS = ("exists", "math", "figures", "colab", "widgets", "offline")


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
    """Every start tag of a document, as ``(name, attributes)``."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, name: str) -> list[dict]:
        return [attrs for tag, attrs in self.tags if tag == name]


def chromium(binary: str, *args: str) -> str:
    """Run headless Chromium with a fresh profile; return what it printed on stdout."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                                capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def check_page(doc: str, server: Server, binary: str, colab_base: str) -> dict[str, str]:
    """Load one page and return ``{check: "ok" | "-" (not applicable) | "FAIL: why"}``."""
    built = SITE / f"{doc}.html"
    if not built.exists():
        return {name: "FAIL: not built" if name == "exists" else "-" for name in CHECKS}
    static = built.read_text(encoding="utf-8")
    is_notebook = (ROOT / f"{doc}.ipynb").exists()
    first_request = len(server.requests)
    dom = Tags(chromium(binary, "--dump-dom", server.url + f"{doc}.html"))
    requests = server.requests[first_request:]

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
    return {
        "exists": verdict(True, f"/{doc}.html" in served, "not served"),
        "math": verdict('class="math' in static, any(tag == "mjx-container" for tag, _ in dom.tags),
                        "no mjx-container: MathJax did not run"),
        "figures": verdict(is_notebook, images and all(
            src.startswith("data:") or urljoin(f"/{doc}.html", src) in served for src in images),
            f"{len(images)} output images, or one did not load"),
        "colab": verdict(is_notebook, any(a.get("href") == colab for a in dom.find("a")),
                         f"no link to {colab}"),
        "widgets": verdict("application/vnd.jupyter.widget-view+json" in static,
                           "jupyter-widgets" in classes, "saved widgets were not rendered"),
        "offline": verdict(True, not external and not missing,
                           f"CDN: {external[:2]}" if external else f"404: {missing[:3]}"),
    }


def screenshot(binary: str, url: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    chromium(binary, f"--screenshot={path}", "--window-size=1280,1000", "--hide-scrollbars", url)


def main() -> int:
    binary = find_chromium()
    if binary is None:
        print("chromium not found; on Debian: apt-get install -y chromium", file=sys.stderr)
        return 2
    if not (SITE / "index.html").exists():
        print(f"{SITE / 'index.html'} not found; build the book first: python3 tools/make.py book",
              file=sys.stderr)
        return 2
    url, branch = repository()
    colab_base = f"https://colab.research.google.com/github/{url.split('github.com/')[1]}/blob/{branch}"
    pages = toc_pages()
    server = Server(SITE)
    try:
        results = {doc: check_page(doc, server, binary, colab_base) for doc in pages}
        screenshot(binary, server.url + "index.html", SCREENSHOTS / "landing.png")
        chapter = next((d for d in pages if (ROOT / f"{d}.ipynb").exists()), pages[-1])
        screenshot(binary, server.url + f"{chapter}.html", SCREENSHOTS / "chapter.png")
    finally:
        server.close()

    width = max(map(len, pages))
    print(f"{'page':<{width}}  " + "  ".join(f"{name:<7}" for name in CHECKS))
    failures = []
    for doc, checks in results.items():
        print(f"{doc:<{width}}  " + "  ".join(f"{v[:4]:<7}" for v in checks.values()))
        failures += [f"{doc}: {name}: {v[6:]}" for name, v in checks.items() if v.startswith("FAIL")]
    print("\n".join(["", *failures]) if failures else f"\nall checks passed on {len(pages)} pages")
    print(f"screenshots: {SCREENSHOTS}/landing.png, chapter.png ({chapter})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
