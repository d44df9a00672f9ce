"""Data for the book: made, shipped, or (for readers who are online) downloaded.

Everything here ends up in one small container, :class:`ImageDataset`, that holds
the whole dataset as tensors in memory:

- ``images``: float32 ``(N, C, H, W)`` with values in ``[-1, 1]``,
- ``labels``: int64 ``(N,)`` class ids, with ``class_names[label]`` in words,
- optionally ``captions`` (a list of N strings) and ``attributes`` (``(N, K)``).

Three sources fill it:

1. :class:`ShapesDataset`, a procedural, captioned dataset (shape x colour x
   position). It is unlimited, RGB, class- and text-conditional, renders 10k
   images in a fraction of a second, and splits neatly by class for few-shot
   learning. Tests and the book build never need the network.
2. :func:`load_digits`, the 1,797 8x8 handwritten digits that ship inside
   scikit-learn, upsampled.
3. :func:`load_mnist` and :func:`load_cifar10`, readers for the standard files,
   with ``download=True`` for readers who are online.

Training loops draw random batches with :func:`infinite_batches`, which indexes
the in-memory tensors directly: no DataLoader, no worker processes.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import http.client
import importlib.util
import math
import os
import struct
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .validation import check_number, check_range

# ---------------------------------------------------------------------------
# The container every loader returns
# ---------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Images, labels and (optionally) captions, all held in memory.

    Args:
        images: floating-point tensor ``(N, C, H, W)`` with values in ``[-1, 1]``.
            float64 is converted to float32 (the models are float32); integer
            pixels such as uint8 ``[0, 255]`` are refused: convert them with
            :func:`uint8_to_unit` first.
        labels: integer tensor ``(N,)`` of class ids in ``[0, len(class_names))``.
        class_names: the name of each class id (a list of strings, at least one).
        captions: optional list of N strings describing each image.
        attributes: optional integer tensor ``(N, K)`` of per-image attribute ids.
        name: a short name shown by ``repr``.

    Raises:
        TypeError: a wrong type or dtype (float labels, uint8 images, ...).
        ValueError: wrong shapes, labels out of range, images outside ``[-1, 1]``
            or not finite. Each message names the argument and what was expected.

    ``dataset[i]`` returns ``(image (C, H, W), label ())`` like a TensorDataset.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                 captions: Sequence[str] | None = None, attributes: torch.Tensor | None = None,
                 name: str = "images"):
        images = _checked_images(images)
        n = images.shape[0]
        if isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names) \
                or len(class_names) == 0:
            raise TypeError(f"class_names must be a non-empty list of strings, got {class_names!r:.80}")
        _check_labels(labels, n, len(class_names))
        if captions is not None:
            if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
                raise TypeError("captions must be a list of strings, one per image")
            if len(captions) != n:
                raise ValueError(f"got {len(captions)} captions for {n} images")
        if attributes is not None:
            if not isinstance(attributes, torch.Tensor) or attributes.ndim != 2 or attributes.shape[0] != n:
                raise ValueError(f"attributes must be a tensor of shape ({n}, K), got {_describe(attributes)}")
            if attributes.is_floating_point() or attributes.is_complex() or attributes.dtype == torch.bool:
                raise TypeError(f"attributes must be an integer tensor of ids, got dtype {attributes.dtype}")
        self._set(images, labels.long(), list(class_names),
                  None if captions is None else list(captions), attributes, name)

    def _set(self, images, labels, class_names, captions, attributes, name) -> None:
        self.images = images
        self.labels = labels
        self.class_names = class_names
        self.captions = captions
        self.attributes = attributes
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def subset(self, indices) -> "ImageDataset":
        """A new ImageDataset with the images at ``indices`` (labels keep their ids)."""
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        captions = None
        if self.captions is not None:
            captions = [self.captions[i] for i in indices.tolist()]
        attributes = None if self.attributes is None else self.attributes[indices]
        subset = ImageDataset.__new__(ImageDataset)   # the values were checked when self was made
        subset._set(self.images[indices], self.labels[indices], self.class_names, captions,
                    attributes, self.name)
        return subset

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}: {len(self)} images of shape "
                f"{self.image_shape}, {self.num_classes} classes, values in [-1, 1])")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _checked_images(images) -> torch.Tensor:
    """``images`` as floating point ``(N, C, H, W)`` in ``[-1, 1]`` (float64 -> float32), or an error."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a tensor of shape (N, C, H, W), got {_describe(images)}")
    if not images.is_floating_point():
        hint = (" (for [0, 255] pixels use minilib.datasets.uint8_to_unit(images))"
                if images.dtype == torch.uint8 else "")
        raise TypeError(f"images must be floating point with values in [-1, 1], got dtype "
                        f"{images.dtype}{hint}")
    if images.dtype == torch.float64:
        images = images.float()
    if images.numel():
        low, high = images.aminmax()
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise ValueError("images must be finite; they contain NaN or infinite values")
        if low < -1 - 1e-3 or high > 1 + 1e-3:
            raise ValueError(f"images must have values in [-1, 1], got {low.item():.4g} to "
                             f"{high.item():.4g} (map [0, 1] images with x * 2 - 1, [0, 255] "
                             f"pixels with uint8_to_unit)")
    return images


