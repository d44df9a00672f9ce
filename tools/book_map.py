"""Draw the map of the book for the landing page: book/images/book_map.png.

    python tools/book_map.py                    # writes book/images/book_map.png
    python tools/book_map.py --output map.png   # somewhere else

Each chapter is a box with what it builds, coloured by the part of the book it
belongs to; arrows show which chapters a chapter builds on. Part V sits in a
row of its own under chapter 13, and its boxes name the chapter each one builds
on instead of drawing arrows across the chapter-13 band. Only matplotlib is
needed. The picture is drawn to be read between about 650 pixels wide (the
text column of the website) and 900.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402
from matplotlib.path import Path as Path_  # noqa: E402
from matplotlib.transforms import Affine2D  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "book" / "images" / "book_map.png"

# part: (header, fill colour, edge colour)
PARTS = {
    1: ("Part I · Building blocks", "#e3eefa", "#3b6fb6"),
    2: ("Part II · Diffusion and flows", "#fdebd9", "#c8702a"),
    3: ("Part III · Autoregression", "#e2f3e6", "#3d8b50"),
    4: ("Part IV · The real models", "#efe6f6", "#7b4fa8"),
    5: ("Part V · After SD3", "#fbe5ea", "#b03a5b"),
}

# chapter: (part, column, row, title, what it builds)
CHAPTERS = {
    1: (1, 0, 0, "Images as tokens", "patch embedding,\n2-D sin-cos positions"),
    2: (1, 0, 1, "Timestep embedding", "sinusoidal features,\nthe null class"),
    3: (1, 0, 2, "adaLN modulation", "conditioning with\nadaLN-Zero blocks"),
    4: (1, 0, 3, "Latent autoencoders", "a KL autoencoder\nand its latent space"),
    5: (2, 1, 0, "Diffusion transformer", "a latent DiT: DDPM,\nDDIM and guidance"),
    6: (2, 1, 1, "Flow matching", "rectified flow,\nEuler and Heun steps"),
    7: (2, 1, 2, "MM-DiT", "SD3's joint attention\nfor text-to-image"),
    8: (2, 1, 3, "Few-shot generation", "VFSDDPM: a set\nencoder steers a DiT"),
    9: (3, 2, 0, "Vector quantisation", "codebooks and\nmulti-scale residual VQ"),
    10: (3, 2, 1, "VAR", "next-scale prediction\nwith a KV cache"),
    11: (3, 2, 2, "Masked autoregression", "MAR: many tokens per\nstep, in random order"),
    12: (3, 2, 3, "The diffusion loss", "a tiny diffusion\nmodel per token"),
}
REAL_MODELS = (13, "The real models", "every model at full size, and the official DiT, VAR and MAR weights in the book's code")
# Part V, one box per column under chapter 13: chapter: (column, title, what it builds, chapter it builds on)
AFTER_SD3 = {
    14: (0, "Few-step generation", "MeanFlow: one or two\nnetwork calls per image", 6),
    15: (1, "REPA", "aligning a DiT block\nwith a frozen encoder", 5),
    16: (2, "FLUX", "single-stream blocks\nand 2-D rotary positions", 7),
}

# (from, to, how the arrow leaves and enters: side of each box, curvature)
DEPENDENCIES = [
    (5, 6, "bottom", "top", 0.0),
    (6, 7, "bottom", "top", 0.0),
    (9, 10, "bottom", "top", 0.0),
    (12, 11, "top", "bottom", 0.0),
]

COLUMN_X = [0.02, 0.35, 0.68]      # left edge of each column (figure fraction)
BOX_W, BOX_H = 0.30, 0.145
TOP, ROW_STEP = 0.70, 0.175        # bottom edge of row 0, distance between rows
BADGE = 0.05                       # room for the chapter number on the left of a box
ARROW = "#5f6670"
PART5_Y, PART5_H = -0.245, 0.18    # bottom edge and height of Part V's boxes (below the chapter-13 band)
# Parts I-IV are laid out in fractions of a 7.6-inch-high frame; Part V extends it downwards (negative y).
FRAME_H, BELOW = 7.6, 1.95         # inches
FIGSIZE, DPI = (9.0, FRAME_H + BELOW), 200   # shown about 650-900 px wide: fonts of 11 pt and more stay legible


def frame(fig) -> Affine2D:
    """Transform from layout coordinates (x: figure fraction, y: fraction of FRAME_H above Part V) to the figure."""
    height = FRAME_H + BELOW
    return Affine2D().scale(1, FRAME_H / height).translate(0, BELOW / height) + fig.transFigure


def box_xy(chapter: int) -> tuple[float, float]:
    _, column, row, _, _ = CHAPTERS[chapter]
    return COLUMN_X[column], TOP - row * ROW_STEP


def anchor(chapter: int, side: str) -> tuple[float, float]:
    """A point on a box's side: "left", "right", "top", "bottom", or "left@0.8" (a fraction of the height)."""
    x, y = box_xy(chapter)
    side, _, fraction = side.partition("@")
    height = float(fraction) if fraction else 0.5
    return {"left": (x, y + BOX_H * height), "right": (x + BOX_W, y + BOX_H * height),
            "top": (x + BOX_W / 2, y + BOX_H), "bottom": (x + BOX_W / 2, y)}[side]


