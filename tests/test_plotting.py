"""Tests for minilib.plotting (rendered off-screen with the Agg backend)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from minilib.plotting import image_grid, plot_curves, plot_heatmap, show_images  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_image_grid_layout_and_values():
    images = torch.stack([torch.full((3, 4, 5), v) for v in (-1.0, 0.0, 1.0)])   # (3, 3, 4, 5)
    grid = image_grid(images, nrow=2, padding=1, pad_value=0.5)
    assert grid.shape == (2 * (4 + 1) + 1, 2 * (5 + 1) + 1, 3)
    assert np.all(grid[1:5, 1:6] == 0.0)          # -1 -> black
    assert np.all(grid[1:5, 7:12] == 0.5)         # 0 -> mid grey
    assert np.all(grid[6:10, 1:6] == 1.0)         # 1 -> white
    assert np.all(grid[6:10, 7:12] == 0.5)        # empty cell stays padding
    assert grid[0, 0, 0] == 0.5


def test_image_grid_clips_and_keeps_one_channel():
    grid = image_grid(torch.full((4, 1, 2, 2), 3.0), padding=0)
    assert grid.shape == (4, 4, 1) and grid.max() == 1.0


def test_wrong_ranks_and_channels_are_clear_errors():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*images\[None\]"):
        image_grid(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\) channels"):
        show_images(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match="2-d matrix"):
        plot_heatmap(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="must be 1-d"):
        plot_curves({"loss": np.zeros((3, 3))})


def test_show_images_draws_the_grid():
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    fig = show_images(images, nrow=3, title="samples")
    assert isinstance(fig, Figure)
    shown = fig.axes[0].get_images()[0].get_array()
    np.testing.assert_allclose(np.asarray(shown), image_grid(images, nrow=3), atol=1e-6)


def test_show_images_with_titles_gives_one_panel_each():
    fig = show_images(torch.zeros(5, 1, 8, 8), nrow=3, titles=list("abcde"))
    titled = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert titled == list("abcde")
    with pytest.raises(ValueError, match="2 titles for 5 images"):
        show_images(torch.zeros(5, 1, 8, 8), titles=["a", "b"])


def test_show_images_into_an_existing_axes():
    fig, ax = plt.subplots()
    assert show_images(torch.zeros(2, 1, 4, 4), ax=ax) is fig


def test_plot_curves():
    losses = list(np.linspace(1, 0.1, 100))
    fig = plot_curves({"train": losses, "test": torch.linspace(1, 0.2, 100)}, smooth=10, logy=True)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "step"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "test"]
    assert len(ax.get_lines()) == 4                 # raw + smoothed per curve
    with pytest.raises(TypeError, match="non-empty dict"):
        plot_curves([1, 2, 3])


def test_plot_heatmap():
    matrix = torch.arange(6.0).view(2, 3)
    fig = plot_heatmap(matrix, row_labels=["a", "b"], col_labels=["x", "y", "z"], annotate=True)
    np.testing.assert_array_equal(fig.axes[0].get_images()[0].get_array(), matrix.numpy())
    assert len(fig.axes) == 2                       # the heatmap and its colour bar
    with pytest.raises(ValueError, match="row_labels has 3 entries for 2 rows"):
        plot_heatmap(matrix, row_labels=["a", "b", "c"])
