"""Every notebook starts with the setup cell generated from _config.yml (tools/setup_cell.py)."""

import builtins
import json
import re
import shlex
import sys
import tomllib
import types
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

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
    pip_lines = [line for line in source.splitlines() if line.strip().startswith("%pip")]
    assert not any(re.search(r"\btorch\b", line) for line in pip_lines)  # never reinstall Colab's torch


def test_the_cell_installs_every_dependency_but_torch():
    listed = tomllib.loads((setup_cell.ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [r for r in listed if re.split(r"[<>=!~\[; ]", r)[0] != "torch"]
    assert setup_cell.dependencies() == wanted and "matplotlib" in wanted and len(wanted) == len(listed) - 1
    source = setup_cell.cell_source()
    assert f'%pip install --quiet {" ".join(repr(r).replace(chr(39), chr(34)) for r in wanted)}' in source


def test_dependencies_reader_handles_comments_and_specifiers(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = [\n    "torch>=2.1",  # not this\n'
                         '    "numpy>=1.24",\n    \'tqdm\',\n    # a comment\n    "scikit-learn",\n]\n'
                         '[tool.x]\nother = ["a"]\n')
    assert setup_cell.dependencies(pyproject) == ["numpy>=1.24", "tqdm", "scikit-learn"]
    assert setup_cell._name("numpy>=1.24") == "numpy" and setup_cell._name("torch") == "torch"


class FakeKernel:
    """Runs the setup cell as IPython would, with pip, imports and package metadata simulated."""

    def __init__(self, minilib_present=False, pip_works=True):
        self.installed = {"minilib"} if minilib_present else set()
        self.pip_works = pip_works
        self.pip_calls = []
        self.setup_called = False

    def run_line_magic(self, magic, line):
        assert magic == "pip"
        self.pip_calls.append(line)
        if self.pip_works:
            for word in shlex.split(line)[1:]:
                if not word.startswith("-"):
                    self.installed.add("minilib" if word.startswith("git+") else setup_cell._name(word))

    def run(self, source):
        code = TransformerManager().transform_cell(source)     # %pip -> get_ipython().run_line_magic(...)
        kernel, real_import = self, builtins.__import__

        class PackageNotFoundError(ModuleNotFoundError):
            pass

        def version(name):
            if name not in kernel.installed:
                raise PackageNotFoundError(name)
            return "1.0"

        metadata = types.SimpleNamespace(version=version, PackageNotFoundError=PackageNotFoundError)
        fake_importlib = types.SimpleNamespace(metadata=metadata, invalidate_caches=lambda: None)
        budget = types.SimpleNamespace(setup_notebook=lambda: setattr(kernel, "setup_called", True) or "cpu")

        def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
            if name.split(".")[0] == "minilib":
                if "minilib" not in kernel.installed:
                    raise ModuleNotFoundError("No module named 'minilib'")
                return budget if fromlist else types.SimpleNamespace(budget=budget)
            if name.split(".")[0] == "importlib":
                return fake_importlib
            return real_import(name, globals, locals, fromlist, level)

        namespace = {"__builtins__": {**vars(builtins), "__import__": fake_import}, "get_ipython": lambda: self}
        exec(code, namespace)
        return namespace


def test_the_cell_does_nothing_where_minilib_is_installed():
    kernel = FakeKernel(minilib_present=True)
    namespace = kernel.run(setup_cell.cell_source())
    assert kernel.pip_calls == [] and kernel.setup_called and namespace["device"] == "cpu"


def test_the_cell_installs_minilib_then_its_dependencies():
    kernel = FakeKernel()
    kernel.run(setup_cell.cell_source())
    url, branch = setup_cell.repository()
    first, second = kernel.pip_calls
    assert first == f'install --quiet --no-deps "git+{url}@{branch}"'
    assert shlex.split(second)[2:] == setup_cell.dependencies()
    assert kernel.setup_called


def test_the_cell_stops_with_a_clear_message_when_the_install_fails():
    kernel = FakeKernel(pip_works=False)
    with pytest.raises(RuntimeError, match=r"Installing minilib, numpy, .*filelock failed \(pip's messages are above\)"):
        kernel.run(setup_cell.cell_source())
    assert len(kernel.pip_calls) == 2 and not kernel.setup_called     # never reaches ModuleNotFoundError


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