def _check_labels(labels, n: int, num_classes: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,):
        raise ValueError(f"labels must be a tensor of shape ({n},) to match {n} images, got "
                         f"{_describe(labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class ids, got dtype {labels.dtype}")
    check_range(labels, 0, num_classes - 1, f"labels (class ids for {num_classes} class_names)")


def infinite_batches(data, batch_size: int, seed: int = 0,
                     device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield random batches forever, one shuffled pass (epoch) after another.

    Args:
        data: an :class:`ImageDataset` (yields ``(images, labels)``), or a tuple of
            tensors that share their first dimension N (yields one slice of each),
            e.g. ``(ds.images, ds.attributes)`` for a text-conditional model.
        batch_size: images per batch, at most N. The last incomplete batch of
            each epoch is dropped, so every batch has the same size.
        seed: seeds the shuffling, so a run is repeatable.
        device: where the batches live; the tensors are moved there once.

    Example::

        batches = infinite_batches(ds, batch_size=64)
        images, labels = next(batches)      # (64, C, H, W), (64,)
    """
    tensors = (data.images, data.labels) if isinstance(data, ImageDataset) else tuple(data)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError("data must be an ImageDataset or a tuple of tensors")
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError(f"all tensors must share their first dimension, got "
                         f"{[tuple(t.shape) for t in tensors]}")
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be between 1 and the dataset size {n}, got {batch_size}")
    if device is not None:
        tensors = tuple(t.to(device) for t in tensors)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator).to(tensors[0].device)
        for start in range(0, n - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield tuple(t[index] for t in tensors)


# ---------------------------------------------------------------------------
# Procedural shapes
# ---------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")

# RGB in [0, 1]. Saturated but not neon, so they read well on the dark background.
COLOUR_RGB = torch.tensor([
    [0.93, 0.20, 0.20],   # red
    [0.20, 0.80, 0.30],   # green
    [0.22, 0.45, 0.98],   # blue
    [0.98, 0.85, 0.18],   # yellow
    [0.88, 0.25, 0.88],   # magenta
    [0.15, 0.85, 0.90],   # cyan
])
BACKGROUND_RGB = torch.tensor([0.08, 0.08, 0.11])

# Centre (x, y) of each position, as a fraction of the image side; y points down.
POSITION_XY = torch.tensor([
    [0.28, 0.28],   # top left
    [0.72, 0.28],   # top right
    [0.28, 0.72],   # bottom left
    [0.72, 0.72],   # bottom right
    [0.50, 0.50],   # centre
])

LABEL_KINDS = ("shape", "colour", "position", "shape_colour")
MAX_JITTER = 0.05   # 0.28 (corner centres from the edges) - 0.23 (widest default shape: a triangle of size 0.22)


# Each shape is a signed distance function (SDF) of the offset (x, y) from its
# centre: negative inside, positive outside, in units of the image side. The
# polygons are intersections of half-planes, so their distance is the largest
# distance past any edge (exact along the edges, which is all anti-aliasing
# needs). x has shape (N, 1, W) and y (N, H, 1): most arithmetic happens on
# these thin tensors, and only the final max/add broadcasts to (N, H, W).

def _circle_sdf(x, y, size):
    return (x * x + y * y).sqrt() - size


def _square_sdf(x, y, size):
    half_side = 0.85 * size            # about the same area as the circle of the same size
    return torch.maximum(x.abs() - half_side, y.abs() - half_side)


def _triangle_sdf(x, y, size):
    """Equilateral triangle pointing up, centred on its bounding box.

    In a frame with ``up`` pointing up and the origin at the triangle's centroid,
    the three edges lie at distance ``inradius`` along the outward normals
    (0, -1) and (+-sqrt(3)/2, 1/2). The apex is at ``up = 2 * inradius`` and the
    base at ``-inradius``, so the bounding box is centred at ``up = inradius / 2``.
    """
    inradius = 0.6 * size
    up = -y + inradius / 2                                    # y points down in images
    base = -up - inradius
    sides = (math.sqrt(3) / 2) * x.abs() + up / 2 - inradius
    return torch.maximum(base, sides)


def _cross_sdf(x, y, size):
    arm, thickness = size, 0.33 * size
    ax, ay = x.abs(), y.abs()
    horizontal_bar = torch.maximum(ax - arm, ay - thickness)
    vertical_bar = torch.maximum(ax - thickness, ay - arm)
    return torch.minimum(horizontal_bar, vertical_bar)   # union = nearer of the two


SHAPE_SDFS = (_circle_sdf, _square_sdf, _triangle_sdf, _cross_sdf)   # same order as SHAPES


def render_shapes(shape_ids: torch.Tensor, colour_ids: torch.Tensor, position_ids: torch.Tensor,
                  sizes: torch.Tensor, image_size: int = 32,
                  offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one anti-aliased coloured shape per image, all images at once.

    A pixel's coverage is ``clamp(0.5 - distance_in_pixels, 0, 1)``, where the
    distance comes from the shape's signed distance function: 1 well inside, 0
    well outside and a one-pixel linear ramp across the edge, which is what
    makes the edges smooth. The image blends background and colour by coverage.

    Args:
        shape_ids: int ``(N,)``, indices into :data:`SHAPES`.
        colour_ids: int ``(N,)``, indices into :data:`COLOURS`.
        position_ids: int ``(N,)``, indices into :data:`POSITIONS`.
        sizes: float ``(N,)``, the shape's radius as a fraction of the image side
            (0.15 to 0.22 keeps every shape inside its quadrant).
        image_size: side H = W of the square images, at least 8.
        offsets: optional float ``(N, 2)`` nudge (x, y) of the centre, as a fraction
            of the image side.

    Returns:
        float32 ``(N, 3, image_size, image_size)`` in ``[-1, 1]`` on the device of
        ``shape_ids``.
    """
    _check_render_inputs(shape_ids, colour_ids, position_ids, sizes, image_size, offsets)
    n, device = shape_ids.shape[0], shape_ids.device
    # Pixel centres in (0, 1): pixel i covers [i, i + 1] / image_size.
    grid = (torch.arange(image_size, device=device, dtype=torch.float32) + 0.5) / image_size
    centres = POSITION_XY.to(device)[position_ids]                     # (N, 2)
    if offsets is not None:
        centres = centres + offsets.to(device, torch.float32)
    x = grid.view(1, 1, -1) - centres[:, 0].view(-1, 1, 1)            # (N, 1, W)
    y = grid.view(1, -1, 1) - centres[:, 1].view(-1, 1, 1)            # (N, H, 1)
    radius = sizes.to(device, torch.float32).view(-1, 1, 1)

    distance = torch.empty(n, image_size, image_size, device=device)  # (N, H, W)
    for shape_id, sdf in enumerate(SHAPE_SDFS):
        chosen = (shape_ids == shape_id).nonzero().squeeze(1)         # which images have this shape
        distance.index_copy_(0, chosen, sdf(x[chosen], y[chosen], radius[chosen]))

    coverage = (0.5 - distance * image_size).clamp_(0, 1).unsqueeze(1)  # (N, 1, H, W) in [0, 1]
    background = BACKGROUND_RGB.to(device).view(1, 3, 1, 1) * 2 - 1     # colours in [-1, 1]
    colour = COLOUR_RGB.to(device)[colour_ids].view(-1, 3, 1, 1) * 2 - 1
    return torch.lerp(background, colour, coverage)                     # (N, 3, H, W)


def _check_render_inputs(shape_ids, colour_ids, position_ids, sizes, image_size, offsets):
    if not isinstance(shape_ids, torch.Tensor):
        raise TypeError(f"shape_ids must be an integer tensor, got {_describe(shape_ids)}")
    n = shape_ids.shape[0] if shape_ids.ndim else None
    ids = {"shape_ids": (shape_ids, SHAPES), "colour_ids": (colour_ids, COLOURS),
           "position_ids": (position_ids, POSITIONS)}
    for name, (value, names) in ids.items():
        if not isinstance(value, torch.Tensor) or value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an integer tensor, got {_describe(value)}")
        if value.ndim != 1 or value.shape[0] != n:
            raise ValueError(f"{name} must have shape (N,) = ({n},), got {tuple(value.shape)}")
        if n and (value.min() < 0 or value.max() >= len(names)):
            raise ValueError(f"{name} must lie in [0, {len(names) - 1}] (ids into {names}), got "
                             f"values {value.min().item()}..{value.max().item()}")
    if not isinstance(sizes, torch.Tensor) or sizes.shape != (n,):
        raise ValueError(f"sizes must be a float tensor of shape ({n},), got {_describe(sizes)}")
    if n and (sizes.min() <= 0 or sizes.max() > 0.5):
        raise ValueError("sizes are radii as a fraction of the image side: expected values in (0, 0.5]")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if offsets is not None and (not isinstance(offsets, torch.Tensor) or offsets.shape != (n, 2)):
        raise ValueError(f"offsets must have shape ({n}, 2), got {_describe(offsets)}")


def _as_id(value, names: Sequence[str], what: str) -> int:
    """Accept an id (int or 0-d tensor) or a name, return the id."""
    if isinstance(value, str):
        if value not in names:
            raise ValueError(f"unknown {what} {value!r}; expected one of {list(names)}")
        return names.index(value)
    value = int(value)
    if not 0 <= value < len(names):
        raise ValueError(f"{what} id must be in [0, {len(names) - 1}], got {value}")
    return value


def caption(shape, colour, position) -> str:
    """``caption(0, 0, 0) == caption("circle", "red", "top left") == "a red circle, top left"``."""
    shape = SHAPES[_as_id(shape, SHAPES, "shape")]
    colour = COLOURS[_as_id(colour, COLOURS, "colour")]
    position = POSITIONS[_as_id(position, POSITIONS, "position")]
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape}, {position}"


