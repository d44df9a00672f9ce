"""VAR: visual autoregressive modelling by next-scale prediction (Tian et al., 2024).

Chapter 3 of the book meets VAR's blocks as a second flavour of adaLN; chapter 10
builds the whole model on them. Compared with DiT's block (``adaln.DiTBlock``):

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

The model (``VAR``) predicts the token maps of a multi-scale VQ-VAE (chapter 9)
one *scale* at a time, each scale conditioned on the class and on all coarser
scales: ``p(r_1, ..., r_K) = prod_k p(r_k | r_1, ..., r_{k-1})``. ``forward``
trains all scales at once with teacher forcing under the block-causal mask;
``autoregressive_infer_cfg`` samples scale by scale with classifier-free
guidance, top-k/top-p filtering and the KV cache. ``build_var`` makes the
official configurations (width ``64 * depth``, ``depth`` heads).

Submodule names (``word_embed``, ``class_emb``, ``lvl_embed``, ``pos_1LC``,
``attn.mat_qkv``, ``attn.q_bias``, ``ffn.fc1``, ``ada_lin.1``, ``ada_gss``,
``head_nm.ada_lin.1``, ``head``) follow the official code so that VAR's
checkpoints load into these classes with ``strict=True``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adaln import Mlp, modulate
from .validation import (NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, PROBABILITY, UNIT_INTERVAL,
                         check_arguments, check_divisible)
from .vqvae import VAR_PATCH_NUMS


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
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)  # 1: keep the sample
        return x * keep.div_(1 - self.p)  # the mask is scaled, then applied (VAR's rounding)

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


# ---------------------------------------------------------------------------
# Sampling helpers
# ---------------------------------------------------------------------------


def sample_with_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                             rng: torch.Generator | None = None, num_samples: int = 1) -> torch.Tensor:
    """Draw token ids from ``softmax(logits)`` after top-k and top-p filtering.

    ``logits_BlV`` ``(B, l, V)`` is filtered *in place* (hence the trailing underscore,
    as in the official code): a removed token's logit becomes ``-inf``.

    - top-k (Fan et al., 2018): keep the ``top_k`` largest logits of each row
      (ties with the k-th are kept too); ``top_k >= V`` keeps everything.
    - top-p, nucleus (Holtzman et al., 2020): sort a row's probabilities from
      small to large and drop tokens while the dropped mass stays ``<= 1 - top_p``;
      what is left is the smallest set of most likely tokens whose mass is at
      least ``top_p``. The most likely token is never dropped.

    ``top_k=0`` and ``top_p=0`` switch a filter off. Returns int64
    ``(B, l, num_samples)``, drawn with replacement using the generator ``rng``.
    """
    if not isinstance(logits_BlV, torch.Tensor) or logits_BlV.ndim != 3 or not logits_BlV.is_floating_point():
        raise ValueError(f"logits must be a float tensor of shape (B, l, V), got "
                         f"{getattr(logits_BlV, 'dtype', type(logits_BlV).__name__)} "
                         f"{tuple(getattr(logits_BlV, 'shape', ()))}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (0 = off), got {top_p!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    B, l, V = logits_BlV.shape
    if 0 < top_k < V:
        kth_largest = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_largest, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        sorted_to_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_to_remove[..., -1:] = False  # the most likely token stays
        logits_BlV.masked_fill_(sorted_to_remove.scatter(-1, sorted_idx, sorted_to_remove), -torch.inf)
    probs = logits_BlV.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=num_samples, replacement=True, generator=rng).view(B, l, num_samples)


def gumbel_softmax_with_rng(logits: torch.Tensor, tau: float, rng: torch.Generator | None = None) -> torch.Tensor:
    """A soft sample ``softmax((logits + g) / tau)``, ``g ~ Gumbel(0, 1)`` drawn with ``rng``.

    ``(..., V) -> (..., V)``: a point of the probability simplex that approaches a
    one-hot sample as ``tau -> 0`` (Jang et al., 2017). VAR's ``more_smooth``
    sampling mixes code vectors with these weights instead of picking one.
    """
    gumbels = -torch.empty_like(logits).exponential_(generator=rng).log()
    return ((logits + gumbels) / tau).softmax(dim=-1)


# ---------------------------------------------------------------------------
# The VAR transformer
# ---------------------------------------------------------------------------

def scale_levels(patch_nums: Sequence[int]) -> torch.Tensor:
    """The scale index of every token of a flattened pyramid: int64 ``(L,)``, ``L = sum pn^2``.

    ``scale_levels([1, 2, 3])`` is ``[0, 1, 1, 1, 1, 2, 2, ..., 2]`` (1 + 4 + 9 tokens).
    """
    return torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)])


def block_causal_mask(patch_nums: Sequence[int]) -> torch.Tensor:
    """VAR's attention mask over scales: float ``(1, 1, L, L)``.

    Entry ``(i, j)`` is 0 when token ``j``'s scale is not later than token ``i``'s
    (``level(j) <= level(i)``) and ``-inf`` otherwise: every token sees all tokens
    of its own scale and of every coarser one, and nothing finer. Within a scale
    attention is bidirectional, which is what lets VAR predict a whole token map
    in one step.
    """
    d = scale_levels(patch_nums).view(1, -1, 1)  # query levels down the rows
    dT = d.transpose(1, 2)  # key levels along the columns
    return torch.where(d >= dT, 0.0, -torch.inf).view(1, 1, d.shape[1], d.shape[1])


class VAR(nn.Module):
    """The VAR transformer: class-conditional next-scale prediction of a token pyramid.

    A multi-scale VQ-VAE (chapter 9) writes an image's latent as ``K`` token maps
    ``r_1, ..., r_K`` of sides ``patch_nums`` (1x1 up to 16x16), each a residual
    that refines the sum of the coarser ones. VAR models

        p(r_1, ..., r_K | class) = prod_k p(r_k | r_1, ..., r_{k-1}, class)   (paper eq. 6)

    with one transformer over the flattened pyramid of ``L = sum pn^2`` tokens
    (680 for the default 10 scales) and the block-causal mask
    ``attn_bias_for_masking``: the tokens of scale ``k`` see scales ``1..k``, so a
    whole token map is predicted in parallel, and the next scale waits for it.

    Inputs, position by position:

    - scale 1 (``first_l`` tokens): the class embedding ``class_emb`` (a table of
      ``num_classes + 1`` rows; the last is the null class of classifier-free
      guidance) plus ``pos_start``;
    - scale ``k > 1``: ``word_embed`` (a ``Linear(Cvae, C)``) of the VQ-VAE's
      features of the scales so far, resized to ``pn_k x pn_k``
      (``quantize.idxBl_to_var_input`` in training,
      ``quantize.get_next_autoregressive_input`` in sampling);
    - every token adds a learned absolute position ``pos_1LC`` ``(1, L, C)`` and
      the embedding of its scale, ``lvl_embed(lvl_1L)``.

    The class embedding is also the adaLN conditioning ``cond_BD`` of every block
    (``AdaLNSelfAttn``, or shared through ``shared_ada_lin``) and of ``head_nm``;
    ``head`` maps each token to logits over the ``V`` codebook entries.

    The VQ-VAE is kept in the tuples ``vae_proxy`` / ``vae_quant_proxy``, outside
    the module tree, so VAR's state dict holds the transformer only (as VAR's
    checkpoints do) and ``.to(device)`` does not move it: move both.

    Args:
        vae_local: the multi-scale ``VQVAE`` whose tokens VAR models; needed for
            sampling and ``training_loss``, not for ``forward``. May be None.
        num_classes: number of classes; ``class_emb`` has one more row.
        depth, embed_dim, num_heads, mlp_ratio: the transformer (``C = D = embed_dim``).
        drop_path_rate: stochastic depth, rising linearly from 0 (first block) to
            this (last block).
        norm_eps: LayerNorm epsilon.
        shared_aln: one ``shared_ada_lin`` for all blocks (see ``AdaLNSelfAttn``).
        cond_drop_rate: probability of replacing a label by the null class in
            training, so the same network learns ``p(x)`` for guidance.
        attn_l2_norm: cosine attention with a learned temperature (VAR: True).
        patch_nums: the sides of the token maps, coarse to fine.
        Cvae, vocab_size: the VQ-VAE's code width and codebook size; taken from
            ``vae_local`` when it is given.

    The constructor ends with :meth:`init_weights` (the official ``build_vae_var``
    calls it right after building). VAR's own dropout options (``drop_rate``,
    ``attn_drop_rate``) are 0 in every released model and are left out.
    """

    @check_arguments(num_classes=POSITIVE_INT, depth=POSITIVE_INT, embed_dim=POSITIVE_INT, num_heads=POSITIVE_INT,
                     mlp_ratio=POSITIVE, drop_path_rate=PROBABILITY, norm_eps=POSITIVE, cond_drop_rate=PROBABILITY,
                     Cvae=POSITIVE_INT.or_none(), vocab_size=POSITIVE_INT.or_none())
    def __init__(self, vae_local: nn.Module | None = None, num_classes: int = 1000, depth: int = 16,
                 embed_dim: int = 1024, num_heads: int = 16, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-6, shared_aln: bool = False, cond_drop_rate: float = 0.1,
                 attn_l2_norm: bool = True, patch_nums: Sequence[int] = VAR_PATCH_NUMS,
                 Cvae: int | None = None, vocab_size: int | None = None):
        super().__init__()
        patch_nums = tuple(int(pn) for pn in patch_nums)
        if not patch_nums or any(pn < 1 for pn in patch_nums):
            raise ValueError(f"patch_nums must be a non-empty sequence of positive ints, got {patch_nums}")
        if vae_local is not None:
            Cvae = _agree("Cvae", Cvae, vae_local.Cvae)
            vocab_size = _agree("vocab_size", vocab_size, vae_local.vocab_size)
            vae_patch_nums = tuple(vae_local.quantize.v_patch_nums)
            if vae_patch_nums != patch_nums:
                raise ValueError(f"patch_nums {patch_nums} differ from the VQ-VAE's v_patch_nums {vae_patch_nums}")
        if Cvae is None or vocab_size is None:
            raise ValueError("VAR needs Cvae and vocab_size, or a vae_local to read them from")
        check_divisible("VAR", "embed_dim", embed_dim, "num_heads", num_heads)
        self.Cvae, self.V = Cvae, vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.num_classes, self.cond_drop_rate = num_classes, cond_drop_rate
        self.patch_nums = patch_nums
        self.L = sum(pn * pn for pn in patch_nums)
        self.first_l = patch_nums[0] ** 2
        self.begin_ends = []  # (start, end) of each scale in the flattened sequence
        cur = 0
        for pn in patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.num_stages_minus_1 = len(patch_nums) - 1
        self.vae_proxy = () if vae_local is None else (vae_local,)
        self.vae_quant_proxy = () if vae_local is None else (vae_local.quantize,)

        # 1. input embeddings: features of the coarser scales, class, positions, scale
        init_std = math.sqrt(1 / self.C / 3)
        self.word_embed = nn.Linear(Cvae, self.C)
        self.class_emb = nn.Embedding(num_classes + 1, self.C)  # row num_classes: the null class
        nn.init.trunc_normal_(self.class_emb.weight, mean=0, std=init_std)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        nn.init.trunc_normal_(self.pos_start, mean=0, std=init_std)
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        nn.init.trunc_normal_(self.pos_1LC, mean=0, std=init_std)
        self.lvl_embed = nn.Embedding(len(patch_nums), self.C)
        nn.init.trunc_normal_(self.lvl_embed.weight, mean=0, std=init_std)

        # 2. the blocks, with stochastic depth rising linearly to drop_path_rate
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(self.D, 6 * self.C)) if shared_aln
                               else nn.Identity())
        self.drop_path_rate = drop_path_rate
        # float32 steps, as VAR's torch.linspace gives them (so the same keep probabilities)
        dpr = [p.item() for p in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(self.C, self.D, num_heads, mlp_ratio=mlp_ratio, shared_aln=shared_aln,
                          attn_l2_norm=attn_l2_norm, drop_path=dpr[i], norm_eps=norm_eps)
            for i in range(depth))

        # 3. the scale of every token and the block-causal mask (both in the state dict, as in VAR)
        self.register_buffer("lvl_1L", scale_levels(patch_nums).view(1, self.L))
        self.register_buffer("attn_bias_for_masking", block_causal_mask(patch_nums).contiguous())

        # 4. the classifier head
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_eps=norm_eps)
        self.head = nn.Linear(self.C, self.V)
        self.init_weights()  # VAR's initialisation, with the settings of its build_vae_var

    def extra_repr(self) -> str:
        return f"drop_path_rate={self.drop_path_rate:g}"

    # ----------------------------------------------------------------- training

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """``head(head_nm(h, cond))``: tokens ``(B, L, C)`` to logits ``(B, L, V)``."""
        return self.head(self.head_nm(h_BLC, cond_BD))

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                drop_labels: bool | None = None) -> torch.Tensor:
        """Teacher-forced logits for every scale at once.

        Args:
            label_B: int64 ``(B,)`` classes in ``[0, num_classes]`` (``num_classes`` is
                the null class).
            x_BLCv_wo_first_l: ``(B, L - first_l, Cvae)``, the inputs of scales
                ``2..K``: the VQ-VAE's features of the ground-truth scales ``1..k-1``
                resized to scale ``k`` (``quantize.idxBl_to_var_input``).
            drop_labels: replace each label by the null class with probability
                ``cond_drop_rate`` (label dropout, for classifier-free guidance),
                drawing ``torch.rand(B)`` from the global generator. None (default):
                in training mode only.

        Label dropout in evaluation: the official ``VAR.forward`` (``models/var.py``)
        draws ``torch.rand(B)`` and drops labels in every mode, evaluation included.
        minilib does not by default: an evaluation pass keeps its labels, gives the
        same logits every time and leaves the global generator where it was (the
        official one has moved by ``B`` numbers, so later draws differ too).
        ``drop_labels=True`` reproduces the official pass exactly: the same seed
        gives the same draw, the same dropped labels, the same logits and the same
        generator state afterwards (``tests/test_official_var.py``).

        Returns:
            logits ``(B, L, V)``; position ``l`` predicts the token at ``l`` of the
            ground-truth pyramid ``torch.cat(gt_idx_Bl, dim=1)``.
        """
        if not isinstance(x_BLCv_wo_first_l, torch.Tensor) or x_BLCv_wo_first_l.ndim != 3 \
                or x_BLCv_wo_first_l.shape[1:] != (self.L - self.first_l, self.Cvae):
            raise ValueError(f"x_BLCv_wo_first_l must have shape (B, {self.L - self.first_l}, {self.Cvae}) "
                             f"(L - first_l, Cvae), got {tuple(getattr(x_BLCv_wo_first_l, 'shape', ()))}")
        if drop_labels is not None and not isinstance(drop_labels, bool):
            raise ValueError(f"drop_labels must be True, False or None (training mode decides), got {drop_labels!r}")
        B = x_BLCv_wo_first_l.shape[0]
        label_B = self._check_labels(label_B, B)
        if self.training if drop_labels is None else drop_labels:  # label dropout for classifier-free guidance
            drop = torch.rand(B, device=label_B.device) < self.cond_drop_rate
            label_B = torch.where(drop, self.num_classes, label_B)
        sos = cond_BD = self.class_emb(label_B)
        sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)  # VAR's order of the sums

        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        for block in self.blocks:
            x_BLC = block(x_BLC, cond_BD_or_gss, self.attn_bias_for_masking)
        return self.get_logits(x_BLC, cond_BD)

    def training_loss(self, label_B: torch.Tensor, gt_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """VAR's objective: cross-entropy of the teacher-forced logits over all scales.

        ``gt_idx_Bl`` is the ground-truth index pyramid, one int64 ``(B, pn^2)``
        tensor per scale (``vae.img_to_idxBl(images)``). The loss is the mean over
        all ``B * L`` tokens of ``-log p(r_k[i] | r_{<k}, class)``: VAR's trainer
        weights every token by ``1 / L``, so the fine scales, with most of the
        tokens, dominate.
        """
        _, quant = self._vae_and_quantizer()
        if not isinstance(gt_idx_Bl, (list, tuple)) or len(gt_idx_Bl) != len(self.patch_nums):
            raise ValueError(f"gt_idx_Bl must be a list of {len(self.patch_nums)} index maps (one per scale), "
                             f"got {type(gt_idx_Bl).__name__} of length {len(gt_idx_Bl) if hasattr(gt_idx_Bl, '__len__') else '?'}")
        B = gt_idx_Bl[0].shape[0]
        for idx, pn in zip(gt_idx_Bl, self.patch_nums):
            if idx.shape != (B, pn * pn) or idx.is_floating_point():
                raise ValueError(f"gt_idx_Bl[k] must be integer (B, pn_k^2) with pn = {self.patch_nums}, "
                                 f"got {idx.dtype} {tuple(idx.shape)} for pn = {pn}")
        gt_BL = torch.cat(list(gt_idx_Bl), dim=1)
        if gt_BL.min() < 0 or gt_BL.max() >= self.V:
            raise ValueError(f"token ids must lie in [0, {self.V - 1}], got {gt_BL.min().item()}..{gt_BL.max().item()}")
        logits_BLV = self(label_B, quant.idxBl_to_var_input(list(gt_idx_Bl)))
        return F.cross_entropy(logits_BLV.reshape(-1, self.V), gt_BL.reshape(-1))

    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0) -> None:
        """VAR's initialisation (the values of the official ``build_vae_var``).

        Every ``Linear`` and ``Embedding`` weight is drawn from a truncated normal
        with ``init_std`` (negative: ``sqrt(1 / (3C))``), biases 0. Then the head is
        scaled by ``init_head`` (near-uniform first predictions), each block's
        output projections (``attn.proj``, ``ffn.fc2``) by ``1 / sqrt(2 depth)``
        (GPT-2's rule, so the residual stream does not grow with depth), and the
        adaLN weights: gamma rows by ``init_adaln_gamma`` (each block starts close
        to the identity) and scale/shift rows by ``init_adaln``.
        """
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=init_std)
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            if block.shared_aln:  # ada_gss (1, 1, 6, C): gamma1, gamma2, then scales and shifts
                block.ada_gss[:, :, 2:].mul_(init_adaln)
                block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:  # ada_lin weight (6C, D): the same order along the rows
                block.ada_lin[-1].weight[2 * self.C:].mul_(init_adaln)
                block.ada_lin[-1].weight[:2 * self.C].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.zero_()

    # ----------------------------------------------------------------- sampling

    @torch.no_grad()
    def autoregressive_infer_cfg(self, B: int, label_B: torch.Tensor | int | None, g_seed: int | None = None,
                                 cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
                                 use_kv_cache: bool = True, return_idx: bool = False):
        """Sample ``B`` images scale by scale, with classifier-free guidance.

        At scale ``k`` (``si = k - 1``, counted from 0) the model sees the class and
        the coarser scales and predicts all ``pn_k^2`` tokens at once. The batch is
        doubled: the first ``B`` rows carry the labels, the last ``B`` the null
        class, and the logits are guided as

            logits = (1 + t) * logits_cond - t * logits_uncond,   t = cfg * si / (K - 1),

        (the code's ``t``; chapter 10 writes it ``w_k``, Ho & Salimans' weight, so the book's
        guidance scale is ``s = 1 + w_k``),

        a guidance that rises linearly from 0 at the first scale to ``cfg`` at the
        last (``cfg = 0`` samples the plain conditional model). Then top-k/top-p
        filtering and a draw; the chosen code vectors are added to the running
        feature map ``f_hat`` by the VQ-VAE (``get_next_autoregressive_input``),
        which also gives the input of the next scale.

        With ``use_kv_cache=True`` (VAR's way) each scale feeds only its own tokens
        and the attention layers keep the keys and values of the earlier scales;
        with ``False`` each scale recomputes the whole prefix under the
        block-causal mask. Both give the same tokens for the same seed.

        Args:
            B: number of images.
            label_B: int64 ``(B,)`` classes; an int for all (negative: the null
                class, i.e. unconditional); None: uniformly random classes.
            g_seed: seed of the sampling generator (None: the global one).
            cfg: guidance weight at the last scale (``w_K``; the book's scale ``s = 1 + cfg`` there;
                0: no guidance).
            top_k, top_p: see :func:`sample_with_top_k_top_p_` (0 = off).
            more_smooth: VAR's visualisation trick: mix code vectors with
                Gumbel-softmax weights instead of picking the sampled one.
            use_kv_cache: feed one scale at a time with the KV cache.
            return_idx: return the sampled index pyramid instead of images.

        Returns:
            images ``(B, 3, H, W)`` in ``[0, 1]`` (as VAR returns them), or with
            ``return_idx`` the list of int64 ``(B, pn^2)`` index maps, coarse to fine.

        Call ``.eval()`` first; the VQ-VAE must be on the same device as the model.
        """
        vae, quant = self._vae_and_quantizer()
        POSITIVE_INT("autoregressive_infer_cfg", "B", B)
        NON_NEGATIVE("autoregressive_infer_cfg", "cfg", cfg)  # 0: no guidance
        NON_NEGATIVE_INT("autoregressive_infer_cfg", "top_k", top_k)  # 0: off
        UNIT_INTERVAL("autoregressive_infer_cfg", "top_p", top_p)  # 0: off
        device = self.lvl_1L.device
        if quant.embedding.weight.device != device:
            raise ValueError(f"the VQ-VAE is on {quant.embedding.weight.device} but VAR is on {device}; "
                             "move both (VAR does not move its vae_proxy)")
        rng = None if g_seed is None else torch.Generator(device=device).manual_seed(g_seed)
        if label_B is None:  # uniform classes, drawn as the official code draws them (same seed, same classes)
            uniform = torch.full((1, self.num_classes), 1.0 / self.num_classes, device=device)
            label_B = torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)
        elif isinstance(label_B, int):
            label_B = torch.full((B,), self.num_classes if label_B < 0 else label_B, device=device)
        label_B = self._check_labels(label_B, B)

        sos = cond_BD = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes))))
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC  # (1, L, C)
        next_token_map = (sos.unsqueeze(1).expand(2 * B, self.first_l, -1)
                          + self.pos_start.expand(2 * B, self.first_l, -1) + lvl_pos[:, :self.first_l])
        f_hat = sos.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        idx_Bl_list, prefix, cur_L = [], [], 0
        for block in self.blocks:
            block.attn.kv_caching(use_kv_cache)
        try:
            for si, pn in enumerate(self.patch_nums):
                ratio = si / max(1, self.num_stages_minus_1)  # 0 at the first scale, 1 at the last
                cur_L += pn * pn
                if use_kv_cache:  # this scale's tokens only; earlier keys and values are cached
                    x, attn_bias = next_token_map, None
                else:  # the whole prefix again, under the block-causal mask
                    prefix.append(next_token_map)
                    x, attn_bias = torch.cat(prefix, dim=1), self.attn_bias_for_masking[:, :, :cur_L, :cur_L]
                for block in self.blocks:
                    x = block(x, cond_BD_or_gss, attn_bias)
                logits_BlV = self.get_logits(x[:, -pn * pn:], cond_BD)

                t = cfg * ratio
                logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
                idx_Bl = sample_with_top_k_top_p_(logits_BlV, top_k=top_k, top_p=top_p, rng=rng)[:, :, 0]
                idx_Bl_list.append(idx_Bl)
                if not more_smooth:
                    h_BlC = quant.embedding(idx_Bl)
                else:  # soft codes, sharper at finer scales (MaskGIT-style temperature)
                    gum_t = max(0.27 * (1 - ratio * 0.95), 0.005)
                    weights = gumbel_softmax_with_rng(logits_BlV.mul(1 + ratio), tau=gum_t, rng=rng)
                    h_BlC = weights @ quant.embedding.weight.unsqueeze(0)
                h_BChw = h_BlC.transpose(1, 2).reshape(B, self.Cvae, pn, pn)
                f_hat, next_token_map = quant.get_next_autoregressive_input(si, len(self.patch_nums), f_hat, h_BChw)
                if si != self.num_stages_minus_1:  # the input of the next scale
                    next_token_map = next_token_map.view(B, self.Cvae, -1).transpose(1, 2)
                    next_pn = self.patch_nums[si + 1]
                    next_token_map = self.word_embed(next_token_map) + lvl_pos[:, cur_L:cur_L + next_pn * next_pn]
                    next_token_map = next_token_map.repeat(2, 1, 1)  # conditional and unconditional halves
        finally:
            for block in self.blocks:
                block.attn.kv_caching(False)
        if return_idx:
            return idx_Bl_list
        return vae.fhat_to_img(f_hat).add_(1).mul_(0.5)  # from [-1, 1] to [0, 1]

    # ----------------------------------------------------------------- checks

    def _vae_and_quantizer(self):
        if not self.vae_proxy:
            raise ValueError("this VAR has no VQ-VAE: build it with VAR(vae_local=vae, ...) "
                             "(or zoo.build(name, vae_local=vae)) to sample or to compute the training loss")
        return self.vae_proxy[0], self.vae_quant_proxy[0]

    def _check_labels(self, label_B, B: int) -> torch.Tensor:
        if not isinstance(label_B, torch.Tensor) or label_B.shape != (B,) or label_B.is_floating_point() \
                or label_B.dtype == torch.bool:
            raise ValueError(f"label_B must be an integer tensor of shape ({B},), got "
                             f"{getattr(label_B, 'dtype', type(label_B).__name__)} {tuple(getattr(label_B, 'shape', ()))}")
        if B and (label_B.min() < 0 or label_B.max() > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} is the null class), "
                             f"got {label_B.min().item()}..{label_B.max().item()}")
        return label_B.long()


def _agree(name: str, given, from_vae):
    if given is not None and given != from_vae:
        raise ValueError(f"{name}={given} differs from the VQ-VAE's {name}={from_vae}")
    return from_vae


def build_var(depth: int = 16, vae_local: nn.Module | None = None, num_classes: int = 1000,
              patch_nums: Sequence[int] = VAR_PATCH_NUMS, shared_aln: bool = False,
              attn_l2_norm: bool = True) -> VAR:
    """One of VAR's official configurations.

    Everything follows from ``depth`` (VAR's ``build_vae_var``): width
    ``C = 64 * depth``, ``depth`` heads of 64, MLP ratio 4, drop-path rate
    ``0.1 * depth / 24``, label dropout 0.1. ``Cvae`` and ``vocab_size`` come from
    ``vae_local`` when given, else they are the official VQ-VAE's (32 and 4096).
    VAR-d16 has 310,283,520 parameters.
    """
    model = VAR(vae_local=vae_local, num_classes=num_classes, depth=depth, embed_dim=64 * depth,
                num_heads=depth, mlp_ratio=4.0, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6,
                shared_aln=shared_aln, cond_drop_rate=0.1, attn_l2_norm=attn_l2_norm, patch_nums=patch_nums,
                Cvae=None if vae_local is not None else 32, vocab_size=None if vae_local is not None else 4096)
    return model