def text_width(fig, text: str, **style) -> float:
    """Width of a piece of text in figure fractions."""
    artist = fig.text(0, 0, text, **style)
    width = artist.get_window_extent(fig.canvas.get_renderer()).width / fig.bbox.width
    artist.remove()
    return width


def wrap(fig, text: str, width: float, **style) -> str:
    """Break text into lines no wider than ``width`` (figure fraction), word by word, keeping its line breaks."""
    if "\n" in text:
        return "\n".join(wrap(fig, part, width, **style) for part in text.split("\n"))
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and text_width(fig, trial, **style) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return "\n".join(lines + [line])


def draw_box(fig, x, y, w, h, number, title, builds, part, tag="", note="") -> None:
    _, fill, edge = PARTS[part]
    fig.patches.append(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.012",
                                      transform=frame(fig), facecolor=fill, edgecolor=edge, linewidth=1.6))
    fig.text(x + BADGE / 2 + 0.004, y + h - 0.036, str(number), ha="center", va="center", fontsize=13,
             fontweight="bold", color="white", transform=frame(fig),
             bbox=dict(boxstyle="circle,pad=0.25", facecolor=edge, edgecolor="none"))
    room = w - BADGE - 0.012
    title_style = dict(fontsize=13.5, fontweight="bold")
    while text_width(fig, title, **title_style) > room:     # shrink a long title until it fits
        title_style["fontsize"] -= 0.25
    fig.text(x + BADGE + 0.004, y + h - 0.036, title, ha="left", va="center", color="#1f2328",
             transform=frame(fig), **title_style)
    builds_style = dict(fontsize=11.5, linespacing=1.25)
    fig.text(x + BADGE + 0.004, y + h - 0.064, wrap(fig, builds, room, **builds_style), ha="left", va="top",
             color="#3c4148", transform=frame(fig), **builds_style)
    if tag:
        fig.text(x + w - 0.015, y + h - 0.036, tag, ha="right", va="center", fontsize=13, fontweight="bold",
                 color=edge, transform=frame(fig))
    if note:
        fig.text(x + BADGE + 0.004, y + 0.014, note, ha="left", va="bottom", fontsize=11.5, style="italic",
                 color=edge, transform=frame(fig))


def draw_arrow(fig, start, end, curvature=0.0, style="-|>", lw=1.6) -> None:
    fig.patches.append(FancyArrowPatch(start, end, transform=frame(fig), arrowstyle=style,
                                       mutation_scale=14, linewidth=lw, color=ARROW,
                                       connectionstyle=f"arc3,rad={curvature}", shrinkA=2, shrinkB=2))


def draw_route(fig, points, lw=1.6, bridge=False) -> None:
    """An arrow along a polyline of figure-fraction points (right-angled routes between the boxes).

    With ``bridge`` a white halo makes it pass visibly *over* the lines it crosses.
    """
    path = Path_(points, [Path_.MOVETO] + [Path_.LINETO] * (len(points) - 1))
    arrow = FancyArrowPatch(path=path, transform=frame(fig), arrowstyle="-|>", mutation_scale=14,
                            linewidth=lw, color=ARROW, joinstyle="round", capstyle="butt", zorder=3)
    if bridge:
        arrow.set_path_effects([patheffects.withStroke(linewidth=6, foreground="white"), patheffects.Normal()])
    fig.patches.append(arrow)


