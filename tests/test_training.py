"""Tests for minilib.training: EMA, the training loop, checkpoints."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from minilib.training import (EMA, History, clip_gradients, learning_rate_at, load_checkpoint,
                              load_or_train, moving_average, save_checkpoint, train)


def regression_problem(seed=0):
    """y = x @ w + 0.5 for a fixed w; a linear model can fit it exactly."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.5

    def batches():
        while True:
            index = torch.randint(0, 256, (32,), generator=generator)
            yield x[index], y[index]

    def loss_fn(model, batch):
        inputs, targets = batch
        return ((model(inputs) - targets) ** 2).mean()

    return batches(), loss_fn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.norm = nn.BatchNorm1d(1)   # has buffers too


# --- EMA --------------------------------------------------------------------


def test_ema_one_update_is_the_weighted_mean():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for name, new in model.state_dict().items():
        assert torch.allclose(ema.state_dict()[name], 0.9 * old[name] + 0.1 * new, atol=1e-6)
    assert not any(p.requires_grad for p in ema.model.parameters())

    target = nn.Linear(3, 2)
    ema.copy_to(target)
    assert torch.equal(target.weight, ema.model.weight)


def test_ema_follows_non_persistent_buffers():
    model = nn.Linear(3, 2)
    model.register_buffer("positions", torch.zeros(4), persistent=False)
    ema = EMA(model, decay=0.5)
    model.positions += 1.0
    ema.update(model)
    assert torch.equal(ema.model.positions, torch.ones(4))


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        EMA(nn.Linear(2, 2), decay=1.0)


# --- the training loop --------------------------------------------------------


def test_train_makes_the_loss_fall():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    batches, loss_fn = regression_problem()
    history = train(model, loss_fn, batches, steps=150, lr=0.05, ema_decay=0.9, progress=False)
    assert isinstance(history, History) and len(history) == 150
    assert np.mean(history[-10:]) < 0.01 * np.mean(history[:10])
    assert isinstance(history.ema, EMA)
    assert len(history.grad_norms) == len(history.learning_rates) == 150
    assert history.smoothed(10).shape == (150,)
    assert model.training    # the model's mode is restored


def test_train_is_deterministic_on_cpu():
    def run():
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        batches, loss_fn = regression_problem()
        return train(model, loss_fn, batches, steps=20, progress=False), model

    (h1, m1), (h2, m2) = run(), run()
    assert list(h1) == list(h2) and torch.equal(m1.weight, m2.weight)


def test_gradient_clipping_bounds_the_norm():
    model = nn.Linear(4, 1)
    ((model.weight.sum() + model.bias.sum()) * 1000).backward()
    before = clip_gradients(model, max_norm=1.0)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert before > 100 and after <= 1.0 + 1e-5


def test_train_clips_before_the_optimizer_step():
    """Watch the gradients the optimiser actually sees, via a global step hook."""
    seen = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        seen.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record)
    try:
        model = nn.Linear(4, 1)
        batches, _ = regression_problem()
        history = train(model, lambda m, b: (m(b[0]) * 1e4).mean(), batches, steps=5,
                        grad_clip=0.5, progress=False)
    finally:
        handle.remove()
    assert len(seen) == 5 and max(seen) <= 0.5 + 1e-4
    assert min(history.grad_norms) > 100     # the raw gradients were large


def test_train_reports_bad_losses_and_short_iterators():
    model = nn.Linear(4, 1)
    batches, _ = regression_problem()
    with pytest.raises(FloatingPointError, match="step 0"):
        train(model, lambda m, b: m(b[0]).sum() * float("nan"), batches, steps=3, progress=False)
    with pytest.raises(TypeError, match="scalar tensor"):
        train(model, lambda m, b: m(b[0]), batches, steps=3, progress=False)
    with pytest.raises(ValueError, match="ran out after 2 of 5 steps"):
        train(model, lambda m, b: m(b[0]).mean(), [next(batches)] * 2, steps=5, progress=False)


