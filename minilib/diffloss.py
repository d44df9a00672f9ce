"""MAR's per-token diffusion head (Li et al., 2024, "Autoregressive Image Generation
without Vector Quantization").

MAR does not predict a discrete token: for each token its transformer outputs a
condition vector ``z``, and a small MLP denoiser, ``SimpleMLPAdaLN``, learns
``p(x | z)`` by diffusion on that one token. Chapter 3 of the book shows it as a
third use of adaLN: a residual MLP instead of a transformer, with the timestep
and the condition entering every block through adaLN-Zero modulation:

    y = TimeEmbed(t) + Linear(z)
    h = x + gate * MLP(LN(x) * (1 + scale) + shift),   (shift, scale, gate) = Linear(SiLU(y))

Chapter 12 adds the diffusion loss around it, ``DiffLoss``: per-token Gaussian
diffusion with the cosine schedule over 1000 steps, trained with Improved DDPM's
hybrid loss (eps MSE plus the variational bound for the learned variance) and
sampled by DDPM on a respaced schedule (100 steps in MAR), with a temperature
and classifier-free guidance. Submodule names (``net.time_embed``,
``net.cond_embed``, ``net.input_proj``, ``net.res_blocks.i.in_ln``,
``adaLN_modulation.1``, ``net.final_layer``) follow the official code so that
MAR's checkpoints load.
"""

from __future__ import annotations

import torch
from torch import nn

from .adaln import FinalLayer, modulate, zero_init
from .diffusion import GaussianDiffusion, beta_schedule
from .timestep import TimestepEmbedder
from .validation import check_finite, check_float_input


