"""MAR's per-token diffusion head (Li et al., 2024, "Autoregressive Image Generation
without Vector Quantization").

MAR does not predict a discrete token: for each token its transformer outputs a
condition vector ``z``, and a small MLP denoiser, ``SimpleMLPAdaLN``, learns
``p(x | z)`` by diffusion on that one token. Chapter 3 of the book shows it as a
third use of adaLN: a residual MLP instead of a transformer, with the timestep
and the condition entering every block through adaLN-Zero modulation:

    y = TimeEmbed(t) + Linear(z)
    h = x + gate * MLP(LN(x) * (1 + scale) + shift),   (shift, scale, gate) = Linear(SiLU(y))

Chapter 12 adds the diffusion loss around it. Submodule names (``time_embed``,
``cond_embed``, ``input_proj``, ``res_blocks.i.in_ln``, ``adaLN_modulation.1``,
``final_layer``) follow the official code so that MAR's checkpoints load.
"""

from __future__ import annotations

import torch
from torch import nn

from .adaln import FinalLayer, modulate, zero_init
from .timestep import TimestepEmbedder


def modulate_vectors(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` for one vector per sample: all three ``(N, C)``.

    ``adaln.modulate`` works on token sequences ``(B, L, D)``; here each sample is a
    single token, so it is a sequence of length 1.
    """
    return modulate(x.unsqueeze(1), shift, scale).squeeze(1)


class ResBlock(nn.Module):
    """A residual MLP block with adaLN-Zero: ``x + gate * MLP(modulate(LN(x), shift, scale))``.

    ``forward(x, y)``: features ``(N, C)`` and conditioning ``(N, C)`` to ``(N, C)``.
    Unlike DiT, ``in_ln`` keeps its affine weight and bias.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        h = modulate_vectors(self.in_ln(x), shift, scale)
        return x + gate * self.mlp(h)


class SimpleMLPAdaLN(nn.Module):
    """MAR's denoiser for one token: ``(x_t, t, z) -> prediction``.

    ``forward(x, t, c)``: noisy tokens ``(N, in_channels)``, timesteps ``(N,)``
    (0 .. 999) and conditions ``(N, z_channels)`` to ``(N, out_channels)``. MAR
    learns the variance too, so it builds this with ``out_channels = 2 *
    in_channels``: the predicted noise, then the variance interpolation values.

    Initialisation as in MAR: xavier-uniform linear weights and zero biases, N(0,
    0.02) for the timestep MLP, and zero for every ``adaLN_modulation`` output
    layer and for the final linear layer. So every ``ResBlock`` starts as the
    identity and the untrained head outputs exactly 0.
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int):
        super().__init__()
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.z_channels, self.num_res_blocks = z_channels, num_res_blocks
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        # DiT's final layer with a 1x1 "patch": norm_final, adaLN shift/scale, linear.
        self.final_layer = FinalLayer(model_channels, patch_size=1, out_channels=out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        zero_layers = [block.adaLN_modulation[-1] for block in self.res_blocks]
        zero_layers += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zero_layers:
            zero_init(layer)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        if x.ndim != 2 or x.shape[1] != self.in_channels or t.shape != (N,) or c.shape != (N, self.z_channels):
            raise ValueError(f"SimpleMLPAdaLN expects x (N, {self.in_channels}), t (N,), c (N, {self.z_channels}); "
                             f"got x {tuple(x.shape)}, t {tuple(t.shape)}, c {tuple(c.shape)}")
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)  # (N, model_channels)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x.unsqueeze(1), y).squeeze(1)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance on the predicted noise.

        The batch is two halves: conditions ``c[:N/2]`` from the class and ``c[N/2:]``
        from the null class. Both halves denoise the same ``x[:N/2]``; the noise
        prediction becomes ``eps_u + cfg_scale * (eps_c - eps_u)`` and is returned for
        both halves, while the variance channels pass through unguided.
        """
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch (conditional + unconditional), got {x.shape[0]}")
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = eps.chunk(2)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)
