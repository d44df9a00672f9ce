"""The KL autoencoder of latent diffusion, as used by MAR and Stable Diffusion 3.

Chapter 4 of the book. Rombach et al. (2022, "High-Resolution Image Synthesis with
Latent Diffusion Models") train a convolutional VAE once, then run the generator
in its latent space: an image ``x`` of shape ``(B, 3, H, W)`` becomes a latent
``z`` of shape ``(B, z_channels, H/f, W/f)``, ``f = 2^(len(ch_mult) - 1)``:

    encoder:   x -> (mean, logvar)               q(z | x) = N(mean, diag(exp(logvar)))
    sample:    z = mean + exp(logvar / 2) * eps,  eps ~ N(0, I)    (reparameterisation)
    decoder:   z -> x_hat
    loss:      |x - x_hat| + kl_weight * KL(q(z | x) || N(0, I))

The KL term is weighted very lightly (LDM uses 1e-6): it only keeps the latent
space from drifting to huge values, it does not make ``q(z | x)`` close to N(0, I).
So generators rescale the latent before use, which ``to_latent``/``from_latent``
do: ``(z - shift_factor) * scale_factor`` and back.

Both models in the book use this code with different settings:

| model | ch_mult | f | latent | attention in levels | quant convs | scale, shift |
|---|---|---|---|---|---|---|
| MAR's KL-16 | (1, 1, 2, 2, 4) | 16 | 16 x 16 x 16 for 256 px | encoder level 4 only | yes | 0.2325, 0 |
| SD3's VAE | (1, 2, 4, 4) | 8 | 16 x 32 x 32 for 256 px | none | no | 1.5305, 0.0609 |

Both have ``ch = 128``, two ResnetBlocks per encoder level (three per decoder
level) and one attention block in each middle. Submodule names (``down.i.block``,
``mid.attn_1``, ``up.i.upsample``, ``nin_shortcut``, ``quant_conv``, ...) follow
the official code, so MAR's ``kl16.ckpt`` and SD3's VAE weights (with the
``first_stage_model.`` prefix removed) load with ``strict=True``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .validation import FINITE, POSITIVE, POSITIVE_INT, check_arguments, check_float_input


def group_norm(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with eps 1e-6 (32 groups in the official models): the autoencoder's only normalisation."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """The residual block of the autoencoder, ``(B, in_channels, H, W) -> (B, out_channels, H, W)``:

        h = conv1(swish(norm1(x)))
        h = conv2(swish(norm2(h)))
        out = shortcut(x) + h

    ``shortcut`` is the identity, or a 1x1 conv ``nin_shortcut`` ("network in
    network") where the channel count changes. The official blocks also hold a
    ``Dropout(p=0)`` and a timestep projection of width 0; neither has weights,
    so they are left out.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 32):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``H * W`` positions of a feature map, with a residual.

        h = norm(x);   q, k, v = q(h), k(h), v(h)            (1x1 convs, C -> C)
        out = x + proj_out(softmax(q^T k / sqrt(C)) v)        (an (HW, HW) attention matrix)

    ``(B, C, H, W) -> (B, C, H, W)``. The cost grows with ``(H W)^2``, which is why
    the autoencoders attend only at their lowest resolution.

    With ``fused_qkv`` the three 1x1 convs are one ``qkv`` conv ``C -> 3C`` (VAR's
    VQ-VAE stores them so); the computation is the same.
    """

    def __init__(self, channels: int, norm_groups: int = 32, fused_qkv: bool = False):
        super().__init__()
        self.fused_qkv = fused_qkv
        self.norm = group_norm(channels, norm_groups)
        if fused_qkv:
            self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        else:
            self.q = nn.Conv2d(channels, channels, kernel_size=1)
            self.k = nn.Conv2d(channels, channels, kernel_size=1)
            self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        qkv = self.qkv(h).chunk(3, dim=1) if self.fused_qkv else (self.q(h), self.k(h), self.v(h))
        # (B, C, H, W) -> (B, HW, C): one token per position.
        q, k, v = (t.flatten(2).transpose(1, 2) for t in qkv)
        h = F.scaled_dot_product_attention(q, k, v)  # default scale 1 / sqrt(C)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv: ``(B, C, H, W) -> (B, C, H // 2, W // 2)``.

    The input is padded by one zero row at the bottom and one zero column on the
    right only, then convolved without padding: output pixel ``(i, j)`` sees input
    rows and columns ``2i .. 2i + 2``. (A symmetric ``padding=1`` would centre the
    kernels one pixel earlier and give different outputs, so checkpoints need
    exactly this.) For odd sizes the output is ``floor(H / 2)``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (left, right, top, bottom)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour 2x, then a 3x3 conv.
    ``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def make_level(in_channels: int, out_channels: int, num_blocks: int, attention: bool,
               norm_groups: int = 32, fused_qkv: bool = False) -> nn.Module:
    """One resolution level: ``block`` (ResnetBlocks, the first one changing the
    width) and ``attn`` (an AttnBlock after each block, or an empty list).

    A plain ``nn.Module`` holds them, as in the official code; the resampling
    layer is added by the caller.
    """
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, norm_groups)
                                for i in range(num_blocks))
    level.attn = nn.ModuleList(AttnBlock(out_channels, norm_groups, fused_qkv)
                               for _ in range(num_blocks if attention else 0))
    return level


def run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Apply a level's blocks, each followed by its attention block if it has one."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def make_middle(channels: int, norm_groups: int = 32, fused_qkv: bool = False) -> nn.Module:
    """The middle of the encoder and of the decoder: ResnetBlock, AttnBlock, ResnetBlock."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, norm_groups)
    mid.attn_1 = AttnBlock(channels, norm_groups, fused_qkv)
    mid.block_2 = ResnetBlock(channels, channels, norm_groups)
    return mid


