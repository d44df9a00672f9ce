"""DiT: the Diffusion Transformer (Peebles & Xie, 2023, https://arxiv.org/abs/2212.09748).

Chapter 5 of the book. DiT replaces the U-Net of a latent diffusion model by a
plain vision transformer built from the pieces of Part I:

    latents x (N, C, H, W) --PatchEmbed + fixed 2-D sin-cos positions--> tokens (N, L, D)
    timesteps t (N,)       --TimestepEmbedder--> (N, D) -+
    labels y (N,)          --LabelEmbedder----> (N, D) -+-> c = t_emb + y_emb
    tokens, c --depth x DiTBlock (adaLN-Zero)--> --FinalLayer--> (N, L, p*p*C_out)
              --unpatchify--> (N, C_out, H, W)

The output holds the predicted noise eps in its first C channels and, with
``learn_sigma``, C more channels for the variance (the "v" of Nichol & Dhariwal's
learned-variance interpolation), so ``C_out = 2C``.

Every submodule keeps the name it has in the official code (``x_embedder``,
``t_embedder``, ``y_embedder``, ``pos_embed``, ``blocks``, ``final_layer``), so
an official checkpoint such as DiT-XL-2-256x256.pt loads with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from .adaln import DiTBlock, FinalLayer, zero_init
from .patch_embed import PatchEmbed, get_2d_sincos_pos_embed, unpatchify
from .timestep import LabelEmbedder, TimestepEmbedder
from .validation import (POSITIVE, POSITIVE_INT, PROBABILITY, check_arguments, check_divisible, check_same_batch,
                         check_timesteps)

# The model sizes of the paper's Table 1, each with patch sizes 2, 4 and 8.
# "DiT-XL/2" is XL with 2x2 patches; the input size (32 for 256 px images
# through the 8x-downsampling VAE) is a separate argument.
_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
DIT_CONFIGS = {f"DiT-{size}/{p}": dict(**dims, patch_size=p) for size, dims in _SIZES.items() for p in (2, 4, 8)}


class DiT(nn.Module):
    """A class-conditional diffusion transformer with adaLN-Zero blocks.

    Args:
        input_size: side of the (latent) input images, H = W.
        patch_size: p; the transformer sees L = (H/p)^2 tokens.
        in_channels: C of the input (4 for SD's VAE latents).
        hidden_size, depth, num_heads, mlp_ratio: the transformer's width D, number
            of blocks, attention heads and MLP expansion.
        class_dropout_prob: probability of replacing a label by the null class
            during training, for classifier-free guidance.
        num_classes: number of labels; the label table has one more row (the null class).
        learn_sigma: also predict the variance, doubling the output channels.
        guided_channels: how many of the ``in_channels`` eps channels
            ``forward_with_cfg`` guides; None (default) guides them all. The
            official code guides the first 3 only (see ``forward_with_cfg``):
            ``guided_channels=3`` samples its checkpoints exactly as it does.
    """

    @check_arguments(input_size=POSITIVE_INT, patch_size=POSITIVE_INT, in_channels=POSITIVE_INT,
                     hidden_size=POSITIVE_INT, depth=POSITIVE_INT, num_heads=POSITIVE_INT, mlp_ratio=POSITIVE,
                     class_dropout_prob=PROBABILITY, num_classes=POSITIVE_INT)
    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, num_classes: int = 1000, learn_sigma: bool = True,
                 guided_channels: int | None = None):
        super().__init__()
        check_divisible("DiT", "input_size", input_size, "patch_size", patch_size)
        check_divisible("DiT", "hidden_size", hidden_size, "num_heads", num_heads)
        if guided_channels is not None and (isinstance(guided_channels, bool) or not isinstance(guided_channels, int)
                                            or not 1 <= guided_channels <= in_channels):
            raise ValueError(f"guided_channels must be None or an int from 1 to in_channels = {in_channels}, "
                             f"got {guided_channels!r}")
        self.guided_channels = guided_channels
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.learn_sigma = learn_sigma

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, img_size=input_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed, never trained. A frozen Parameter rather than a buffer because the
        # official checkpoints store it under this name (and count it in the total).
        pos_embed = get_2d_sincos_pos_embed(hidden_size, self.x_embedder.grid_size)  # (L, D)
        self.pos_embed = nn.Parameter(pos_embed.unsqueeze(0), requires_grad=False)  # (1, L, D)

        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation, in the official order.

        1. every Linear: xavier-uniform weight, zero bias (the transformer default);
        2. the patch embedding: xavier-uniform too, treating its ``(D, C, p, p)``
           kernel as the ``(D, C*p*p)`` linear map it is;
        3. label table and timestep MLP: N(0, 0.02);
        4. adaLN-Zero: the modulation layers and the output layer back to zero,
           since step 1 overwrote them. The model then predicts exactly 0.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            zero_init(block.adaLN_modulation[-1])
        zero_init(self.final_layer.adaLN_modulation[-1])
        zero_init(self.final_layer.linear)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predict noise (and variance) for noisy latents.

        Args:
            x: ``(N, C, H, W)`` noisy inputs x_t.
            t: ``(N,)`` diffusion timesteps, 0 .. 999 for the official models.
            y: ``(N,)`` integer labels; ``num_classes`` is the null class. In
                training mode labels are dropped with ``class_dropout_prob``.
        Returns:
            ``(N, out_channels, H, W)``: eps in the first C channels, then the
            variance channels if ``learn_sigma``.
        """
        check_timesteps("DiT", "t", t)
        check_same_batch("DiT", x=x, t=t, y=y)
        tokens = self.x_embedder(x) + self.pos_embed  # (N, L, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final_layer(tokens, c)  # (N, L, p*p*C_out)
        return unpatchify(out, self.patch_size, self.out_channels)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """``forward`` with classifier-free guidance, for the samplers.

        The batch holds two halves with the same inputs: the first with the
        labels, the second with the null class. With eps_c and eps_u the two
        predictions, both halves get

            eps = eps_u + cfg_scale * (eps_c - eps_u)

        (scale 1: plain conditional; larger: further from the unconditional).
        Guidance acts on the eps channels only; the variance channels are passed
        through. By default all ``in_channels`` eps channels are guided. The
        official code (``models.py``, ``DiT.forward_with_cfg``) guides only the
        first 3 of the 4 latent channels and passes the 4th through with the
        variances, a slip its authors kept so that their published samples stay
        reproducible; build with ``guided_channels=3`` (as the zoo's official
        DiTs do) to sample exactly like it.

        Args:
            x: ``(2M, C, H, W)``; only the first half is read.
            t, y: ``(2M,)``; ``y[M:]`` is normally the null class.
        Returns:
            ``(2M, out_channels, H, W)``, the two halves equal in the guided channels.
        """
        if len(x) % 2:
            raise ValueError(f"forward_with_cfg expects a batch of conditional then unconditional "
                             f"halves, got an odd batch size {len(x)}")
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        guided = self.in_channels if self.guided_channels is None else self.guided_channels
        eps, rest = out[:, :guided], out[:, guided:]
        cond_eps, uncond_eps = eps.chunk(2)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)
