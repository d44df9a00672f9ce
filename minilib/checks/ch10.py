"""Chapter 10, VAR: the block-causal attention mask and the next-scale teacher-forcing input."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, Part, _keeps_random_state, _randn, _run

__all__ = ["check_block_causal_mask", "check_next_scale_input"]


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
    hidden = [Case("patch_nums (3, 1): a coarser scale after a finer one", ((3, 1),)),
              Case("patch_nums (1, 1, 1, 2): three one-token scales", ((1, 1, 1, 2),))]
    _run(fn, cases, block_causal_mask, "minilib.var.block_causal_mask", rtol=0, atol=0, hidden=hidden,
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


def _next_scale_input(maps: list[torch.Tensor], phis: list) -> torch.Tensor | None:
    """VAR's teacher-forcing input from the code maps of all K scales (``idxBl_to_var_input`` after the lookup).

    ``maps[k]`` ``(B, C, p_k, p_k)``, ``phis[k]`` a map ``(B, C, H, W) -> (B, C, H, W)``
    with ``H = W = p_K``. For k < K: ``f_hat += phis[k](bicubic(maps[k], H))``, then
    ``area(f_hat, p_{k+1})`` flattened to ``(B, p_{k+1}^2, C)``; the K - 1 pieces
    concatenated: ``(B, p_2^2 + ... + p_K^2, C)``, None for K = 1.
    """
    import torch.nn.functional as F

    B, C, H = maps[0].shape[0], maps[0].shape[1], maps[-1].shape[-1]
    f_hat = maps[0].new_zeros(B, C, H, H)
    pieces = []
    for k in range(len(maps) - 1):
        f_hat = f_hat + phis[k](F.interpolate(maps[k], size=(H, H), mode="bicubic"))
        p = maps[k + 1].shape[-1]
        pieces.append(F.interpolate(f_hat, size=(p, p), mode="area").flatten(2).transpose(1, 2))
    return torch.cat(pieces, dim=1) if pieces else None


@_keeps_random_state
def check_next_scale_input(fn: Callable) -> None:
    """Check ``fn(maps, phis)``: VAR's teacher-forcing input, the running ``f_hat`` at the next scale's size.

    ``maps``: K code maps ``(B, C, p_k, p_k)`` (the codebook vectors of each
    scale's tokens), ``phis``: K callables ``(B, C, H, W) -> (B, C, H, W)``, ``H =
    W = p_K``. Returns ``(B, p_2^2 + ... + p_K^2, C)``: after each scale k < K
    the bicubically up-sampled map goes through ``phis[k]`` and is added to
    ``f_hat``, which is area-down-sampled to the size of scale k + 1 and
    flattened row by row; None for a single scale. Like
    ``VectorQuantizer2.idxBl_to_var_input`` after the code lookup.
    """
    import torch.nn.functional as F

    from ..vqvae import Phi

    def phis_for(C, K, seed, ratio=0.5):
        torch.manual_seed(seed)
        return [Phi(C, ratio).eval() for _ in range(K)]

    def maps_for(B, C, patch_nums, seed):
        return [_randn(B, C, p, p, seed=seed + k) for k, p in enumerate(patch_nums)]

    def variant(up="bicubic", down="area", accumulate=True, use_phi=True, transpose=True, shift=1):
        def wrong(maps, phis):
            B, C, H = maps[0].shape[0], maps[0].shape[1], maps[-1].shape[-1]
            f_hat, pieces = maps[0].new_zeros(B, C, H, H), []
            for k in range(len(maps) - 1):
                h = F.interpolate(maps[k], size=(H, H), mode=up)
                h = phis[k](h) if use_phi else h
                f_hat = f_hat + h if accumulate else h
                p = maps[k + shift].shape[-1]
                small = F.interpolate(f_hat, size=(p, p), mode=down)
                pieces.append(small.flatten(2).transpose(1, 2) if transpose else small.reshape(B, -1, C))
            return torch.cat(pieces, dim=1) if pieces else None
        return wrong

    identity = [lambda h: h] * 4
    parts = [Part("the running f_hat at the next scale's size", [
                 Case("patch_nums (1, 2, 4), B 2, C 3, identity phis", (maps_for(2, 3, (1, 2, 4), 500), identity[:3])),
                 Case("patch_nums (1, 2, 3, 4), B 1, C 4, VAR's phi (quant_resi 0.5)",
                      (maps_for(1, 4, (1, 2, 3, 4), 510), phis_for(4, 4, 511)))], points=2),
             Part("edge cases", [
                 Case("a single scale (1,): there is no next scale, return None", (maps_for(2, 3, (1,), 520),
                                                                                    identity[:1])),
                 Case("patch_nums (2, 3): up-sampling 2 -> 3 and area down-sampling 3 -> 3",
                      (maps_for(3, 2, (2, 3), 530), phis_for(2, 2, 531)))], points=1),
             Part("hidden inputs", [
                 Case("patch_nums (1, 2, 3, 5, 8), B 2, C 2, phis with quant_resi 0.7",
                      (maps_for(2, 2, (1, 2, 3, 5, 8), 540), phis_for(2, 5, 541, 0.7))),
                 Case("patch_nums (1, 4), B 4, C 5", (maps_for(4, 5, (1, 4), 550), phis_for(5, 2, 551)))],
                  points=1, hidden=True)]
    _run(fn, parts, _next_scale_input, "VectorQuantizer2.idxBl_to_var_input (after the lookup)", rtol=1e-4,
         atol=1e-5,
         mistakes=[Mistake(variant(accumulate=False), "feed the running sum: f_hat accumulates the up-sampled maps "
                                                      "of ALL scales so far (f_hat = f_hat + phi(up(map))), not "
                                                      "only the latest scale's."),
                   Mistake(variant(up="bilinear"), "up-sample each code map to p_K x p_K with mode='bicubic', as "
                                                   "VAR does."),
                   Mistake(variant(up="nearest"), "up-sample each code map to p_K x p_K with mode='bicubic', as "
                                                  "VAR does."),
                   Mistake(variant(down="bilinear"), "down-sample f_hat with mode='area' (the mean over each "
                                                     "cell), as VAR does."),
                   Mistake(variant(use_phi=False), "pass each up-sampled map through its phi (phis[k]) before "
                                                   "adding it to f_hat."),
                   Mistake(variant(transpose=False), "flatten f_hat (B, C, p, p) to tokens with .flatten(2)"
                                                     ".transpose(1, 2): a plain reshape to (B, p*p, C) mixes "
                                                     "channels and positions."),
                   Mistake(variant(shift=0), "after scale k, down-sample f_hat to the size of the NEXT scale, "
                                             "p_{k+1}: the transformer predicts scale k+1 from it.")],
         error_hint="maps[k] is (B, C, p_k, p_k); F.interpolate(maps[k], size=(H, W), mode='bicubic') with H = W = "
                    "maps[-1].shape[-1]; phis[k](...) keeps the shape.",
         hint="f_hat = zeros (B, C, H, W); for k in range(K - 1): f_hat += phis[k](bicubic(maps[k], (H, W))); "
              "append area(f_hat, p_{k+1}).flatten(2).transpose(1, 2); torch.cat along dim 1 (None if K = 1).")