def run_middle(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def check_levels(ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, resolution: int,
                 attn_resolutions: tuple[int, ...], norm_groups: int = 32) -> None:
    """Raise a ValueError for settings that would fail later or silently do nothing."""
    if len(ch_mult) == 0 or any(m < 1 for m in ch_mult):
        raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {ch_mult}")
    widths = [ch * m for m in ch_mult]
    if norm_groups < 1 or any(w % norm_groups for w in widths):
        raise ValueError(f"GroupNorm({norm_groups}) needs every level width ch * ch_mult[i] to be a multiple of "
                         f"norm_groups={norm_groups}; got ch={ch}, ch_mult={ch_mult} -> {widths}")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be at least 1, got {num_res_blocks}")
    level_resolutions = [resolution // 2 ** i for i in range(len(ch_mult))]
    unknown = [r for r in attn_resolutions if r not in level_resolutions]
    if unknown:
        raise ValueError(f"attention resolutions {unknown} match no level; with resolution={resolution} "
                         f"the levels work at {level_resolutions}")


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` -> moments ``(B, 2 * z_channels, H / f, W / f)``, ``f = 2^(L - 1)``.

    ``conv_in`` (to ``ch`` channels), then ``L = len(ch_mult)`` levels ``down[i]``:
    ``num_res_blocks`` ResnetBlocks at width ``ch * ch_mult[i]`` (each followed by an
    AttnBlock if the level's resolution ``resolution / 2^i`` is in
    ``attn_resolutions``) and a ``downsample``, except at the last level. Then the
    middle (ResnetBlock, AttnBlock, ResnetBlock), GroupNorm, swish and ``conv_out``
    to twice ``z_channels``: the mean and the log-variance of ``q(z | x)``.

    ``resolution`` is the training image size, only used to place attention; the
    encoder runs on any ``H, W`` divisible by ``f``. ``double_z=False`` outputs
    ``z_channels`` (a plain feature map, as VAR's VQ-VAE needs); ``fused_qkv``
    is passed to every ``AttnBlock``.
    """

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], in_channels: int, resolution: int, z_channels: int,
                 norm_groups: int = 32, double_z: bool = True, fused_qkv: bool = False):
        super().__init__()
        check_levels(ch, ch_mult, num_res_blocks, resolution, attn_resolutions, norm_groups)
        self.in_channels = in_channels
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            level = make_level(block_in, ch * mult, num_res_blocks, resolution // 2 ** i in attn_resolutions,
                               norm_groups, fused_qkv)
            block_in = ch * mult
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = make_middle(block_in, norm_groups, fused_qkv)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, (2 if double_z else 1) * z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.downsample_factor
        check_float_input("Encoder", "x", x, ndim=4, layout="(B, C, H, W)", like=self.conv_in.weight)
        if x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"Encoder expects images x of shape (B, {self.in_channels}, H, W) with H and W "
                             f"divisible by {f} (the downsampling factor); got {tuple(x.shape)}")
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = run_middle(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` -> image ``(B, out_channels, h * f, w * f)``.

    The encoder in reverse: ``conv_in`` to the widest width ``ch * ch_mult[-1]``, the
    middle, then the levels from last to first, each with ``num_res_blocks + 1``
    ResnetBlocks (AttnBlocks where ``resolution / 2^i`` is in ``attn_resolutions``)
    and an ``upsample`` except at level 0; GroupNorm, swish, ``conv_out``.

    ``up[i]`` holds level ``i`` (the official index order, so ``up[0]`` is the
    full-resolution level that runs last). ``fused_qkv`` is passed to every ``AttnBlock``.
    """

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], out_channels: int, resolution: int, z_channels: int,
                 norm_groups: int = 32, fused_qkv: bool = False):
        super().__init__()
        check_levels(ch, ch_mult, num_res_blocks, resolution, attn_resolutions, norm_groups)
        self.z_channels = z_channels
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = make_middle(block_in, norm_groups, fused_qkv)
        levels = []
        for i in reversed(range(len(ch_mult))):  # built in the order they run: widest first
            level = make_level(block_in, ch * ch_mult[i], num_res_blocks + 1,
                               resolution // 2 ** i in attn_resolutions, norm_groups, fused_qkv)
            block_in = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.append(level)
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        check_float_input("Decoder", "z", z, ndim=4, layout="(B, C, h, w)", like=self.conv_in.weight)
        if z.shape[1] != self.z_channels:
            raise ValueError(f"Decoder expects latents z of shape (B, {self.z_channels}, h, w); got {tuple(z.shape)}")
        h = run_middle(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The posterior ``q(z | x) = N(mean, diag(exp(logvar)))`` returned by ``AutoencoderKL.encode``.

    ``mean`` and ``logvar`` are ``(B, C, H, W)``; ``logvar`` is clamped to
    ``[-30, 20]`` so that ``exp`` neither underflows to a zero std nor overflows.
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        if mean.shape != logvar.shape or mean.ndim < 2:
            raise ValueError(f"DiagonalGaussian expects mean and logvar of one shape (B, ...); "
                             f"got {tuple(mean.shape)} and {tuple(logvar.shape)}")
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, I)``: a sample through which gradients
        reach ``mean`` and ``logvar`` (the reparameterisation trick)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latent, ``mean`` (what a deterministic encoding uses)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """``KL(q || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar)`` over all but the batch axis: ``(B,)``."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=tuple(range(1, self.mean.ndim)))


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder: ``encoder``, optional ``quant_conv``/``post_quant_conv``, ``decoder``.

    ``encode(x)``: images ``(B, in_channels, H, W)`` -> ``DiagonalGaussian`` over
    latents ``(B, z_channels, H/f, W/f)``; ``decode(z)`` goes back;
    ``forward(x, sample=True)`` returns ``(reconstruction, posterior)``.

    Args:
        ch, ch_mult, num_res_blocks: width of level 0, width multiplier per level,
            ResnetBlocks per encoder level (the decoder has one more per level).
        z_channels: latent channels (MAR calls it ``embed_dim``).
        resolution: training image size; with the two ``*_attn_resolutions`` it
            says which levels attend (level ``i`` works at ``resolution / 2^i``).
            Both middles always attend.
        in_channels: image channels, for the encoder's input and the decoder's output.
        use_quant_conv: LDM's 1x1 convs on the moments (``2z -> 2z``) and on the
            latent before decoding (``z -> z``); MAR keeps them, SD3 dropped them.
        scale_factor, shift_factor: the latent normalisation of ``to_latent``.
        norm_groups: GroupNorm groups (32 in the official models). Every width must
            be a multiple of it. A small model needs fewer: with 32 channels, 32
            groups of one channel are instance norm, which erases how strongly a
            channel responds (chapter 4 shows that this wipes out colour).
    """

    @check_arguments(ch=POSITIVE_INT, num_res_blocks=POSITIVE_INT, z_channels=POSITIVE_INT, resolution=POSITIVE_INT,
                     in_channels=POSITIVE_INT, norm_groups=POSITIVE_INT, scale_factor=POSITIVE, shift_factor=FINITE)
    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 resolution: int = 256, encoder_attn_resolutions: tuple[int, ...] = (),
                 decoder_attn_resolutions: tuple[int, ...] = (), in_channels: int = 3,
                 use_quant_conv: bool = False, scale_factor: float = 1.0, shift_factor: float = 0.0,
                 norm_groups: int = 32):
        super().__init__()
        self.z_channels, self.use_quant_conv = z_channels, use_quant_conv
        self.scale_factor, self.shift_factor = scale_factor, shift_factor
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                               attn_resolutions=encoder_attn_resolutions, in_channels=in_channels,
                               resolution=resolution, z_channels=z_channels, norm_groups=norm_groups)
        self.decoder = Decoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                               attn_resolutions=decoder_attn_resolutions, out_channels=in_channels,
                               resolution=resolution, z_channels=z_channels, norm_groups=norm_groups)
        if use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, kernel_size=1)
            self.post_quant_conv = nn.Conv2d(z_channels, z_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """``(B, in_channels, H, W)`` -> ``q(z | x)`` with mean and logvar ``(B, z_channels, H/f, W/f)``."""
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, z_channels, h, w)`` -> ``(B, in_channels, h * f, w * f)``."""
        if z.ndim != 4 or z.shape[1] != self.z_channels:
            raise ValueError(f"decode expects latents (B, {self.z_channels}, h, w); got {tuple(z.shape)}")
        if self.use_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct ``x`` from a posterior sample (or its mean when ``sample=False``)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        """``(z - shift_factor) * scale_factor``: an encoder latent to the generator's latent
        space, e.g. ``vae.to_latent(vae.encode(x).sample())``."""
        return (z - self.shift_factor) * self.scale_factor

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """``z / scale_factor + shift_factor``, the inverse of ``to_latent``, e.g.
        ``vae.decode(vae.from_latent(z))``."""
        return z / self.scale_factor + self.shift_factor


class VAELoss(NamedTuple):
    """``loss = reconstruction + kl_weight * kl``, each a scalar averaged over the batch."""

    loss: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor


def vae_loss(recon: torch.Tensor, x: torch.Tensor, posterior: DiagonalGaussian, kl_weight: float,
             reconstruction: str = "l1") -> VAELoss:
    """The VAE objective, per image and averaged over the batch:

        loss = mean_b [ sum_{c,h,w} d(x, x_hat) ] + kl_weight * mean_b [ KL(q(z | x) || N(0, I)) ]

    with ``d = |x - x_hat|`` (``"l1"``, LDM's choice: sharper than squared error) or
    ``(x - x_hat)^2`` (``"mse"``). With ``kl_weight = 1`` this is the negative ELBO,
    up to constants, of a Laplace decoder with unit scale (``"l1"``: -log p = |x - x_hat| + const)
    or of a Gaussian decoder with variance 1/2 (``"mse"``: -log p = (x - x_hat)^2 / (2 sigma^2) + const). LDM adds a
    perceptual (LPIPS) and a GAN loss and uses ``kl_weight = 1e-6``; the book's
    small autoencoder uses the reconstruction term alone plus a small KL weight.

    ``recon`` and ``x``: ``(B, C, H, W)``. Returns ``VAELoss(loss, reconstruction, kl)``.
    """
    if recon.shape != x.shape:
        raise ValueError(f"recon and x must have one shape; got {tuple(recon.shape)} and {tuple(x.shape)}")
    if reconstruction == "l1":
        error = (x - recon).abs()
    elif reconstruction == "mse":
        error = (x - recon).pow(2)
    else:
        raise ValueError(f"reconstruction must be 'l1' or 'mse', got {reconstruction!r}")
    rec = error.sum(dim=tuple(range(1, x.ndim))).mean()
    kl = posterior.kl().mean()
    return VAELoss(rec + kl_weight * kl, rec, kl)


SMALL_CONFIG = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, resolution=32, norm_groups=8)
"""The book's training-chapter autoencoder, for 32x32 images (the shapes dataset).

Widths 32, 64, 64 and f = 4: a ``(B, 3, 32, 32)`` image becomes a ``(B, 4, 8, 8)``
latent (12x fewer numbers). Attention only in the two middles, at 8x8. No quant
convs, like SD3. 8 GroupNorm groups, so that each group holds at least 4 channels
as in the full-size models. Build it with ``AutoencoderKL(**SMALL_CONFIG)`` or
``zoo.build("small-kl-vae")``.
"""