def class_names_for(label: str = "shape_colour") -> list[str]:
    """Names of the classes for a label kind, e.g. ``"red circle"`` for ``shape_colour``."""
    if label == "shape":
        return list(SHAPES)
    if label == "colour":
        return list(COLOURS)
    if label == "position":
        return list(POSITIONS)
    if label == "shape_colour":
        return [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]
    raise ValueError(f"label must be one of {LABEL_KINDS}, got {label!r}")


def labels_from_attributes(attributes: torch.Tensor, label: str = "shape_colour") -> torch.Tensor:
    """Class ids ``(N,)`` from attribute ids ``(N, 3)`` = (shape, colour, position).

    ``shape_colour`` numbers the classes ``shape * len(COLOURS) + colour``, the
    order of :func:`class_names_for`.
    """
    shape, colour, position = attributes.unbind(dim=1)
    if label == "shape":
        return shape
    if label == "colour":
        return colour
    if label == "position":
        return position
    if label == "shape_colour":
        return shape * len(COLOURS) + colour
    raise ValueError(f"label must be one of {LABEL_KINDS}, got {label!r}")


class ShapesDataset(ImageDataset):
    """Coloured shapes with captions: ``ShapesDataset(10_000)[0] -> (image, label)``.

    Every combination of shape x colour x position (4 x 6 x 5 = 120) appears
    equally often (up to one image when N is not a multiple of 120), in a random
    order; each image gets a random size and a small random nudge of its centre.
    Images are a deterministic function of ``seed``.

    Args:
        num_images: N.
        image_size: side of the square images (>= 8).
        seed: the same seed gives identical images, labels and captions.
        label: what ``labels`` holds: ``"shape_colour"`` (24 classes, default),
            ``"shape"`` (4), ``"colour"`` (6) or ``"position"`` (5).
        device: where to render and keep the tensors.
        size_range: (min, max) radius as a fraction of the image side, with
            ``0 < min <= max <= 0.5``. Up to 0.22 (the default is 0.15 to 0.22)
            every shape stays inside the image; larger shapes may run
            off it at the corner positions (chapter 8 draws large ones and keeps
            only the centred ones).
        jitter: largest nudge of the centre, as a fraction of the image side, in
            ``[0, MAX_JITTER]`` = ``[0, 0.05]``: the corner positions' centres lie
            0.28 from the edges and the widest default shape (a triangle of size
            0.22, whose base reaches 1.04 x 0.22 sideways) 0.23 from its centre,
            so a nudged shape stays inside the image and near its own position.

    Attributes:
        images: float32 ``(N, 3, H, W)`` in ``[-1, 1]``.
        labels: int64 ``(N,)``; ``class_names[labels[i]]`` names the class.
        attributes: int64 ``(N, 3)`` = (shape, colour, position) ids into
            :data:`SHAPES`, :data:`COLOURS`, :data:`POSITIONS`.
        captions: N strings such as ``"a red circle, top left"``.
        sizes: float ``(N,)``, offsets: float ``(N, 2)``, as passed to :func:`render_shapes`.
    """

    def __init__(self, num_images: int, image_size: int = 32, seed: int = 0,
                 label: str = "shape_colour", device: torch.device | str | None = None,
                 size_range: tuple[float, float] = (0.15, 0.22), jitter: float = 0.03):
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        class_names = class_names_for(label)   # validates `label`
        if len(size_range) != 2 or not 0 < size_range[0] <= size_range[1] <= 0.5:   # NaN fails too
            raise ValueError(f"size_range must be (min, max) with 0 < min <= max <= 0.5, got {size_range}")
        check_number(jitter, "jitter (largest nudge of a shape's centre, a fraction of the image side)",
                     0, MAX_JITTER)

        # Sample on the CPU with our own generator, so the seed means the same on every device.
        generator = torch.Generator().manual_seed(seed)
        # Deal the 120 combinations like cards: every full deck once, then part of a shuffled one.
        num_combos = len(SHAPES) * len(COLOURS) * len(POSITIONS)
        decks = [torch.randperm(num_combos, generator=generator)
                 for _ in range(math.ceil(num_images / num_combos))]
        combo = torch.cat(decks)[:num_images]
        combo = combo[torch.randperm(num_images, generator=generator)]
        shape_ids = combo // (len(COLOURS) * len(POSITIONS))
        colour_ids = combo // len(POSITIONS) % len(COLOURS)
        position_ids = combo % len(POSITIONS)
        low, high = size_range
        sizes = low + (high - low) * torch.rand(num_images, generator=generator)
        offsets = jitter * (2 * torch.rand(num_images, 2, generator=generator) - 1)

        attributes = torch.stack([shape_ids, colour_ids, position_ids], dim=1)
        images = render_shapes(shape_ids.to(device), colour_ids.to(device),
                               position_ids.to(device), sizes, image_size, offsets)
        captions = [caption(*row) for row in attributes.tolist()]
        super().__init__(images, labels_from_attributes(attributes, label).to(images.device),
                         class_names, captions, attributes.to(images.device), name="shapes")
        self.label_kind = label
        self.sizes = sizes.to(images.device)
        self.offsets = offsets.to(images.device)


