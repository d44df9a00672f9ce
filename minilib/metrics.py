"""The oracle: how the book scores a conditional generator.

Every chapter that trains a class-conditional generator asks two questions of
its samples, and a small classifier trained on the real data (the *oracle*)
answers both:

1. **Did it draw what was asked?** :func:`oracle_accuracy` is the fraction of
   generated images that the oracle classifies as the class they were
   generated for. Real test images score the oracle's own accuracy; a
   generator that ignores its label scores about ``1 / num_classes``.
2. **Do the samples look like the data, with its variety?** The Fréchet
   distance (:func:`frechet_distance`) fits a Gaussian to the oracle's
   penultimate-layer features of the generated images and another to those
   of real images, and measures how far apart the two Gaussians are. It is
   FID (Heusel et al. 2017) with our oracle in place of Inception-v3: 0 for
   identical statistics, growing when the samples drift or lose variety.

Both numbers come from :func:`oracle_report`. Train an oracle once per dataset
with :func:`load_or_train_oracle`; it caches the weights in a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minilib.datasets import ImageDataset, ShapesDataset, infinite_batches, load_dataset, load_digits
from minilib.training import History, load_or_train, read_checkpoint, train
from minilib.validation import POSITIVE_INT, check_arguments

# ---------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 3x3 convolution with GroupNorm and SiLU, then a 2x2 max-pool (halves H and W)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.GroupNorm(8, out_channels),
        nn.SiLU(),
        nn.MaxPool2d(2),
    )


class Oracle(nn.Module):
    """A small CNN classifier whose penultimate layer doubles as a feature extractor.

    ``conv blocks -> adaptive average pool to 4x4 -> flatten -> Linear -> SiLU``
    gives the features ``(N, feature_dim)``; a last ``Linear`` gives the logits
    ``(N, num_classes)``. Pooling to a fixed 4x4 grid (not to 1x1) keeps where
    things are, which a position label needs, and makes the network work for
    any image size of at least 8 pixels: 16x16 digits and 32x32 shapes alike.

    Args:
        in_channels: C of the images, 1 (digits) or 3 (shapes).
        num_classes: number of classes.
        width: channels of the first block (the second has twice as many); a
            multiple of 8, for GroupNorm's 8 groups.
        feature_dim: width of the penultimate layer, the features' dimension.

    ``forward(images)``: images ``(N, C, H, W)`` in ``[-1, 1]`` -> logits ``(N, num_classes)``.
    The buffer ``val_accuracy`` holds the held-out accuracy measured after
    training (NaN before), so it is saved and loaded with the weights.
    """

    @check_arguments(in_channels=POSITIVE_INT, num_classes=POSITIVE_INT, width=POSITIVE_INT, feature_dim=POSITIVE_INT)
    def __init__(self, in_channels: int, num_classes: int, width: int = 16, feature_dim: int = 128):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"an oracle needs num_classes >= 2, got num_classes={num_classes}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.body = nn.Sequential(_conv_block(in_channels, width), _conv_block(width, 2 * width),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.feature = nn.Sequential(nn.Linear(2 * width * 16, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)
        self.register_buffer("val_accuracy", torch.tensor(float("nan")))

    @classmethod
    def for_dataset(cls, dataset: ImageDataset, **kwargs) -> "Oracle":
        """An untrained oracle with the channels and classes of ``dataset``."""
        return cls(dataset.image_shape[0], dataset.num_classes, **kwargs)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``(N, feature_dim)`` of images ``(N, C, H, W)``."""
        self._check_images(images)
        return self.feature(self.body(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def _check_images(self, images) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"images must be a tensor of shape (N, C, H, W), got {_describe(images)}")
        if images.shape[1] != self.in_channels:
            raise ValueError(f"this oracle reads {self.in_channels}-channel images, got "
                             f"{images.shape[1]} channels (shape {tuple(images.shape)})")
        if min(images.shape[-2:]) < 8:
            raise ValueError(f"images must be at least 8x8, got {tuple(images.shape[-2:])}")


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def split_dataset(dataset: ImageDataset, val_fraction: float = 0.2,
                  seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """A random (train, validation) split; the same seed gives the same split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    num_val = round(len(dataset) * val_fraction)
    if not 1 <= num_val < len(dataset):
        raise ValueError(f"a dataset of {len(dataset)} images is too small to split with "
                         f"val_fraction={val_fraction}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return dataset.subset(order[num_val:]), dataset.subset(order[:num_val])


def random_shift(images: torch.Tensor, max_shift: int = 1) -> torch.Tensor:
    """Move each image by up to ``max_shift`` pixels in x and y, repeating the border.

    A cheap augmentation: generated images are rarely centred exactly like the
    training data, and the oracle should not care. ``(N, C, H, W)`` in and out.
    """
    _, _, h, w = images.shape
    padded = F.pad(images, [max_shift] * 4, mode="replicate")          # (N, C, H + 2s, W + 2s)
    corners = torch.randint(0, 2 * max_shift + 1, (len(images), 2)).tolist()
    return torch.stack([image[:, top:top + h, left:left + w]
                        for image, (top, left) in zip(padded, corners)])


def classification_loss(oracle: Oracle, batch) -> torch.Tensor:
    """Cross-entropy on randomly shifted images; ``batch = (images, labels)``."""
    images, labels = batch
    return F.cross_entropy(oracle(random_shift(images)), labels)


def fit_oracle(oracle: Oracle, dataset: ImageDataset, steps: int = 300, batch_size: int = 128,
               lr: float = 3e-3, val_fraction: float = 0.2, seed: int = 0,
               device: torch.device | str | None = None, progress: bool = False) -> History:
    """Train ``oracle`` in place on a random ``1 - val_fraction`` of ``dataset``.

    AdamW with a cosine learning-rate decay and one-pixel random shifts. After
    training, the accuracy on the held-out images is stored in
    ``oracle.val_accuracy``.

    Returns:
        the training :class:`~minilib.training.History` (per-step losses, ``seconds``).
    """
    if oracle.num_classes != dataset.num_classes or oracle.in_channels != dataset.image_shape[0]:
        raise ValueError(f"the oracle ({oracle.in_channels} channels, {oracle.num_classes} classes) "
                         f"does not fit the dataset ({dataset.image_shape[0]} channels, "
                         f"{dataset.num_classes} classes)")
    train_set, val_set = split_dataset(dataset, val_fraction, seed)
    batches = infinite_batches(train_set, min(batch_size, len(train_set)), seed=seed, device=device)
    history = train(oracle, classification_loss, batches, steps, lr=lr, weight_decay=1e-4,
                    schedule="cosine", warmup_steps=min(50, steps // 10), seed=seed,
                    device=device, progress=progress)
    oracle.val_accuracy.fill_(oracle_accuracy(oracle, val_set.images, val_set.labels))
    return history


def train_oracle(dataset: ImageDataset, steps: int = 300, batch_size: int = 128, lr: float = 3e-3,
                 val_fraction: float = 0.2, seed: int = 0,
                 device: torch.device | str | None = None, progress: bool = False) -> Oracle:
    """A new :class:`Oracle` for ``dataset``, trained by :func:`fit_oracle`.

    The held-out accuracy is in ``oracle.val_accuracy``. On one CPU core the
    default 300 steps take about 17 s on one busy core for the 16x16 digits (over 99% held-out
    accuracy) and about 37 s for 32x32 shapes (100% for every label kind).
    """
    torch.manual_seed(seed)     # the initial weights too, so a run is repeatable
    oracle = Oracle.for_dataset(dataset)
    fit_oracle(oracle, dataset, steps=steps, batch_size=batch_size, lr=lr,
               val_fraction=val_fraction, seed=seed, device=device, progress=progress)
    return oracle


ORACLE_DATASETS = ("digits", "shapes", "mnist", "fashion-mnist", "cifar10")


def oracle_dataset(dataset_name: str, label: str = "shape_colour", image_size: int | None = None,
                   num_images: int = 6000, seed: int = 0) -> ImageDataset:
    """The real data an oracle learns from: ``"digits"`` (16x16), ``"shapes"`` (32x32), or one of
    the downloaded datasets of :func:`~minilib.datasets.load_dataset` (``"mnist"``,
    ``"fashion-mnist"``, ``"cifar10"``; their whole training split, at their own size unless
    ``image_size`` is given).

    ``label`` (shapes only) picks the classes, see :class:`~minilib.datasets.ShapesDataset`;
    ``num_images`` (shapes only) sets how many are rendered.
    """
    if dataset_name == "digits":
        return load_digits(image_size or 16)
    if dataset_name == "shapes":
        return ShapesDataset(num_images, image_size or 32, seed=seed, label=label)
    if dataset_name in ORACLE_DATASETS:
        return load_dataset(dataset_name, image_size=image_size)
    raise ValueError(f"dataset_name must be one of {ORACLE_DATASETS}, got {dataset_name!r}")


def load_or_train_oracle(dataset_name: str, path: str | Path | None = None,
                         label: str = "shape_colour", image_size: int | None = None,
                         steps: int = 300, seed: int = 0,
                         device: torch.device | str | None = None, progress: bool = False) -> Oracle:
    """The oracle of a dataset, loaded from ``path`` if it exists, else trained and saved there.

    Args:
        dataset_name: ``"digits"`` or ``"shapes"`` (see :func:`oracle_dataset`).
        path: the checkpoint file, e.g. ``"checkpoints/oracle_digits.safetensors"``;
            ``None`` trains without saving.
        label, image_size: which classes (shapes) and what size of images; they
            must match the generator's.
        steps, seed, device, progress: as in :func:`fit_oracle`.

    Returns:
        the trained oracle in eval mode; ``oracle.val_accuracy`` is its held-out accuracy.
    """
    dataset = oracle_dataset(dataset_name, label, image_size, seed=seed)
    settings = {"dataset": dataset_name, "label": label if dataset_name == "shapes" else None,
                "image_size": dataset.image_shape[-1]}
    if path is not None and Path(path).is_file():
        saved = read_checkpoint(path)[1]
        if {key: saved.get(key) for key in settings} != settings:
            raise ValueError(f"{path} holds an oracle for {saved.get('dataset')!r} (label "
                             f"{saved.get('label')!r}, {saved.get('image_size')}px), not for "
                             f"{dataset_name!r} (label {settings['label']!r}, "
                             f"{settings['image_size']}px); use another path or delete the file")
    torch.manual_seed(seed)
    oracle = Oracle.for_dataset(dataset)

    def train_fn():
        return fit_oracle(oracle, dataset, steps, seed=seed, device=device, progress=progress)

    if path is None:
        train_fn()
    else:
        load_or_train(path, oracle, train_fn, steps=steps, seed=seed, **settings)
    if device is not None:      # a loaded oracle is on the CPU
        oracle.to(device)
    return oracle.eval()


# ---------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------


@torch.no_grad()
def _in_batches(function, images: torch.Tensor, oracle: Oracle, batch_size: int = 500) -> torch.Tensor:
    """``function(chunk)`` over ``images`` in chunks, on the oracle's device, in eval mode."""
    oracle._check_images(images)
    device = next(oracle.parameters()).device
    was_training = oracle.training
    oracle.eval()
    outputs = [function(chunk.to(device)) for chunk in images.split(batch_size)]
    oracle.train(was_training)
    return torch.cat(outputs)


def predict(oracle: Oracle, images: torch.Tensor) -> torch.Tensor:
    """The oracle's class for each image: ``(N, C, H, W)`` -> int64 ``(N,)``."""
    return _in_batches(lambda chunk: oracle(chunk).argmax(dim=1), images, oracle)


def oracle_features(oracle: Oracle, images: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer features ``(N, feature_dim)`` of ``(N, C, H, W)`` images, on the CPU."""
    return _in_batches(oracle.features, images, oracle).cpu()


def oracle_accuracy(oracle: Oracle, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of ``images`` that the oracle puts in the class ``labels`` asked for.

    Args:
        images: ``(N, C, H, W)`` in ``[-1, 1]``, e.g. samples generated for ``labels``.
        labels: int ``(N,)``, the requested classes.
    """
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape (N,), got {_describe(labels)}")
    if not isinstance(images, torch.Tensor) or images.shape[:1] != labels.shape:
        raise ValueError(f"need one label per image, got {_describe(images)} and {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("oracle_accuracy needs at least one image")
    if labels.min() < 0 or labels.max() >= oracle.num_classes:
        raise ValueError(f"labels must lie in [0, {oracle.num_classes - 1}], got "
                         f"{labels.min().item()}..{labels.max().item()}")
    return (predict(oracle, images).cpu() == labels.cpu()).float().mean().item()


# ---------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------


def feature_statistics(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (with the ``N - 1`` divisor) of ``(N, D)``
    features, in float64."""
    if not isinstance(feats, torch.Tensor) or feats.ndim != 2:
        raise ValueError(f"features must be a tensor of shape (N, D), got {_describe(feats)}")
    if feats.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {feats.shape[0]}")
    feats = feats.detach().double().cpu()
    mean = feats.mean(dim=0)
    centred = feats - mean
    return mean, centred.T @ centred / (feats.shape[0] - 1)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix: ``V sqrt(L) V^T``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    # Rounding can make the smallest eigenvalues of a singular covariance slightly negative.
    return eigenvectors * eigenvalues.clamp(min=0).sqrt() @ eigenvectors.T


def frechet_distance_from_statistics(mean_a: torch.Tensor, cov_a: torch.Tensor,
                                     mean_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """Fréchet (2-Wasserstein) distance squared between ``N(mean_a, cov_a)`` and ``N(mean_b, cov_b)``:

        d^2 = |mean_a - mean_b|^2 + tr(cov_a) + tr(cov_b) - 2 tr sqrt(cov_a cov_b)

    ``cov_a cov_b`` is not symmetric, but it has the same eigenvalues as the
    symmetric PSD matrix ``M = sqrt(cov_a) cov_b sqrt(cov_a)``, so
    ``tr sqrt(cov_a cov_b) = sum_i sqrt(eigenvalue_i(M))``: two symmetric
    eigendecompositions, no general matrix square root, and it works for
    singular covariances (fewer samples than feature dimensions).

    Means ``(D,)``, covariances ``(D, D)``; computed in float64.
    """
    mean_a, cov_a, mean_b, cov_b = (x.detach().double().cpu() for x in (mean_a, cov_a, mean_b, cov_b))
    dim = mean_a.shape[0]
    for name, value, shape in [("mean_a", mean_a, (dim,)), ("mean_b", mean_b, (dim,)),
                               ("cov_a", cov_a, (dim, dim)), ("cov_b", cov_b, (dim, dim))]:
        if value.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    sqrt_a = _sqrt_psd(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    middle = (middle + middle.T) / 2           # symmetric up to rounding; make it exactly so
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return max(distance.item(), 0.0)           # identical inputs can round to -1e-15


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N_a, D)`` and ``(N_b, D)``.

    The sample sizes may differ, but each needs at least 2 samples. With few
    samples the estimate is biased upwards (noisy covariances look different),
    so compare distances computed from equal sample sizes only.
    """
    mean_a, cov_a = feature_statistics(feats_a)
    mean_b, cov_b = feature_statistics(feats_b)
    if mean_a.shape != mean_b.shape:
        raise ValueError(f"the two feature sets must have the same dimension D, got "
                         f"{tuple(feats_a.shape)} and {tuple(feats_b.shape)}")
    return frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b)


def oracle_report(oracle: Oracle, images: torch.Tensor, labels: torch.Tensor,
                  real_images: torch.Tensor) -> dict[str, float]:
    """Both scores of a batch of generated images.

    Args:
        images: generated ``(N, C, H, W)``, in ``[-1, 1]``.
        labels: int ``(N,)``, the classes they were generated for.
        real_images: real images ``(M, C, H, W)`` to compare with; for a fair
            distance, use as many as there are generated images, with the same
            class proportions.
    Returns:
        ``{"accuracy": oracle_accuracy, "frechet_distance": Fréchet distance of
        the oracle's features of generated vs real images}``.
    """
    return {"accuracy": oracle_accuracy(oracle, images, labels),
            "frechet_distance": frechet_distance(oracle_features(oracle, images),
                                                 oracle_features(oracle, real_images))}


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"
