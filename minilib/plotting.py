"""Pictures for the notebooks: image grids, training curves, heatmaps.

Every function draws with matplotlib and returns the ``Figure``. None calls
``plt.show()``: a notebook displays the figure of a cell by itself. (If the
call is the last line of a cell, end it with ``;`` or assign the result, or
Jupyter shows the figure twice.)

Images follow the library's convention: tensors ``(N, C, H, W)`` with ``C`` 1
(greyscale) or 3 (RGB) and values in ``[-1, 1]``; values outside are clipped.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from .training import moving_average


def _to_numpy_images(images) -> np.ndarray:
    """(N, C, H, W) tensor/array in [-1, 1] -> float (N, H, W, C) array in [0, 1]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        hint = " (for a single image, pass images[None])" if images.ndim == 3 else ""
        raise ValueError(f"expected images of shape (N, C, H, W), got shape {images.shape}{hint}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 (grey) or 3 (RGB) channels in dim 1 of (N, C, H, W), got "
                         f"shape {images.shape}; channels-last images need .permute(0, 3, 1, 2)")
    if images.shape[0] == 0:
        raise ValueError("got zero images to show")
    return (np.clip(images, -1, 1).transpose(0, 2, 3, 1) + 1) / 2


def image_grid(images, nrow: int | None = None, padding: int = 1,
               pad_value: float = 1.0) -> np.ndarray:
    """Tile a batch of images into one picture.

    Args:
        images: ``(N, C, H, W)`` tensor or array in ``[-1, 1]``, C = 1 or 3.
        nrow: images per row (default: about square, ``ceil(sqrt(N))``).
        padding: pixels between images and around the border.
        pad_value: brightness of the padding in ``[0, 1]`` (1 = white).

    Returns:
        float32 array ``(H', W', C)`` in ``[0, 1]``, where
        ``H' = rows * (H + padding) + padding`` and likewise for W'.
    """
    tiles = _to_numpy_images(images)
    n, h, w, c = tiles.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    ncol_images, rows = min(nrow, n), math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, ncol_images * (w + padding) + padding, c),
                   pad_value, dtype=np.float32)
    for i, tile in enumerate(tiles):
        top = padding + (i // nrow) * (h + padding)
        left = padding + (i % nrow) * (w + padding)
        grid[top:top + h, left:left + w] = tile
    return grid


def _imshow(ax, picture: np.ndarray) -> None:
    """Show an (H, W, C) picture in [0, 1] with crisp pixels and no axes."""
    if picture.shape[-1] == 1:
        ax.imshow(picture[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(picture, interpolation="nearest")
    ax.set_axis_off()


def show_images(images, nrow: int | None = None, titles: Sequence[str] | None = None,
                ax=None, figsize: tuple[float, float] | None = None, title: str | None = None,
                padding: int = 1):
    """Show a batch of images as a grid.

    Args:
        images: ``(N, C, H, W)`` in ``[-1, 1]``, C = 1 or 3.
        nrow: images per row (default about square).
        titles: one short title per image (e.g. class names or captions); each
            image then gets its own small panel.
        ax: draw into this Axes instead of a new figure (not with ``titles``).
        figsize: figure size in inches (default grows with the grid).
        title: one title over the whole grid.

    Returns:
        the matplotlib Figure.
    """
    tiles = _to_numpy_images(images)
    n = tiles.shape[0]
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    if titles is None:
        if ax is None:
            size = figsize or (min(1.0 * min(nrow, n), 12), min(1.0 * rows, 12))
            fig, ax = plt.subplots(figsize=size)
        _imshow(ax, image_grid(images, nrow, padding))
        if title:
            ax.set_title(title)
        return ax.figure

    if len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} images")
    if ax is not None:
        raise ValueError("titles draws one panel per image, so it needs a new figure; drop ax")
    fig, axes = plt.subplots(rows, nrow, figsize=figsize or (1.6 * nrow, 1.8 * rows),
                             squeeze=False)
    for i, panel in enumerate(axes.flat):
        panel.set_axis_off()
        if i < n:
            _imshow(panel, tiles[i])
            panel.set_title(titles[i], fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(curves: Mapping[str, Sequence[float]], smooth: int = 1, xlabel: str = "step",
                ylabel: str = "loss", logy: bool = False, ax=None,
                figsize: tuple[float, float] = (6, 3.5), title: str | None = None):
    """Plot named curves (e.g. training losses) against their index.

    Args:
        curves: ``{"name": values}``; values a list, array or 1-d tensor.
        smooth: window of a trailing moving average; with ``smooth > 1`` the
            raw values are drawn faintly behind the smoothed line.
        logy: log-scale y axis (losses often span decades).

    Returns:
        the matplotlib Figure.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise TypeError('curves must be a non-empty dict like {"train loss": losses}')
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    for name, values in curves.items():
        values = np.asarray(torch.as_tensor(values).detach().cpu(), dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"curve {name!r} must be 1-d, got shape {values.shape}")
        if smooth > 1:
            line, = ax.plot(values, alpha=0.25)
            ax.plot(moving_average(values, smooth), color=line.get_color(), label=name)
        else:
            ax.plot(values, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax.figure


def plot_heatmap(matrix, row_labels: Sequence[str] | None = None,
                 col_labels: Sequence[str] | None = None, ax=None, cmap: str = "viridis",
                 title: str | None = None, colorbar: bool = True, annotate: bool = False,
                 vmin: float | None = None, vmax: float | None = None,
                 figsize: tuple[float, float] = (5, 4), xlabel: str = "", ylabel: str = ""):
    """Show a 2-d matrix (attention map, confusion matrix, mask) as colours.

    Args:
        matrix: ``(R, C)`` tensor or array.
        row_labels / col_labels: tick labels, one per row / column.
        annotate: write each value in its cell (for small matrices).

    Returns:
        the matplotlib Figure.
    """
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().float().cpu().numpy()
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-d matrix (R, C), got shape {matrix.shape}")
    for labels, size, what in ((row_labels, matrix.shape[0], "row_labels"),
                               (col_labels, matrix.shape[1], "col_labels")):
        if labels is not None and len(labels) != size:
            raise ValueError(f"{what} has {len(labels)} entries for {size} {what[:3]}s")
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest",
                      aspect="auto")
    if row_labels is not None:
        ax.set_yticks(range(len(row_labels)), labels=row_labels)
    if col_labels is not None:
        ax.set_xticks(range(len(col_labels)), labels=col_labels, rotation=90)
    if annotate:
        middle = (np.nanmin(matrix) + np.nanmax(matrix)) / 2
        for (r, c), value in np.ndenumerate(matrix):
            ax.text(c, r, f"{value:.2g}", ha="center", va="center", fontsize=7,
                    color="black" if value > middle else "white")
    if colorbar:
        ax.figure.colorbar(image, ax=ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax.figure
