"""Vector quantisation: a continuous vector becomes the index of its nearest code.

Chapter 9 of the book. A VQ-VAE (van den Oord et al., 2017, "Neural Discrete
Representation Learning") keeps a codebook ``E`` of ``V`` vectors ``e_k`` of
width ``C`` and replaces every encoder output ``z`` by its nearest code:

    k* = argmin_k ||z - e_k||^2 = argmin_k ( ||e_k||^2 - 2 z . e_k )     (nearest_code)
    z_q = e_{k*}

``argmin`` has no gradient, so training uses three tricks, all here:

    straight-through:   z_q = z + sg[e_{k*} - z]   (forward: the code; backward: the identity)
    codebook loss:      || sg[z] - e_{k*} ||^2      (moves the code towards the encoder)
    commitment loss:    || z - sg[e_{k*}] ||^2      (keeps the encoder near its code), weight beta

``sg`` is stop-gradient (``.detach()``). Codebooks tend to *collapse*: a few codes
win every lookup and the rest never move again. ``VectorQuantizer`` offers three
well-known remedies:

- k-means initialisation (``kmeans_init_``): start the codes where the data is
  (Zeghidour et al., 2021, SoundStream);
- dead-code restart (``dead_code_threshold``): a code whose running usage falls
  below a threshold jumps to a random encoder output of the current batch
  (Dhariwal et al., 2020, Jukebox);
- l2-normalised lookup (``l2_norm``): compare directions only, on the unit sphere,
  so no code can be "too far away" to ever be picked (Yu et al., 2022, ViT-VQGAN;
  VAR's ``using_znorm``).

``ResidualVQ`` quantises the error left by the previous quantiser again, ``D``
times (Zeghidour et al., 2021; Lee et al., 2022, RQ-VAE): ``D`` indices per vector
and an error that shrinks with depth. VAR's multi-scale quantiser
(``minilib.vqvae``) is residual VQ where step ``k`` works at a coarser resolution.

Shapes: vectors are channel-last, ``(..., C)``: a batch of points ``(N, C)``, a
sequence ``(B, L, C)`` or a feature map moved to ``(B, H, W, C)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .validation import NON_NEGATIVE, POSITIVE_INT, PROBABILITY, check_arguments


def _check_vectors(z: torch.Tensor, dim: int, who: str) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{who} expects a tensor of vectors (..., {dim}); got {type(z).__name__}")
    if z.ndim < 1 or z.shape[-1] != dim:
        raise ValueError(f"{who} expects vectors of width {dim} in the last dimension, (..., {dim}); "
                         f"got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"{who} expects floating-point vectors; got dtype {z.dtype}")


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The index of the nearest code for every vector, by squared Euclidean distance.

        k*(z) = argmin_k ||z - e_k||^2,   ||z - e_k||^2 = ||z||^2 + ||e_k||^2 - 2 z . e_k

    The expansion turns V distance computations into one matrix product
    ``(N, C) @ (C, V)``; ``||z||^2`` is the same for every k and does not change the
    argmin, but is kept so the matrix holds true distances. The product is added
    with ``addmm`` (``norms - 2 z @ E^T`` in one step), as VAR's quantiser does, so
    that near-ties round the same way and give the same index. No gradient flows.

    Args:
        z: vectors ``(..., C)``.
        codebook: ``(V, C)``.
    Returns:
        int64 indices ``(...)`` into the codebook (ties go to the smaller index).
    """
    if not isinstance(codebook, torch.Tensor) or codebook.ndim != 2:
        raise ValueError(f"nearest_code expects a codebook (V, C); got "
                         f"{tuple(codebook.shape) if isinstance(codebook, torch.Tensor) else type(codebook).__name__}")
    _check_vectors(z, codebook.shape[1], "nearest_code")
    with torch.no_grad():
        z_NC = z.reshape(-1, z.shape[-1]).to(codebook.dtype)
        d_NV = z_NC.square().sum(1, keepdim=True) + codebook.square().sum(1)  # (N, V): ||z||^2 + ||e_k||^2
        d_NV.addmm_(z_NC, codebook.T, beta=1, alpha=-2)  # ... - 2 z . e_k
        return d_NV.argmin(dim=1).reshape(z.shape[:-1])


