"""Conditioning by adaptive layer norm (adaLN, adaLN-Zero).

Chapter 3 of the book. A conditioning vector ``c`` (timestep embedding plus
class embedding, shape ``(B, D)``) does not enter the token sequence; instead
it *modulates* every block. A linear layer maps ``c`` to a shift, a scale and a
gate for each sub-layer:

    h = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
    y = h + gate_mlp * MLP(modulate(LN(h), shift_mlp, scale_mlp))

with ``modulate(u, shift, scale) = u * (1 + scale) + shift``. *adaLN-Zero*
initialises that linear layer to zero, so every gate starts at 0 and every
block starts as the identity: a deep network begins as a shallow one and grows
its residual branches as training asks for them (Peebles & Xie, 2023).

Submodule names (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``,
``adaLN_modulation.1``, ``norm_final``, ``linear``) follow the official DiT code
so that its checkpoints load into these classes.

This file also holds the model of the chapter's experiment, ``TinyDenoiser``,
which is the same small transformer conditioned either by adaLN-Zero or by
extra "in-context" tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .patch_embed import PatchEmbed, get_2d_sincos_pos_embed, unpatchify
from .timestep import LabelEmbedder, TimestepEmbedder
from .validation import (POSITIVE, POSITIVE_INT, PROBABILITY, check_arguments, check_divisible, check_float_input,
                         check_range, check_same_batch)


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift``, broadcast over the token axis.

    Args:
        x: ``(B, L, D)`` normalised tokens.
        shift: ``(B, D)`` or None (SD3's scale-only variant has no shift).
        scale: ``(B, D)``; a scale of 0 leaves x unchanged, hence the ``1 +``.
    Returns:
        ``(B, L, D)``.
    """
    if x.ndim != 3 or scale.ndim != 2 or scale.shape[0] != x.shape[0] or scale.shape[1] != x.shape[2]:
        raise ValueError(f"modulate expects x (B, L, D) and scale/shift (B, D); "
                         f"got x {tuple(x.shape)}, scale {tuple(scale.shape)}")
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm/DiT layout).

    ``(B, L, D) -> (B, L, D)``; uses ``scaled_dot_product_attention``, which picks
    a fused kernel (flash or memory-efficient) on GPU.
    """

    @check_arguments(dim=POSITIVE_INT, num_heads=POSITIVE_INT)
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        check_divisible("Attention", "dim", dim, "num_heads", num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    """``Linear -> GELU(tanh) -> Linear``, the transformer's feed-forward layer."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def zero_init(layer: nn.Linear) -> nn.Linear:
    """Set a linear layer's weight and bias to zero (the "Zero" of adaLN-Zero)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (DiT, Peebles & Xie 2023, Fig. 3).

    ``forward(x, c)``: tokens ``(B, L, D)`` and conditioning ``(B, D)`` to ``(B, L, D)``.
    The layer norms have no affine parameters of their own: shift and scale come
    from ``c``. At initialisation the block is exactly the identity.
    """

    @check_arguments(hidden_size=POSITIVE_INT, num_heads=POSITIVE_INT, mlp_ratio=POSITIVE)
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(hidden_size, 6 * hidden_size)))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift and scale, no gate) then a linear map to ``p * p * C_out`` per token.

    ``(B, L, D), (B, D) -> (B, L, p*p*C_out)``. Both linear layers start at zero,
    so an untrained DiT predicts exactly 0.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = zero_init(nn.Linear(hidden_size, patch_size * patch_size * out_channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(hidden_size, 2 * hidden_size)))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TransformerBlock(nn.Module):
    """A plain pre-norm ViT block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.

    Used by the in-context variant of ``TinyDenoiser``, where conditioning
    arrives as extra tokens rather than through modulation.
    """

    @check_arguments(hidden_size=POSITIVE_INT, num_heads=POSITIVE_INT, mlp_ratio=POSITIVE)
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


CONDITIONING_MODES = ("adaln_zero", "in_context")


class TinyDenoiser(nn.Module):
    """A small DiT-like denoiser whose only switch is *how* it is conditioned.

    ``conditioning="adaln_zero"``: DiT blocks modulated by ``c = t_emb + y_emb``.
    ``conditioning="in_context"``: the two embeddings are appended as two extra
    tokens and plain transformer blocks attend to them (DiT's "in-context"
    variant). Everything else (patch embedding, positions, width, depth, heads,
    the output head) is the same, so the loss curves compare conditioning alone.

    ``forward(x, t, y)``: images ``(B, C, H, W)``, times ``(B,)`` in [0, 1], labels
    ``(B,)`` to a prediction ``(B, C, H, W)``.
    """

    @check_arguments(image_size=POSITIVE_INT, patch_size=POSITIVE_INT, in_channels=POSITIVE_INT,
                     hidden_size=POSITIVE_INT, depth=POSITIVE_INT, num_heads=POSITIVE_INT, num_classes=POSITIVE_INT,
                     class_dropout_prob=PROBABILITY)
    def __init__(self, image_size: int = 16, patch_size: int = 4, in_channels: int = 1,
                 hidden_size: int = 96, depth: int = 4, num_heads: int = 4, num_classes: int = 10,
                 class_dropout_prob: float = 0.1, conditioning: str = "adaln_zero"):
        super().__init__()
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
        check_divisible("TinyDenoiser", "image_size", image_size, "patch_size", patch_size)
        check_divisible("TinyDenoiser", "hidden_size", hidden_size, "num_heads", num_heads)
        self.conditioning = conditioning
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, img_size=image_size)
        grid = image_size // patch_size
        pos = get_2d_sincos_pos_embed(hidden_size, grid)
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)  # (1, L, D), fixed
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if conditioning == "adaln_zero":
            self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads) for _ in range(depth))
            self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        else:
            self.blocks = nn.ModuleList(TransformerBlock(hidden_size, num_heads) for _ in range(depth))
            self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6)
            self.linear = zero_init(nn.Linear(hidden_size, patch_size * patch_size * in_channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_float_input("TinyDenoiser", "t", t, ndim=1, layout="(B,)")
        check_range(t, 0.0, 1.0, "TinyDenoiser: t (rectified-flow time, not a 0..999 timestep)")
        check_same_batch("TinyDenoiser", x=x, t=t, y=y)
        tokens = self.x_embedder(x) + self.pos_embed  # (B, L, D)
        t_emb, y_emb = self.t_embedder(t * 1000), self.y_embedder(y)  # t in [0,1] -> DiT's 0..1000 scale
        if self.conditioning == "adaln_zero":
            c = t_emb + y_emb
            for block in self.blocks:
                tokens = block(tokens, c)
            out = self.final_layer(tokens, c)
        else:
            num_image_tokens = tokens.shape[1]
            tokens = torch.cat([tokens, t_emb[:, None], y_emb[:, None]], dim=1)  # (B, L + 2, D)
            for block in self.blocks:
                tokens = block(tokens)
            out = self.linear(self.norm_final(tokens[:, :num_image_tokens]))
        return unpatchify(out, self.patch_size, self.in_channels)
