"""Chapter 7, MM-DiT: joint attention (block_mixing) and classifier-free guidance of the denoiser."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, Part, _generator, _keeps_random_state, _randn, _run

__all__ = ["check_block_mixing", "check_guided_denoiser"]


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
    other = blocks(82, qk_norm="rms")
    hidden = [Case("context (3, 6, 32), x (3, 2, 32): more text tokens than image tokens",
                   (_randn(3, 6, 32, seed=83), _randn(3, 2, 32, seed=84), other.context_block, other.x_block,
                    _randn(3, 32, seed=85))),
              Case("one token in each stream", (_randn(2, 1, 32, seed=86), _randn(2, 1, 32, seed=87),
                                               one.context_block, one.x_block, _randn(2, 32, seed=88)))]
    _run(fn, cases, block_mixing, "minilib.mmdit.block_mixing", rtol=1e-4, atol=1e-5, hidden=hidden,
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


class _ToyTextDenoiser(torch.nn.Module):
    """A denoiser ``D(x, sigma, tokens)`` for the guidance check: nonlinear in x, sigma and the caption.

    ``x (B, C, H, W)``, ``sigma (B,)``, ``tokens (B, T)`` long (0 = padding) -> ``(B, C, H, W)``.
    """

    def __init__(self, channels: int, seed: int):
        super().__init__()
        generator = _generator(seed)
        self.table = torch.nn.Parameter(torch.randn(20, channels, generator=generator))
        self.mix = torch.nn.Parameter(torch.randn(channels, channels, generator=generator) / channels ** 0.5)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if sigma.shape != x.shape[:1] or tokens.shape[0] != x.shape[0]:
            raise ValueError(f"sigma must be (B,) and tokens (B, T) for x {tuple(x.shape)}, got "
                             f"{tuple(sigma.shape)} and {tuple(tokens.shape)}")
        caption = (self.table[tokens] * (tokens > 0)[..., None]).sum(1)             # (B, C)
        s = sigma.view(-1, 1, 1, 1)
        mixed = torch.einsum("bchw,cd->bdhw", x, self.mix)
        return (1 - s) * torch.tanh(mixed + caption[:, :, None, None]) + s * x * 0.1


@_keeps_random_state
def check_guided_denoiser(fn: Callable) -> None:
    """Check ``fn(denoiser, x, sigma, cond, uncond, cond_scale)``: classifier-free guidance of a denoiser.

    ``denoiser(x, sigma, **kwargs)``; ``cond`` and ``uncond`` dicts of keyword
    inputs (here ``{"tokens": (B, T)}``); returns ``D_uncond + cond_scale (D_cond -
    D_uncond)`` shaped like ``x``, like ``minilib.flow.CFGDenoiser`` (which runs
    both in one batch of 2B).
    """
    from ..flow import CFGDenoiser

    def reference(denoiser, x, sigma, cond, uncond, cond_scale):
        return CFGDenoiser(denoiser)(x, sigma, cond, uncond, cond_scale)

    def halves(denoiser, x, sigma, cond, uncond):
        return denoiser(x, sigma, **cond), denoiser(x, sigma, **uncond)

    def swapped(denoiser, x, sigma, cond, uncond, cond_scale):
        d_c, d_u = halves(denoiser, x, sigma, cond, uncond)
        return d_c + cond_scale * (d_u - d_c)

    def ho_salimans(denoiser, x, sigma, cond, uncond, cond_scale):
        d_c, d_u = halves(denoiser, x, sigma, cond, uncond)
        return d_c + cond_scale * (d_c - d_u)

    def scaled_cond(denoiser, x, sigma, cond, uncond, cond_scale):
        return cond_scale * denoiser(x, sigma, **cond)

    def no_uncond_term(denoiser, x, sigma, cond, uncond, cond_scale):
        d_c, d_u = halves(denoiser, x, sigma, cond, uncond)
        return cond_scale * (d_c - d_u)

    def tokens(B, T, seed):
        generator = _generator(seed)
        return torch.randint(1, 20, (B, T), generator=generator) * (torch.rand(B, T, generator=generator) > 0.3)

    toy, wide = _ToyTextDenoiser(3, 90), _ToyTextDenoiser(4, 91)

    def case(label, denoiser, B, C, side, sigma, scale, seed, T=5):
        x = _randn(B, C, side, side, seed=seed)
        return Case(label, (denoiser, x, sigma if isinstance(sigma, torch.Tensor) else torch.full((B,), sigma),
                            dict(tokens=tokens(B, T, seed + 1)), dict(tokens=torch.zeros(B, T, dtype=torch.long)),
                            scale))

    parts = [Part("guidance: D_uncond + s (D_cond - D_uncond)", [
                 case("x (2, 3, 4, 4), sigma 0.6, cond_scale 3", toy, 2, 3, 4, 0.6, 3.0, 900),
                 case("x (3, 3, 2, 2), a different sigma per sample, cond_scale 5", toy, 3, 3, 2,
                      torch.tensor([0.9, 0.5, 0.1]), 5.0, 910)], points=2),
             Part("edge cases", [
                 case("cond_scale 1: the plain conditional denoiser", toy, 2, 3, 4, 0.3, 1.0, 920),
                 case("cond_scale 0: the unconditional denoiser", toy, 2, 3, 4, 0.3, 0.0, 930),
                 case("one sample, sigma 1 (pure noise)", toy, 1, 3, 4, 1.0, 4.0, 940)], points=1),
             Part("hidden inputs", [
                 case("x (4, 4, 3, 3), cond_scale 7.5, captions of 8 tokens", wide, 4, 4, 3, 0.25, 7.5, 950, T=8),
                 case("cond_scale 0.5 (between unconditional and conditional)", wide, 2, 4, 2, 0.8, 0.5, 960)],
                  points=1, hidden=True)]
    _run(fn, parts, reference, "minilib.flow.CFGDenoiser", rtol=1e-5, atol=1e-6,
         mistakes=[Mistake(swapped, "start from the UNconditional prediction and move towards the conditional "
                                    "one: D_uncond + s (D_cond - D_uncond); yours has the roles swapped (check "
                                    "which half of the batch is which)."),
                   Mistake(ho_salimans, "SD3's cond_scale s is the weight of the whole difference from D_uncond: "
                                        "D_uncond + s (D_cond - D_uncond). D_cond + s (D_cond - D_uncond) is Ho & "
                                        "Salimans' form with w = s, i.e. SD3's scale s + 1."),
                   Mistake(scaled_cond, "guidance needs the unconditional prediction too (the empty caption): "
                                        "D_uncond + s (D_cond - D_uncond), not s D_cond."),
                   Mistake(no_uncond_term, "add the difference to D_uncond: D_uncond + s (D_cond - D_uncond).")],
         error_hint="call denoiser(x, sigma, **cond) and denoiser(x, sigma, **uncond) (or once on "
                    "torch.cat([x, x]), torch.cat([sigma, sigma]) and the concatenated condition tensors, then "
                    ".chunk(2): the first half is the conditional one).",
         hint="d_cond, d_uncond = the denoiser with cond and with uncond; return d_uncond + cond_scale * (d_cond - "
              "d_uncond).")
