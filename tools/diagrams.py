"""Draw the book's explanatory diagrams into book/images/ (matplotlib only).

    python tools/diagrams.py              # all of them
    python tools/diagrams.py dit_block    # one (names below)

| name | used in | shows |
|---|---|---|
| primer | book/primer.md | noise, denoiser, sampler: the three words of Part II |
| dit_block | chapter 3 | a DiT block and the six vectors its adaLN-Zero layer regresses from c |
| sd3_joint_attention | chapter 7 | SD3's two streams and the 2x2 blocks of one joint attention |
| fewshot_pipeline | chapter 8 | support set -> sViT -> context -> DiT |
| generation_orders | chapter 10 | raster, MaskGIT and VAR orders on a 4x4 token grid |
| ar_maskgit_mar | chapter 11 | what AR, MaskGIT and MAR predict per step, and from what |

The pictures are committed; a test re-draws each one to check that this script still
runs (tests/test_diagrams.py). Widths are chosen to be read at the website's text
column (about 650-900 pixels).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "book" / "images"

BLUE, ORANGE, GREEN, PURPLE, GREY = "#3b6fb6", "#c8702a", "#3d8b50", "#7b4fa8", "#666666"
FILLS = {BLUE: "#e3eefa", ORANGE: "#fdebd9", GREEN: "#e2f3e6", PURPLE: "#efe6f6", GREY: "#f0f0f0"}


def box(ax, x, y, w, h, text, colour=BLUE, size=9, weight="normal"):
    """A rounded box centred at (x, y) in data coordinates."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.06",
                                facecolor=FILLS.get(colour, "white"), edgecolor=colour, linewidth=1.4))
    ax.text(x, y, text, ha="center", va="center", fontsize=size, weight=weight)


def arrow(ax, start, end, colour=GREY, style="-|>", width=1.3, rad=0.0, label=None, label_offset=(0, 0)):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=colour, linewidth=width,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))
    if label:
        ax.text((start[0] + end[0]) / 2 + label_offset[0], (start[1] + end[1]) / 2 + label_offset[1], label,
                fontsize=8, color=colour, ha="center", va="center")


def canvas(width, height, xlim, ylim):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


# --- the diagrams ---------------------------------------------------------------------------


def primer():
    """Noise, denoiser, sampler on real digits (scikit-learn's, 8x8)."""
    from sklearn.datasets import load_digits
    digits = load_digits().images[[0, 3, 7]] / 16.0 * 2 - 1  # three digits in [-1, 1]
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(digits.shape)
    times = [0.0, 0.25, 0.5, 0.75, 1.0]
    fig = plt.figure(figsize=(9.5, 4.6))
    fig.text(0.02, 0.95, "1  Noise: the forward process mixes data and Gaussian noise, "
             "$x_t = (1-t)\\,x_0 + t\\,\\varepsilon$ (or DDPM's $\\sqrt{\\bar\\alpha_t}x_0 + \\sqrt{1-\\bar\\alpha_t}\\varepsilon$)",
             fontsize=9.5, weight="bold")
    for i, t in enumerate(times):
        ax = fig.add_axes([0.06 + i * 0.13, 0.58, 0.1, 0.3])
        ax.imshow((1 - t) * digits[0] + t * noise[0], cmap="gray", vmin=-2, vmax=2)
        ax.set_title(f"t = {t:g}" + (" (data $x_0$)" if t == 0 else " (noise)" if t == 1 else ""), fontsize=8)
        ax.axis("off")
    ax = fig.add_axes([0.70, 0.55, 0.28, 0.36])
    ax.axis("off")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    box(ax, 0.5, 0.55, 0.95, 0.42, "2  Denoiser: a network $f_\\theta(x_t, t, y)$\n"
        "predicts the noise $\\varepsilon$, the data $x_0$,\nor the velocity $\\varepsilon - x_0$ "
        "(one is enough:\nthe others follow from $x_t$ and $t$)", ORANGE, size=8.5)
    fig.text(0.02, 0.44, "3  Sampler: start from pure noise and call the denoiser again and again, "
             "each call moving to a lower noise level (DDPM, DDIM, Euler, Heun, DPM-Solver++)",
             fontsize=9.5, weight="bold")
    steps = [1.0, 0.75, 0.5, 0.25, 0.0]
    for i, t in enumerate(steps):
        ax = fig.add_axes([0.06 + i * 0.18, 0.06, 0.1, 0.3])
        ax.imshow((1 - t) * digits[1] + t * noise[1], cmap="gray", vmin=-2, vmax=2)
        ax.set_title(f"t = {t:g}", fontsize=8)
        ax.axis("off")
        if i < len(steps) - 1:
            fig.patches.append(FancyArrowPatch((0.165 + i * 0.18, 0.21), (0.235 + i * 0.18, 0.21),
                                               transform=fig.transFigure, arrowstyle="-|>", mutation_scale=12,
                                               color=ORANGE, linewidth=1.4))
            fig.text(0.2 + i * 0.18, 0.25, "$f_\\theta$", fontsize=9, color=ORANGE, ha="center")
    return fig


