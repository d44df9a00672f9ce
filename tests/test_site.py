"""The built website, opened in headless Chromium (tools/check_site.py).

The normal test run does not build the book, so the site check is skipped
unless `python3 tools/make.py book` has been run and chromium is installed.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import check_site  # noqa: E402


def test_toc_lists_the_root_first_and_every_chapter():
    pages = check_site.toc_pages()
    assert pages[0] == "book/intro"
    assert "notebooks/01_images_as_tokens" in pages and pages[-1] == "book/references"
    for page in pages:
        assert list(check_site.ROOT.glob(f"{page}.*")), f"{page} in _toc.yml has no source file"


@pytest.mark.skipif(not (check_site.SITE / "index.html").exists(),
                    reason="the book is not built (python3 tools/make.py book)")
@pytest.mark.skipif(check_site.find_chromium() is None,
                    reason="chromium is not installed (apt-get install -y chromium)")
def test_every_page_renders_offline():
    assert check_site.main() == 0
