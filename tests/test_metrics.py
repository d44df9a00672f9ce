"""Tests for minilib.metrics: the Fréchet distance and the oracle classifier."""

import math

import pytest
import torch

from minilib.datasets import ShapesDataset, load_digits
from minilib.metrics import (Oracle, feature_statistics, fit_oracle, frechet_distance,
                             frechet_distance_from_statistics, load_or_train_oracle,
                             oracle_accuracy, oracle_dataset, oracle_features, oracle_report,
                             random_shift, split_dataset, train_oracle)

# --- Fréchet distance -------------------------------------------------------


def gaussian_samples(n, dim, seed, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator) / math.sqrt(dim)   # correlated features
    return torch.randn(n, dim, generator=generator) @ mixing + shift


def test_identical_sets_are_at_distance_zero_and_the_distance_is_symmetric():
    a, b = gaussian_samples(300, 16, seed=0), gaussian_samples(200, 16, seed=1, shift=0.3)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 0.5


def test_one_dimensional_closed_form():
    generator = torch.Generator().manual_seed(0)
    a = 1.0 + 2.0 * torch.randn(500, 1, generator=generator)
    b = -0.5 + 0.5 * torch.randn(700, 1, generator=generator)
    a64, b64 = a.double(), b.double()
    expected = (a64.mean() - b64.mean()) ** 2 + (a64.std() - b64.std()) ** 2   # std with N - 1
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9)


