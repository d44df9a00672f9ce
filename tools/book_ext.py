"""A small Sphinx extension for this book (loaded by ``_config.yml``).

It does two things:

1. **Offline math and widgets.** ``_config.yml`` points ``mathjax_path`` and
   ``nb_ipywidgets_js`` at ``_static/offline/...``. After a successful HTML build
   this extension copies exactly those files from ``node_modules`` (installed by
   ``npm ci``, see ``package.json``) into ``_build/html/_static/offline/``. We do
   not keep them in the book's ``_static/`` folder, because Jupyter Book loads
   every ``.js`` file found there on every page (and the widgets would render
   twice). Without ``node_modules`` the build falls back to the CDN defaults and
   says so: the pages then need a network connection to show math and widgets.

2. **One execution cache per run budget.** Notebook outputs depend on
   ``MINILIB_BUDGET`` (ci, cpu or gpu), not only on the notebook's source, so each
   budget gets its own jupyter-cache folder: a ``ci`` build never publishes stale
   ``cpu`` outputs, or the other way round (a miniature run, ``MINILIB_MINIATURE=1``,
   has its own folder too).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from myst_nb.core.config import ipywidgets_js_factory
from sphinx.ext.mathjax import MATHJAX_URL

# Each file or folder the site needs: where it goes under _static/offline/ and
# where npm puts it under node_modules/.
OFFLINE_FILES = {
    "mathjax/tex-mml-chtml.js": "mathjax/es5/tex-mml-chtml.js",
    "mathjax/output/chtml/fonts/woff-v2": "mathjax/es5/output/chtml/fonts/woff-v2",
    # TeX packages that MathJax loads on first use (\cancel, \bbox, ...).
    "mathjax/input/tex/extensions": "mathjax/es5/input/tex/extensions",
    "require.js": "requirejs/require.js",
    "html-manager": "@jupyter-widgets/html-manager/dist",  # embed-amd.js and its fonts
}
# Files in those folders that the pages never load.
UNUSED = shutil.ignore_patterns("*.map", "embed.js*", "libembed-amd.js")

# Loaded between require.js and embed-amd.js. The widget manager finds its fonts
# next to the module that asks for them (@jupyter-widgets/controls asks for the
# icon font, for instance), and RequireJS would place those modules next to each
# page; these paths put every @jupyter-widgets module in _static/offline/html-manager/.
WIDGETS_CONFIG_JS = """\
var htmlManager = document.currentScript.src.replace(/[^/]*$/, "html-manager");
require.config({paths: {"@jupyter-widgets/html-manager/dist": htmlManager, "@jupyter-widgets": htmlManager}});
"""


def _node_modules(app) -> Path:
    return Path(app.srcdir) / "node_modules"


def _use_cdn_if_not_installed(app, config) -> None:
    """Fall back to the CDN defaults when ``npm ci`` has not been run."""
    missing = [src for src in OFFLINE_FILES.values() if not (_node_modules(app) / src).exists()]
    if missing:
        print(f"WARNING: {_node_modules(app)} lacks {missing[0]} (run `npm ci`): math and widgets "
              "will load from a CDN, so the pages need a network connection to render them.")
        config.mathjax_path = MATHJAX_URL
        config.nb_ipywidgets_js = ipywidgets_js_factory()


def _cache_per_budget(app, config) -> None:
    """Keep executed notebooks in ``_build/.jupyter_cache/<budget>/``."""
    budget = os.environ.get("MINILIB_BUDGET", "").strip().lower() or "default"
    if os.environ.get("MINILIB_MINIATURE", "").strip() == "1":
        budget += "-miniature"
    config.nb_execution_cache_path = str(Path(app.outdir).parent / ".jupyter_cache" / budget)


def _copy_offline_files(app, exception) -> None:
    """Copy the offline scripts into the built site (only if the config uses them)."""
    if exception is not None or app.builder.format != "html":
        return
    if "://" in app.config.mathjax_path:  # the CDN fallback is in use
        return
    offline = Path(app.outdir) / "_static" / "offline"
    for dest, src in OFFLINE_FILES.items():
        src, dest = _node_modules(app) / src, offline / dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True, ignore=UNUSED)
        else:
            shutil.copy2(src, dest)
    (offline / "widgets-config.js").write_text(WIDGETS_CONFIG_JS, encoding="utf-8")


def setup(app):
    # Run before myst-nb reads its configuration (at builder-inited).
    app.connect("config-inited", _use_cdn_if_not_installed)
    app.connect("config-inited", _cache_per_budget)
    app.connect("build-finished", _copy_offline_files)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
