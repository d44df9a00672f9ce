"""MAR: masked autoregression with continuous tokens (Li, Tian, Li, Deng & He, 2024,
"Autoregressive Image Generation without Vector Quantization", https://arxiv.org/abs/2406.11838).

Chapter 11 of the book. MAR generates the ``L = seq_h * seq_w`` tokens of an
image (here: the 16-channel latents of the KL-16 VAE, one token per latent
pixel) in a *random order*, several at a time, with a bidirectional transformer
in the style of MAE (He et al., 2022):

    training:  tokens x (B, L, C) --random order, mask ratio r ~ TruncNormal(1, 0.25; [0.7, 1])-->
               known tokens + ``buffer_size`` class tokens --encoder-->
               + a mask token at every masked position --decoder--> z (B, L, D)
               loss = DiffLoss(target = x, condition = z) on the masked positions only
    sampling:  start with every token masked; at step k of K, predict z for all
               masked tokens, sample the tokens that the cosine schedule reveals at
               this step with the diffusion head, and feed them back in.

Because each token is a continuous vector rather than a codebook index, the
per-token distribution p(x | z) is modelled by a small diffusion model, the
*diffusion loss* (``minilib.diffloss.DiffLoss``, chapter 12).

Submodule and parameter names (``class_emb``, ``fake_latent``, ``z_proj``,
``z_proj_ln``, ``encoder_pos_embed_learned``, ``encoder_blocks`` of timm ViT
``Block``s, ``encoder_norm``, ``decoder_embed``, ``mask_token``,
``decoder_pos_embed_learned``, ``decoder_blocks``, ``decoder_norm``,
``diffusion_pos_embed_learned``, ``diffloss``) follow the official
``models/mar.py``, so that the released checkpoints load with ``strict=True``.
Masks are boolean ``(B, L)`` tensors with True at the *masked* (unknown) tokens.

Random numbers. minilib draws everything with torch's generator, so
``torch.manual_seed`` (or ``sample_tokens(seed=...)``) makes a run repeatable.
The official code draws the generation orders and the training mask ratio with
*numpy's* global generator instead (``np.random.shuffle``, ``scipy.stats.truncnorm``).
To reproduce one of its runs exactly, draw those two with ``numpy_orders`` and
``numpy_mask_ratio`` and hand them in (``orders=``, ``mask_ratio=``); every other
draw (label drop, dropout, the diffusion head's t and noise) is torch's in both,
in the same order::

    np.random.seed(s); torch.manual_seed(s)             # what the official main_mar.py does
    orders = numpy_orders(bsz, model.seq_len)           # its sample_orders
    ratio = numpy_mask_ratio(model.mask_ratio_generator)  # its random_masking's truncnorm draw
    loss = model(latents, labels, orders=orders, mask_ratio=ratio)
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .diffloss import DiffLoss, draw_on_cpu
from .validation import (FINITE, POSITIVE, POSITIVE_INT, PROBABILITY, UNIT_INTERVAL, check_arguments, check_divisible,
                         check_float_input, check_same_batch)

# ---------------------------------------------------------------------------
# The transformer block (timm 0.9's ViT Block, as the official code imports it)
# ---------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention, timm layout (``qkv``, ``proj``) with dropout.

    ``(B, N, D) -> (B, N, D)``. No mask: every token attends to every other,
    which is what makes MAR's transformer *bidirectional*.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))


class Mlp(nn.Module):
    """``fc1 -> GELU (exact) -> dropout -> fc2 -> dropout``, timm's ViT MLP. ``(B, N, D) -> (B, N, D)``."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """A pre-norm ViT block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``. ``(B, N, D) -> (B, N, D)``.

    The parameters of timm's ``Block`` (``norm1``, ``attn.qkv``, ``attn.proj``,
    ``norm2``, ``mlp.fc1``, ``mlp.fc2``); timm's parameter-free placeholders
    (``ls1``, ``drop_path1``, ``q_norm``, ... all ``Identity`` in MAR) are left out.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------
