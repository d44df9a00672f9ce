"""Chapter 1, images as tokens: patchify and the 1-D sin-cos embedding."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _keeps_random_state, _randn, _run

__all__ = ['check_patchify', 'check_sincos_embedding']


@_keeps_random_state
def check_patchify(fn: Callable) -> None:
    """Check ``fn(x, patch_size)``: images ``(B, C, H, W)`` -> patches ``(B, L, p*p*C)``.

    Patches in row-major order, the values inside a patch ordered (row, column,
    channel), like ``minilib.patch_embed.patchify``.
    """
    from ..patch_embed import patchify

    def channels_first(x, p):  # (c p q) inside a patch
        B, C, H, W = x.shape
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)

    def column_major(x, p):  # patches numbered column by column
        B, C, H, W = x.shape
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 4, 2, 3, 5, 1).reshape(B, -1, p * p * C)

    cases = [Case("x (2, 3, 8, 8), p = 2", (_randn(2, 3, 8, 8, seed=1), 2)),
             Case("x (1, 4, 4, 6), p = 2 (a wide image: 2 x 3 patches)", (_randn(1, 4, 4, 6, seed=2), 2)),
             Case("x (2, 1, 6, 6), p = 3", (_randn(2, 1, 6, 6, seed=3), 3)),
             Case("x (1, 2, 4, 4), p = 1 (every pixel a token)", (_randn(1, 2, 4, 4, seed=4), 1)),
             Case("x (1, 3, 4, 4), p = 4 (one patch)", (_randn(1, 3, 4, 4, seed=5), 4))]
    hidden = [Case("x (2, 2, 9, 3), p = 3 (a tall image: 3 x 1 patches)", (_randn(2, 2, 9, 3, seed=6), 3)),
              Case("x (3, 5, 4, 8), p = 2 (five channels, 2 x 4 patches)", (_randn(3, 5, 4, 8, seed=7), 2))]
    _run(fn, cases, patchify, "minilib.patch_embed.patchify", rtol=0, atol=0, hidden=hidden,
         mistakes=[Mistake(channels_first, "inside a patch the values are ordered (row, column, channel): "
                                           "move the channel axis last before you flatten a patch."),
                   Mistake(column_major, "number the patches row by row: the patch row index h varies slowest, "
                                         "then the column w, so permute to (B, h, w, p, q, C).")],
         hint="reshape to (B, C, H/p, p, W/p, p), permute to (B, H/p, W/p, p, p, C), then reshape to "
              "(B, L, p*p*C).")


@_keeps_random_state
def check_sincos_embedding(fn: Callable) -> None:
    """Check ``fn(embed_dim, positions)``: 1-D sin-cos features ``(M, D)`` of the positions (any shape, M = numel).

    ``omega_i = 10000 ** (-i / (D/2))``, ``i = 0 .. D/2 - 1``; sines first, then
    cosines, like ``minilib.patch_embed.get_1d_sincos_pos_embed``.
    """
    from ..patch_embed import get_1d_sincos_pos_embed

    def omega(D):
        return 1.0 / 10000 ** (torch.arange(D // 2, dtype=torch.float64) / (D / 2))

    def cos_first(D, pos):
        angles = pos.reshape(-1).double()[:, None] * omega(D)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)

    def interleaved(D, pos):
        angles = pos.reshape(-1).double()[:, None] * omega(D)
        return torch.stack([torch.sin(angles), torch.cos(angles)], dim=2).reshape(len(angles), D)

    def over_D(D, pos):
        angles = pos.reshape(-1).double()[:, None] * (1.0 / 10000 ** (torch.arange(D // 2) / D))
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    cases = [Case("embed_dim 8, positions 0..4", (8, torch.arange(5))),
             Case("embed_dim 16, positions of a 3 x 4 grid (shape (3, 4))", (16, torch.arange(12).reshape(3, 4))),
             Case("embed_dim 2 (a single frequency)", (2, torch.arange(4))),
             Case("embed_dim 32, fractional positions", (32, torch.tensor([0.0, 0.5, 2.25, 31.0])))]
    hidden = [Case("embed_dim 6 (three frequencies), positions 0..6", (6, torch.arange(7))),
              Case("embed_dim 12, negative positions of shape (2, 2, 2)",
                   (12, torch.tensor([-3.0, -1.0, 0.0, 1.5, 4.0, 7.0, 9.0, 100.0]).reshape(2, 2, 2)))]
    _run(fn, cases, get_1d_sincos_pos_embed, "minilib.patch_embed.get_1d_sincos_pos_embed", rtol=1e-4, atol=1e-5,
         hidden=hidden,
         mistakes=[Mistake(cos_first, "the sines come first, then the cosines (MAE's and DiT's convention; "
                                      "the timestep embedding of chapter 2 puts the cosines first)."),
                   Mistake(interleaved, "concatenate [sin(all frequencies), cos(all frequencies)]; do not "
                                        "interleave sin and cos."),
                   Mistake(over_D, "there are D/2 frequencies, omega_i = 10000^(-i / (D/2)): divide i by D/2, "
                                   "not by D.")],
         hint="omega_i = 1 / 10000^(i / (D/2)) for i = 0 .. D/2 - 1, angles = positions.reshape(-1)[:, None] * "
              "omega[None], result [sin(angles), cos(angles)] along the last axis.")
