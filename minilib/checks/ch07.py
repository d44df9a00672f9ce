"""Chapter 7, MM-DiT: joint attention (block_mixing)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _generator, _keeps_random_state, _randn, _run

__all__ = ['check_block_mixing']


@_keeps_random_state
def check_block_mixing(fn: Callable) -> None:
    """Check ``fn(context, x, context_block, x_block, c)``: MM-DiT's joint attention.

    Both streams' q, k, v are concatenated along the sequence (context first),
    one attention runs over all tokens, the result is split back and each block
    finishes with ``post_attention``; returns ``(context or None, x)`` (None when
    ``context_block.pre_only``), like ``minilib.mmdit.block_mixing``.
    """
    from ..mmdit import JointBlock, attention, block_mixing

    def separate_attention(context, x, context_block, x_block, c):
        context_qkv, context_state = context_block.pre_attention(context, c)
        x_qkv, x_state = x_block.pre_attention(x, c)
        context_attn = attention(*context_qkv, context_block.attn.num_heads)
        x_attn = attention(*x_qkv, x_block.attn.num_heads)
        context = None if context_block.pre_only else context_block.post_attention(context_attn, *context_state)
        return context, x_block.post_attention(x_attn, *x_state)

    def swapped_split(context, x, context_block, x_block, c):
        context_qkv, context_state = context_block.pre_attention(context, c)
        x_qkv, x_state = x_block.pre_attention(x, c)
        q, k, v = (torch.cat(pair, dim=1) for pair in zip(context_qkv, x_qkv))
        attn = attention(q, k, v, x_block.attn.num_heads)
        x_attn, context_attn = attn[:, :x.shape[1]], attn[:, x.shape[1]:]
        context = None if context_block.pre_only else context_block.post_attention(context_attn, *context_state)
        return context, x_block.post_attention(x_attn, *x_state)

    def blocks(seed: int, **kwargs):
        torch.manual_seed(seed)
        block = JointBlock(32, 4, **kwargs).eval()
        generator = _generator(seed)
        with torch.no_grad():
            for p in block.parameters():  # random, non-zero weights everywhere (adaLN included)
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
        return block

    one, pre_only, rms = blocks(70), blocks(71, pre_only=True), blocks(72, qk_norm="rms")
    cases = [Case("context (2, 3, 32), x (2, 5, 32), c (2, 32)",
                  (_randn(2, 3, 32, seed=73), _randn(2, 5, 32, seed=74), one.context_block, one.x_block,
                   _randn(2, 32, seed=75))),
             Case("a pre_only context block (the last layer): the context result is None",
                  (_randn(2, 4, 32, seed=76), _randn(2, 6, 32, seed=77), pre_only.context_block, pre_only.x_block,
                   _randn(2, 32, seed=78))),
             Case("qk_norm='rms', context (1, 1, 32), x (1, 7, 32)",
                  (_randn(1, 1, 32, seed=79), _randn(1, 7, 32, seed=80), rms.context_block, rms.x_block,
                   _randn(1, 32, seed=81)))]
    _run(fn, cases, block_mixing, "minilib.mmdit.block_mixing", rtol=1e-4, atol=1e-5,
         mistakes=[Mistake(separate_attention, "the two streams must attend jointly: concatenate their q, k and v "
                                               "along the sequence axis (dim=1) and run ONE attention over all "
                                               "L_c + L_x tokens."),
                   Mistake(swapped_split, "split the attention output in the order you concatenated: the first "
                                          "L_c rows belong to the context, the rest to x.")],
         error_hint="pre_attention returns ((q, k, v), state); concatenate along dim=1, call "
                    "attention(q, k, v, x_block.attn.num_heads), split with [L_c, L_x], and call post_attention(attn, "
                    "*state) for each stream, except a pre_only context block (return None for it).",
         hint="(q_c, k_c, v_c), s_c = context_block.pre_attention(context, c) and likewise for x; q = cat([q_c, "
              "q_x], dim=1) (k, v too); attn = attention(q, k, v, num_heads); split at L_c; post_attention each.")
