"""Few-shot generation with a set encoder: VFSDDPM with a DiT generator.

Chapter 8 of the book. A few-shot generator is shown a handful of images of a
class it has never been trained on (the *support set*) and draws new images of
that class. Few-Shot Diffusion Models (Giannone, Nielsen & Winther, 2022,
https://arxiv.org/abs/2205.15463) do it with two networks:

    support set X (B, S, C, H, W)
        --SetViT (sViT): shifted patch tokens of every image, one sequence of
          S*L tokens + [CLS], locality self-attention blocks, final norm-->
        context c (B, hdim), the [CLS] token    (or tokens (B, 1 + L, hdim))
    [variational: c ~ q(c | X) = N(mu, sigma^2), KL(q || N(0, I)) added to the loss]
    noisy image x_t, timestep t, context c
        --ContextDiT: a DiT whose adaLN vector is t_emb + context_proj(c) ("film"),
          or whose sequence carries context_proj(tokens) ("tokens")-->  eps

The set encoder is a ViT for small data (Lee, Lee & Song, 2021,
https://arxiv.org/abs/2112.13492) applied to a set: *shifted patch
tokenisation* (SPT) gives each token its neighbours' pixels, and *locality
self-attention* (LSA) masks the diagonal of the attention matrix (no token
attends to itself) and learns the softmax temperature. Position embeddings
index the patch inside its image, never the image inside the set, so the
context does not depend on the order of the set.

Training is leave-one-out (``leave_one_out``): every image of a training set is
a target, generated from the context of the *other* images of its set, so the
model learns to generate from a set without ever copying the target.

The CIFAR-100 configuration of the JAX port is ``zoo.build("vfsddpm-cifar100")``;
chapter 8 counts its parameters and the book's appendix compares them with the
parameter summary published with that configuration.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adaln import DiTBlock, FinalLayer, Mlp, zero_init
from .diffusion import GaussianDiffusion, classifier_free_guidance
from .patch_embed import PatchEmbed, get_2d_sincos_pos_embed, patchify, unpatchify
from .timestep import TimestepEmbedder
from .validation import (POSITIVE, POSITIVE_INT, PROBABILITY, check_arguments, check_divisible, check_float_input,
                         check_same_batch, check_timesteps)

CONDITIONING_MODES = ("film", "tokens")
CONTEXT_MODES = ("deterministic", "variational")

# The four diagonal shifts of SPT as (dx, dy) in units of the shift size: left-up,
# right-up, left-down, right-down (Lee et al. 2021, Fig. 2).
DIAGONAL_SHIFTS = ((-1, -1), (1, -1), (-1, 1), (1, 1))


# ---------------------------------------------------------------------------
# The set encoder (sViT)
# ---------------------------------------------------------------------------


def shift_image(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Move images ``dx`` pixels right and ``dy`` pixels down, filling with zeros.

    ``(N, C, H, W) -> (N, C, H, W)``; negative values move left / up.
    """
    # F.pad with (left, right, top, bottom): padding one side and cropping the other moves the picture.
    return F.pad(images, (dx, -dx, dy, -dy))


class ShiftedPatchTokenization(nn.Module):
    """SPT (Lee et al. 2021): patches of an image *and* of its four diagonal shifts.

    Each image is concatenated along channels with four copies of itself moved
    by half a patch (``max(1, p // 2)`` pixels) to the left-up, right-up,
    left-down and right-down, so every patch also sees a rim of its neighbours:

        [x, shift(x, -s, -s), shift(x, s, -s), shift(x, -s, s), shift(x, s, s)]   (N, 5C, H, W)
        --patchify--> (N, L, p*p*5C) --norm (LayerNorm)--> --proj (Linear)--> (N, L, dim)

    Args:
        patch_size: p.
        in_channels: C of one image.
        dim: the token width.
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.shift = max(1, patch_size // 2)
        patch_dim = patch_size * patch_size * in_channels * (1 + len(DIAGONAL_SHIFTS))
        self.norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)

    def shifted_copies(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, 5C, H, W)``: the image, then its four diagonal shifts."""
        s = self.shift
        return torch.cat([images] + [shift_image(images, dx * s, dy * s) for dx, dy in DIAGONAL_SHIFTS], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"SPT expects images (N, {self.in_channels}, H, W), got {tuple(images.shape)}")
        patches = patchify(self.shifted_copies(images), self.patch_size)  # (N, L, p*p*5C)
        return self.proj(self.norm(patches))


