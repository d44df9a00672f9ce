"""Chapter 10, VAR: the block-causal attention mask."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _keeps_random_state, _run

__all__ = ['check_block_causal_mask']


@_keeps_random_state
def check_block_causal_mask(fn: Callable) -> None:
    """Check ``fn(patch_nums)``: VAR's additive attention mask, float ``(1, 1, L, L)``, ``L = sum(pn^2)``.

    Entry ``(i, j)`` is 0 when token j's scale is not later than token i's and
    ``-inf`` otherwise, like ``minilib.var.block_causal_mask``.
    """
    from ..var import block_causal_mask, scale_levels

    def token_causal(patch_nums):
        L = sum(pn * pn for pn in patch_nums)
        return torch.full((L, L), -torch.inf).triu(1).view(1, 1, L, L)

    def strict(patch_nums):
        d = scale_levels(patch_nums)
        return torch.where(d[:, None] > d[None, :], 0.0, -torch.inf).view(1, 1, len(d), len(d))

    def transposed(patch_nums):
        return block_causal_mask(patch_nums).transpose(2, 3)

    def boolean(patch_nums):
        d = scale_levels(patch_nums)
        return (d[:, None] >= d[None, :]).view(1, 1, len(d), len(d))

    def square(patch_nums):
        return block_causal_mask(patch_nums)[0, 0]

    cases = [Case("patch_nums (1, 2, 3): L = 1 + 4 + 9 = 14", ((1, 2, 3),)),
             Case("patch_nums (1,): a single token", ((1,),)),
             Case("patch_nums (2, 2): two scales of the same size", ((2, 2),)),
             Case("VAR's (1, 2, 3, 4, 5, 6, 8, 10, 13, 16): L = 680", ((1, 2, 3, 4, 5, 6, 8, 10, 13, 16),))]
    _run(fn, cases, block_causal_mask, "minilib.var.block_causal_mask", rtol=0, atol=0,
         mistakes=[Mistake(token_causal, "the mask is causal over scales, not over tokens: a token sees every "
                                         "token of its own scale (attention within a scale is bidirectional)."),
                   Mistake(strict, "a token must see its own scale: allow level(j) <= level(i), not only <."),
                   Mistake(transposed, "rows are the queries i and columns the keys j: i may see j when "
                                       "level(j) <= level(i); yours lets coarse tokens see finer ones."),
                   Mistake(boolean, "return an additive float mask, 0 where attention is allowed and -inf where "
                                    "it is not (it is added to the attention logits), not a boolean one."),
                   Mistake(square, "return shape (1, 1, L, L), so the mask broadcasts over batch and heads.")],
         hint="levels = the scale index of every token (scale_levels), then torch.where(levels[:, None] >= "
              "levels[None, :], 0.0, -inf) reshaped to (1, 1, L, L).")
