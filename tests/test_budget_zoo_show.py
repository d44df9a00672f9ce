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


def test_a_miniature_run_caps_work_and_batches_but_keeps_model_and_image_sizes(monkeypatch):
    from minilib.budget import MINIATURE_ENV, choose
    settings = dict(steps=6000, toy_steps=1500, ddpm_steps="250", respacing="ddim25", step_counts=[1, 2, 4, 8],
                    samples_per_class=8, num_samples=2000, hidden=256, batch_size=128, ae_batch_size=64,
                    toy_batch=512, sets_per_batch=6, support_sets=10, lr=1e-4, num_images=6000, image_size=32)
    monkeypatch.setenv(MINIATURE_ENV, "1")
    cfg = choose(ci=settings, cpu=settings, gpu=settings, budget="gpu")
    assert cfg.miniature and cfg.budget == "gpu"
    assert (cfg.steps, cfg.toy_steps, cfg.ddpm_steps, cfg.step_counts) == (2, 2, "2", [1, 2])
    assert (cfg.samples_per_class, cfg.num_samples, cfg.support_sets) == (4, 4, 4)
    assert (cfg.batch_size, cfg.ae_batch_size, cfg.toy_batch, cfg.sets_per_batch) == (8, 8, 8, 6)
    assert (cfg.hidden, cfg.image_size, cfg.lr, cfg.num_images, cfg.respacing) == (256, 32, 1e-4, 6000, "ddim25")
    monkeypatch.setenv(MINIATURE_ENV, "maybe")
    with pytest.raises(ValueError, match="expected 1"):
        choose(ci=settings, cpu=settings, gpu=settings)
    monkeypatch.setenv(MINIATURE_ENV, "0")
    assert choose(ci=settings, cpu=settings, gpu=settings, budget="gpu").steps == 6000


def test_a_budget_that_does_not_suit_the_device_is_named(monkeypatch):
    from minilib.budget import MINIATURE_ENV, budget_mismatch
    monkeypatch.delenv(MINIATURE_ENV, raising=False)
    assert "hours per chapter" in budget_mismatch("gpu", torch.device("cpu"))
    assert "%env MINILIB_BUDGET=cpu" in budget_mismatch("gpu", torch.device("cpu"))
    assert "GPU idles" in budget_mismatch("cpu", torch.device("cuda"))
    assert budget_mismatch("cpu", torch.device("cpu")) is None
    assert budget_mismatch("gpu", torch.device("cuda")) is None
    assert budget_mismatch("ci", torch.device("cpu")) is None
