"""Timestep and label embeddings: how a network is told "how noisy" and "what".

Chapter 2 of the book. A diffusion or flow model is one network used at every
noise level t, so t must enter the network as a vector it can read. DiT, SD3
and MAR's diffusion head all do it the same way:

1. sinusoidal features of t at log-spaced frequencies (``timestep_embedding``),
   the same recipe as the Transformer's positional encoding;
2. a two-layer MLP on top (``TimestepEmbedder``), so the network can learn
   which mixture of frequencies it needs.

Class labels go through a plain embedding table with one extra row, the
"null class", used for classifier-free guidance (``LabelEmbedder``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minilib.validation import POSITIVE_INT, PROBABILITY, check_arguments, check_range


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps.

    For frequencies ``f_i = max_period ** (-i / half)``, ``i = 0 .. half-1`` with
    ``half = dim // 2``, returns ``[cos(t f_0) .. cos(t f_{half-1}), sin(t f_0) ..
    sin(t f_{half-1})]`` (cosines first, as DiT and SD3 do), padded with one zero
    when ``dim`` is odd.

    Args:
        t: ``(N,)`` timesteps, integer or float.
        dim: output width D.
        max_period: sets the lowest frequency, ``1 / max_period``.
    Returns:
        ``(N, D)`` float32 features (or t's dtype if t is floating point).
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape (N,), got {tuple(t.shape)}")
    if dim < 2:
        raise ValueError(f"timestep_embedding needs dim >= 2, got {dim}")
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)  # (half,), from 1 down to ~1/max_period
    args = t[:, None].float() * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        embedding = embedding.to(t.dtype)
    return embedding


class TimestepEmbedder(nn.Module):
    """Sinusoidal features followed by ``Linear -> SiLU -> Linear`` (DiT, SD3, MAR).

    Submodule names (``mlp.0``, ``mlp.2``) match the official checkpoints.
    Input ``(N,)`` timesteps, output ``(N, hidden_size)``.
    """

    @check_arguments(hidden_size=POSITIVE_INT, frequency_embedding_size=POSITIVE_INT)
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        # DiT initialises the MLP with N(0, 0.02) weights.
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels to vectors, with label dropout for classifier-free guidance.

    The table has ``num_classes + 1`` rows when ``dropout_prob > 0``: row
    ``num_classes`` is the *null class*, the embedding of "no label". During
    training each label is replaced by the null class with probability
    ``dropout_prob``, so the same network learns p(x | y) and p(x); sampling
    with guidance mixes the two predictions (chapter 5).

    Input ``(N,)`` integer labels in ``[0, num_classes]``, output ``(N, hidden_size)``.
    """

    @check_arguments(num_classes=POSITIVE_INT, hidden_size=POSITIVE_INT, dropout_prob=PROBABILITY)
    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.1):
        super().__init__()
        has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(has_null_class), hidden_size)
        nn.init.normal_(self.embedding_table.weight, std=0.02)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    @property
    def null_class(self) -> int:
        """The label index meaning "unconditional"."""
        if self.dropout_prob == 0:
            raise ValueError("this LabelEmbedder was built with dropout_prob=0 and has no null class")
        return self.num_classes

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class, at random or where ``force_drop_ids == 1``."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool | None = None,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels y must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
        max_label = self.embedding_table.num_embeddings - 1
        check_range(labels, 0, max_label, "labels y")  # the models call them y: the message names both
        train = self.training if train is None else train
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)
