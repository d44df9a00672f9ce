"""Every notebook starts with the setup cell generated from _config.yml (tools/setup_cell.py)."""

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import setup_cell  # noqa: E402


@pytest.mark.parametrize("path", setup_cell.notebooks(), ids=lambda p: p.name)
def test_notebook_starts_with_current_setup_cell(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert setup_cell.is_up_to_date(nb, setup_cell.cell_source()), (
        f"{path.name}: run `python3 tools/setup_cell.py --write`")


def test_cell_installs_from_the_configured_repository(tmp_path):
    config = tmp_path / "_config.yml"
    config.write_text("title: x\nrepository:\n  # where the code lives\n"
                      "  url: https://github.com/someone/book   # comment\n"
                      "  branch: dev\nhtml:\n  url: https://elsewhere\n")
    assert setup_cell.repository(config) == ("https://github.com/someone/book", "dev")
    source = setup_cell.cell_source(config)
    assert '--no-deps "git+https://github.com/someone/book@dev"' in source
    assert "device = setup_notebook()" in source
    assert not re.search(r"\btorch\b", source)  # never reinstall Colab's torch


def _notebook(cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    return json.loads(nbformat.writes(nb))


def test_write_inserts_once_then_updates(tmp_path):
    source = setup_cell.cell_source()
    nb = _notebook([nbformat.v4.new_markdown_cell("# Title"), nbformat.v4.new_code_cell("x = 1")])
    assert not setup_cell.is_up_to_date(nb, source)

    setup_cell.write_setup_cell(nb, source)  # inserted before the first code cell
    assert [c["cell_type"] for c in nb["cells"]] == ["markdown", "code", "code"]
    assert nb["cells"][1]["metadata"]["tags"] == ["setup"]
    assert setup_cell.is_up_to_date(nb, source)

    nb["cells"][1]["source"] = "old setup"
    nb["cells"][1]["outputs"] = [nbformat.v4.new_output("stream", text="hi")]
    assert not setup_cell.is_up_to_date(nb, source)
    setup_cell.write_setup_cell(nb, source)  # replaced in place, outputs cleared
    assert len(nb["cells"]) == 3 and nb["cells"][1]["outputs"] == []
    assert setup_cell.is_up_to_date(nb, source)

    path = tmp_path / "nb.ipynb"
    setup_cell._save(nb, path)
    nbformat.validate(nbformat.read(path, as_version=4))


def test_check_and_write_command(tmp_path, monkeypatch, capsys):
    path = tmp_path / "chapter.ipynb"
    path.write_text(json.dumps(_notebook([nbformat.v4.new_code_cell("x = 1")])))
    monkeypatch.setattr(setup_cell, "notebooks", lambda: [path])
    assert setup_cell.main(["--check"]) == 1
    assert "chapter.ipynb" in capsys.readouterr().out
    assert setup_cell.main(["--write"]) == 0
    assert setup_cell.main(["--check"]) == 0
