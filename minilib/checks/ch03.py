"""Chapter 3, adaLN modulation: modulate and the adaLN-Zero block."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, Part, _keeps_random_state, _randn, _run

__all__ = ['check_modulate', 'check_dit_block']


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


def _dit_block(hidden_size: int, num_heads: int, seed: int, mlp_ratio: float = 4.0, zero: bool = False):
    """A DiTBlock with random weights everywhere (adaLN included), or as built (adaLN-Zero) if ``zero``."""
    from ..adaln import DiTBlock

    torch.manual_seed(seed)
    block = DiTBlock(hidden_size, num_heads, mlp_ratio).eval()
    if not zero:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return block


@_keeps_random_state
def check_dit_block(fn: Callable) -> None:
    """Check ``fn(block, x, c)``: the forward pass of an adaLN-Zero block, tokens ``(B, L, D)`` -> ``(B, L, D)``.

    ``block`` is a ``minilib.adaln.DiTBlock`` (its ``norm1``, ``attn``, ``norm2``,
    ``mlp`` and ``adaLN_modulation`` are used, not its ``forward``), ``c`` is
    ``(B, D)``; like ``block(x, c)``. Parts: random blocks (2 points), the
    adaLN-Zero block as built, which must be the identity (1 point).
    """
    from ..adaln import modulate

    def reference(block, x, c):
        return block(x, c)

    def six(block, c):
        return block.adaLN_modulation(c).chunk(6, dim=1)

    def no_gates(block, x, c):
        shift1, scale1, _, shift2, scale2, _ = six(block, c)
        x = x + block.attn(modulate(block.norm1(x), shift1, scale1))
        return x + block.mlp(modulate(block.norm2(x), shift2, scale2))

    def shift_scale_swapped(block, x, c):
        scale1, shift1, gate1, scale2, shift2, gate2 = six(block, c)
        x = x + gate1.unsqueeze(1) * block.attn(modulate(block.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * block.mlp(modulate(block.norm2(x), shift2, scale2))

    def one_norm(block, x, c):  # both branches read the block's input x
        shift1, scale1, gate1, shift2, scale2, gate2 = six(block, c)
        h = x + gate1.unsqueeze(1) * block.attn(modulate(block.norm1(x), shift1, scale1))
        return h + gate2.unsqueeze(1) * block.mlp(modulate(block.norm2(x), shift2, scale2))

    def residual_from_modulated(block, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = six(block, c)
        h = modulate(block.norm1(x), shift1, scale1)
        x = h + gate1.unsqueeze(1) * block.attn(h)
        h = modulate(block.norm2(x), shift2, scale2)
        return h + gate2.unsqueeze(1) * block.mlp(h)

    def no_modulation(block, x, c):
        _, _, gate1, _, _, gate2 = six(block, c)
        x = x + gate1.unsqueeze(1) * block.attn(block.norm1(x))
        return x + gate2.unsqueeze(1) * block.mlp(block.norm2(x))

    a, b, z = _dit_block(32, 4, seed=20), _dit_block(24, 2, seed=21, mlp_ratio=2.0), _dit_block(32, 4, seed=22, zero=True)
    parts = [Part("random blocks", [
                 Case("D = 32, 4 heads, x (2, 5, 32), c (2, 32)", (a, _randn(2, 5, 32, seed=23), _randn(2, 32, seed=24))),
                 Case("D = 24, 2 heads, mlp_ratio 2, x (3, 3, 24): as many tokens as samples",
                      (b, _randn(3, 3, 24, seed=25), _randn(3, 24, seed=26))),
                 Case("a single token, x (2, 1, 32)", (a, _randn(2, 1, 32, seed=27), _randn(2, 32, seed=28)))], points=2),
             Part("adaLN-Zero at initialisation: the identity", [
                 Case("the block as built (adaLN_modulation all zero), x (2, 6, 32)",
                      (z, _randn(2, 6, 32, seed=29), _randn(2, 32, seed=30)))], points=1),
             Part("hidden inputs", [
                 Case("D = 24, one sample, 9 tokens", (b, _randn(1, 9, 24, seed=31), _randn(1, 24, seed=32))),
                 Case("D = 32, large conditioning, x (4, 2, 32)", (a, _randn(4, 2, 32, seed=33),
                                                                  _randn(4, 32, seed=34, scale=5.0)))],
                  points=1, hidden=True)]
    _run(fn, parts, reference, "DiTBlock.forward (block(x, c))", rtol=1e-4, atol=1e-4,
         mistakes=[Mistake(no_gates, "multiply each residual branch by its gate: x + gate_msa.unsqueeze(1) * "
                                     "attn(...). Without the gates the block is not the identity at the start."),
                   Mistake(shift_scale_swapped, "adaLN_modulation(c).chunk(6, dim=1) gives, in this order, "
                                                "shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp."),
                   Mistake(one_norm, "the MLP branch reads the output of the attention branch: norm2 is applied to "
                                     "the updated x, not to the block's input."),
                   Mistake(residual_from_modulated, "the residual adds to the unnormalised x: x = x + gate * "
                                                    "attn(modulate(norm1(x), ...)); the modulated tokens go only "
                                                    "into the branch."),
                   Mistake(no_modulation, "modulate the normalised tokens before each branch: "
                                          "modulate(block.norm1(x), shift_msa, scale_msa).")],
         error_hint="adaLN_modulation(c) is (B, 6D): chunk it into six (B, D) vectors along dim=1; the gates need "
                    "a token axis, gate.unsqueeze(1), to broadcast against (B, L, D).",
         hint="shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c).chunk(6, dim=1); "
              "x = x + gate1.unsqueeze(1) * block.attn(modulate(block.norm1(x), shift1, scale1)); the same with "
              "norm2, mlp and the second three.")
