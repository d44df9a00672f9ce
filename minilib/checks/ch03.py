"""Chapter 3, adaLN modulation: modulate."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _keeps_random_state, _randn, _run

__all__ = ['check_modulate']


@_keeps_random_state
def check_modulate(fn: Callable) -> None:
    """Check ``fn(x, shift, scale)``: ``x * (1 + scale) + shift`` for tokens ``(B, L, D)``.

    ``shift`` and ``scale`` are ``(B, D)``, broadcast over the L tokens; ``shift``
    may be None (SD3's scale-only variant). Reference: ``minilib.adaln.modulate``.
    """
    from ..adaln import modulate

    def without_one(x, shift, scale):
        out = x * scale.unsqueeze(1)
        return out if shift is None else out + shift.unsqueeze(1)

    def not_broadcast_over_tokens(x, shift, scale):  # (B, D) against (B, L, D) lines up B with L
        out = x * (1 + scale)
        return out if shift is None else out + shift

    B, L, D = 3, 5, 8
    cases = [Case("x (3, 5, 8), shift (3, 8), scale (3, 8)",
                  (_randn(B, L, D, seed=1), _randn(B, D, seed=2), _randn(B, D, seed=3))),
             Case("x (4, 4, 6), shift (4, 6), scale (4, 6): as many tokens as samples",
                  (_randn(4, 4, 6, seed=4), _randn(4, 6, seed=5), _randn(4, 6, seed=6))),
             Case("shift=None (the scale-only case), x (3, 5, 8), scale (3, 8)",
                  (_randn(B, L, D, seed=7), None, _randn(B, D, seed=8))),
             Case("scale = 0 and shift = 0: modulate must return x unchanged",
                  (_randn(2, 3, 4, seed=9), torch.zeros(2, 4), torch.zeros(2, 4))),
             Case("a single token, x (2, 1, 8)", (_randn(2, 1, 8, seed=10), _randn(2, 8, seed=11), _randn(2, 8, seed=12)))]
    hidden = [Case("one sample, x (1, 7, 5), shift (1, 5), scale (1, 5)",
                   (_randn(1, 7, 5, seed=13), _randn(1, 5, seed=14), _randn(1, 5, seed=15))),
              Case("shift=None and a single token, x (3, 1, 4), scale (3, 4)",
                   (_randn(3, 1, 4, seed=16), None, _randn(3, 4, seed=17)))]
    _run(fn, cases, modulate, "minilib.adaln.modulate", hidden=hidden,
         mistakes=[Mistake(without_one, "the scale is applied as x * (1 + scale), so that a scale of 0 (the "
                                        "adaLN-Zero start) leaves x unchanged."),
                   Mistake(not_broadcast_over_tokens, "shift and scale are (B, D), one vector per sample: give "
                                                      "them a token axis, scale.unsqueeze(1), so they broadcast "
                                                      "over the L tokens of (B, L, D).")],
         error_hint="shift and scale are (B, D): unsqueeze(1) makes them (B, 1, D), which broadcasts against "
                    "x (B, L, D); shift may be None (then there is no shift).",
         hint="modulate(x, shift, scale) = x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1), without the shift "
              "when it is None.")
