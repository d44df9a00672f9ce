"""Images as tokens: patch embedding, unpatchify and 2-D sin-cos positions.

Chapter 1 of the book. A vision transformer cuts a ``(B, C, H, W)`` image into
non-overlapping ``p x p`` patches, flattens each one and maps it linearly to a
``D``-dimensional token: ``(B, C, H, W) -> (B, L, D)`` with ``L = (H/p)(W/p)``.
A convolution with kernel size and stride ``p`` does exactly that linear map,
which is how ``PatchEmbed`` is written (and why its weight is ``(D, C, p, p)``).

Self-attention is permutation-equivariant (shuffling the tokens shuffles its
output the same way), so each token also gets a position embedding. DiT and MAE use fixed 2-D sin-cos embeddings; SD3 stores one large
grid of them and crops the centre for the resolution at hand.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .validation import POSITIVE_INT, check_arguments, check_divisible, check_float_input


def _check_image_batch(x: torch.Tensor, channels: int | None, patch_size: int, where: str,
                       like: torch.Tensor | None = None) -> None:
    """Images ``(B, C, H, W)`` (any C if ``channels`` is None) whose sides ``patch_size`` divides."""
    check_float_input(where, "x", x, ndim=4, layout="(B, C, H, W)", like=like)
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{where} expects {channels} channels in x, got {x.shape[1]} (shape {tuple(x.shape)})")
    H, W = x.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"{where}: the size of x, {H}x{W}, is not divisible by the patch size {patch_size}")


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into flattened patches, the inverse of ``unpatchify``.

    ``(B, C, H, W) -> (B, L, p*p*C)``, patches in row-major order; inside a patch
    the values are ordered (row, column, channel), the layout DiT's output head uses.
    """
    _check_image_batch(x, None, patch_size, "patchify")
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int,
               height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Reassemble per-token patches into images.

    Args:
        x: ``(B, L, p*p*C)`` with L = h*w patches (row-major).
        patch_size: p.
        channels: C.
        height, width: the patch grid h, w; if omitted the grid is square.
    Returns:
        ``(B, C, h*p, w*p)``.
    """
    if x.ndim != 3:
        raise ValueError(f"unpatchify expects (B, L, p*p*C), got shape {tuple(x.shape)}")
    B, L, D = x.shape
    if D != patch_size * patch_size * channels:
        raise ValueError(f"unpatchify: last dimension {D} != patch_size^2 * channels = "
                         f"{patch_size}^2 * {channels} = {patch_size * patch_size * channels}")
    if height is None and width is None:
        height = width = int(round(L ** 0.5))
    elif height is None or width is None:
        raise ValueError("unpatchify: give both height and width of the patch grid, or neither")
    if height * width != L:
        raise ValueError(f"unpatchify: a {height}x{width} grid has {height * width} patches, "
                         f"but x has L = {L} tokens")
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=height, w=width, p=patch_size, q=patch_size)


class PatchEmbed(nn.Module):
    """Patches to tokens with one strided convolution: ``(B, C, H, W) -> (B, L, D)``.

    Args:
        patch_size: p; H and W must be multiples of it.
        in_chans: C.
        embed_dim: D.
        img_size: if given, only images of exactly this size are accepted (DiT);
            if None, any size divisible by p is (SD3 with cropped positions).
    """

    @check_arguments(patch_size=POSITIVE_INT, in_chans=POSITIVE_INT, embed_dim=POSITIVE_INT,
                     img_size=POSITIVE_INT.or_none())
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, img_size: int | None = None,
                 bias: bool = True):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.in_chans = in_chans
        self.img_size = img_size
        if img_size is not None:
            check_divisible("PatchEmbed", "img_size", img_size, "patch_size", patch_size)
            self.grid_size = img_size // patch_size
            self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image_batch(x, self.in_chans, self.patch_size[0], "PatchEmbed", like=self.proj.weight)
        if self.img_size is not None and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"PatchEmbed was built for {self.img_size}x{self.img_size} images x, "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, L, D)

    def as_linear_weight(self) -> torch.Tensor:
        """The conv kernel as the ``(D, p*p*C)`` matrix that acts on ``patchify`` output."""
        return rearrange(self.proj.weight, "d c p q -> d (p q c)")


def get_1d_sincos_pos_embed(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos features of 1-D positions (Vaswani et al. 2017, as in MAE/DiT).

    With ``omega_i = 10000 ** (-i / (D/2))``, ``i = 0 .. D/2 - 1``, returns
    ``[sin(pos * omega_0) .. sin(pos * omega_{D/2-1}), cos(pos * omega_0) .. ]``
    (sines first, unlike ``timestep_embedding``). Computed in float64.

    ``positions (M,) -> (M, D)``.
    """
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega  # (D/2,)
    angles = positions.reshape(-1).double()[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_shift_matrix(embed_dim: int, offset: float) -> torch.Tensor:
    """The ``(D, D)`` matrix ``R_k`` with ``PE(m + k) = R_k PE(m)`` for every position m.

    For each frequency, the pair ``(sin(m w), cos(m w))`` moves to
    ``(sin((m+k) w), cos((m+k) w))`` by a rotation through the angle ``k w``:
    ``sin(a + b) = sin a cos b + cos a sin b`` and ``cos(a + b) = cos a cos b - sin a sin b``.
    So a shift of position is a fixed rotation of the embedding, independent of m,
    which is why ``PE(m) . PE(m + k)`` depends on the offset k alone (and the idea
    behind rotary embeddings, which rotate queries and keys instead).
    Float64, laid out like ``get_1d_sincos_pos_embed`` (sines, then cosines).
    """
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)  # (D/2,)
    cos, sin = torch.cos(offset * omega), torch.sin(offset * omega)
    rotation = torch.zeros(embed_dim, embed_dim, dtype=torch.float64)
    index = torch.arange(half)
    rotation[index, index] = cos                # new sin = cos(kw) sin + sin(kw) cos
    rotation[index, index + half] = sin
    rotation[index + half, index] = -sin        # new cos = -sin(kw) sin + cos(kw) cos
    rotation[index + half, index + half] = cos
    return rotation


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings for an ``h x w`` patch grid.

    Half of the channels encode the column (x) coordinate and half the row (y),
    each with ``get_1d_sincos_pos_embed``: ``[emb(x) | emb(y)]``, the MAE/DiT
    convention. Returns float32 ``(h*w, D)`` in row-major patch order.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos embeddings, got {embed_dim}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # each (h, w)
    emb_x = get_1d_sincos_pos_embed(embed_dim // 2, cols)
    emb_y = get_1d_sincos_pos_embed(embed_dim // 2, rows)
    return torch.cat([emb_x, emb_y], dim=1).float()


def cropped_pos_embed(pos_embed: torch.Tensor, max_size: int, height: int, width: int) -> torch.Tensor:
    """SD3's trick for many resolutions: take the centre ``height x width`` window
    of a ``max_size x max_size`` grid of position embeddings.

    Args:
        pos_embed: ``(1, max_size**2, D)``.
        height, width: the patch grid of the current image (H/p, W/p).
    Returns:
        ``(1, height*width, D)``.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[1] != max_size * max_size:
        raise ValueError(f"pos_embed must be (1, {max_size}**2, D), got {tuple(pos_embed.shape)}")
    if height > max_size or width > max_size:
        raise ValueError(f"a {height}x{width} patch grid does not fit in the {max_size}x{max_size} "
                         "grid of stored position embeddings")
    top, left = (max_size - height) // 2, (max_size - width) // 2
    grid = rearrange(pos_embed, "1 (h w) d -> 1 h w d", h=max_size, w=max_size)
    return rearrange(grid[:, top:top + height, left:left + width], "1 h w d -> 1 (h w) d")