def test_learning_rate_schedule_and_smoothing():
    assert learning_rate_at(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert learning_rate_at(50, 100, 1.0) == 1.0
    assert learning_rate_at(99, 100, 1.0, schedule="cosine") < 0.01
    assert np.allclose(moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])


# --- checkpoints --------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model, other = Tiny(), Tiny()
    model.norm.running_mean.fill_(3.0)
    path = save_checkpoint(tmp_path / "ckpt" / "tiny.safetensors", model, steps=10,
                           config={"width": 4}, note="hello")
    metadata = load_checkpoint(path, other)
    assert metadata == {"steps": 10, "config": {"width": 4}, "note": "hello"}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[name])


def test_checkpoint_with_tied_weights(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight
    save_checkpoint(tmp_path / "tied.safetensors", model)
    load_checkpoint(tmp_path / "tied.safetensors", model)


def test_wrong_keys_give_a_readable_report(tmp_path):
    path = save_checkpoint(tmp_path / "linear.safetensors", nn.Linear(4, 1))
    with pytest.raises(ValueError) as error:
        load_checkpoint(path, Tiny())
    message = str(error.value)
    assert "linear.weight" in message and "norm.running_mean" in message   # missing
    assert "unexpected" in message and "    weight" in message
    assert "Traceback" not in message

    wide = nn.Linear(5, 1)
    with pytest.raises(ValueError, match=r"weight: model \(1, 5\), checkpoint \(1, 4\)"):
        load_checkpoint(path, wide, strict=False)


def test_non_strict_loads_the_matching_keys(tmp_path, capsys):
    source = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    path = save_checkpoint(tmp_path / "two.safetensors", source)
    target = nn.Sequential(nn.Linear(2, 2))
    load_checkpoint(path, target, strict=False)
    assert torch.equal(target[0].weight, source[0].weight)
    assert "1.weight" in capsys.readouterr().out


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors", nn.Linear(1, 1))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors", nn.Linear(1, 1))
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "x.safetensors", nn.Linear(1, 1), bad=object())