def code_usage(indices: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each code was picked, as a probability vector ``(V,)`` (sums to 1)."""
    counts = torch.bincount(indices.reshape(-1), minlength=vocab_size).float()
    return counts / counts.sum().clamp(min=1)


def perplexity(indices: torch.Tensor, vocab_size: int) -> float:
    """``exp(H(p))`` of the code-usage distribution ``p``: the effective number of codes in use.

    ``V`` when every code is used equally often, ``1`` when one code takes all.
    """
    p = code_usage(indices, vocab_size)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
    return float(torch.exp(entropy))


def kmeans_plus_plus(z_NC: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding: ``k`` rows of ``z_NC`` ``(N, C)``, spread out over the data, ``(k, C)``."""
    picks = [int(torch.randint(len(z_NC), (1,), generator=generator))]
    d2 = (z_NC - z_NC[picks[0]]).square().sum(1)
    for _ in range(k - 1):
        weights = d2.cpu().double()
        # Fall back to uniform once every vector coincides with a centroid.
        weights = weights if weights.sum() > 0 else torch.ones_like(weights)
        picks.append(int(torch.multinomial(weights, 1, generator=generator)))
        d2 = torch.minimum(d2, (z_NC - z_NC[picks[-1]]).square().sum(1))
    return z_NC[picks].clone()


class QuantizerOutput(NamedTuple):
    """What a quantiser returns.

    Attributes:
        z_q: quantised vectors ``(..., C)`` with the straight-through gradient.
        indices: int64 ``(...)`` (``(..., D)`` for residual VQ).
        loss: ``codebook + beta * commitment``, a scalar.
        codebook_loss, commitment_loss: the two mean squared errors, scalars.
        perplexity: effective number of codes used in this batch (mean over depths for residual VQ).
    """

    z_q: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: float


class VectorQuantizer(nn.Module):
    """VQ-VAE's quantiser (van den Oord et al., 2017) with remedies for codebook collapse.

    ``forward(z)``: vectors ``(..., C)`` -> ``QuantizerOutput`` with

        z_q = z + sg[e_{k*(z)} - z]                                    (straight-through)
        loss = mean ||sg[z] - e_{k*}||^2 + beta * mean ||z - sg[e_{k*}]||^2

    Args:
        vocab_size: V, the number of codes.
        dim: C, the width of a code.
        beta: weight of the commitment loss (0.25 in the paper).
        l2_norm: look up and output unit vectors: ``z`` and the codes are
            l2-normalised first, so the nearest code is the one with the largest
            cosine similarity (ViT-VQGAN; VAR's ``using_znorm``).
        dead_code_threshold: if > 0, in training, a code whose exponential moving
            average of hits per batch (decay ``usage_decay``) drops below this value is
            restarted at a random vector of the current batch (Jukebox uses 1.0).
        usage_decay: decay of that moving average.

    Attributes:
        embedding: ``nn.Embedding(V, C)``, the codebook ``E`` (``embedding.weight``).
        usage_ema: buffer ``(V,)``, the running hits per batch of every code.
        restarts: how many codes have been restarted so far.
    """

    @check_arguments(vocab_size=POSITIVE_INT, dim=POSITIVE_INT, beta=NON_NEGATIVE, dead_code_threshold=NON_NEGATIVE,
                     usage_decay=PROBABILITY)
    def __init__(self, vocab_size: int, dim: int, beta: float = 0.25, l2_norm: bool = False,
                 dead_code_threshold: float = 0.0, usage_decay: float = 0.99):
        super().__init__()
        self.vocab_size, self.dim, self.beta, self.l2_norm = vocab_size, dim, beta, l2_norm
        self.dead_code_threshold, self.usage_decay = dead_code_threshold, usage_decay
        self.embedding = nn.Embedding(vocab_size, dim)
        # Small uniform init as in the VQ-VAE code (taming-transformers): the codes start near 0.
        nn.init.uniform_(self.embedding.weight, -1.0 / vocab_size, 1.0 / vocab_size)
        self.register_buffer("usage_ema", torch.zeros(vocab_size))
        self.restarts = 0

    def codebook(self) -> torch.Tensor:
        """The codes as used in the lookup, ``(V, C)`` (unit vectors with ``l2_norm``)."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=1) if self.l2_norm else weight

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Indices ``(...)`` of the nearest codes for ``z`` ``(..., C)`` (no gradient)."""
        _check_vectors(z, self.dim, type(self).__name__)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        return nearest_code(z, self.codebook())

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices: ``(...)`` -> ``(..., C)``."""
        if indices.dtype not in (torch.int64, torch.int32) or (indices.numel() and (
                indices.min() < 0 or indices.max() >= self.vocab_size)):
            raise ValueError(f"indices must be integers in [0, {self.vocab_size}); got dtype {indices.dtype}"
                             + (f", range [{int(indices.min())}, {int(indices.max())}]" if indices.numel() else ""))
        return F.embedding(indices, self.codebook())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        _check_vectors(z, self.dim, type(self).__name__)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        indices = nearest_code(z, self.codebook())
        if self.training and self.dead_code_threshold > 0:
            self._restart_dead_codes(z, indices)
            indices = nearest_code(z, self.codebook())   # restarted codes may now be the nearest
        e = F.embedding(indices, self.codebook())
        codebook_loss = F.mse_loss(e, z.detach())       # gradient reaches the codes only
        commitment_loss = F.mse_loss(z, e.detach())     # gradient reaches the encoder only
        z_q = z + (e - z).detach()                       # value e, gradient d z_q / d z = identity
        return QuantizerOutput(z_q, indices, codebook_loss + self.beta * commitment_loss,
                               codebook_loss, commitment_loss, perplexity(indices, self.vocab_size))

    @torch.no_grad()
    def _restart_dead_codes(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        hits = torch.bincount(indices.reshape(-1), minlength=self.vocab_size).to(self.usage_ema)
        self.usage_ema.mul_(self.usage_decay).add_(hits, alpha=1 - self.usage_decay)
        dead = (self.usage_ema < self.dead_code_threshold).nonzero().squeeze(1)
        if len(dead) == 0:
            return
        z_NC = z.detach().reshape(-1, self.dim)
        picks = torch.randint(len(z_NC), (len(dead),), device=z_NC.device)
        self.embedding.weight[dead] = z_NC[picks].to(self.embedding.weight)
        self.usage_ema[dead] = self.dead_code_threshold   # a fresh code gets a grace period
        self.restarts += len(dead)

    @torch.no_grad()
    def kmeans_init_(self, z: torch.Tensor, iters: int = 10, generator: torch.Generator | None = None) -> None:
        """Set the codebook to k-means centroids of ``z`` ``(..., C)`` (Lloyd's algorithm).

        Seeds with k-means++ (Arthur & Vassilvitskii, 2007: each new centroid is a
        vector of ``z`` drawn with probability proportional to its squared distance to
        the nearest centroid so far; ``z`` needs at least V vectors), then alternates:
        assign every vector to its nearest centroid, move every centroid to the mean
        of its vectors (a centroid with no vectors stays). Each iteration cannot
        increase the quantisation error ``sum ||z - e_{k*}||^2``.
        """
        _check_vectors(z, self.dim, "kmeans_init_")
        z_NC = z.detach().reshape(-1, self.dim).float()
        if self.l2_norm:
            z_NC = F.normalize(z_NC, dim=1)
        if len(z_NC) < self.vocab_size:
            raise ValueError(f"k-means init needs at least vocab_size={self.vocab_size} vectors, got {len(z_NC)}")
        centroids = kmeans_plus_plus(z_NC, self.vocab_size, generator)
        for _ in range(iters):
            assign = nearest_code(z_NC, centroids)
            sums = torch.zeros_like(centroids).index_add_(0, assign, z_NC)
            counts = torch.bincount(assign, minlength=self.vocab_size).unsqueeze(1)
            centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        self.embedding.weight.copy_(centroids)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, dim={self.dim}, beta={self.beta}, l2_norm={self.l2_norm}, "
                f"dead_code_threshold={self.dead_code_threshold}")


class ResidualVQ(nn.Module):
    """Residual vector quantisation: ``D`` quantisers, each on what the previous ones missed.

        rho_0 = z;   for d = 1..D:   n_d = k*(rho_{d-1}; E_d),   rho_d = rho_{d-1} - e_{n_d}
        z_q = e_{n_1} + ... + e_{n_D}    (so  z - z_q = rho_D)

    (chapter 9's notation: ``rho_d`` is the residual after level d, ``n_d`` its code number;
    ``r_k`` is kept for VAR's token maps and ``k`` for its scales.)

    With ``V`` codes per level the ``D`` indices address ``V^D`` combinations, yet
    only ``D V`` codes are stored and searched. ``forward(z)``: ``(..., C)`` ->
    ``QuantizerOutput`` with indices ``(..., D)``, the summed losses of the levels
    (each level's codebook and commitment losses against its own residual) and
    ``z_q = z + sg[sum_d e_{n_d} - z]``.

    Args:
        depth: D, the number of quantisers.
        vocab_size, dim, beta, l2_norm, dead_code_threshold: as in ``VectorQuantizer``,
            for every level (``l2_norm`` is unusual here: residuals are not unit vectors).

    Attributes:
        quantizers: ``nn.ModuleList`` of D ``VectorQuantizer``.
    """

    @check_arguments(depth=POSITIVE_INT)
    def __init__(self, depth: int, vocab_size: int, dim: int, beta: float = 0.25, l2_norm: bool = False,
                 dead_code_threshold: float = 0.0):
        super().__init__()
        self.depth, self.dim = depth, dim
        self.quantizers = nn.ModuleList(
            VectorQuantizer(vocab_size, dim, beta, l2_norm, dead_code_threshold) for _ in range(depth))

    def forward(self, z: torch.Tensor, depth: int | None = None) -> QuantizerOutput:
        """Quantise with the first ``depth`` levels (all ``D`` by default)."""
        _check_vectors(z, self.dim, type(self).__name__)
        depth = self.depth if depth is None else depth
        if not 1 <= depth <= self.depth:
            raise ValueError(f"depth must be in [1, {self.depth}], got {depth}")
        residual, total = z, torch.zeros_like(z)
        indices, codebook_loss, commitment_loss, perplexities = [], 0.0, 0.0, []
        for quantizer in self.quantizers[:depth]:
            out = quantizer(residual)
            e = out.z_q.detach()      # this level's codes; gradients reach them through the losses
            total, residual = total + e, residual - e
            indices.append(out.indices)
            codebook_loss = codebook_loss + out.codebook_loss
            commitment_loss = commitment_loss + out.commitment_loss
            perplexities.append(out.perplexity)
        z_q = z + (total - z).detach()
        beta = self.quantizers[0].beta
        return QuantizerOutput(z_q, torch.stack(indices, dim=-1), codebook_loss + beta * commitment_loss,
                               codebook_loss, commitment_loss, sum(perplexities) / len(perplexities))

    @torch.no_grad()
    def partial_reconstructions(self, z: torch.Tensor) -> list[torch.Tensor]:
        """``[e_{k_1}, e_{k_1} + e_{k_2}, ..., z_q]``: the approximation of ``z`` after each level."""
        _check_vectors(z, self.dim, type(self).__name__)
        residual, total, out = z, torch.zeros_like(z), []
        for quantizer in self.quantizers:
            e = quantizer.lookup(quantizer.quantize(residual))
            total, residual = total + e, residual - e
            out.append(total)
        return out

    @torch.no_grad()
    def kmeans_init_(self, z: torch.Tensor, iters: int = 10, generator: torch.Generator | None = None) -> None:
        """Initialise level by level: k-means on ``z``, then on the residuals it leaves, and so on.

        After this the error ``||z - z_q||`` cannot increase with depth: each level's
        centroids are cluster means of exactly the residuals it quantises.
        """
        residual = z.detach()
        for quantizer in self.quantizers:
            quantizer.kmeans_init_(residual, iters, generator)
            residual = residual - quantizer.lookup(quantizer.quantize(residual))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``(..., d)`` (any ``d <= D`` levels) -> the sum of their codes ``(..., C)``."""
        if indices.ndim < 1 or not 1 <= indices.shape[-1] <= self.depth:
            raise ValueError(f"decode expects indices (..., d) with 1 <= d <= {self.depth}; "
                             f"got shape {tuple(indices.shape)}")
        return sum(q.lookup(indices[..., d]) for d, q in enumerate(self.quantizers[:indices.shape[-1]]))
