"""The latent pipeline (minilib/latents.py): encode once, cache, sample, decode."""

import pytest
import torch

from minilib.autoencoder import AutoencoderKL
from minilib.datasets import ImageDataset
from minilib.latents import (LatentDataset, autoencoder_config, decode_latents, encode_dataset,
                             fit_shift_and_scale, latent_batches, load_or_encode, load_or_train_autoencoder,
                             weights_digest)

TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=2, norm_groups=4)


def tiny_dataset(n=24, channels=1, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, channels, size, size, generator=generator) * 2 - 1
    return ImageDataset(images, torch.arange(n) % 3, ["a", "b", "c"])


def tiny_vae(dataset, seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(**autoencoder_config(dataset, **TINY)).eval()


def test_config_follows_the_data():
    config = autoencoder_config(tiny_dataset(channels=3, size=16))
    assert config["in_channels"] == 3 and config["resolution"] == 16 and config["z_channels"] == 4
    with pytest.raises(ValueError, match="square"):
        autoencoder_config(ImageDataset(torch.zeros(2, 1, 8, 4), torch.zeros(2, dtype=torch.long), ["a"]))


def test_shift_and_scale_normalise_the_latents():
    data = tiny_dataset()
    vae = tiny_vae(data)
    shift, scale = fit_shift_and_scale(vae, data.images)
    assert (vae.shift_factor, vae.scale_factor) == (shift, scale)
    z = encode_dataset(vae, data).sample(generator=torch.Generator().manual_seed(0))
    assert abs(z.mean().item()) < 0.1 and 0.9 < z.std().item() < 1.1


def test_encoded_latents_sample_the_posterior_and_decode():
    data = tiny_dataset()
    vae = tiny_vae(data)
    fit_shift_and_scale(vae, data.images)
    latents = encode_dataset(vae, data, batch_size=5)           # batching must not change anything
    posterior = vae.encode(data.images)
    torch.testing.assert_close(latents.mean, posterior.mean, rtol=1e-5, atol=1e-6)
    assert latents.latent_shape == (2, 4, 4) and len(latents) == 24
    draws = torch.stack([latents.sample(slice(0, 1), torch.Generator().manual_seed(i)) for i in range(400)])
    normalised_mean = vae.to_latent(posterior.mean[:1])
    torch.testing.assert_close(draws.mean(0), normalised_mean, atol=0.15 * vae.scale_factor, rtol=0)
    torch.testing.assert_close(draws.std(0), posterior.std[:1] * vae.scale_factor, rtol=0.15, atol=0)
    images = decode_latents(vae, normalised_mean)
    torch.testing.assert_close(images, vae.decode(posterior.mean[:1]).clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_batches_are_fresh_samples_with_their_labels():
    mean = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    latents = LatentDataset(mean, torch.full_like(mean, -30.0), torch.arange(10), shift=1.0, scale=2.0)
    z, labels = next(latent_batches(latents, batch_size=4))
    torch.testing.assert_close(z, ((labels.float() - 1.0) * 2.0).view(4, 1, 1, 1).expand(4, 1, 2, 2), atol=1e-5, rtol=0)
    noisy = LatentDataset(mean, torch.zeros_like(mean), torch.arange(10), 0.0, 1.0)
    batches = latent_batches(noisy, batch_size=10)
    first, second = next(batches)[0], next(batches)[0]
    assert not torch.equal(first.sort(0).values, second.sort(0).values)   # a new eps every batch
    with pytest.raises(ValueError, match="one shape"):
        LatentDataset(mean, mean[:, :, :1], torch.arange(10), 0.0, 1.0)


def test_cache_is_reused_and_invalidated(tmp_path, capsys):
    data = tiny_dataset()
    vae = tiny_vae(data)
    fit_shift_and_scale(vae, data.images)
    path = tmp_path / "cache" / "latents.safetensors"
    first = load_or_encode(path, vae, data)
    assert "encoded 24 images" in capsys.readouterr().out
    again = load_or_encode(path, vae, data)
    assert "loaded the cached latents" in capsys.readouterr().out
    torch.testing.assert_close(again.mean, first.mean)
    other = tiny_vae(data, seed=1)
    fit_shift_and_scale(other, data.images)
    assert weights_digest(other) != weights_digest(vae)
    recoded = load_or_encode(path, other, data)
    assert "other weights" in capsys.readouterr().out
    torch.testing.assert_close(recoded.mean, encode_dataset(other, data).mean)
    path.write_bytes(b"<html>not a checkpoint</html>")
    load_or_encode(path, other, data)
    assert "damaged" in capsys.readouterr().out


def test_load_or_train_autoencoder_trains_once(tmp_path, capsys):
    data = tiny_dataset(n=16)
    path = tmp_path / "vae.safetensors"
    trained = load_or_train_autoencoder(path, data, steps=3, batch_size=4, lr=1e-3, **TINY)
    loaded = load_or_train_autoencoder(path, data, steps=3, batch_size=4, lr=1e-3, **TINY)
    assert "loaded" in capsys.readouterr().out
    assert weights_digest(trained) == weights_digest(loaded)
    assert (trained.shift_factor, trained.scale_factor) == (loaded.shift_factor, loaded.scale_factor)
    assert not loaded.training