def test_load_or_train(tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    calls = []

    def train_fn(model):
        calls.append(1)
        batches, loss_fn = regression_problem()
        return train(model, loss_fn, batches, steps=5, progress=False)

    first = nn.Linear(4, 1)
    history = load_or_train(path, first, lambda: train_fn(first), steps=5)
    assert path.is_file() and len(calls) == 1 and len(history) == 5

    second = nn.Linear(4, 1)
    loaded = load_or_train(path, second, lambda: train_fn(second))
    assert len(calls) == 1                                   # did not train again
    assert torch.equal(first.weight, second.weight)
    assert list(loaded) == list(history)
    assert "loaded" in capsys.readouterr().out


# --- hardening: argument checks, dtypes, atomic saves, damaged files --------------


@pytest.mark.parametrize("grad_clip", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_train_refuses_a_gradient_clip_that_is_not_positive(grad_clip):
    batches, loss_fn = regression_problem()
    with pytest.raises(ValueError, match=r"grad_clip .*must be a finite number > 0 or None, got"):
        train(nn.Linear(4, 1), loss_fn, batches, steps=1, grad_clip=grad_clip, progress=False)
    with pytest.raises(ValueError, match="max_norm must be"):
        clip_gradients(nn.Linear(1, 1), grad_clip)


def test_train_refuses_bad_learning_rates_and_weight_decay():
    batches, loss_fn = regression_problem()
    model = nn.Linear(4, 1)
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match=r"lr \(the learning rate\) must be a finite number > 0"):
            train(model, loss_fn, batches, steps=1, lr=bad, progress=False)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        train(model, loss_fn, batches, steps=1, weight_decay=-0.1, progress=False)
    with pytest.raises(TypeError, match="grad_clip .*must be a number or None, got '1'"):
        train(model, loss_fn, batches, steps=1, grad_clip="1", progress=False)
    before = model.weight.detach().clone()
    history = train(model, loss_fn, batches, steps=3, grad_clip=None, progress=False)   # None: no clipping
    assert len(history) == 3 and not torch.equal(before, model.weight)


def test_integer_or_bool_tensors_for_float_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    model = nn.Linear(3, 2)
    path = tmp_path / "ints.safetensors"
    save_file({"weight": torch.ones(2, 3, dtype=torch.int64), "bias": torch.ones(2, dtype=torch.bool)}, str(path))
    before = model.weight.detach().clone()
    with pytest.raises(ValueError) as error:
        load_checkpoint(path, model)
    message = str(error.value)
    assert "2 key(s) dtype mismatches" in message
    assert "weight: model torch.float32, checkpoint torch.int64" in message
    assert "bias: model torch.float32, checkpoint torch.bool" in message
    with pytest.raises(ValueError, match="dtype mismatches"):
        load_checkpoint(path, model, strict=False)        # never loaded, even when not strict
    assert torch.equal(model.weight, before)
    # A float16 file loads into a float32 model (same kind of number, another precision).
    save_file({"weight": torch.full((2, 3), 0.5, dtype=torch.float16), "bias": torch.zeros(2, dtype=torch.float16)},
              str(path))
    load_checkpoint(path, model)
    assert model.weight.dtype == torch.float32 and torch.all(model.weight == 0.5)


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    first = nn.Linear(4, 1)
    save_checkpoint(path, first)
    good = path.read_bytes()

    def old_safetensors_that_dies_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:     # writes straight to the name it is given, then fails
            f.write(b"\x00" * 40)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", old_safetensors_that_dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, nn.Linear(4, 1))
    assert path.read_bytes() == good                       # the old checkpoint, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]   # no temporary file left


def test_load_or_train_moves_a_damaged_file_aside_and_trains(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"<!DOCTYPE html><html>503 Service Unavailable</html>")
    calls = []

    def train_fn():
        calls.append(1)
        batches, loss_fn = regression_problem()
        return train(model, loss_fn, batches, steps=2, progress=False)

    model = nn.Linear(4, 1)
    with pytest.warns(UserWarning, match=r"looks like an HTML page.*\n.*Moved it to .*model\.safetensors\.damaged"):
        history = load_or_train(path, model, train_fn)
    assert calls == [1] and len(history) == 2
    assert (tmp_path / "model.safetensors.damaged").read_bytes().startswith(b"<!DOCTYPE html>")
    other = nn.Linear(4, 1)
    load_checkpoint(path, other)                           # the new file is a good checkpoint
    assert torch.equal(other.weight, model.weight)


def test_load_or_train_with_a_file_for_other_settings_says_to_delete_it(tmp_path):
    path = save_checkpoint(tmp_path / "model.safetensors", nn.Linear(4, 1))
    expected = r"(?s)weight: model \(1, 5\), checkpoint \(1, 4\).*Delete .*model\.safetensors"
    with pytest.raises(ValueError, match=expected):
        load_or_train(path, nn.Linear(5, 1), lambda: pytest.fail("must not train"))


def test_load_or_train_keeps_the_weights_when_the_folder_is_not_writable(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    blocker = tmp_path / "read-only"
    blocker.write_text("a file where the checkpoint folder should be")
    model = nn.Linear(4, 1)
    batches, loss_fn = regression_problem()
    with pytest.warns(UserWarning, match=r"could not save .*the trained weights are in .*minilib-checkpoints"):
        load_or_train(blocker / "ckpt" / "model.safetensors", model,
                      lambda: train(model, loss_fn, batches, steps=2, progress=False))
    fallback = tmp_path / "tmp" / "minilib-checkpoints" / "model.safetensors"
    other = nn.Linear(4, 1)
    load_checkpoint(fallback, other)
    assert torch.equal(other.weight, model.weight)
