"""Chapter 16, FLUX: rotary position embeddings (apply_rope)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _keeps_random_state, _randn, _run

__all__ = ['check_apply_rope']


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
