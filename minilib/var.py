"""VAR's transformer blocks (Tian et al., 2024, "Visual Autoregressive Modeling").

Chapter 3 of the book meets these blocks as a second flavour of adaLN; chapter 10
builds the full VAR model on them. Compared with DiT's block (``adaln.DiTBlock``):

- the conditioning ``c`` (a class embedding, width D) is mapped by ``ada_lin`` to
  six vectors of width C in the order ``gamma1, gamma2, scale1, scale2, shift1,
  shift2`` (DiT's order is shift, scale, gate per sub-layer):

      x = x + gamma1 * Attn(LN(x) * (1 + scale1) + shift1)
      x = x + gamma2 * FFN(LN(x) * (1 + scale2) + shift2)

- with ``shared_aln=True`` one ``shared_ada_lin`` in the parent model computes
  the six vectors once, and each block only adds its own learned offset
  ``ada_gss`` of shape ``(1, 1, 6, C)``: far fewer parameters per block;
- attention L2-normalises queries and keys and multiplies the cosine
  similarities by a learned per-head temperature (``scale_mul_1H11``), which
  keeps the logits bounded in a deep, wide model;
- attention takes an additive mask (VAR's block-causal mask over scales) and can
  cache keys and values, so sampling feeds one scale at a time.

Submodule names (``attn.mat_qkv``, ``attn.q_bias``, ``ffn.fc1``, ``ada_lin.1``,
``ada_gss``, ``head_nm.ada_lin.1``) follow the official code so that VAR's
checkpoints load into these classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .adaln import Mlp, modulate


class FFN(Mlp):
    """VAR's feed-forward layer: the same ``fc1 -> GELU(tanh) -> fc2`` as DiT's ``Mlp``.

    ``(B, L, C) -> (B, L, C)``.
    """


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016) on a residual branch ``(B, ...)``.

    In training, each sample's whole branch is zeroed with probability ``p`` and the
    kept ones are scaled by ``1 / (1 - p)`` so the expectation is unchanged. In
    evaluation it is the identity.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SelfAttention(nn.Module):
    """Multi-head self-attention as in VAR, with an optional additive mask and a KV cache.

    ``forward(x, attn_bias)``: tokens ``(B, L, C)`` and an additive mask ``(1 or B,
    1 or H, L, L_k)`` (0 where a query may look, ``-inf`` where it may not; ``L_k``
    counts cached keys too) to ``(B, L, C)``.

    With ``attn_l2_norm=True`` (VAR's setting) the logits are

        s * <q / |q|, k / |k|>,   s = exp(min(scale_mul_1H11, log 100)),

    a cosine similarity times a learned per-head temperature in ``(0, 100]``,
    initialised to 4. Otherwise they are ``<q, k> * 0.25 / sqrt(head_dim)``.

    The fused ``mat_qkv`` has no bias of its own: q and v get the learned biases
    ``q_bias`` and ``v_bias``, and k a bias fixed at zero (the buffer
    ``zero_k_bias``). Without the L2 norm a key bias would only add ``q . b_k`` to
    a whole row of logits, which the softmax ignores.
    """

    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.caching, self.cached_k, self.cached_v = False, None, None

    def kv_caching(self, enable: bool) -> None:
        """Turn the KV cache on or off; either way, forget what was cached."""
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[2] != self.embed_dim:
            raise ValueError(f"SelfAttention expects x of shape (B, L, {self.embed_dim}), got {tuple(x.shape)}")
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, head_dim)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp(max=self.max_scale_mul).exp()  # (1, H, 1, 1)
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if self.caching:
            if self.cached_k is not None:
                k = torch.cat((self.cached_k, k), dim=2)
                v = torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        if attn_bias is not None:
            if not attn_bias.is_floating_point() or attn_bias.ndim != 4 or attn_bias.shape[-2:] != (L, k.shape[2]):
                raise ValueError(f"attn_bias must be an additive float mask of shape (1 or B, 1 or H, {L}, "
                                 f"{k.shape[2]}), got {attn_bias.dtype} {tuple(attn_bias.shape)}")
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))

    def extra_repr(self) -> str:
        return f"attn_l2_norm={self.attn_l2_norm}"


class SharedAdaLin(nn.Linear):
    """The parent's ``Linear(D, 6C)`` for shared adaLN, reshaped for the blocks.

    ``(B, D) -> (B, 1, 6, C)``; every block adds its own ``ada_gss`` to it.
    """

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.out_features // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


class AdaLNSelfAttn(nn.Module):
    """VAR's transformer block: self-attention and FFN, both modulated by adaLN.

    ``forward(x, cond_BD, attn_bias)``: tokens ``(B, L, C)`` to ``(B, L, C)``, where

    - ``shared_aln=False``: ``cond_BD`` is the conditioning ``(B, D)``, and this
      block's own ``ada_lin = SiLU -> Linear(D, 6C)`` turns it into six ``(B, C)``
      vectors;
    - ``shared_aln=True``: ``cond_BD`` is the parent's ``SiLU -> SharedAdaLin``
      output ``(B, 1, 6, C)``, and the block adds its learned ``ada_gss``
      ``(1, 1, 6, C)``.

    Then, with ``LN`` a LayerNorm without affine parameters (``ln_wo_grad``):

        x = x + gamma1 * Attn(LN(x) * (1 + scale1) + shift1, attn_bias)
        x = x + gamma2 * FFN(LN(x) * (1 + scale2) + shift2)

    Unlike adaLN-Zero the block is not the identity at construction. VAR's model
    re-initialises ``ada_lin``: gamma weights times 1e-5 (nearly zero, so each block
    starts close to the identity), scale and shift weights times 0.5, biases 0.
    """

    def __init__(self, embed_dim: int, cond_dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 shared_aln: bool = False, attn_l2_norm: bool = True, drop_path: float = 0.0,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.C, self.D = embed_dim, cond_dim
        self.shared_aln = shared_aln
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(embed_dim, num_heads, attn_l2_norm=attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[2] != self.C:
            raise ValueError(f"AdaLNSelfAttn expects x of shape (B, L, {self.C}), got {tuple(x.shape)}")
        B = x.shape[0]
        if self.shared_aln:
            if cond_BD.shape != (B, 1, 6, self.C):
                raise ValueError(f"with shared_aln, cond_BD must be the shared_ada_lin output ({B}, 1, 6, {self.C}), "
                                 f"got {tuple(cond_BD.shape)}")
            ada = (self.ada_gss + cond_BD).view(B, 6, self.C)
        else:
            if cond_BD.shape != (B, self.D):
                raise ValueError(f"cond_BD must have shape ({B}, {self.D}), got {tuple(cond_BD.shape)}")
            ada = self.ada_lin(cond_BD).view(B, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(1)  # each (B, C)
        x = x + self.drop_path(self.attn(modulate(self.ln_wo_grad(x), shift1, scale1), attn_bias) * gamma1[:, None])
        x = x + self.drop_path(self.ffn(modulate(self.ln_wo_grad(x), shift2, scale2)) * gamma2[:, None])
        return x

    def extra_repr(self) -> str:
        return f"shared_aln={self.shared_aln}"


class AdaLNBeforeHead(nn.Module):
    """The adaLN before VAR's output head: ``LN(x) * (1 + scale) + shift``, no gate.

    ``forward(x_BLC, cond_BD)``: tokens ``(B, L, C)`` and conditioning ``(B, D)`` to
    ``(B, L, C)``. ``ada_lin = SiLU -> Linear(D, 2C)`` gives ``scale, shift`` (in that order).
    """

    def __init__(self, C: int, D: int, norm_eps: float = 1e-6):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        if x_BLC.ndim != 3 or x_BLC.shape[2] != self.C or cond_BD.shape != (x_BLC.shape[0], self.D):
            raise ValueError(f"AdaLNBeforeHead expects x (B, L, {self.C}) and cond (B, {self.D}), "
                             f"got {tuple(x_BLC.shape)} and {tuple(cond_BD.shape)}")
        scale, shift = self.ada_lin(cond_BD).view(-1, 2, self.C).unbind(1)
        return modulate(self.ln_wo_grad(x_BLC), shift, scale)