# Words of every caption, for the text-to-image chapter. 0 is padding.
VOCAB = ("<pad>", "a", "an", ",") + COLOURS + SHAPES + ("top", "bottom", "left", "right", "centre")


def tokenize(captions: Sequence[str], length: int | None = None) -> torch.Tensor:
    """Caption strings -> word ids ``(N, L)`` into :data:`VOCAB`, right-padded with 0.

    ``"a red circle, top left"`` becomes the ids of
    ``["a", "red", "circle", ",", "top", "left"]``. ``length`` defaults to the
    longest caption; a caption longer than ``length`` is an error.
    """
    if isinstance(captions, str):
        raise TypeError("tokenize expects a list of captions; wrap a single one in a list")
    words = [c.replace(",", " , ").split() for c in captions]
    length = length or max((len(w) for w in words), default=0)
    ids = torch.zeros(len(words), length, dtype=torch.long)
    for row, caption_words in enumerate(words):
        if len(caption_words) > length:
            raise ValueError(f"caption {captions[row]!r} has {len(caption_words)} words, "
                             f"more than length={length}")
        for column, word in enumerate(caption_words):
            if word not in VOCAB:
                raise ValueError(f"word {word!r} in caption {captions[row]!r} is not in VOCAB")
            ids[row, column] = VOCAB.index(word)
    return ids