def test_diagonal_gaussians_closed_form():
    mean_a, mean_b = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = ((mean_a - mean_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum()
    distance = frechet_distance_from_statistics(mean_a, torch.diag(var_a), mean_b, torch.diag(var_b))
    assert distance == pytest.approx(expected.item(), rel=1e-12)


def test_general_covariances_match_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    a, b = gaussian_samples(400, 8, seed=2), gaussian_samples(400, 8, seed=3, shift=0.2)
    (mean_a, cov_a), (mean_b, cov_b) = feature_statistics(a), feature_statistics(b)
    cross = linalg.sqrtm((cov_a @ cov_b).numpy()).real
    expected = ((mean_a - mean_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross.trace()
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-6)


def test_a_mean_shift_adds_its_squared_length():
    a = gaussian_samples(300, 8, seed=0)
    distances = [frechet_distance(a, a + shift) for shift in [0.0, 0.1, 0.5, 1.0]]
    assert distances == sorted(distances)
    assert distances[-1] == pytest.approx(8 * 1.0 ** 2, rel=1e-6)   # same covariance: |shift|^2


def test_few_samples_give_a_finite_distance():
    a, b = gaussian_samples(5, 32, seed=0), gaussian_samples(3, 32, seed=1)   # singular covariances
    assert math.isfinite(frechet_distance(a, b)) and frechet_distance(a, b) > 0
    assert frechet_distance(a[:2], a[:2]) == pytest.approx(0.0, abs=1e-9)


# --- the oracle -------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits(16)


@pytest.fixture(scope="module")
def digits_oracle(digits):
    return train_oracle(digits, steps=60, batch_size=64)


def test_oracle_on_digits_reaches_high_validation_accuracy(digits_oracle):
    assert digits_oracle.val_accuracy.item() > 0.9


def test_oracle_accuracy_on_real_and_shuffled_labels(digits, digits_oracle):
    assert oracle_accuracy(digits_oracle, digits.images, digits.labels) > 0.9
    shuffled = digits.labels[torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))]
    assert oracle_accuracy(digits_oracle, digits.images, shuffled) < 0.2     # chance is 0.1


def test_features_and_report(digits, digits_oracle):
    feats = oracle_features(digits_oracle, digits.images[:50])
    assert feats.shape == (50, 128) and feats.dtype == torch.float32
    first, second = digits.subset(range(0, 800)), digits.subset(range(800, 1600))
    real = oracle_report(digits_oracle, first.images, first.labels, second.images)
    noise = torch.rand(800, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fake = oracle_report(digits_oracle, noise, first.labels, second.images)
    assert set(real) == {"accuracy", "frechet_distance"}
    assert real["accuracy"] > 0.9 and fake["accuracy"] < 0.3
    assert fake["frechet_distance"] > 10 * real["frechet_distance"]


@pytest.mark.parametrize("label", ["shape_colour", "shape", "colour", "position"])
def test_oracle_fits_rgb_shapes_of_any_label_kind(label):
    shapes = ShapesDataset(8, image_size=32, label=label)
    oracle = Oracle.for_dataset(shapes)
    assert oracle(shapes.images).shape == (8, shapes.num_classes)
    assert oracle.features(shapes.images).shape == (8, 128)


def test_split_is_disjoint_and_repeatable(digits):
    train_set, val_set = split_dataset(digits, val_fraction=0.25, seed=3)
    assert len(val_set) == round(0.25 * len(digits)) and len(train_set) + len(val_set) == len(digits)
    again, _ = split_dataset(digits, val_fraction=0.25, seed=3)
    assert torch.equal(train_set.images, again.images)


def test_random_shift_moves_a_dot_by_at_most_one_pixel():
    images = -torch.ones(200, 1, 9, 9)
    images[:, :, 4, 4] = 1
    moved = random_shift(images, max_shift=1)
    rows, cols = (moved[:, 0] == 1).nonzero()[:, 1:].T
    assert len(rows) == 200 and rows.sub(4).abs().max() == 1 and cols.sub(4).abs().max() == 1
    torch.testing.assert_close(random_shift(images, max_shift=0), images)


def test_load_or_train_oracle_caches_the_weights_and_accuracy(tmp_path):
    path = tmp_path / "oracle_digits.safetensors"
    trained = load_or_train_oracle("digits", path, steps=20)
    assert path.is_file() and not trained.training
    loaded = load_or_train_oracle("digits", path, steps=20)
    assert loaded.val_accuracy == trained.val_accuracy and not torch.isnan(loaded.val_accuracy)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    with pytest.raises(ValueError, match="holds an oracle for 'digits'"):
        load_or_train_oracle("digits", path, image_size=8)


# --- bad input --------------------------------------------------------------


def test_bad_input_raises_clear_errors(digits, digits_oracle):
    images, labels = digits.images[:10], digits.labels[:10]
    with pytest.raises(ValueError, match="num_classes >= 2"):
        Oracle(1, 1)
    with pytest.raises(ValueError, match="1-channel"):
        oracle_accuracy(digits_oracle, images.expand(-1, 3, -1, -1), labels)
    with pytest.raises(ValueError, match="shape \\(N, C, H, W\\)"):
        oracle_features(digits_oracle, images[0])
    with pytest.raises(ValueError, match="one label per image"):
        oracle_accuracy(digits_oracle, images, labels[:5])
    with pytest.raises(ValueError, match="integer tensor"):
        oracle_accuracy(digits_oracle, images, labels.float())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        oracle_accuracy(digits_oracle, images, labels + 10)
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="same dimension"):
        frechet_distance(torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="shape \\(N, D\\)"):
        frechet_distance(torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match="dataset_name"):
        oracle_dataset("cifar")
    with pytest.raises(ValueError, match="val_fraction"):
        split_dataset(digits, val_fraction=1.0)
    with pytest.raises(ValueError, match="does not fit the dataset"):
        fit_oracle(Oracle(3, 10), digits, steps=1)


def test_an_oracle_learns_a_downloaded_dataset_from_the_data_root(tmp_path, monkeypatch):
    from minilib.datasets import DATA_ENV, write_miniature_files
    from minilib.metrics import load_or_train_oracle, oracle_features
    write_miniature_files(tmp_path, images_per_split=40)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    oracle = load_or_train_oracle("cifar10", tmp_path / "oracle.safetensors", steps=2)
    assert oracle_features(oracle, torch.zeros(3, 3, 32, 32)).shape[0] == 3
    mnist = load_or_train_oracle("mnist", None, image_size=32, steps=2)
    assert mnist(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
