"""Latent generation: the pipeline of DiT, SD3 and MAR on the book's data.

A latent generator never sees pixels. Chapter 4's autoencoder compresses each
image once; the generator trains on the compressed latents, normalised by the
autoencoder's shift and scale; its samples are decoded back to pixels::

    vae = load_or_train_autoencoder(path, data, steps=800, batch_size=8, lr=4e-3)
    latents = load_or_encode(cache_path, vae, data)        # encode once, cached
    batches = latent_batches(latents, batch_size=64)        # (z, labels), z = to_latent(posterior sample)
    ...train the generator on z...
    images = decode_latents(vae, generated_z)               # from_latent, then the decoder

The cache holds the posterior's mean and log-variance, not one sample, so every
batch draws a fresh ``z = mean + std * eps`` as the official DiT training script
does when it encodes on the fly (``vae.encode(x).latent_dist.sample()``) and as
MAR's cached training does (``DiagonalGaussianDistribution(moments).sample()``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from .autoencoder import SMALL_CONFIG, AutoencoderKL, DiagonalGaussian, vae_loss
from .datasets import ImageDataset, infinite_batches
from .training import History, load_or_train, move_aside, read_checkpoint, train
from .validation import POSITIVE_INT, check_arguments

KL_WEIGHT = 1e-6
"""LDM's KL weight, chapter 4's choice: the KL term only keeps the latents from drifting."""


def autoencoder_config(dataset: ImageDataset, **overrides) -> dict:
    """Chapter 4's small configuration (:data:`~minilib.autoencoder.SMALL_CONFIG`), fitted to a dataset:
    ``in_channels`` and ``resolution`` from its images; ``overrides`` replace any other setting."""
    channels, height, width = dataset.image_shape
    if height != width:
        raise ValueError(f"the autoencoder expects square images, got {height}x{width}")
    return {**SMALL_CONFIG, "in_channels": channels, "resolution": height, **overrides}


def autoencoder_loss(model: AutoencoderKL, batch) -> torch.Tensor:
    """Chapter 4's loss: summed squared error of a posterior-sample reconstruction plus ``KL_WEIGHT`` x KL."""
    images = batch[0]
    recon, posterior = model(images)
    return vae_loss(recon, images, posterior, KL_WEIGHT, reconstruction="mse").loss


@check_arguments(steps=POSITIVE_INT, batch_size=POSITIVE_INT)
def train_autoencoder(vae: AutoencoderKL, dataset: ImageDataset, steps: int, batch_size: int, lr: float,
                      seed: int = 0, device: torch.device | str | None = None, progress: bool = False) -> History:
    """Train ``vae`` in place with chapter 4's recipe (no gradient clipping, Adam betas (0.9, 0.99),
    20 warm-up steps, cosine decay, no EMA of the weights, as LDM trains its autoencoders)."""
    batches = infinite_batches(dataset, batch_size, seed=seed, device=device)
    return train(vae, autoencoder_loss, batches, steps=steps, lr=lr, warmup_steps=min(20, steps - 1),
                 schedule="cosine", grad_clip=None, betas=(0.9, 0.99), device=device, progress=progress)


@torch.no_grad()
def fit_shift_and_scale(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64, seed: int = 0,
                        ) -> tuple[float, float]:
    """Set ``vae.shift_factor`` to the mean and ``vae.scale_factor`` to 1 / std of posterior samples of
    ``images`` ``(N, C, H, W)`` (all channels and positions pooled, as SD3 and FLUX do), and return both.
    After this, ``vae.to_latent`` maps the training latents to mean 0 and standard deviation 1."""
    generator = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    samples = []
    for chunk in images.split(batch_size):
        posterior = vae.encode(chunk.to(device))
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        samples.append(posterior.mean + posterior.std * noise)
    samples = torch.cat(samples)
    shift, std = samples.mean().item(), samples.std().item()
    vae.shift_factor, vae.scale_factor = shift, 1.0 / std
    return shift, 1.0 / std