# The two schedules: how many tokens are masked in training, and in sampling
# ---------------------------------------------------------------------------


class TruncatedNormal:
    """The normal distribution N(mean, std^2) restricted to ``[low, high]``.

    MAR draws its training mask ratio from ``TruncatedNormal(1.0, 0.25, 0.7, 1.0)``,
    the left half of a Gaussian centred on "everything masked" (the official code
    uses ``scipy.stats.truncnorm`` with the same parameters). Samples come from the
    inverse CDF, ``x = mean + std * Phi^-1(Phi(a) + u (Phi(b) - Phi(a)))`` with
    ``u ~ U(0, 1)`` and ``a, b`` the standardised bounds, drawn with torch's
    random generator so that ``torch.manual_seed`` makes them repeatable.
    """

    def __init__(self, mean: float, std: float, low: float, high: float):
        if not std > 0 or not low < high:
            raise ValueError(f"need std > 0 and low < high, got std={std}, low={low}, high={high}")
        self.mean, self.std, self.low, self.high = float(mean), float(std), float(low), float(high)
        # plain floats (no tensors), so that the model can be built on the meta device
        self._cdf_low, self._cdf_high = (0.5 * (1 + math.erf((bound - mean) / (std * math.sqrt(2))))
                                         for bound in (low, high))

    def __repr__(self) -> str:
        return f"TruncatedNormal(mean={self.mean}, std={self.std}, low={self.low}, high={self.high})"

    def pdf(self, x: torch.Tensor) -> torch.Tensor:
        """The density at ``x`` (any shape; zero outside ``[low, high]``), float64."""
        x = torch.as_tensor(x, dtype=torch.float64)
        u = (x - self.mean) / self.std
        density = torch.exp(-0.5 * u ** 2) / math.sqrt(2 * math.pi) / self.std / (self._cdf_high - self._cdf_low)
        return torch.where((x >= self.low) & (x <= self.high), density, torch.zeros_like(density))

    def ppf(self, u: torch.Tensor) -> torch.Tensor:
        """The inverse CDF: the value below which a fraction ``u`` of the mass lies.

        ``u`` any shape, in [0, 1]; returns float64 of the same shape. A uniform ``u``
        gives a sample: that is how both ``rvs`` and scipy's ``truncnorm.rvs`` draw.
        """
        u = torch.as_tensor(u, dtype=torch.float64)
        p = self._cdf_low + u * (self._cdf_high - self._cdf_low)
        return (self.mean + self.std * torch.special.ndtri(p)).clamp(self.low, self.high)

    def rvs(self, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``size`` samples, float64 ``(size,)`` on the CPU, from torch's generator (or ``generator``)."""
        return self.ppf(torch.rand(size, dtype=torch.float64, generator=generator, device="cpu"))


def mask_schedule(seq_len: int, num_iter: int) -> list[int]:
    """How many tokens are still masked after each of the ``num_iter`` sampling steps.

    MaskGIT's cosine schedule, as in MAR's ``sample_tokens``: after step k
    (k = 0 .. K-1) ``floor(L cos(pi/2 (k+1)/K))`` tokens stay masked, but every
    step reveals at least one token and leaves at least one for later, and the
    last step reveals everything. Returns K non-increasing numbers ending in 0.
    Few tokens are revealed at first, when the model knows least, and many at the end.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not isinstance(num_iter, int) or not 1 <= num_iter <= seq_len:
        raise ValueError(f"num_iter must be an int from 1 to seq_len = {seq_len} (at least one token "
                         f"per step), got {num_iter!r}")
    masked, schedule = seq_len, []
    for step in range(num_iter - 1):
        masked = max(1, min(masked - 1, math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))))
        schedule.append(masked)
    return schedule + [0]


def mask_by_order(mask_len: int, orders: torch.Tensor) -> torch.Tensor:
    """Mask the first ``mask_len`` positions of each order: ``(B, L)`` long -> ``(B, L)`` bool."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :mask_len], True)


# ---------------------------------------------------------------------------
# The official code's random stream (numpy), to reproduce its runs exactly
# ---------------------------------------------------------------------------


def numpy_orders(bsz: int, seq_len: int, rng: np.random.RandomState | None = None) -> torch.Tensor:
    """Generation orders drawn as the official ``sample_orders`` draws them.

    For each image in turn, ``0 .. seq_len-1`` shuffled in place by ``rng.shuffle``;
    ``rng`` is numpy's global generator by default (the one ``np.random.seed`` seeds),
    as in the official code. Pass the result as ``orders=`` to ``MAR.forward`` or
    ``MAR.sample_tokens``. Returns ``(bsz, seq_len)`` long on the CPU.
    """
    if not isinstance(bsz, int) or bsz < 1 or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"bsz and seq_len must be positive ints, got bsz={bsz!r}, seq_len={seq_len!r}")
    rng = np.random if rng is None else rng
    orders = []
    for _ in range(bsz):
        order = np.arange(seq_len)
        rng.shuffle(order)
        orders.append(order)
    return torch.from_numpy(np.stack(orders)).long()