def few_shot_split(class_names: Sequence[str] | int, num_held_out: int,
                   seed: int = 0) -> tuple[list[int], list[int]]:
    """Split class ids into (train classes, held-out classes), at random but repeatably.

    A few-shot generator trains on the first list and must then generate the
    held-out classes from a handful of examples it has never seen.

    Args:
        class_names: the dataset's ``class_names`` (or just the number of classes).
        num_held_out: how many classes to hold out, at least 1 and fewer than all.
        seed: picks which classes.

    Returns:
        two sorted lists of class ids.
    """
    num_classes = class_names if isinstance(class_names, int) else len(class_names)
    if not 1 <= num_held_out < num_classes:
        raise ValueError(f"num_held_out must be between 1 and {num_classes - 1} "
                         f"(there are {num_classes} classes), got {num_held_out}")
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[num_held_out:]), sorted(order[:num_held_out])


def select_classes(dataset: ImageDataset, classes: Sequence[int]) -> ImageDataset:
    """The images of ``dataset`` whose label is in ``classes`` (labels keep their ids)."""
    wanted = torch.as_tensor(list(classes), dtype=torch.long, device=dataset.labels.device)
    keep = torch.isin(dataset.labels, wanted).nonzero().squeeze(1)
    return dataset.subset(keep)


# ---------------------------------------------------------------------------
# Real images: digits shipped with scikit-learn, MNIST, CIFAR-10
# ---------------------------------------------------------------------------


def uint8_to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float32 in [-1, 1]."""
    return torch.tensor(np.asarray(images), dtype=torch.float32) / 127.5 - 1


def resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)`` to ``(N, C, image_size, image_size)``.

    Anti-aliased when shrinking, so downsampled digits don't sparkle.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    shrinking = image_size < images.shape[-1]
    out = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                        align_corners=False, antialias=shrinking)
    return out.clamp(-1, 1)


def load_digits(image_size: int = 16) -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, shipped inside the package).

    Returns:
        ImageDataset with images float32 ``(1797, 1, image_size, image_size)`` in
        ``[-1, 1]`` (white digit on black), labels 0-9, class_names "0".."9".
    """
    pixels, labels = _read_sklearn_digits()                        # (1797, 64) in 0..16, (1797,)
    images = torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 8, 8) / 8.0 - 1
    return ImageDataset(resize(images, image_size), torch.tensor(labels, dtype=torch.long),
                        [str(d) for d in range(10)], name="digits")