def dit_block():
    """A DiT block: two residual branches, each LayerNorm -> modulate -> op -> gate."""
    fig, ax = canvas(9.0, 6.2, (0, 10.8), (0, 7.3))
    x = 3.2
    rows = [(0.5, "tokens $x$  (B, L, D)", GREY), (1.4, "LayerNorm (no affine)", BLUE),
            (2.2, "modulate: $x(1+\\gamma_1)+\\beta_1$", BLUE), (3.0, "self-attention", BLUE),
            (3.8, "$\\times\\,\\alpha_1$  (gate), then $+$ residual", BLUE), (4.6, "LayerNorm (no affine)", GREEN),
            (5.4, "modulate: $x(1+\\gamma_2)+\\beta_2$", GREEN), (6.2, "MLP", GREEN)]
    for y, text, colour in rows:
        box(ax, x, y, 3.3, 0.55, text, colour, size=8.5)
    for (y0, _, _), (y1, _, _) in zip(rows[:-1], rows[1:]):
        arrow(ax, (x, y0 + 0.28), (x, y1 - 0.28))
    box(ax, x, 7.0, 3.3, 0.5, "$\\times\\,\\alpha_2$  (gate), then $+$ residual", GREEN, size=8.5)
    arrow(ax, (x, 6.48), (x, 6.75))
    # residual connections
    arrow(ax, (x - 1.7, 0.5), (x - 1.7, 3.85), colour=GREY, rad=0.0)
    ax.text(x - 1.95, 2.2, "residual", rotation=90, fontsize=8, color=GREY, va="center")
    ax.text(x - 1.75, 4.05, "+", fontsize=13, color=GREY, ha="center")
    arrow(ax, (x - 1.7, 4.3), (x - 1.7, 6.95), colour=GREY)
    ax.text(x - 1.95, 5.6, "residual", rotation=90, fontsize=8, color=GREY, va="center")
    # the conditioning
    box(ax, 8.1, 0.7, 3.2, 0.7, "$c = \\mathrm{emb}(t) + \\mathrm{emb}(y)$  (B, D)", ORANGE, size=8.5)
    box(ax, 8.1, 2.0, 3.2, 0.9, "adaLN_modulation:\nSiLU, Linear(D, 6D)\nzero-initialised", ORANGE, size=8.5)
    arrow(ax, (8.1, 1.07), (8.1, 1.53), colour=ORANGE)
    vectors = [(2.2, "$\\beta_1, \\gamma_1$"), (3.8, "$\\alpha_1$"), (5.4, "$\\beta_2, \\gamma_2$"), (7.0, "$\\alpha_2$")]
    for y, label in vectors:
        arrow(ax, (8.1, 2.47), (x + 1.7, y), colour=ORANGE, rad=0.0)
        ax.text(x + 2.05, y + 0.18, label, fontsize=9, color=ORANGE)
    ax.text(9.0, 4.4, "six vectors of size D:\n$\\beta_1, \\gamma_1, \\alpha_1, \\beta_2, \\gamma_2, \\alpha_2$\n"
            "(shift_msa, scale_msa, gate_msa,\nshift_mlp, scale_mlp, gate_mlp)\n\nat initialisation all are 0:\n"
            "both gates closed, the block\nis the identity", fontsize=8, ha="center", va="bottom", color=ORANGE)
    return fig


