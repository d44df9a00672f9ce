"""The website as readers see it: built, then opened in headless Chromium.

``python3 tools/make.py test`` runs this file a second time after the main
test run, with ``MINILIB_SITE_TEST=1``: it builds the book into
``_build/test-site`` with ``make.py book --budget gpu --miniature`` (notebooks
executed two at a time into the build's cache, then ``jupyter-book build -W -n``,
so any warning fails) and runs tools/check_site.py on every page of
``_toc.yml``. The miniature run executes every notebook's ``gpu``
configuration (model and image sizes, the real-dataset loaders on tiny stand-in
files in the real formats, latent caching) with step counts capped at 2, sample
counts at 4 and batch sizes at 8 (minilib/budget.py), so every code path of the
``gpu`` budget runs on every CI run; the main test run has already executed
every notebook at the ``ci`` budget under nbval. The screenshots of the landing
page and of a chapter are saved in ``_build/test-site/_build/screenshots/``. In a
plain ``pytest`` run the site test is skipped (building takes minutes); the
checker's own tests always run.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import check_site  # noqa: E402

ROOT = check_site.ROOT
TEST_SITE = ROOT / "_build" / "test-site"
HTML = TEST_SITE / "_build" / "html"
SITE_TEST = os.environ.get("MINILIB_SITE_TEST") == "1"


def test_toc_lists_the_root_first_and_every_chapter():
    pages = check_site.toc_pages()
    assert pages[0] == "book/intro"
    assert "notebooks/01_images_as_tokens" in pages and pages[-1] == "book/references"
    for page in pages:
        assert list(ROOT.glob(f"{page}.*")), f"{page} in _toc.yml has no source file"


def test_tags_know_the_classes_around_each_element():
    dom = check_site.Tags('<div class="jupyter-widgets"><div class="widget-output"><p><img src="a.png">'
                          '</div></div><img src="b.png"><br><span><img src="c.png"></span>')
    assert [img["src"] for img in dom.find("img")] == ["a.png", "b.png", "c.png"]
    assert [img["src"] for img in dom.find("img", inside="widget-output")] == ["a.png"]


def test_broken_links_finds_missing_pages_and_anchors(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "a.html").write_text('<h1 id="top">A</h1><a name="old"></a>')
    (tmp_path / "index.html").write_text("home")
    page = check_site.Tags('<a href="a.html#top">ok</a> <a href="a.html#old">ok</a> <a href="../index.html">ok</a>'
                           '<a href="https://example.org/x">external</a> <a href="mailto:x@y">mail</a>'
                           '<a href="b.html">missing page</a> <a href="a.html#nowhere">missing id</a>'
                           '<a href="../">folder</a>')
    assert check_site.broken_links("book/a", page, tmp_path) == ["a.html#nowhere", "b.html"]


@pytest.fixture(scope="module")
def built_site():
    """Build the book into _build/test-site as `make.py book` builds it, with the gpu budget in miniature
    (notebooks whose code changed are executed, two at a time, on stand-in data; any Sphinx warning fails)."""
    build = subprocess.run([sys.executable, ROOT / "tools" / "make.py", "book", "--budget", "gpu", "--miniature",
                            "--jobs", "2", "--timeout", "900", "--output", TEST_SITE],
                           cwd=ROOT, capture_output=True, text=True)
    assert build.returncode == 0, f"a notebook failed, or the build failed or warned:\n{build.stdout[-6000:]}" \
                                  f"\n{build.stderr[-3000:]}"
    return HTML


@pytest.mark.skipif(not SITE_TEST, reason="builds the whole site: run by `python3 tools/make.py test` "
                                          "(or set MINILIB_SITE_TEST=1)")
def test_every_page_renders_in_chromium(built_site, capsys):
    assert check_site.find_chromium() is not None, "chromium is not installed (apt-get install -y chromium)"
    for old in ("landing.png", "chapter.png"):
        (built_site.parent / "screenshots" / old).unlink(missing_ok=True)
    code = check_site.main(["--site", str(built_site)])
    report = capsys.readouterr().out
    print(report)
    assert code == 0, report
    for shot in ("landing.png", "chapter.png"):
        path = built_site.parent / "screenshots" / shot
        assert path.is_file() and path.stat().st_size > 10_000, f"{path} is missing or empty"