def _read_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits as (pixels (1797, 64), labels (1797,)).

    Importing scikit-learn takes seconds, so we read the CSV file it ships
    (``sklearn/datasets/data/digits.csv.gz``: 64 pixels then the label per row)
    and only fall back to ``sklearn.datasets.load_digits`` if it has moved.
    """
    spec = importlib.util.find_spec("sklearn")     # finds the package without importing it
    if spec is None or spec.origin is None:
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_load_digits
    digits = sklearn_load_digits()
    return digits.data, digits.target


class DownloadError(RuntimeError):
    """A file could not be downloaded (offline, unreachable, refused, damaged) or stored."""


OFFLINE_ENV = "MINILIB_OFFLINE"
CONNECT_TIMEOUT = 5.0   # seconds to connect and to get the server's first answer
READ_TIMEOUT = 60.0     # longest silence allowed while the data arrive


def is_offline() -> bool:
    """Whether ``$MINILIB_OFFLINE`` is set (to anything but ``""`` or ``"0"``): then nothing is downloaded."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def download_file(url: str, path: Path, md5: str | None = None, timeout: float = CONNECT_TIMEOUT,
                  sha256: str | None = None, headers: dict[str, str] | None = None,
                  size: int | None = None, read_timeout: float = READ_TIMEOUT,
                  check: Callable[[Path], None] | None = None, folder_hint: str = "") -> Path:
    """Fetch ``url`` to ``path`` with a progress bar, safely even when several processes do it at once.

    How a download can go wrong, and what this function does about it:

    - **Offline**: with ``$MINILIB_OFFLINE`` set it fails at once, naming the
      URL and where to put a copy fetched elsewhere.
    - **A host that never answers**: ``timeout`` (default 5 s) bounds the wait
      for the connection and for the server's first answer; ``read_timeout``
      (default 60 s) the silence while the data arrive.
    - **Half files**: the data go to a temporary file with a unique name in the
      same folder, which is renamed to ``path`` (``os.replace``, atomic) only
      when complete and checked. A failed download leaves nothing under the
      real name, and a short read (fewer bytes than the server announced) fails.
    - **Two processes fetching the same file** (a class on one machine, two
      notebooks) take turns on a lock file in ``<folder>/.locks/``. The second
      waits, then finds the file in place and uses it without downloading again.
    - **The wrong content**: an HTML page (a login or error page) is refused; the
      size, MD5 and SHA-256 are checked where given, and ``check(temporary_path)``
      may inspect the file (raise :class:`DownloadError` to refuse it). A
      refused download is deleted, and the message says so.
    - **A folder you cannot write to** fails with a message naming it;
      ``folder_hint`` says how to choose another one.

    Returns:
        ``path``.

    Raises:
        DownloadError: with the URL, the path, and what to do.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    if is_offline():
        raise DownloadError(f"{OFFLINE_ENV} is set, so nothing is downloaded: download {url} on a machine "
                            f"that is online and put the file at {path} (or unset {OFFLINE_ENV}).")
    try:
        (path.parent / ".locks").mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.parent / ".locks" / f"{path.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"waiting for another process that is downloading {path.name} into {path.parent} ...")
            lock.acquire()
    except OSError as error:
        raise DownloadError(f"cannot write into the folder {path.parent} ({error.strerror or error}); "
                            f"choose a folder you can write to{folder_hint}") from None
    try:
        if path.is_file():          # another process finished it while we waited
            return path
        _remove_stale_parts(path)
        partial = _fetch(url, path, timeout, read_timeout, headers)
        try:
            _check_download(partial, url, path, md5, sha256, size, check)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path
    finally:
        lock.release()


def _remove_stale_parts(path: Path) -> None:
    """Delete temporary files that an interrupted download of ``path`` left (we hold its lock)."""
    for stale in path.parent.glob(f"{glob.escape(path.name)}.*.part"):
        stale.unlink(missing_ok=True)


def _fetch(url: str, path: Path, timeout: float, read_timeout: float,
           headers: dict[str, str] | None) -> Path:
    """Stream ``url`` into a new unique ``<name>.<random>.part`` file next to ``path``; return it."""
    from tqdm.auto import tqdm

    host = urllib.parse.urlsplit(url).netloc or url
    request = urllib.request.Request(url, headers={"User-Agent": "minilib", **(headers or {})})
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    except OSError as error:
        raise DownloadError(f"cannot write into the folder {path.parent} ({error.strerror or error})") from None
    partial = Path(name)
    received, total, stage = 0, None, "connect"
    try:
        with os.fdopen(handle, "wb") as out:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                stage = "read"
                _set_read_timeout(response, read_timeout)
                _refuse_web_pages(response, url, path)
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=path.name) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
    except DownloadError:
        partial.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
        partial.unlink(missing_ok=True)
        problem = _network_problem(error, stage, host, timeout, read_timeout)
        raise DownloadError(f"could not download {url} to {path}: {problem}. If you are offline, "
                            f"download the file on another machine and put the file at {path}.") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if total is not None and received != total:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"the download of {url} stopped after {received:,} of {total:,} bytes; "
                            f"nothing was saved, try again")
    return partial


def _set_read_timeout(response, seconds: float) -> None:
    """Give an HTTP response's socket a new timeout for the body (``urlopen`` has one for everything).

    ``urlopen(timeout=...)`` is the limit for connecting and for the first answer;
    once the data flow, a longer silence is normal on a slow network. The socket
    sits at ``response.fp.raw._sock``; other responses (``file://``) have none.
    """
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _refuse_web_pages(response, url: str, path: Path) -> None:
    content_type = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type == "text/html" and path.suffix.lower() not in (".html", ".htm"):
        raise DownloadError(f"{url} answered with a web page (text/html), not the file: usually a login, "
                            f"licence or error page. Open the URL in a browser to see it; nothing was saved "
                            f"at {path}.")


def _network_problem(error, stage: str, host: str, timeout: float, read_timeout: float) -> str:
    """One readable line for a network exception."""
    if isinstance(error, urllib.error.HTTPError):
        return f"the server answered {error.code} {error.reason}"
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, TimeoutError):
        if stage == "connect":
            return (f"{host} did not answer within {timeout:g} s (no connection, or a connection but no "
                    f"reply); the host may be down or blocked")
        return f"no data arrived for {read_timeout:g} s, so the download was abandoned"
    return str(reason) or type(reason).__name__


def _check_download(partial: Path, url: str, path: Path, md5: str | None, sha256: str | None,
                    size: int | None, check: Callable[[Path], None] | None) -> None:
    """Raise DownloadError unless the downloaded ``partial`` file has the expected size and digests."""
    deleted = f"the download was deleted; try again, or put a good copy at {path}"
    found = partial.stat().st_size
    if size is not None and found != size:
        raise DownloadError(f"{url} gave {found:,} bytes, but the file has {size:,}: it is incomplete or "
                            f"not the right file ({deleted})")
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        digest = file_digest(partial, algorithm)
        if digest != expected.lower():
            raise DownloadError(f"{url} downloaded, but its {algorithm.upper()} is not {expected} (got "
                                f"{digest}): the file is damaged or has changed ({deleted})")
    if check is not None:
        check(partial)


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """The hex digest of a file (``"md5"`` or ``"sha256"``), read in 1 MB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def read_idx(path: str | Path, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (MNIST's format), raw or gzipped.

    The header is a 4-byte magic number ``0x00 0x00 0x08 ndim`` (0x08: uint8),
    then ``ndim`` big-endian uint32 sizes, then the bytes, row-major. MNIST's
    images are 0x00000803 ``(N, 28, 28)``, its labels 0x00000801 ``(N,)``.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:    # e.g. a truncated or not-really-gzip file
        raise ValueError(f"{path} could not be read as an IDX file: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        magic = data[:4].hex() if len(data) >= 4 else data.hex()
        raise ValueError(f"{path} is not an IDX file of unsigned bytes: its magic number is "
                         f"0x{magic}, expected 0x00000803 (images) or 0x00000801 (labels)")
    ndim = data[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path} holds a {ndim}-d array (magic 0x{data[:4].hex()}), "
                         f"expected {expected_ndim}-d (magic 0x000008{expected_ndim:02x})")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path} is truncated: its header is incomplete")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    if len(data) - header_size != math.prod(shape):
        raise ValueError(f"{path} should hold {math.prod(shape)} bytes of data for shape {shape}, "
                         f"but holds {len(data) - header_size}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_MD5 = {   # Zalando Research's README (github.com/zalandoresearch/fashion-mnist)
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")


def _find_mnist_file(root: Path, name: str, download_missing: bool, fashion: bool = False) -> Path:
    # Also look where torchvision puts MNIST, so readers can reuse a download.
    for folder in (root, root / ("FashionMNIST" if fashion else "MNIST") / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    url = (FASHION_MNIST_URL if fashion else MNIST_URL) + f"{name}.gz"
    loader = "load_fashion_mnist" if fashion else "load_mnist"
    if download_missing:
        md5 = (FASHION_MNIST_MD5 if fashion else MNIST_MD5)[f"{name}.gz"]
        return download_file(url, root / f"{name}.gz", md5=md5,
                             folder_hint=f" (pass another root folder to {loader})")
    raise FileNotFoundError(
        f"{'Fashion-MNIST' if fashion else 'MNIST'} file {name} not found: looked for {root / name} and "
        f"{root / name}.gz. Download {url} into {root}, or call {loader}({str(root)!r}, download=True).")


def load_mnist(root: str | Path, train: bool = True, download: bool = False,
               image_size: int | None = None, fashion: bool = False) -> ImageDataset:
    """MNIST from the standard IDX files in ``root`` (raw or ``.gz``).

    Args:
        root: folder with ``train-images-idx3-ubyte[.gz]``,
            ``train-labels-idx1-ubyte[.gz]`` and the ``t10k-`` test files.
        train: the 60,000 training images, else the 10,000 test images.
        download: fetch missing files from :data:`MNIST_URL` with :func:`download_file`
            (needs the network; with ``$MINILIB_OFFLINE`` set it fails at once).
        image_size: resize to this side (default: keep 28).
        fashion: read Fashion-MNIST (Xiao et al. 2017) instead, the same format with ten
            kinds of clothing; :func:`load_fashion_mnist` says this for you.

    Returns:
        ImageDataset, images float32 ``(N, 1, H, W)`` in ``[-1, 1]``, labels 0-9.
    """
    root = Path(root).expanduser().resolve()
    prefix = "train" if train else "t10k"
    images_path = _find_mnist_file(root, f"{prefix}-images-idx3-ubyte", download, fashion)
    labels_path = _find_mnist_file(root, f"{prefix}-labels-idx1-ubyte", download, fashion)
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                         f"{labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path} holds labels up to {labels.max()}, expected 0-9")
    images = uint8_to_unit(images).unsqueeze(1)
    if image_size is not None:
        images = resize(images, image_size)
    class_names = list(FASHION_MNIST_CLASSES) if fashion else [str(d) for d in range(10)]
    return ImageDataset(images, torch.from_numpy(labels.astype(np.int64)), class_names,
                        name=f"{'fashion-mnist' if fashion else 'mnist'}-{prefix}")


def load_fashion_mnist(root: str | Path, train: bool = True, download: bool = False,
                       image_size: int | None = None) -> ImageDataset:
    """Fashion-MNIST from its IDX files in ``root``: :func:`load_mnist` with ``fashion=True``."""
    return load_mnist(root, train, download, image_size, fashion=True)



CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_RECORD = 1 + 3 * 32 * 32   # one label byte, then 1024 red, 1024 green, 1024 blue bytes


def read_cifar10_bin(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch -> (images uint8 ``(N, 3, 32, 32)``, labels uint8 ``(N,)``)."""
    path = Path(path)
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0 or data.size % CIFAR10_RECORD != 0:
        raise ValueError(f"{path} is not a CIFAR-10 binary batch: its size {data.size} bytes is "
                         f"not a positive multiple of the {CIFAR10_RECORD}-byte record")
    records = data.reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        raise ValueError(f"{path} holds labels up to {labels.max()}, expected 0-9; is it really "
                         f"a CIFAR-10 (not CIFAR-100) batch?")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _extract_cifar10(archive: Path, root: Path) -> None:
    """Extract only the regular files under cifar-10-batches-bin/ (no path tricks)."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 2 or parts[0] != CIFAR10_FOLDER:
                continue
            target = root / CIFAR10_FOLDER / parts[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as source, open(target, "wb") as out:
                out.write(source.read())


def load_cifar10(root: str | Path, train: bool = True, download: bool = False,
                 image_size: int | None = None) -> ImageDataset:
    """CIFAR-10 from the binary version (``cifar-10-batches-bin``), never from pickles.

    Args:
        root: folder that holds ``cifar-10-batches-bin/`` (or the ``.bin`` files themselves).
        train: the five ``data_batch_{1..5}.bin`` (50,000 images), else ``test_batch.bin``.
        download: fetch and extract :data:`CIFAR10_URL` (162 MB) if the files are missing,
            with :func:`download_file` (with ``$MINILIB_OFFLINE`` set it fails at once).
        image_size: resize to this side (default: keep 32).

    Returns:
        ImageDataset, images float32 ``(N, 3, H, W)`` in ``[-1, 1]``, labels 0-9
        named by :data:`CIFAR10_CLASSES`. (The 50,000 training images take 600 MB.)
    """
    root = Path(root).expanduser().resolve()
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if train else ["test_batch.bin"]
    folder = next((f for f in (root / CIFAR10_FOLDER, root)
                   if all((f / name).is_file() for name in names)), None)
    if folder is None and download:
        archive = download_file(CIFAR10_URL, root / "cifar-10-binary.tar.gz", md5=CIFAR10_MD5,
                                folder_hint=" (pass another root folder to load_cifar10)")
        _extract_cifar10(archive, root)
        archive.unlink()
        folder = root / CIFAR10_FOLDER
    if folder is None:
        missing = [n for n in names if not (root / CIFAR10_FOLDER / n).is_file()]
        raise FileNotFoundError(
            f"CIFAR-10 file(s) {', '.join(missing)} not found in {root / CIFAR10_FOLDER}. "
            f"Download {CIFAR10_URL} and extract it into {root} (it makes the folder "
            f"{CIFAR10_FOLDER}/), or call load_cifar10({str(root)!r}, download=True).")
    batches = [read_cifar10_bin(folder / name) for name in names]
    images = uint8_to_unit(np.concatenate([b[0] for b in batches]))
    labels = torch.from_numpy(np.concatenate([b[1] for b in batches]).astype(np.int64))
    if image_size is not None:
        images = resize(images, image_size)
    return ImageDataset(images, labels, CIFAR10_CLASSES, name="cifar10-" + ("train" if train else "test"))


# ---------------------------------------------------------------------------
# One entry point for the chapters
# ---------------------------------------------------------------------------

DATA_ENV = "MINILIB_DATA"
REAL_DATASETS = {   # name: (loader, download size, image side as stored)
    "mnist": (load_mnist, "11 MB", 28),
    "fashion-mnist": (load_fashion_mnist, "30 MB", 28),
    "cifar10": (load_cifar10, "162 MB", 32),
}
DATASETS = ("digits",) + tuple(REAL_DATASETS)


def data_root() -> Path:
    """Where downloaded datasets live: ``$MINILIB_DATA`` if set, else ``~/.cache/minilib/data``."""
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "minilib" / "data").expanduser()


def load_dataset(name: str, image_size: int | None = None, train: bool = True, limit: int | None = None,
                 root: str | Path | None = None, download: bool = True) -> ImageDataset:
    """A dataset by name, as the chapters ask for it: ``"digits"`` (scikit-learn's 8x8 digits, no
    download), ``"mnist"``, ``"fashion-mnist"`` (28x28 grey) or ``"cifar10"`` (32x32 colour).

    The real datasets are read from ``root/<name>`` (default :func:`data_root`), downloaded there
    once if missing (the size is printed first) and checked against the publishers' MD5 sums.

    Args:
        image_size: resize to this side (MNIST's 28 -> 32 matches the book's 32x32 models).
        train: the training split (the test split otherwise; ``digits`` has only one).
        limit: keep the first ``limit`` images (e.g. to fit a small budget).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if limit is not None:
        check_number(limit, "limit", low=1, integer=True)
    if name == "digits":
        dataset = load_digits(image_size or 8)
    else:
        loader, size, _ = REAL_DATASETS[name]
        folder = Path(root or data_root()) / name
        try:
            dataset = loader(folder, train=train, download=False, image_size=image_size)
        except FileNotFoundError:
            if not download:
                raise
            print(f"{name} is not in {folder}: downloading it once ({size}) ...", flush=True)
            dataset = loader(folder, train=train, download=True, image_size=image_size)
    if limit is not None and limit < len(dataset):
        dataset = dataset.subset(torch.arange(limit))
    return dataset


def write_miniature_files(root: str | Path, images_per_split: int = 64, seed: int = 0) -> Path:
    """Write tiny stand-ins for MNIST, Fashion-MNIST and CIFAR-10 into ``root/<name>``, in the real
    file formats (gzipped IDX, CIFAR-10's binary batches), so that code which reads the real
    datasets can be run without the network (the tests do this). The pixels are random; the
    labels cycle through 0-9. Returns ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    labels = (np.arange(images_per_split) % 10).astype(np.uint8)
    for name in ("mnist", "fashion-mnist"):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for prefix in ("train", "t10k"):
            pixels = rng.integers(0, 256, size=(images_per_split, 28, 28), dtype=np.uint8)
            _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", pixels)
            _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    folder = root / "cifar10" / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        pixels = rng.integers(0, 256, size=(images_per_split, 3 * 32 * 32), dtype=np.uint8)
        np.concatenate([labels[:, None], pixels], axis=1).tofile(folder / name)
    return root


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