def sd3_joint_attention():
    """SD3's MM-DiT block: two streams with their own weights, one attention over both."""
    fig = plt.figure(figsize=(10, 4.8))
    ax = fig.add_axes([0.0, 0.0, 0.62, 1.0])
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 8)
    ax.axis("off")
    for x, name, colour in [(2.2, "text tokens $c$\n(B, $L_c$, D)", ORANGE), (7.8, "image tokens $x$\n(B, $L_x$, D)", BLUE)]:
        box(ax, x, 0.7, 3.2, 0.9, name, colour, size=8.5)
        box(ax, x, 2.1, 3.2, 0.9, "LayerNorm + modulate\n(own adaLN from $t$, pooled text)", colour, size=8)
        box(ax, x, 3.5, 3.2, 0.7, "own Linear to Q, K, V", colour, size=8.5)
        box(ax, x, 6.1, 3.2, 0.7, "own output proj, gate, MLP", colour, size=8.5)
        arrow(ax, (x, 1.15), (x, 1.65))
        arrow(ax, (x, 2.55), (x, 3.15))
        arrow(ax, (x, 3.85), (5.0 + (x - 5.0) * 0.35, 4.45))
        arrow(ax, (5.0 + (x - 5.0) * 0.35, 5.15), (x, 5.75))
        box(ax, x, 7.3, 3.2, 0.6, "to the next block", colour, size=8)
        arrow(ax, (x, 6.45), (x, 7.0))
    box(ax, 5.0, 4.8, 4.4, 0.7, "one attention over the concatenation [c ; x]", PURPLE, size=8.5)
    ax2 = fig.add_axes([0.66, 0.18, 0.3, 0.64])
    Lc, Lx = 3, 6
    grid = np.zeros((Lc + Lx, Lc + Lx))
    grid[:Lc, :Lc], grid[:Lc, Lc:], grid[Lc:, :Lc], grid[Lc:, Lc:] = 0, 1, 2, 3
    colours = matplotlib.colors.ListedColormap([FILLS[ORANGE], "#f6dcc9", "#d5e4f5", FILLS[BLUE]])
    ax2.imshow(grid, cmap=colours, vmin=-0.5, vmax=3.5)
    ax2.axhline(Lc - 0.5, color="k", lw=1.2)
    ax2.axvline(Lc - 0.5, color="k", lw=1.2)
    for (r, c), text in {(1, 1): "text\nto text", (1, 6): "text to image", (6, 1): "image\nto text",
                         (6, 6): "image to image"}.items():
        ax2.text(c, r, text, ha="center", va="center", fontsize=8)
    ax2.set_xticks([1, 6], ["keys: text", "keys: image"], fontsize=8)
    ax2.set_yticks([1, 6], ["queries:\ntext", "queries:\nimage"], fontsize=8)
    ax2.set_title("the attention matrix of one joint attention:\nfour blocks, no mask (padding is attended too)",
                  fontsize=8.5)
    return fig


def fewshot_pipeline():
    """VFSDDPM: a support set becomes one context vector that steers a DiT."""
    from sklearn.datasets import load_digits
    images = load_digits().images[[3, 13, 23, 33, 43]] / 16.0
    fig = plt.figure(figsize=(10, 3.2))
    for i, image in enumerate(images):
        ax = fig.add_axes([0.01 + i * 0.055, 0.42, 0.05, 0.2])
        ax.imshow(image, cmap="gray_r")
        ax.axis("off")
    fig.text(0.14, 0.3, "support set: 5 images\nof one (new) class", ha="center", fontsize=8.5)
    ax = fig.add_axes([0.29, 0.0, 0.71, 1.0])
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 4.5)
    ax.axis("off")
    arrow(ax, (-0.25, 2.3), (0.35, 2.3))
    box(ax, 1.45, 2.3, 2.0, 1.5, "shifted patch\ntokens (SPT)\n+ positions\nper patch", GREEN, size=8.5)
    box(ax, 3.85, 2.3, 2.1, 1.5, "sViT: locality\nself-attention\nblocks over all\n5 images' tokens", GREEN, size=8.5)
    box(ax, 5.95, 2.3, 1.4, 1.0, "[CLS]:\ncontext\nvector", GREEN, size=8.5)
    box(ax, 8.45, 2.3, 2.4, 1.6, "DiT: adaLN from\n$c = \\mathrm{emb}(t) + W\\,\\mathrm{ctx}$\n(or context as\nextra tokens)",
        BLUE, size=8.5)
    arrow(ax, (2.47, 2.3), (2.78, 2.3))
    arrow(ax, (4.92, 2.3), (5.23, 2.3))
    arrow(ax, (6.67, 2.3), (7.23, 2.3))
    ax.text(8.45, 4.05, "noisy image $x_t$, time $t$", ha="center", fontsize=8.5)
    arrow(ax, (8.45, 3.85), (8.45, 3.12))
    ax.text(8.45, 0.55, "a new image of the set's class", ha="center", fontsize=8.5)
    arrow(ax, (8.45, 1.48), (8.45, 0.8))
    ax.text(3.0, 0.5, "training: leave one out (each image of a set is generated from the other ones)",
            fontsize=8, color=GREY, ha="center")
    return fig