def draw() -> plt.Figure:
    fig = plt.figure(figsize=FIGSIZE, dpi=DPI)
    fig.patch.set_facecolor("white")
    fig.text(0.5, 0.968, "What you will build, chapter by chapter", ha="center", va="center",
             fontsize=16, fontweight="bold", color="#1f2328", transform=frame(fig))
    fig.text(0.5, 0.93, "an arrow points from a chapter to one that builds on it", ha="center",
             va="center", fontsize=11.5, color="#5f6670", style="italic", transform=frame(fig))

    for part, column in [(1, 0), (2, 1), (3, 2)]:
        header, _, edge = PARTS[part]
        fig.text(COLUMN_X[column] + BOX_W / 2, TOP + BOX_H + 0.03, header, ha="center", va="center",
                 fontsize=13.5, fontweight="bold", color=edge, transform=frame(fig))

    for number, (part, _, _, title, builds) in CHAPTERS.items():
        x, y = box_xy(number)
        draw_box(fig, x, y, BOX_W, BOX_H, number, title, builds, part)

    for start, end, side_a, side_b, curvature in DEPENDENCIES:
        draw_arrow(fig, anchor(start, side_a), anchor(end, side_b), curvature)

    # All of Part I feeds the DiT: one bus in the gap between the first two columns.
    bus_x = (COLUMN_X[0] + BOX_W + COLUMN_X[1]) / 2
    ys = [anchor(n, "right")[1] for n in (1, 2, 3, 4)]
    for y in ys[1:]:
        fig.lines.append(plt.Line2D([COLUMN_X[0] + BOX_W, bus_x], [y, y], transform=frame(fig),
                                    color=ARROW, linewidth=1.6, solid_capstyle="butt"))
    fig.lines.append(plt.Line2D([bus_x, bus_x], [min(ys), max(ys)], transform=frame(fig),
                                color=ARROW, linewidth=1.6, solid_capstyle="round"))
    draw_arrow(fig, anchor(1, "right"), anchor(5, "left"))

    # Two routes around the boxes: DiT -> few-shot down the gap right of Part II, and the
    # autoencoder -> MAR along the gap between rows 2 and 3, over the lines it crosses.
    gap_x = COLUMN_X[1] + BOX_W + (COLUMN_X[2] - COLUMN_X[1] - BOX_W) / 2
    (x5, y5), (x8, y8) = anchor(5, "right"), anchor(8, "right")
    draw_route(fig, [(x5 + 0.002, y5 - 0.03), (gap_x, y5 - 0.03), (gap_x, y8 + 0.03), (x8 + 0.004, y8 + 0.03)])
    x4, y4 = box_xy(4)
    row_gap_y = y4 + BOX_H + (ROW_STEP - BOX_H) / 2
    x11, y11 = box_xy(11)
    draw_route(fig, [(x4 + BOX_W - 0.05, y4 + BOX_H + 0.006), (x4 + BOX_W - 0.05, row_gap_y),
                     (x11 + 0.05, row_gap_y), (x11 + 0.05, y11 - 0.003)], bridge=True)

    # Part IV: one wide box under the three columns, fed by all of them.
    number, title, builds = REAL_MODELS
    header, _, edge = PARTS[4]
    x, y, w, h = COLUMN_X[0], 0.015, COLUMN_X[2] + BOX_W - COLUMN_X[0], 0.105
    draw_box(fig, x, y, w, h, number, title, builds, 4, tag=header.split(" · ")[0])
    for column in range(3):
        cx = COLUMN_X[column] + BOX_W / 2
        draw_arrow(fig, (cx, TOP - 3 * ROW_STEP), (cx, y + h))

    # Part V: a row of its own under chapter 13; each box names the chapter it builds on (arrows
    # from Part II would have to cross the chapter-13 band).
    header, _, edge = PARTS[5]
    fig.text(0.5, PART5_Y + PART5_H + 0.03, header, ha="center", va="center", fontsize=13.5,
             fontweight="bold", color=edge, transform=frame(fig))
    for number, (column, title, builds, base) in AFTER_SD3.items():
        draw_box(fig, COLUMN_X[column], PART5_Y, BOX_W, PART5_H, number, title, builds, 5,
                 note=f"builds on chapter {base}")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    fig = draw()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=DPI, facecolor="white")
    print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    main()
