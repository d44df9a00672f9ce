"""REPA: representation alignment, a shortcut for training diffusion transformers.

Part V of the book (Yu, Kwak, Jang, Jeong, Huang, Shin & Xie, 2025,
"Representation Alignment for Generation: Training Diffusion Transformers Is
Easier Than You Think", https://arxiv.org/abs/2410.06940; official code:
sihyun-yu/REPA, ``loss.py``, ``models/sit.py``, ``train.py``).

A denoising transformer must learn, from the noisy input alone, what the image
*is* before it can say how to denoise it; much of its long training goes into
those early, semantic features. Self-supervised image encoders such as DINOv2
already have them. REPA adds one regulariser to the usual loss: the hidden
states after an early block ``k`` of the diffusion transformer, passed through
a small MLP (the *projector*), should point in the same direction as the
frozen encoder's features of the *clean* image, patch by patch:

    L = L_flow + lambda * L_align,
    L_align = -1/N sum_n cos( proj(h_k(x_t))_n , f(x0)_n )        (averaged over the batch)

The projector is thrown away after training and the sampler is unchanged: the
term only shapes what the first ``k`` blocks compute. The official defaults:
``k = encoder_depth = 8`` (of SiT-XL's 28 blocks), ``lambda = proj_coeff = 0.5``,
a projector of width 2048, DINOv2-B features (768 wide, 16 x 16 patches of a
224 px image, the token grid of SiT/2 on 256 px images).

What this file holds: :class:`Projector`, :func:`alignment_loss`,
:func:`capture_hidden_states` / :func:`hidden_states` (a block's output, read
with a forward hook, leaving the model's output untouched), and
:func:`repa_loss` (flow matching as in :mod:`minilib.flow` plus the alignment term).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .flow import interpolate, uniform, velocity_target
from .validation import NON_NEGATIVE, POSITIVE, POSITIVE_INT, check_arguments

PROJECTOR_DIM, ENCODER_DEPTH, PROJ_COEFF = 2048, 8, 0.5  # train.py / models/sit.py defaults


class Projector(nn.Sequential):
    """REPA's projector: ``Linear -> SiLU -> Linear -> SiLU -> Linear`` (``build_mlp`` in ``models/sit.py``).

    Maps the transformer's hidden states to the encoder's feature width, token
    by token: ``(B, N, hidden_size) -> (B, N, z_dim)``. Its submodules ``0``,
    ``2`` and ``4`` are the three linear layers, as in the official state dict
    (``projectors.0.0.weight`` there, for the first encoder).
    """

    @check_arguments(hidden_size=POSITIVE_INT, projector_dim=POSITIVE_INT, z_dim=POSITIVE_INT)
    def __init__(self, hidden_size: int, projector_dim: int = PROJECTOR_DIM, z_dim: int = 768):
        super().__init__(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, z_dim))


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity, per patch, averaged over patches and batch.

        L = -mean_{b, n} < projected_{b,n} / |projected_{b,n}| , target_{b,n} / |target_{b,n}| >

    It lies in [-1, 1]: -1 when every projected patch points along its target,
    0 when they are orthogonal, and it ignores the length of either vector
    (``loss.py``: ``normalize`` both, ``-(z * z_tilde).sum(-1)``, mean over patches,
    then over the batch). With several encoders, average their losses.

    Args:
        projected: ``(B, N, D)`` the projector's output.
        target: ``(B, N, D)`` the frozen encoder's patch features (no gradient needed).
    Returns:
        the scalar loss.
    """
    for name, value in (("projected", projected), ("target", target)):
        if not isinstance(value, torch.Tensor) or value.ndim != 3 or not value.is_floating_point():
            raise ValueError(f"alignment_loss: {name} must be a float tensor (B, N, D), got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    if projected.shape != target.shape:
        raise ValueError(f"alignment_loss: projected {tuple(projected.shape)} and target {tuple(target.shape)} "
                         f"must match: one target feature per transformer token, of the projector's width")
    cosine = (F.normalize(projected, dim=-1) * F.normalize(target, dim=-1)).sum(-1)  # (B, N)
    return -cosine.mean()


def _check_depth(model: nn.Module, depth: int) -> None:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no ModuleList 'blocks' to read hidden states from")
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= len(blocks):
        raise ValueError(f"depth must be an int from 1 to the number of blocks {len(blocks)}, got {depth!r}")


@contextmanager
def capture_hidden_states(model: nn.Module, depth: int):
    """Within the ``with``, record the output of ``model.blocks[depth - 1]`` at every forward.

    ``depth`` counts blocks from 1, as REPA's ``encoder_depth`` (``depth = 8``: after
    the 8th block). Yields a list; each forward appends the block's output
    ``(B, L, D)``, still attached to the autograd graph. A forward hook only
    reads: the model's output is exactly what it is without it. The hook is
    removed on leaving the ``with``, even after an error.
    """
    _check_depth(model, depth)
    captured: list[torch.Tensor] = []
    handle = model.blocks[depth - 1].register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


def hidden_states(model: nn.Module, depth: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output, hidden)``: ``model(*args, **kwargs)`` and the tokens ``(B, L, D)`` after block ``depth``."""
    with capture_hidden_states(model, depth) as captured:
        output = model(*args, **kwargs)
    if len(captured) != 1:
        raise ValueError(f"block {depth} ran {len(captured)} times in one forward; expected once")
    return output, captured[0]


class RepaLosses(NamedTuple):
    """The three numbers of one REPA step: ``total = denoising + proj_coeff * alignment``."""

    total: torch.Tensor
    denoising: torch.Tensor
    alignment: torch.Tensor


@check_arguments(depth=POSITIVE_INT, proj_coeff=NON_NEGATIVE, time_scale=POSITIVE)
def repa_loss(model: nn.Module, projector: nn.Module, x0: torch.Tensor, target_features: torch.Tensor,
              depth: int = ENCODER_DEPTH, model_kwargs: dict | None = None, proj_coeff: float = PROJ_COEFF,
              time_scale: float = 1.0, t_sampler: Callable = uniform) -> RepaLosses:
    """Flow matching plus REPA's alignment term, on one batch.

    As :func:`minilib.flow.flow_matching_loss` (REPA trains SiT with the same
    straight path ``x_t = (1 - t) x0 + t noise`` and velocity target
    ``noise - x0``, ``t ~ U(0, 1)`` by default), while a hook reads the tokens
    after block ``depth``; they go through ``projector`` and are aligned with
    ``target_features``, the frozen encoder's features of the clean ``x0``
    (computed by the caller, under ``torch.no_grad()``).

    Args:
        model: a velocity network ``model(x_t, time_scale * t, **model_kwargs)``
            with a ``blocks`` ModuleList, e.g. ``TinyDenoiser`` (``time_scale = 1``)
            or ``DiT(learn_sigma=False)`` (``time_scale = 1000``).
        projector: e.g. :class:`Projector`, ``(B, L, D) -> (B, L, z_dim)``.
        x0: clean data ``(B, C, H, W)``.
        target_features: ``(B, L, z_dim)``, one feature per transformer token.
        depth: which block's output to align (counted from 1).
        proj_coeff: lambda, the weight of the alignment term.
    Returns:
        :class:`RepaLosses` ``(total, denoising, alignment)``, scalars.
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    t = t_sampler(x0.shape[0], device=x0.device).to(x0.dtype)
    noise = torch.randn_like(x0)
    prediction, hidden = hidden_states(model, depth, interpolate(x0, noise, t), t * time_scale, **model_kwargs)
    if prediction.shape != x0.shape:
        raise ValueError(f"the model must return a velocity of shape {tuple(x0.shape)}, got "
                         f"{tuple(prediction.shape)} (a DiT needs learn_sigma=False)")
    denoising = (prediction - velocity_target(x0, noise)).pow(2).mean()
    alignment = alignment_loss(projector(hidden), target_features)
    return RepaLosses(denoising + proj_coeff * alignment, denoising, alignment)