def generation_orders():
    """In which step each token of a 4x4 grid is generated: raster, MaskGIT, VAR."""
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    raster = np.arange(1, 17).reshape(4, 4)
    rng = np.random.default_rng(3)
    maskgit = np.zeros(16, dtype=int)
    maskgit[rng.permutation(16)] = np.repeat([1, 2, 3, 4], [1, 2, 5, 8])  # cosine-like schedule: few first
    panels = [(raster, "raster (GPT-style): 16 steps,\none token each, left to right", "Blues"),
              (maskgit.reshape(4, 4), "MaskGIT: 4 steps, the most\nconfident predictions kept", "Oranges")]
    for ax, (steps, title, cmap) in zip(axes[:2], panels):
        ax.imshow(steps, cmap=cmap, vmin=0, vmax=steps.max() * 1.3)
        for (r, c), value in np.ndenumerate(steps):
            ax.text(c, r, str(value), ha="center", va="center", fontsize=10)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[2]
    ax.set_xlim(-0.5, 10.5)
    ax.set_ylim(-0.5, 4.5)
    ax.set_aspect("equal")
    ax.axis("off")
    x = 0
    for step, side in enumerate([1, 2, 3, 4], start=1):
        cell = 1.0 if side < 4 else 0.75
        for r in range(side):
            for c in range(side):
                ax.add_patch(Rectangle((x + c * cell, 4 - (r + 1) * cell), cell, cell, facecolor=FILLS[GREEN],
                                       edgecolor=GREEN))
        ax.text(x + side * cell / 2, 4 - side * cell - 0.45, f"step {step}\n{side}x{side}", ha="center", va="top",
                fontsize=8)
        x += side * cell + 0.4
    ax.set_title("VAR: 4 steps, one whole scale each\n(all tokens of a scale in parallel)", fontsize=9)
    fig.suptitle("The number in a token is the step that generates it", fontsize=9.5, y=0.02)
    return fig


def ar_maskgit_mar():
    """What each kind of model conditions on and predicts in one step."""
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.9))
    specs = [
        ("Autoregressive (raster)", "causal transformer", "sees: the tokens before", "predicts: the next token",
         "discrete, softmax over a codebook", "order fixed, 1 token/step", BLUE),
        ("MaskGIT", "bidirectional transformer\nwith [MASK] tokens", "sees: all known tokens", "predicts: every masked token",
         "discrete, softmax; keeps the\nmost confident ones", "order by confidence, 8-12 steps", ORANGE),
        ("MAR", "bidirectional encoder-decoder\n(MAE-style, buffer tokens)", "sees: all known tokens",
         "predicts: a random subset", "continuous, a small diffusion\nhead samples each token",
         "random order, many per step", GREEN),
    ]
    for ax, (title, net, sees, predicts, kind, order, colour) in zip(axes, specs):
        ax.set_xlim(0, 4)
        ax.set_ylim(0, 5.2)
        ax.axis("off")
        ax.set_title(title, fontsize=10, color=colour, weight="bold")
        box(ax, 2, 4.3, 3.7, 0.85, net, colour, size=8.5)
        for y, text in [(3.3, sees), (2.5, predicts), (1.5, kind), (0.5, order)]:
            ax.text(2, y, text, ha="center", va="center", fontsize=8.5)
    return fig


DIAGRAMS = {"primer": primer, "dit_block": dit_block, "sd3_joint_attention": sd3_joint_attention,
            "fewshot_pipeline": fewshot_pipeline, "generation_orders": generation_orders,
            "ar_maskgit_mar": ar_maskgit_mar}


def draw(name: str, folder: Path = OUTPUT) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fig = DIAGRAMS[name]()
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Draw the book's diagrams into book/images/.")
    parser.add_argument("names", nargs="*", help=f"some of {sorted(DIAGRAMS)} (default: all)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(DIAGRAMS)
    if unknown:
        parser.error(f"unknown diagram(s) {sorted(unknown)}; choose from {sorted(DIAGRAMS)}")
    for name in args.names or sorted(DIAGRAMS):
        print(draw(name, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
