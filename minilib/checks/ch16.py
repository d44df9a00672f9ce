"""Chapter 16, FLUX: rotary position embeddings (apply_rope) and the position ids of the sequence [text; image]."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _keeps_random_state, _randn, _run

__all__ = ['check_apply_rope', 'check_sequence_ids']


@_keeps_random_state
def check_apply_rope(fn: Callable) -> None:
    """Check ``fn(x, angles)``: rotate each pair of neighbouring channels of queries or keys.

    ``x (B, H, L, d)``, ``angles (B, L, d/2)``; the pair ``(x_2i, x_2i+1)`` of
    token l turns by ``angles[:, l, i]``:
    ``(cos a x_2i - sin a x_2i+1, sin a x_2i + cos a x_2i+1)``, like
    ``minilib.flux.apply_rope``.
    """
    from ..flux import apply_rope, image_ids, rope_2d

    def halves(x, angles):  # pairs (x_i, x_{i + d/2}): the other common layout
        d = x.shape[-1]
        first, second = x[..., :d // 2], x[..., d // 2:]
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        return torch.cat((cos * first - sin * second, sin * first + cos * second), dim=-1)

    def backwards(x, angles):
        return apply_rope(x, -angles)

    grid = rope_2d(image_ids(1, 2, 3), (4, 6, 6))  # a 2 x 3 token grid, FLUX's three axes
    cases = [Case("x (2, 3, 5, 8), random angles (2, 5, 4)", (_randn(2, 3, 5, 8, seed=160), _randn(2, 5, 4, seed=161))),
             Case("the angles of a 2 x 3 token grid, axes_dim (4, 6, 6): x (1, 2, 6, 16)",
                  (_randn(1, 2, 6, 16, seed=162), grid)),
             Case("all angles 0: nothing turns", (_randn(1, 1, 4, 6, seed=163), torch.zeros(1, 4, 3))),
             Case("one head, one token, d = 2: a plain 2-D rotation by 90 degrees",
                  (torch.tensor([[[[1.0, 2.0]]]]), torch.full((1, 1, 1), torch.pi / 2)))]
    hidden = [Case("x (3, 1, 2, 4) in float64", (_randn(3, 1, 2, 4, seed=164).double(),
                                                 _randn(3, 2, 2, seed=165).double())),
              Case("large angles (positions up to 100), x (1, 4, 3, 12)",
                   (_randn(1, 4, 3, 12, seed=166), _randn(1, 3, 6, seed=167) * 100))]
    _run(fn, cases, apply_rope, "minilib.flux.apply_rope", rtol=1e-4, atol=1e-5, hidden=hidden,
         mistakes=[Mistake(halves, "FLUX pairs NEIGHBOURING channels (x_0, x_1), (x_2, x_3), ...: reshape the last "
                                   "axis to (d/2, 2); pairing x_i with x_(i + d/2) is another layout, which the "
                                   "official weights do not expect."),
                   Mistake(backwards, "turn counter-clockwise: (x_2i, x_2i+1) -> (cos a x_2i - sin a x_2i+1, "
                                      "sin a x_2i + cos a x_2i+1).")],
         error_hint="angles is (B, L, d/2): give it a head axis, angles[:, None], to broadcast against x (B, H, L, d).",
         hint="pairs = x.reshape(B, H, L, d // 2, 2); a, b = pairs[..., 0], pairs[..., 1]; cos, sin = "
              "angles.cos()[:, None], angles.sin()[:, None]; stack (cos a - sin b, sin a + cos b) on a new last axis "
              "and reshape to (B, H, L, d).")


@_keeps_random_state
def check_sequence_ids(fn: Callable) -> None:
    """Check ``fn(batch_size, text_length, height, width)``: FLUX.1's ids of the sequence ``[text; image]``.

    Returns ``(B, text_length + height * width, 3)`` float32: the text tokens all at
    ``(0, 0, 0)``, then the image tokens at ``(0, row, column)`` in row-major order
    (as ``pack`` orders them), like ``torch.cat([text_ids(...), image_ids(...)], dim=1)``.
    """
    from ..flux import image_ids, text_ids

    def reference(batch_size, text_length, height, width):
        return torch.cat([text_ids(batch_size, text_length), image_ids(batch_size, height, width)], dim=1)

    def image_first(batch_size, text_length, height, width):
        return torch.cat([image_ids(batch_size, height, width), text_ids(batch_size, text_length)], dim=1)

    def column_row(batch_size, text_length, height, width):
        ids = reference(batch_size, text_length, height, width).clone()
        ids[..., 1:] = ids[..., [2, 1]]
        return ids

    def column_major(batch_size, text_length, height, width):
        grid = image_ids(batch_size, height, width).reshape(batch_size, height, width, 3).transpose(1, 2)
        return torch.cat([text_ids(batch_size, text_length), grid.reshape(batch_size, -1, 3)], dim=1)

    def numbered_text(batch_size, text_length, height, width):
        ids = reference(batch_size, text_length, height, width).clone()
        ids[:, :text_length, 2] = torch.arange(text_length, dtype=ids.dtype)
        return ids

    def token_index(batch_size, text_length, height, width):
        ids = reference(batch_size, text_length, height, width).clone()
        ids[..., 0] = torch.arange(ids.shape[1], dtype=ids.dtype)
        return ids

    cases = [Case("batch 1, 2 text tokens, a 2 x 3 image grid", (1, 2, 2, 3)),
             Case("batch 2, 3 text tokens, a 3 x 2 image grid", (2, 3, 3, 2)),
             Case("batch 1, 1 text token, a 1 x 4 image grid (one row)", (1, 1, 1, 4))]
    hidden = [Case("batch 3, 5 text tokens, a 4 x 4 image grid", (3, 5, 4, 4)),
              Case("batch 1, 4 text tokens, a 5 x 1 image grid (one column)", (1, 4, 5, 1))]
    _run(fn, cases, reference, "torch.cat([minilib.flux.text_ids, minilib.flux.image_ids], dim=1)", hidden=hidden,
         mistakes=[Mistake(image_first, "FLUX concatenates [text; image]: the text ids come FIRST (model.py: "
                                        "torch.cat((txt_ids, img_ids), dim=1))."),
                   Mistake(column_row, "the three axes are (index, ROW, COLUMN): ids[..., 1] is the row "
                                       "(changes every `width` tokens), ids[..., 2] the column."),
                   Mistake(column_major, "the image tokens are in row-major order, as pack flattens (h w): "
                                         "the column changes fastest."),
                   Mistake(numbered_text, "FLUX.1 puts every text token at (0, 0, 0): the T5 features carry "
                                          "their order, their ids do not."),
                   Mistake(token_index, "FLUX.1 sets the first axis (the index) to 0 for every token.")],
         error_hint="return a float tensor of shape (B, text_length + height * width, 3).",
         hint="ids = torch.zeros(height, width, 3); ids[..., 1] = arange(height)[:, None]; ids[..., 2] = "
              "arange(width)[None, :]; image = ids.reshape(1, -1, 3).expand(B, -1, -1); return "
              "torch.cat([torch.zeros(B, text_length, 3), image], dim=1).")