class LocalitySelfAttention(nn.Module):
    """LSA (Lee et al. 2021): self-attention with a learned temperature and no self-attention.

        A = softmax(Q K^T * exp(temperature) + M),  M_ij = -inf if i == j else 0,

    ``temperature`` is a learned log-scale, initialised to ``log(1/sqrt(d_head))``
    so that training starts from ordinary scaled dot-product attention; a
    learned scale lets the attention become sharper than ``1/sqrt(d)`` allows.
    Masking the diagonal makes every token gather information from the *other*
    tokens, since its own value already reaches the output via the residual.

    ``(B, L, D) -> (B, L, D)``. Submodules as in ``adaln.Attention`` (``qkv``, ``proj``).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.temperature = nn.Parameter(torch.tensor(math.log((dim // num_heads) ** -0.5)))

    def attention_mask(self, length: int, device=None) -> torch.Tensor:
        """``(L, L)`` bool, True where attention is allowed: everywhere but the diagonal."""
        return ~torch.eye(length, dtype=torch.bool, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        if L < 2:
            raise ValueError("locality self-attention masks each token's own key, so it needs at least 2 tokens")
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q * self.temperature.exp(), k, v,
                                             attn_mask=self.attention_mask(L, x.device), scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class SetEncoderBlock(nn.Module):
    """A pre-norm ViT block with locality self-attention: ``(B, L, D) -> (B, L, D)``.

        x = x + LSA(norm1(x));   x = x + MLP(norm2(x))
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LocalitySelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SetViT(nn.Module):
    """sViT: a vision transformer that reads a whole set of images at once.

    Every image of the set is cut into L shifted-patch tokens (``spt``); each
    token gets the learned position embedding of its patch (``pos_embedding``
    rows 1..L, the same for every image of the set) and a [CLS] token (row 0)
    is put in front. The ``1 + S*L`` tokens go through ``depth`` LSA blocks and
    a final LayerNorm (``norm``); the [CLS] token is the set's summary:

        sets (B, S, C, H, W) --spt--> (B, S, L, D) --+pos, [CLS]--> (B, 1 + S*L, D)
            --blocks, norm--> pooled (B, D) = [CLS];  tokens (B, 1 + L, D) = [CLS, mean over the set per patch]

    Since no embedding says which image a token came from, and attention treats
    its tokens as a set, both outputs are invariant to the order of the images,
    and any set size S >= 1 works.

    Args:
        image_size, patch_size, in_channels: the images and patch side p, L = (H/p)^2.
        dim: token width (hdim).
        depth, num_heads, mlp_ratio: the transformer.
    """

    @check_arguments(image_size=POSITIVE_INT, patch_size=POSITIVE_INT, in_channels=POSITIVE_INT, dim=POSITIVE_INT,
                     depth=POSITIVE_INT, num_heads=POSITIVE_INT, mlp_ratio=POSITIVE)
    def __init__(self, image_size: int = 32, patch_size: int = 2, in_channels: int = 3, dim: int = 384,
                 depth: int = 6, num_heads: int = 6, mlp_ratio: float = 4.0):
        super().__init__()
        check_divisible("SetViT", "image_size", image_size, "patch_size", patch_size)
        check_divisible("SetViT", "dim", dim, "num_heads", num_heads)
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_patches = (image_size // patch_size) ** 2
        self.spt = ShiftedPatchTokenization(patch_size, in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        self.blocks = nn.ModuleList(SetEncoderBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embedding, std=0.02)

    def forward(self, sets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode sets ``(B, S, C, H, W)``; returns ``pooled (B, D)`` and ``tokens (B, 1 + L, D)``."""
        check_sets(sets, self.in_channels, self.image_size, min_size=1)
        B, S = sets.shape[:2]
        L = self.num_patches
        patches = self.spt(sets.flatten(0, 1)) + self.pos_embedding[:, 1:]  # (B*S, L, D)
        cls = (self.cls_token + self.pos_embedding[:, :1]).expand(B, -1, -1)  # (B, 1, D)
        x = torch.cat([cls, patches.reshape(B, S * L, -1)], dim=1)  # (B, 1 + S*L, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        per_patch = x[:, 1:].reshape(B, S, L, -1).mean(dim=1)  # (B, L, D): the set's mean at each patch
        return x[:, 0], torch.cat([x[:, :1], per_patch], dim=1)


# ---------------------------------------------------------------------------
# The generator: a DiT conditioned on the context
# ---------------------------------------------------------------------------


class ContextDiT(nn.Module):
    """A DiT (chapter 5) conditioned on a set's context instead of a class label.

    Built from the chapter-5 pieces: ``x_embedder`` (PatchEmbed), a fixed sin-cos
    ``pos_embed``, ``t_embedder`` (TimestepEmbedder), ``blocks`` (adaLN-Zero
    DiTBlock) and ``final_layer``; the label embedder is replaced by
    ``context_proj``, a Linear from the context width to the DiT width. Two ways
    to condition:

    * ``"film"``: the context is one vector ``(N, context_dim)`` and enters like
      a class embedding, ``c = t_emb + context_proj(context)``, which modulates
      every block (adaLN: a FiLM layer, a per-channel scale and shift);
    * ``"tokens"``: the context is a sequence ``(N, M, context_dim)``; its
      projections are appended to the image tokens, every block attends to
      them, and they are dropped before the final layer. adaLN then carries t only.

    ``forward(x, t, context)``: ``(N, C, H, W)``, ``(N,)``, context -> eps ``(N, C_out, H, W)``.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 3, hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, context_dim: int = 384,
                 conditioning: str = "film", learn_sigma: bool = False):
        super().__init__()
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
        self.conditioning = conditioning
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.context_dim = context_dim
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, img_size=input_size)
        pos_embed = get_2d_sincos_pos_embed(hidden_size, self.x_embedder.grid_size)  # (L, D), fixed as in DiT
        self.pos_embed = nn.Parameter(pos_embed.unsqueeze(0), requires_grad=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.context_proj = nn.Linear(context_dim, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation (see ``dit.DiT.initialize_weights``): xavier-uniform Linear
        layers and patch kernel, N(0, 0.02) timestep MLP, adaLN-Zero and output layer at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            zero_init(block.adaLN_modulation[-1])
        zero_init(self.final_layer.adaLN_modulation[-1])
        zero_init(self.final_layer.linear)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        check_timesteps("ContextDiT", "t", t)
        check_float_input("ContextDiT", "context", context, like=self.context_proj.weight)
        check_same_batch("ContextDiT", x=x, t=t, context=context)
        N = len(x)
        want = (N, self.context_dim) if self.conditioning == "film" else (N, "M", self.context_dim)
        if (t.shape != (N,) or context.ndim != len(want) or context.shape[0] != N
                or context.shape[-1] != self.context_dim):
            raise ValueError(f"ContextDiT ({self.conditioning}) expects t ({N},) and context {want} for {N} "
                             f"images, got t {tuple(t.shape)} and context {tuple(context.shape)}")
        tokens = self.x_embedder(x) + self.pos_embed  # (N, L, D)
        c = self.t_embedder(t)  # (N, D)
        if self.conditioning == "film":
            c = c + self.context_proj(context)
        else:
            tokens = torch.cat([tokens, self.context_proj(context)], dim=1)  # (N, L + M, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final_layer(tokens[:, :self.x_embedder.num_patches], c)  # (N, L, p*p*C_out)
        return unpatchify(out, self.patch_size, self.out_channels)


# ---------------------------------------------------------------------------
# The few-shot model
# ---------------------------------------------------------------------------


class VFSDDPM(nn.Module):
    """(Variational) few-shot DDPM: a set encoder and a DiT generator (as in the JAX port of FSDM).

    Args:
        image_size, in_channels, patch_size: images and the patch side (both networks).
        hidden_size, depth, num_heads, mlp_ratio: the DiT generator.
        hdim: the width of the set encoder and of the context.
        encoder_depth, encoder_heads, encoder_mlp_ratio: the set encoder (heads default to ``num_heads``).
        encoder_patch_size: the encoder's patch side (default ``patch_size``); a larger one
            makes the S*L tokens of a set fewer.
        sample_size: images per training set S; each is generated from the other S - 1.
        conditioning: ``"film"`` (the [CLS] vector through adaLN) or ``"tokens"``
            ([CLS] and the per-patch set means as extra DiT tokens).
        context: ``"deterministic"`` (c is the encoder's output) or ``"variational"``
            (a ``posterior`` MLP maps it to the mean and log-variance of
            q(c | X) = N(mu, diag sigma^2); training samples c and adds KL(q || N(0, I))).
        learn_sigma: as in DiT (the samplers here use fixed variances).
        context_dropout_prob: in training, replace each context by a learned
            ``null_context`` with this probability, so that the same network also
            learns to generate without a set, for classifier-free guidance
            (``sample(..., guidance_scale=s)``). 0 (the JAX port's setting): no null context.

    ``forward(x_t, t, context)`` is the generator, so ``GaussianDiffusion`` samples with
    ``model_kwargs=dict(context=model.encode(support)[0])``.
    """

    @check_arguments(image_size=POSITIVE_INT, in_channels=POSITIVE_INT, patch_size=POSITIVE_INT,
                     hidden_size=POSITIVE_INT, depth=POSITIVE_INT, num_heads=POSITIVE_INT, mlp_ratio=POSITIVE,
                     hdim=POSITIVE_INT, encoder_depth=POSITIVE_INT, encoder_heads=POSITIVE_INT.or_none(),
                     encoder_mlp_ratio=POSITIVE, encoder_patch_size=POSITIVE_INT.or_none(), sample_size=POSITIVE_INT,
                     context_dropout_prob=PROBABILITY)
    def __init__(self, image_size: int = 32, in_channels: int = 3, patch_size: int = 2, hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, hdim: int = 384,
                 encoder_depth: int = 6, encoder_heads: int | None = None, encoder_mlp_ratio: float = 4.0,
                 encoder_patch_size: int | None = None, sample_size: int = 6, conditioning: str = "film",
                 context: str = "deterministic", learn_sigma: bool = False, context_dropout_prob: float = 0.0):
        super().__init__()
        if context not in CONTEXT_MODES:
            raise ValueError(f"context must be one of {CONTEXT_MODES}, got {context!r}")
        if sample_size < 2:
            raise ValueError(f"leave-one-out training needs sets of at least 2 images, "
                             f"got sample_size={sample_size}")
        check_divisible("VFSDDPM", "image_size", image_size, "patch_size", patch_size)
        check_divisible("VFSDDPM", "hidden_size", hidden_size, "num_heads", num_heads)
        self.context_dropout_prob = context_dropout_prob
        self.sample_size = sample_size
        self.context_mode = context
        self.conditioning = conditioning
        self.encoder = SetViT(image_size, encoder_patch_size or patch_size, in_channels, hdim, encoder_depth,
                              encoder_heads or num_heads, encoder_mlp_ratio)
        if context == "variational":  # FSDM's posterior head: Linear, SiLU, Linear to (mu, log sigma^2)
            self.posterior = nn.Sequential(nn.Linear(hdim, hdim), nn.SiLU(), nn.Linear(hdim, 2 * hdim))
        self.dit = ContextDiT(image_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                              context_dim=hdim, conditioning=conditioning, learn_sigma=learn_sigma)
        if context_dropout_prob > 0:  # "no set": the context of classifier-free guidance's unconditional half
            self.null_context = nn.Parameter(torch.zeros(hdim))

    def null_contexts(self, like: torch.Tensor) -> torch.Tensor:
        """The null context in the shape of ``like``, a batch of contexts from ``encode``."""
        if self.context_dropout_prob == 0:
            raise ValueError("this model was built with context_dropout_prob=0 and has no null context; "
                             "build it with e.g. context_dropout_prob=0.1 to use guidance")
        return self.null_context.expand_as(like)

    def encode(self, sets: torch.Tensor, sample: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The context of each set and its KL term.

        Args:
            sets: ``(B, S, C, H, W)`` support sets, any S >= 1.
            sample: variational only: draw c = mu + sigma * eps (reparameterisation)
                rather than take the mean mu; default: sample in training mode.
        Returns:
            ``context``: ``(B, hdim)`` ("film") or ``(B, 1 + L, hdim)`` ("tokens"), and
            ``kl``: ``(B,)``, KL(q(c | X) || N(0, I)) averaged over the context's
            elements, in nats (zeros for a deterministic context).
        """
        pooled, tokens = self.encoder(sets)
        h = pooled if self.conditioning == "film" else tokens
        if self.context_mode == "deterministic":
            return h, h.new_zeros(len(h))
        mu, logvar = self.posterior(h).chunk(2, dim=-1)
        sample = self.training if sample is None else sample
        c = mu + (0.5 * logvar).exp() * torch.randn_like(mu) if sample else mu
        return c, gaussian_kl(mu, logvar).flatten(1).mean(dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """eps for noisy images ``x (N, C, H, W)`` at ``t (N,)`` given ``context`` from ``encode``."""
        return self.dit(x, t, context)

    def training_loss(self, diffusion: GaussianDiffusion, sets: torch.Tensor,
                      kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """The leave-one-out loss of a batch of sets ``(B, S, C, H, W)``, S = ``sample_size``.

        Every image x_j of every set is a target, with the context of the others:

            L = mean_{b, j} || eps - eps_theta(x_t^{bj}, t, c(X_b without x_j)) ||^2  +  kl_weight * KL

        Returns ``{"loss": total, "mse": the diffusion term, "kl": the mean KL (0 if deterministic)}``.
        """
        check_sets(sets, self.encoder.in_channels, self.encoder.image_size, min_size=self.sample_size)
        if sets.shape[1] != self.sample_size:
            raise ValueError(f"this model trains on sets of sample_size={self.sample_size}, "
                             f"got sets of {sets.shape[1]}")
        targets, contexts = leave_one_out(sets)  # (B*S, C, H, W), (B*S, S-1, C, H, W)
        context, kl = self.encode(contexts)
        if self.training and self.context_dropout_prob > 0:
            drop = torch.rand(len(context), device=context.device) < self.context_dropout_prob
            drop = drop.view(-1, *([1] * (context.ndim - 1)))
            context = torch.where(drop, self.null_contexts(context), context)
        mse = diffusion.training_loss(self, targets, dict(context=context))
        kl = kl.mean()
        return {"loss": mse + kl_weight * kl, "mse": mse, "kl": kl}

    @torch.no_grad()
    def sample(self, diffusion: GaussianDiffusion, support: torch.Tensor, num_samples: int,
               seed: int | None = None, noise: torch.Tensor | None = None, sampler: str = "ddim",
               guidance_scale: float = 1.0, clip_denoised: bool = True) -> torch.Tensor:
        """``num_samples`` new images for each support set.

        Args:
            diffusion: the process to sample with, e.g. ``diffusion.respace(50)``.
            support: ``(B, S, C, H, W)`` support sets.
            seed: seeds the starting noise (if not given) and the sampler's noise.
            noise: optional starting noise, ``(B, num_samples, C, H, W)``, or
                ``(num_samples, C, H, W)`` to start every set from the same noise.
            sampler: ``"ddim"`` (eta = 0) or ``"ddpm"``.
            guidance_scale: s of classifier-free guidance, eps = eps(null) + s (eps(c) - eps(null));
                1 is plain conditional sampling (needs ``context_dropout_prob > 0`` otherwise).
        Returns:
            ``(B, num_samples, C, H, W)``, on the model's device.
        """
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        check_sets(support, self.encoder.in_channels, self.encoder.image_size)
        device = next(self.parameters()).device
        B, C, H, W = len(support), *support.shape[2:]
        if noise is not None:
            if tuple(noise.shape[-4:]) != (num_samples, C, H, W) or noise.ndim not in (4, 5):
                raise ValueError(f"noise must be ({B}, {num_samples}, {C}, {H}, {W}) or "
                                 f"({num_samples}, {C}, {H}, {W}), got {tuple(noise.shape)}")
            noise = noise.expand(B, num_samples, C, H, W).reshape(B * num_samples, C, H, W).to(device)
        context, _ = self.encode(support.to(device), sample=False)
        context = context.repeat_interleave(num_samples, dim=0)
        loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
        shape = (B * num_samples, C, H, W)
        if guidance_scale == 1:
            images = loop(self, shape, dict(context=context), noise=noise, seed=seed,
                          clip_denoised=clip_denoised, device=device)
        else:  # one batch of two halves: with the sets' contexts, then with the null context
            if noise is None:
                noise = torch.randn(shape, generator=None if seed is None else torch.Generator().manual_seed(seed))
            noise = noise.to(device)
            guided = classifier_free_guidance(self, guidance_scale)
            images = loop(guided, (2 * len(context), C, H, W),
                          dict(context=torch.cat([context, self.null_contexts(context)])),
                          noise=torch.cat([noise, noise]), seed=seed, clip_denoised=clip_denoised,
                          device=device)[:len(context)]
        return images.view(B, num_samples, C, H, W)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per element: ``(mu^2 + sigma^2 - 1 - log sigma^2) / 2``."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


# ---------------------------------------------------------------------------
# Sets: leave-one-out and batches of sets
# ---------------------------------------------------------------------------


def check_sets(sets, channels: int, image_size: int, min_size: int = 1) -> None:
    """Raise a ValueError unless ``sets`` is ``(B, S, channels, image_size, image_size)`` with S >= min_size."""
    if not isinstance(sets, torch.Tensor) or sets.ndim != 5:
        shape = tuple(sets.shape) if isinstance(sets, torch.Tensor) else type(sets).__name__
        raise ValueError(f"expected sets of images (B, S, C, H, W), got {shape}")
    if tuple(sets.shape[2:]) != (channels, image_size, image_size) or sets.shape[1] < min_size:
        raise ValueError(f"expected sets (B, S >= {min_size}, {channels}, {image_size}, {image_size}), "
                         f"got {tuple(sets.shape)}")


def leave_one_out_index(set_size: int) -> torch.Tensor:
    """``(S, S-1)`` int64: row j lists the positions of a set of S other than j."""
    if set_size < 2:
        raise ValueError(f"leave-one-out needs sets of at least 2 images, got {set_size}")
    index = torch.arange(set_size)
    return torch.stack([torch.cat([index[:j], index[j + 1:]]) for j in range(set_size)])


def leave_one_out(sets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of every set, with the set of the others as its context.

    ``sets (B, S, ...) -> targets (B*S, ...), contexts (B*S, S-1, ...)``, where
    ``targets[b*S + j] = sets[b, j]`` and ``contexts[b*S + j] = sets[b]`` without image j.
    """
    if not isinstance(sets, torch.Tensor) or sets.ndim < 3:
        shape = tuple(sets.shape) if isinstance(sets, torch.Tensor) else type(sets).__name__
        raise ValueError(f"expected sets (B, S, ...), got {shape}")
    others = leave_one_out_index(sets.shape[1]).to(sets.device)
    return sets.flatten(0, 1), sets[:, others].flatten(0, 1)


def class_sets(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int], set_size: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One set of ``set_size`` distinct images per entry of ``classes``: ``(len(classes), S, C, H, W)``."""
    sets = []
    for c in classes:
        members = (labels == c).nonzero().squeeze(1)
        if len(members) < set_size:
            raise ValueError(f"class {c} has {len(members)} images, fewer than the set size {set_size}")
        pick = torch.randperm(len(members), generator=generator)[:set_size].to(members.device)
        sets.append(images[members[pick]])
    return torch.stack(sets)


def infinite_sets(dataset, set_size: int, batch_size: int, classes: Sequence[int] | None = None,
                  seed: int = 0, device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
    """Endless batches ``(batch_size, set_size, C, H, W)`` of same-class sets.

    Each set draws a class uniformly from ``classes`` (default: every class of the
    dataset that has enough images), then ``set_size`` distinct images of it.

    Args:
        dataset: an ``ImageDataset`` (images and labels).
        seed: the same seed gives the same batches.
        device: where the batches live (the images are moved there once).
    """
    images, labels = dataset.images, dataset.labels
    if device is not None:
        images, labels = images.to(device), labels.to(device)
    if classes is None:
        counts = torch.bincount(labels.cpu(), minlength=dataset.num_classes)
        classes = (counts >= set_size).nonzero().squeeze(1).tolist()
    if not classes:
        raise ValueError(f"no class has {set_size} images to make a set")
    generator = torch.Generator().manual_seed(seed)
    classes = torch.as_tensor(list(classes))
    while True:
        chosen = classes[torch.randint(len(classes), (batch_size,), generator=generator)]
        yield class_sets(images, labels, chosen.tolist(), set_size, generator)


def component_parameters(model: VFSDDPM) -> dict[str, int]:
    """Parameters per part: ``"encoder/spt"``, ``"dit/blocks"``, ``"posterior/0"``, ``"null_context"``, ..."""
    counts = {}
    for name, p in model.named_parameters():
        key = "/".join(name.split(".")[:2])
        counts[key] = counts.get(key, 0) + p.numel()
    return counts
