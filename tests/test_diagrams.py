"""tools/diagrams.py draws every diagram, and the committed pictures are the ones the book shows."""

import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import diagrams  # noqa: E402


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize("name", sorted(diagrams.DIAGRAMS))
def test_each_diagram_is_drawn_and_committed(name, tmp_path):
    width, height = png_size(diagrams.draw(name, tmp_path))
    assert 500 <= width <= 1400 and 200 <= height <= 1000, (width, height)  # readable in the text column
    committed = ROOT / "book" / "images" / f"{name}.png"
    assert committed.exists(), f"run python tools/diagrams.py {name} and commit {committed}"
    assert png_size(committed) == (width, height), f"{committed} is out of date: run python tools/diagrams.py {name}"


def test_every_committed_diagram_is_used_by_a_page():
    pages = [p.read_text() for p in [*ROOT.glob("book/*.md"), *ROOT.glob("notebooks/*.ipynb")]]
    for name in diagrams.DIAGRAMS:
        assert any(f"images/{name}.png" in page for page in pages), f"no page shows {name}.png"


def test_unknown_names_are_refused(capsys):
    with pytest.raises(SystemExit):
        diagrams.main(["no_such_diagram"])
    assert "unknown diagram" in capsys.readouterr().err