def numpy_mask_ratio(distribution: TruncatedNormal, rng: np.random.RandomState | None = None) -> float:
    """One training mask ratio drawn as the official ``random_masking`` draws it.

    scipy's ``truncnorm.rvs(1)`` takes one uniform number from numpy's global
    generator (or ``rng``) and maps it through the inverse CDF; this does the same
    with ``distribution.ppf``. Call it right after ``numpy_orders``, as the official
    ``forward`` does, and pass the result as ``mask_ratio=`` to ``MAR.forward``.
    """
    rng = np.random if rng is None else rng
    return distribution.ppf(torch.from_numpy(rng.uniform(size=1))).item()


@contextmanager
def seeded(seed: int | None, device: torch.device):
    """Run the body as if after ``torch.manual_seed(seed)``, then restore torch's generators.

    The CPU generator and, on a GPU, ``device``'s generator are seeded; both are put
    back afterwards, so a seeded call leaves the caller's random stream untouched.
    ``seed=None`` does nothing (the global stream is used and advanced).
    """
    if seed is None:
        yield
        return
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    device = torch.device(device)
    gpus = []  # the GPU whose generator is seeded and restored, if any
    if device.type == "cuda":
        gpus = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=gpus):
        torch.random.default_generator.manual_seed(seed)
        for index in gpus:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class MAR(nn.Module):
    """The masked autoregressive model: an MAE-style encoder/decoder and a diffusion head.

    Args:
        img_size, vae_stride, patch_size: the image side, the tokenizer's
            downsampling and the patch size on the latent grid; the model sees
            ``seq_h = seq_w = img_size // vae_stride // patch_size`` tokens per side.
            For pixels as tokens use ``vae_stride=1``.
        encoder_embed_dim, encoder_depth, encoder_num_heads: the encoder's width,
            blocks and heads; likewise ``decoder_*`` for the decoder.
        mlp_ratio: the blocks' MLP expansion.
        vae_embed_dim: channels C of the latents; a token has
            ``token_embed_dim = C * patch_size**2`` numbers.
        mask_ratio_min: lower end of the training mask ratio's truncated normal.
        label_drop_prob: in training, the class embedding is replaced by
            ``fake_latent`` with this probability (for classifier-free guidance).
        class_num: number of classes (the official code always builds 1000 rows).
        attn_dropout, proj_dropout: dropout in the blocks.
        buffer_size: number of extra tokens in front of the sequence; all of them
            hold the class embedding and they are never masked.
        diffloss_d, diffloss_w: depth and width of the diffusion head's MLP.
        num_sampling_steps: the diffusion head's sampling steps, a string as in the
            official code (e.g. ``"100"``).
        diffusion_batch_mul: the diffusion loss sees each token this many times per
            step, with different noise and timesteps.
        grad_checkpointing: recompute the encoder's and decoder's block activations in
            backward, to save memory (the official code also checkpoints the head's blocks).
    """

    @check_arguments(img_size=POSITIVE_INT, vae_stride=POSITIVE_INT, patch_size=POSITIVE_INT,
                     encoder_embed_dim=POSITIVE_INT, encoder_depth=POSITIVE_INT, encoder_num_heads=POSITIVE_INT,
                     decoder_embed_dim=POSITIVE_INT, decoder_depth=POSITIVE_INT, decoder_num_heads=POSITIVE_INT,
                     mlp_ratio=POSITIVE, vae_embed_dim=POSITIVE_INT, label_drop_prob=UNIT_INTERVAL,
                     class_num=POSITIVE_INT, attn_dropout=PROBABILITY, proj_dropout=PROBABILITY,
                     buffer_size=POSITIVE_INT, diffloss_d=POSITIVE_INT, diffloss_w=POSITIVE_INT,
                     diffusion_batch_mul=POSITIVE_INT)
    def __init__(self, img_size: int = 256, vae_stride: int = 16, patch_size: int = 1,
                 encoder_embed_dim: int = 1024, encoder_depth: int = 16, encoder_num_heads: int = 16,
                 decoder_embed_dim: int = 1024, decoder_depth: int = 16, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, vae_embed_dim: int = 16, mask_ratio_min: float = 0.7,
                 label_drop_prob: float = 0.1, class_num: int = 1000, attn_dropout: float = 0.1,
                 proj_dropout: float = 0.1, buffer_size: int = 64, diffloss_d: int = 3, diffloss_w: int = 1024,
                 num_sampling_steps: str = "100", diffusion_batch_mul: int = 4, grad_checkpointing: bool = False):
        super().__init__()
        if img_size % (vae_stride * patch_size):
            raise ValueError(f"img_size {img_size} must be divisible by vae_stride * patch_size = "
                             f"{vae_stride} * {patch_size}")
        if not 0 < mask_ratio_min < 1:
            raise ValueError(f"mask_ratio_min must lie in (0, 1), got {mask_ratio_min}")
        check_divisible("MAR", "encoder_embed_dim", encoder_embed_dim, "encoder_num_heads", encoder_num_heads)
        check_divisible("MAR", "decoder_embed_dim", decoder_embed_dim, "decoder_num_heads", decoder_num_heads)
        # VAE and patchify specifics
        self.vae_embed_dim = vae_embed_dim
        self.img_size, self.vae_stride, self.patch_size = img_size, vae_stride, patch_size
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size ** 2
        self.grad_checkpointing = grad_checkpointing

        # class embedding, and the learned "fake" class embedding for unconditional generation
        self.num_classes = class_num
        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.label_drop_prob = label_drop_prob
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))

        # the training mask ratio: a left-half truncated Gaussian centred at 100% masking, std 0.25
        self.mask_ratio_generator = TruncatedNormal(1.0, 0.25, mask_ratio_min, 1.0)

        # encoder
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.buffer_size = buffer_size
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList(
            Block(encoder_embed_dim, encoder_num_heads, mlp_ratio, qkv_bias=True, proj_drop=proj_dropout,
                  attn_drop=attn_dropout) for _ in range(encoder_depth))
        self.encoder_norm = nn.LayerNorm(encoder_embed_dim, eps=1e-6)

        # decoder
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, proj_drop=proj_dropout,
                  attn_drop=attn_dropout) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))

        self.initialize_weights()

        # the diffusion loss (built after initialize_weights, which must not touch its own init)
        self.diffloss = DiffLoss(target_channels=self.token_embed_dim, z_channels=decoder_embed_dim,
                                 width=diffloss_w, depth=diffloss_d, num_sampling_steps=num_sampling_steps)
        self.diffusion_batch_mul = diffusion_batch_mul

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """MAR's initialisation: N(0, 0.02) for the embeddings, the fake latent, the mask
        token and the learned positions; xavier-uniform Linear weights with zero biases;
        LayerNorms at weight 1, bias 0."""
        for parameter in [self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                          self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned]:
            nn.init.normal_(parameter, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # --- tokens ----------------------------------------------------------------

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, H, W)`` to tokens ``(B, L, C*p*p)``, row-major, each token
        ordered (channel, row, column) as in the official code."""
        expected = (self.vae_embed_dim, self.seq_h * self.patch_size, self.seq_w * self.patch_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"MAR expects latents of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) as imgs, "
                             f"got {tuple(x.shape)}")
        return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=self.patch_size, q=self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, L, C*p*p)`` back to latents ``(B, C, H, W)``."""
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.seq_len, self.token_embed_dim):
            raise ValueError(f"MAR expects tokens of shape (B, {self.seq_len}, {self.token_embed_dim}), "
                             f"got {tuple(x.shape)}")
        return rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=self.seq_h, c=self.vae_embed_dim,
                         p=self.patch_size, q=self.patch_size)

    # --- masking ---------------------------------------------------------------

    def sample_orders(self, bsz: int) -> torch.Tensor:
        """A random generation order for each of ``bsz`` images: ``(bsz, L)`` long, each row
        a permutation of ``0 .. L-1`` (drawn with torch's generator; ``numpy_orders``
        draws them as the official code does)."""
        device = self.mask_token.device
        return torch.rand(bsz, self.seq_len, device=device).argsort(dim=1)

    def random_masking(self, x: torch.Tensor, orders: torch.Tensor, mask_ratio: float | None = None) -> torch.Tensor:
        """The training mask: ``ceil(L * r)`` tokens masked, the first ones of each order,
        with one mask ratio r for the whole batch.

        Args:
            x: tokens ``(B, L, C)``; orders: ``(B, L)`` permutations.
            mask_ratio: r in (0, 1]; by default drawn from ``mask_ratio_generator``
                with torch's generator (``numpy_mask_ratio`` draws it as the official code does).
        Returns:
            ``(B, L)`` bool, True = masked.
        """
        bsz, seq_len = x.shape[:2]
        orders = self._check_orders(orders, bsz, x.device)
        if mask_ratio is None:
            mask_ratio = self.mask_ratio_generator.rvs(1).item()
        elif not 0 < mask_ratio <= 1:
            raise ValueError(f"mask_ratio must lie in (0, 1], got {mask_ratio}")
        num_masked_tokens = math.ceil(seq_len * mask_ratio)
        return mask_by_order(num_masked_tokens, orders)

    def _check_orders(self, orders, bsz: int, device: torch.device) -> torch.Tensor:
        """``orders`` must be ``(bsz, L)`` integer rows, each a permutation of ``0 .. L-1``."""
        if not isinstance(orders, torch.Tensor) or orders.shape != (bsz, self.seq_len) or orders.is_floating_point():
            shape = (f"{orders.dtype} {tuple(orders.shape)}" if isinstance(orders, torch.Tensor)
                     else type(orders).__name__)
            raise ValueError(f"orders must be an integer tensor of shape (B, L) = ({bsz}, {self.seq_len}), got {shape}")
        if orders.device.type != "meta" and not torch.equal(
                orders.sort(dim=1).values.cpu(), torch.arange(self.seq_len).expand(bsz, -1)):
            raise ValueError(f"orders: each row must be a permutation of 0 .. {self.seq_len - 1}")
        return orders.to(device=device, dtype=torch.long)

    def _check_mask(self, mask: torch.Tensor, bsz: int) -> torch.Tensor:
        if mask.shape != (bsz, self.seq_len):
            raise ValueError(f"mask must have shape (B, L) = ({bsz}, {self.seq_len}), got {tuple(mask.shape)}")
        mask = mask.bool()
        counts = mask.sum(dim=1)
        if (counts != counts[0]).any():
            raise ValueError(f"every image must have the same number of masked tokens, got {counts.tolist()}")
        return mask

    def _with_buffer(self, mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` -> ``(B, buffer_size + L)``; the buffer is never masked."""
        return torch.cat([mask.new_zeros(len(mask), self.buffer_size), mask], dim=1)

    # --- the encoder and decoder ------------------------------------------------

    def forward_mae_encoder(self, x: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor) -> torch.Tensor:
        """Encode the known tokens, MAE-style: masked tokens are dropped, not replaced.

        The sequence is ``buffer_size`` class tokens followed by the L tokens; after
        the learned positions and ``z_proj_ln`` only the buffer and the unmasked
        tokens go through the encoder blocks. In training, each image's class
        embedding is swapped for ``fake_latent`` with probability ``label_drop_prob``.

        Args:
            x: tokens ``(B, L, token_embed_dim)`` (the values at masked positions are never read).
            mask: ``(B, L)`` bool, True = masked, the same count in every row.
            class_embedding: ``(B, encoder_embed_dim)``.
        Returns:
            ``(B, buffer_size + L - num_masked, encoder_embed_dim)``.
        """
        x = self.z_proj(x)
        bsz, seq_len, embed_dim = x.shape
        mask = self._check_mask(mask, bsz)
        x = torch.cat([x.new_zeros(bsz, self.buffer_size, embed_dim), x], dim=1)
        mask_with_buffer = self._with_buffer(mask)

        if self.training:  # random label drop, for classifier-free guidance
            # drawn with the CPU generator, as the official code does, also when training on a GPU
            drop = draw_on_cpu(torch.rand, (bsz,), x.device) < self.label_drop_prob
            drop = drop.unsqueeze(-1).to(x.dtype)
            class_embedding = drop * self.fake_latent + (1 - drop) * class_embedding
        x[:, :self.buffer_size] = class_embedding.unsqueeze(1).to(x.dtype)

        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        x = x[~mask_with_buffer].reshape(bsz, -1, embed_dim)  # drop the masked tokens
        for block in self.encoder_blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Put a learned ``mask_token`` back at every masked position and decode.

        Args:
            x: the encoder's output ``(B, buffer_size + L - num_masked, encoder_embed_dim)``.
            mask: the same ``(B, L)`` mask the encoder saw.
        Returns:
            ``z`` ``(B, L, decoder_embed_dim)``: one condition vector per token for the
            diffusion head (buffer removed, ``diffusion_pos_embed_learned`` added).
        """
        x = self.decoder_embed(x)
        mask_with_buffer = self._with_buffer(self._check_mask(mask, len(x)))
        x_after_pad = self.mask_token.to(x.dtype).repeat(mask_with_buffer.shape[0], mask_with_buffer.shape[1], 1)
        x_after_pad[~mask_with_buffer] = x.reshape(-1, x.shape[-1])
        x = x_after_pad + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
        x = self.decoder_norm(x)
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned

    # --- training --------------------------------------------------------------

    def forward_loss(self, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The diffusion loss on the masked tokens.

        Every token (with its condition z) is repeated ``diffusion_batch_mul``
        times, so each gets several noise levels per step; the mask makes only the
        masked tokens count.

        Args:
            z: ``(B, L, D)``, target: ``(B, L, C)``, mask: ``(B, L)`` (True = masked).
        Returns:
            a scalar.
        """
        bsz, seq_len, _ = target.shape
        target = target.reshape(bsz * seq_len, -1).repeat(self.diffusion_batch_mul, 1)
        z = z.reshape(bsz * seq_len, -1).repeat(self.diffusion_batch_mul, 1)
        mask = mask.reshape(bsz * seq_len).repeat(self.diffusion_batch_mul).to(target.dtype)
        return self.diffloss(target=target, z=z, mask=mask)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor | None = None,
                mask_ratio: float | None = None) -> torch.Tensor:
        """The training loss for a batch of latents.

        Random draws, in this order: the orders and the mask ratio (unless given), the
        label drop (train mode), dropout, then the diffusion loss's t and noise.

        Args:
            imgs: latents ``(B, vae_embed_dim, H, W)`` (already scaled, e.g. by the VAE's scale factor).
            labels: ``(B,)`` integer classes in ``[0, class_num)``.
            orders: optional ``(B, L)`` permutations (default: ``sample_orders``).
            mask_ratio: optional mask ratio in (0, 1] (default: drawn in ``random_masking``).
                ``numpy_orders`` and ``numpy_mask_ratio`` give the official code's draws.
        Returns:
            the scalar diffusion loss on the masked tokens.
        """
        check_float_input("MAR", "imgs", imgs, ndim=4, layout="(B, C, H, W)", like=self.z_proj.weight)
        check_same_batch("MAR", imgs=imgs, labels=labels)
        labels = self._check_labels(labels, len(imgs))
        class_embedding = self.class_emb(labels)
        x = self.patchify(imgs)
        gt_latents = x.clone().detach()
        if orders is None:
            orders = self.sample_orders(bsz=x.size(0))
        mask = self.random_masking(x, orders, mask_ratio)
        x = self.forward_mae_encoder(x, mask, class_embedding)
        z = self.forward_mae_decoder(x, mask)
        return self.forward_loss(z=z, target=gt_latents, mask=mask)

    def _check_labels(self, labels, bsz: int) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.shape != (bsz,) or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor of shape ({bsz},), got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
                             + (f" {labels.dtype}" if isinstance(labels, torch.Tensor) else ""))
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], got "
                             f"{labels.min().item()}..{labels.max().item()}")
        return labels.to(self.class_emb.weight.device)

    # --- sampling --------------------------------------------------------------

    @torch.no_grad()
    def sample_tokens(self, bsz: int, num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                      labels: torch.Tensor | None = None, temperature: float = 1.0, progress: bool = False,
                      return_history: bool = False, clip_denoised: bool = False,
                      orders: torch.Tensor | None = None, seed: int | None = None):
        """Generate latents by masked autoregression in a random order.

        All tokens start masked. At step k the encoder sees the tokens generated so
        far, the decoder gives a condition z for every token, and the diffusion
        head samples the tokens that ``mask_schedule(L, num_iter)`` reveals at this
        step (the next ones in each image's random order); at the last step all
        the rest.

        Classifier-free guidance (``cfg != 1``) runs a second, unconditional half
        of the batch with ``fake_latent`` as the class, and the diffusion head
        guides its noise prediction with scale
        ``1 + (cfg - 1) * (L - num_masked) / L`` (``"linear"``, from Muse: weak
        while little is known, full at the end; ``num_masked`` counts at least 1,
        as in the official code) or ``cfg`` at every step (``"constant"``).

        Args:
            bsz: number of images.
            num_iter: autoregressive steps K, from 1 to L.
            cfg: guidance scale; 1 is plain conditional (or unconditional) sampling.
            cfg_schedule: ``"linear"`` or ``"constant"``.
            labels: ``(bsz,)`` classes, or None for unconditional sampling.
            temperature: the diffusion head's temperature (it scales the noise of
                each reverse step; below 1 gives safer, less varied tokens).
            progress: show a progress bar over the steps.
            return_history: also return, for each step, what happened in it.
            clip_denoised: let the diffusion head clamp its x0 estimates to [-1, 1]
                (``DiffLoss.sample``). Not in the official code, which needs a head
                trained long enough to be accurate at t = 999 (chapter 12); for a
                briefly trained head on tokens in [-1, 1] (pixels) it keeps samples finite.
            orders: optional ``(bsz, L)`` generation orders (default: ``sample_orders``).
            seed: if given, the run draws as if after ``torch.manual_seed(seed)`` and
                leaves torch's random state as it was (see ``seeded``); the same seed
                gives the same latents. Without it the global stream is used.

        Random draws, in this order: the orders (unless given), then for every step
        the diffusion head's start noise and the noise of each of its steps. The
        official code draws the orders with numpy; after ``np.random.seed(s)``,
        ``orders=numpy_orders(bsz, L), seed=s`` reproduces its run after
        ``np.random.seed(s); torch.manual_seed(s)`` (``tests/test_official_mar.py``).

        Returns:
            latents ``(bsz, vae_embed_dim, H, W)``; with ``return_history``, also a
            list of K dicts with ``"revealed"`` (bool ``(bsz, L)``, the tokens
            sampled at this step), ``"masked"`` (bool ``(bsz, L)``, still unknown
            after it) and ``"tokens"`` (``(bsz, L, token_embed_dim)``, the tokens so
            far, zeros where unknown), all on the CPU.
        """
        POSITIVE_INT("sample_tokens", "bsz", bsz)
        FINITE("sample_tokens", "cfg", cfg)
        POSITIVE("sample_tokens", "temperature", temperature)
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        if self.training:
            warnings.warn("MAR.sample_tokens in training mode: dropout is on and the samples are noisier; "
                          "call model.eval() first", UserWarning, stacklevel=2)
        mask_schedule(self.seq_len, num_iter)  # validates num_iter
        if labels is not None:
            labels = self._check_labels(labels, bsz)
        device = self.mask_token.device
        if orders is not None:
            orders = self._check_orders(orders, bsz, device)
        with seeded(seed, device):
            return self._generate(bsz, num_iter, cfg, cfg_schedule, labels, temperature, progress, return_history,
                                  clip_denoised, orders)

    def _generate(self, bsz, num_iter, cfg, cfg_schedule, labels, temperature, progress, return_history,
                  clip_denoised, orders):
        """The loop of ``sample_tokens``, with its arguments checked."""
        schedule = mask_schedule(self.seq_len, num_iter)
        device = self.mask_token.device
        guided = cfg != 1.0
        mask = torch.ones(bsz, self.seq_len, dtype=torch.bool, device=device)
        tokens = torch.zeros(bsz, self.seq_len, self.token_embed_dim, device=device)
        if orders is None:
            orders = self.sample_orders(bsz)
        class_embedding = self.class_emb(labels) if labels is not None else self.fake_latent.repeat(bsz, 1)
        if guided:
            class_embedding = torch.cat([class_embedding, self.fake_latent.repeat(bsz, 1)])
        both = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)  # conditional + unconditional halves
        history = []
        steps = range(num_iter)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="MAR sampling", unit="step")
        for step in steps:
            x = self.forward_mae_encoder(both(tokens), both(mask), class_embedding)
            z = self.forward_mae_decoder(x, both(mask))  # (B or 2B, L, D)

            mask_len = schedule[step]
            mask_next = mask_by_order(mask_len, orders)
            mask_to_pred = mask & ~mask_next  # the tokens revealed at this step
            if cfg_schedule == "linear":
                cfg_iter = 1 + (cfg - 1) * (self.seq_len - max(mask_len, 1)) / self.seq_len
            else:
                cfg_iter = cfg
            sampled = self.diffloss.sample(z[both(mask_to_pred)], temperature, cfg_iter, clip_denoised=clip_denoised)
            if guided:
                sampled = sampled[: len(sampled) // 2]  # drop the unconditional half's samples
            tokens = tokens.clone()
            tokens[mask_to_pred] = sampled.to(tokens.dtype)
            mask = mask_next
            if return_history:
                history.append({"revealed": mask_to_pred.cpu(), "masked": mask.cpu(), "tokens": tokens.cpu()})
        latents = self.unpatchify(tokens)
        return (latents, history) if return_history else latents