def load_or_train_autoencoder(path: str | Path | None, dataset: ImageDataset, steps: int, batch_size: int,
                              lr: float, stats_images: int = 512, seed: int = 0,
                              device: torch.device | str | None = None, progress: bool = False,
                              **config_overrides) -> AutoencoderKL:
    """Chapter 4's autoencoder for ``dataset``: loaded from ``path`` if the file exists, else trained
    (and saved there unless ``path`` is None); then its shift and scale are fitted on the first
    ``stats_images`` images. Returns the model in eval mode on ``device``.

    Chapter 4 saves its model as ``checkpoints/ch04_small_kl_vae_<budget>.safetensors`` when its
    ``checkpoint_dir`` is set; a chapter that passes the same path (and the same data and settings)
    reuses that training run.
    """
    torch.manual_seed(seed)
    vae = AutoencoderKL(**autoencoder_config(dataset, **config_overrides))
    if device is not None:
        vae.to(device)

    def train_fn():
        return train_autoencoder(vae, dataset, steps, batch_size, lr, seed=seed, device=device,
                                 progress=progress)

    if path is None:
        train_fn()
    else:
        load_or_train(path, vae, train_fn, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        if device is not None:
            vae.to(device)
    vae.eval()
    fit_shift_and_scale(vae, dataset.images[:stats_images], seed=seed)
    return vae


class LatentDataset:
    """A dataset encoded once: the posterior ``mean`` and ``logvar`` ``(N, z_channels, h, w)`` of every
    image, its ``labels`` ``(N,)`` and the autoencoder's ``shift`` and ``scale``.

    ``sample(index, generator)`` draws ``to_latent(mean + std * eps)`` for the chosen images, the
    normalised latents ``(len(index), z_channels, h, w)`` a generator trains on.
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, labels: torch.Tensor, shift: float,
                 scale: float):
        if mean.shape != logvar.shape or mean.ndim != 4:
            raise ValueError(f"mean and logvar must be (N, C, h, w) tensors of one shape, got "
                             f"{tuple(mean.shape)} and {tuple(logvar.shape)}")
        if labels.shape != (mean.shape[0],):
            raise ValueError(f"labels must have shape ({mean.shape[0]},), got {tuple(labels.shape)}")
        self.mean, self.logvar, self.labels = mean, logvar, labels
        self.shift, self.scale = float(shift), float(scale)

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(z_channels, h, w)`` of one latent."""
        return tuple(self.mean.shape[1:])

    def sample(self, index: torch.Tensor | slice = slice(None),
               generator: torch.Generator | None = None) -> torch.Tensor:
        mean, logvar = self.mean[index], self.logvar[index]
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        return (z - self.shift) * self.scale

    def to(self, device) -> "LatentDataset":
        return LatentDataset(self.mean.to(device), self.logvar.to(device), self.labels.to(device),
                             self.shift, self.scale)


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, dataset: ImageDataset, batch_size: int = 256) -> LatentDataset:
    """Encode every image of ``dataset`` once with ``vae`` (on the autoencoder's device, results on the CPU)."""
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    means, logvars = [], []
    for chunk in dataset.images.split(batch_size):
        posterior: DiagonalGaussian = vae.encode(chunk.to(device))
        means.append(posterior.mean.cpu())
        logvars.append(posterior.logvar.cpu())
    vae.train(was_training)
    return LatentDataset(torch.cat(means), torch.cat(logvars), dataset.labels.cpu(), vae.shift_factor,
                         vae.scale_factor)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes and values): which weights encoded a cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_or_encode(path: str | Path | None, vae: AutoencoderKL, dataset: ImageDataset,
                   batch_size: int = 256) -> LatentDataset:
    """:func:`encode_dataset`, cached in the safetensors file ``path`` (None: no cache).

    The cache records which autoencoder weights, shift, scale and how many images it holds; a file
    written by other weights or for other data is encoded again and overwritten (with a message),
    and a damaged file is moved aside, so a stale cache can never feed a generator wrong latents.
    """
    if path is None:
        return encode_dataset(vae, dataset, batch_size)
    path = Path(path)
    expected = {"weights": weights_digest(vae), "images": len(dataset),
                "shift": float(vae.shift_factor), "scale": float(vae.scale_factor)}
    if path.is_file():
        try:
            tensors, metadata = read_checkpoint(path)
        except ValueError as error:
            move_aside(path, str(error))
            print(f"{path} was damaged ({error}); moved aside, encoding again")
        else:
            if {key: metadata.get(key) for key in expected} == expected \
                    and torch.equal(tensors["labels"], dataset.labels.cpu()):
                print(f"loaded the cached latents from {path}")
                return LatentDataset(tensors["mean"], tensors["logvar"], tensors["labels"],
                                     vae.shift_factor, vae.scale_factor)
            print(f"{path} was encoded by other weights or from other images; encoding again")
    latents = encode_dataset(vae, dataset, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    save_file({"mean": latents.mean.contiguous(), "logvar": latents.logvar.contiguous(),
               "labels": latents.labels.contiguous()}, str(partial),
              metadata={key: json.dumps(value) for key, value in expected.items()})
    partial.replace(path)
    print(f"encoded {len(dataset)} images into {path}")
    return latents


def latent_batches(latents: LatentDataset, batch_size: int, seed: int = 0,
                   device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random batches forever, like :func:`~minilib.datasets.infinite_batches`, of
    ``(z (B, z_channels, h, w), labels (B,))`` with a fresh posterior sample per batch."""
    if device is not None:
        latents = latents.to(device)
    generator = torch.Generator(device=latents.mean.device).manual_seed(seed + 1)
    indices = torch.arange(len(latents), device=latents.mean.device)
    for (index,) in infinite_batches((indices,), batch_size, seed=seed):
        yield latents.sample(index, generator), latents.labels[index]


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Generated latents ``(B, z_channels, h, w)`` in the normalised space -> images ``(B, C, H, W)``
    in ``[-1, 1]`` (``from_latent``, the decoder, then clamped), on ``z``'s device."""
    device = next(vae.parameters()).device
    images = [vae.decode(vae.from_latent(chunk.to(device))).clamp(-1, 1) for chunk in z.split(batch_size)]
    return torch.cat(images).to(z.device)
