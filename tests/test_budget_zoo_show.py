import pytest
import torch

from minilib import zoo
from minilib.budget import choose, current_budget, setup_notebook
from minilib.show import show_source


def test_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MINILIB_BUDGET", "cpu")
    assert current_budget() == "cpu"
    cfg = choose(ci=dict(steps=1), cpu=dict(steps=2), gpu=dict(steps=3))
    assert (cfg.budget, cfg.steps) == ("cpu", 2)
    monkeypatch.setenv("MINILIB_BUDGET", "GPU ")
    assert choose(ci=dict(steps=1), cpu=dict(steps=2), gpu=dict(steps=3)).steps == 3


def test_default_budget_follows_cuda(monkeypatch):
    monkeypatch.delenv("MINILIB_BUDGET", raising=False)
    assert current_budget() == ("gpu" if torch.cuda.is_available() else "cpu")


def test_budget_errors(monkeypatch):
    monkeypatch.setenv("MINILIB_BUDGET", "huge")
    with pytest.raises(ValueError, match="not a budget"):
        current_budget()
    with pytest.raises(ValueError, match="same keys"):
        choose(ci=dict(steps=1), cpu=dict(steps=2, width=3), gpu=dict(steps=3), budget="ci")


def test_setup_notebook_seeds_and_returns_a_device(monkeypatch, capsys):
    monkeypatch.setenv("MINILIB_BUDGET", "ci")
    device = setup_notebook(seed=3)
    first = torch.rand(3)
    setup_notebook(seed=3, verbose=False)
    assert torch.equal(first, torch.rand(3))
    assert isinstance(device, torch.device)
    assert "budget: 'ci'" in capsys.readouterr().out


def test_zoo_builds_small_models_and_meta_models():
    assert "tiny-denoiser-adaln-zero" in zoo.names()
    model = zoo.build("tiny-denoiser-adaln-zero", depth=2)
    assert len(model.blocks) == 2
    meta = zoo.build("tiny-denoiser-in-context", device="meta")
    assert next(meta.parameters()).device.type == "meta"
    assert zoo.count_parameters(meta) == zoo.count_parameters(zoo.build("tiny-denoiser-in-context"))


def test_zoo_errors_are_helpful():
    with pytest.raises(KeyError, match="Did you mean"):
        zoo.build("tiny-denoiser-adaln")
    with pytest.raises(TypeError, match="unknown setting"):
        zoo.build("tiny-denoiser-adaln-zero", widht=3)
    with pytest.raises(ValueError, match="already registered"):
        zoo.register(zoo.get("tiny-denoiser-in-context"))


def test_show_source_renders_real_code():
    from minilib.adaln import modulate
    shown = show_source(modulate)
    assert "def modulate" in shown.source
    assert shown._repr_markdown_().startswith("`minilib/adaln.py: modulate`")
    assert show_source(modulate, lines=(1, 1)).source.startswith("def modulate")
    with pytest.raises(TypeError, match="needs a Python function"):
        show_source(3)
    with pytest.raises(ValueError, match="lines must satisfy"):
        show_source(modulate, lines=(5, 500))