def draw_on_cpu(sampler, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """``sampler(shape)`` (e.g. ``torch.randn``) drawn with the CPU generator, then moved to ``device``.

    The official MAR code draws a few of its random numbers this way even on a GPU
    (``torch.randn(...).cuda()``: the head's start noise; the label drop), so
    drawing them on the CPU here keeps a seeded GPU run on the official stream.
    The copy to a GPU goes through pinned memory without blocking, so the host never
    waits for the GPU here. Returns a float32 tensor of ``shape`` on ``device``.
    """
    values = sampler(shape)
    device = torch.device(device)
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


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


class DiffLoss(nn.Module):
    """MAR's diffusion loss: a diffusion model of one token ``x`` given its condition ``z``.

    Instead of a softmax over a codebook, MAR models ``p(x | z)`` for each
    continuous token ``x (C,)`` with a small denoiser ``net`` conditioned on
    the transformer's output ``z``. The loss (MAR, section 3.2) is the diffusion loss
    on that token,

        L(z, x) = E_{t, eps} || eps - eps_theta(x_t | t, z) ||^2   (+ the vb term for the variance),

    and sampling runs the reverse diffusion for each token, with a temperature
    and classifier-free guidance.

    Args (the official names and order):
        target_channels: C, the token size (16 for MAR's KL-16 latents, 1x1 patches).
        z_channels: the size of the condition (the MAR decoder's width).
        depth: the number of ``ResBlock`` s of ``net`` (``diffloss_d``).
        width: ``net``'s hidden size (``diffloss_w``).
        num_sampling_steps: steps of the sampling schedule, e.g. ``"100"`` (a
            string in MAR's command line, an int is accepted too).

    ``net`` predicts eps and the learned-range variance values (2C outputs).
    ``train_diffusion`` is the 1000-step cosine process with ``learn_sigma``;
    ``gen_diffusion`` is it respaced to ``num_sampling_steps``. Neither holds
    tensors of the state dict, so ``state_dict()`` is ``net``'s, under ``net.``.
    """

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: str | int = "100"):
        super().__init__()
        for name, value in [("target_channels", target_channels), ("z_channels", z_channels),
                            ("depth", depth), ("width", width)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DiffLoss: {name} must be a positive int, got {value!r}")
        if not str(num_sampling_steps).isdigit():
            raise ValueError(f"DiffLoss: num_sampling_steps must be a number of steps such as '100', "
                             f"got {num_sampling_steps!r}")
        self.in_channels = target_channels
        self.z_channels = z_channels
        self.net = SimpleMLPAdaLN(in_channels=target_channels, model_channels=width,
                                  out_channels=target_channels * 2,  # eps and the variance values
                                  z_channels=z_channels, num_res_blocks=depth)
        self.train_diffusion = GaussianDiffusion(beta_schedule("cosine", 1000), learn_sigma=True)
        self.gen_diffusion = self.train_diffusion.respace(int(num_sampling_steps))

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The diffusion loss of a batch of tokens, one random t per token.

        Args:
            target: ``(N, C)`` clean tokens.
            z: ``(N, z_channels)`` their conditions.
            mask: optional ``(N,)`` weights (MAR: 1 for the masked tokens that are
                predicted, 0 for the visible ones); the loss is then
                ``sum(loss_i * mask_i) / sum(mask_i)``.
        Returns:
            the scalar loss: the mean over tokens of the hybrid loss (eps MSE + vb).
        """
        check_float_input("DiffLoss", "target", target)
        self._check_condition(z, len(target) if target.ndim == 2 else None)
        if target.ndim != 2 or target.shape[1] != self.in_channels or len(target) == 0:
            raise ValueError(f"DiffLoss expects target tokens (N, {self.in_channels}) with N >= 1, "
                             f"got {tuple(target.shape)}")
        check_finite("DiffLoss", "z", z)
        if mask is not None:
            if mask.shape != (len(target),):
                raise ValueError(f"DiffLoss expects a mask (N,) = ({len(target)},), got {tuple(mask.shape)}")
            if mask.device.type == "cpu" and not mask.sum() > 0:  # the loss would be 0 / 0
                raise ValueError("DiffLoss: the mask selects no token (its sum is 0), so the loss is undefined")
        t = torch.randint(0, self.train_diffusion.num_timesteps, (len(target),), device=target.device)
        loss = self.train_diffusion.training_losses(self.net, target, t=t, model_kwargs=dict(c=z))["loss"]
        if mask is not None:
            loss = (loss * mask).sum() / mask.sum()
        return loss.mean()

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float = 1.0,
               clip_denoised: bool = False) -> torch.Tensor:
        """Draw one token per condition with DDPM on ``gen_diffusion``.

        Random draws: the start noise (with the CPU generator, as the official code
        does), then one noise per DDPM step.

        Args:
            z: ``(N, z_channels)`` conditions. With guidance (``cfg != 1``) the batch
                is two halves, conditions from the class then from the null class;
                both halves start from the same noise and denoise with
                ``net.forward_with_cfg``.
            temperature: scales the noise of every DDPM step (see
                ``GaussianDiffusion.p_sample_loop``); MAR uses it to trade
                diversity for fidelity.
            cfg: the guidance scale.
            clip_denoised: clamp each step's x0_hat to [-1, 1]. MAR does not (False,
                the default). The first step, at t = 999 with abar = 2.4e-9, multiplies
                the head's eps error by 1 / sqrt(abar) ~ 20,000 in x0_hat, so an
                unclipped sampler needs a head whose eps is accurate to ~1e-3 there;
                a briefly trained small head is not, and for tokens in [-1, 1] the
                clamp keeps its samples finite.
        Returns:
            ``(N, C)`` tokens; with guidance, keep the first half (both halves are
            guided, and MAR drops the second).
        """
        self._check_condition(z)
        if cfg != 1.0:
            if len(z) % 2:
                raise ValueError(f"DiffLoss.sample with cfg != 1 needs an even batch (conditional then "
                                 f"unconditional halves), got {len(z)}")
            noise = draw_on_cpu(torch.randn, (len(z) // 2, self.in_channels), z.device)
            noise = torch.cat([noise, noise])
            model, model_kwargs = self.net.forward_with_cfg, dict(c=z, cfg_scale=cfg)
        else:
            noise = draw_on_cpu(torch.randn, (len(z), self.in_channels), z.device)
            model, model_kwargs = self.net.forward, dict(c=z)
        return self.gen_diffusion.p_sample_loop(model, tuple(noise.shape), model_kwargs=model_kwargs, noise=noise,
                                                clip_denoised=clip_denoised, temperature=temperature)

    def _check_condition(self, z: torch.Tensor, n: int | None = None) -> None:
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != self.z_channels or \
                (n is not None and len(z) != n):
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            expected = f"({'N' if n is None else n}, {self.z_channels})"
            raise ValueError(f"DiffLoss expects conditions z {expected}, got {shape}")
