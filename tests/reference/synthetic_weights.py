"""Deterministic random weights for a module tree, the same in the official code and in minilib.

The official VQ-VAE cannot be made small enough to store its weights in a reference file
(its widths are fixed multiples of ``ch``, which GroupNorm keeps at 32 or more). Instead,
both sides fill the same state dict from one seed: each tensor from its own generator,
seeded by the tensor's name, so the values do not depend on the order in which modules are
built or initialised. Scales keep activations of order one: weight matrices and kernels
``N(0, 1 / fan_in)``, norm scales ``1 + N(0, 0.1^2)``, everything else ``N(0, 0.02^2)``.
"""

from __future__ import annotations

import zlib

import torch


def synthetic_value(name: str, like: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float32)
    if like.ndim >= 2:
        fan_in = like[0].numel()
        return (noise / fan_in ** 0.5).to(like.dtype)
    if name.endswith("weight") and ("norm" in name or name.split(".")[-2].startswith("ln")):
        return (1 + 0.1 * noise).to(like.dtype)
    return (0.02 * noise).to(like.dtype)


def fill_(module: torch.nn.Module, seed: int, skip=lambda name: False) -> list[str]:
    """Overwrite every float parameter and buffer of ``module`` (not the ``skip``ped ones); return their names."""
    filled = []
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not skip(name):
                tensor.copy_(synthetic_value(name, tensor, seed))
                filled.append(name)
    return filled
