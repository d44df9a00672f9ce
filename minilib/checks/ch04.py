"""Chapter 4, latent autoencoders: the reparameterised sample, the KL term and the VAE loss."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, Part, _generator, _keeps_random_state, _name, _randn, _run

__all__ = ['check_reparameterise', 'check_kl', 'check_vae_loss']


def _posterior_cases() -> list[Case]:
    logvar_wild = _randn(2, 3, 4, 4, seed=22, scale=3.0)
    logvar_wild[0, 0, 0, :3] = torch.tensor([25.0, -45.0, 20.5])  # outside the clamp [-30, 20]
    return [Case("mean, logvar (2, 4, 3, 3)", (_randn(2, 4, 3, 3, seed=20), _randn(2, 4, 3, 3, seed=21))),
            Case("log-variances outside [-30, 20] (25, -45, 20.5)", (_randn(2, 3, 4, 4, seed=23), logvar_wild)),
            Case("a single latent (1, 4, 2, 2)", (_randn(1, 4, 2, 2, seed=24), _randn(1, 4, 2, 2, seed=25))),
            Case("mean = 0, logvar = 0 (already N(0, I))", (torch.zeros(3, 2, 2, 2), torch.zeros(3, 2, 2, 2)))]


def _hidden_posterior_cases() -> list[Case]:
    logvar = _randn(3, 2, 3, 3, seed=26, scale=2.0)
    logvar[1, 1, 2, :] = torch.tensor([-30.5, 19.9, 60.0])  # just outside, just inside, far outside the clamp
    return [Case("a flat latent (3, 8): any shape (B, ...)", (_randn(3, 8, seed=27), _randn(3, 8, seed=28))),
            Case("log-variances at the clamp's edges (-30.5, 19.9, 60)", (_randn(3, 2, 3, 3, seed=29), logvar))]


@_keeps_random_state
def check_reparameterise(fn: Callable) -> None:
    """Check ``fn(mean, logvar, generator)``: a sample ``mean + std * eps`` of ``N(mean, exp(logvar))``.

    ``logvar`` is clamped to ``[-30, 20]``, ``std = exp(logvar / 2)`` and ``eps =
    torch.randn(mean.shape, generator=generator)``, as in
    ``minilib.autoencoder.DiagonalGaussian.sample``. The check seeds ``generator``
    the same way for your function and for minilib's.
    """
    from ..autoencoder import DiagonalGaussian

    def with_generator(sample):
        def call(mean, logvar, seed):
            return sample(mean, logvar, _generator(seed))
        return call

    def reference(mean, logvar, generator):
        return DiagonalGaussian(mean, logvar).sample(generator)

    def std_is_var(mean, logvar, generator):
        return mean + logvar.clamp(-30, 20).exp() * torch.randn(mean.shape, generator=generator)

    def no_clamp(mean, logvar, generator):
        return mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator)

    student = fn

    def seeded(mean, logvar, seed):
        return student(mean, logvar, _generator(seed))

    seeded.__name__ = _name(fn)
    cases = [Case(c.label, c.args + (100 + k,)) for k, c in enumerate(_posterior_cases())]
    hidden = [Case(c.label, c.args + (200 + k,)) for k, c in enumerate(_hidden_posterior_cases())]
    _run(seeded, cases, with_generator(reference), "DiagonalGaussian(mean, logvar).sample(generator)",
         rtol=1e-4, atol=1e-5, hidden=hidden,
         mistakes=[Mistake(with_generator(std_is_var), "the standard deviation is exp(logvar / 2), not "
                                                       "exp(logvar) (that is the variance)."),
                   Mistake(with_generator(no_clamp), "clamp logvar to [-30, 20] first, as DiagonalGaussian does, "
                                                     "so that exp neither overflows nor gives a zero std.")],
         hint="eps = torch.randn(mean.shape, generator=generator) (use the generator, and draw eps in one call "
              "with mean's shape), std = exp(0.5 * logvar.clamp(-30, 20)), sample = mean + std * eps.")


@_keeps_random_state
def check_kl(fn: Callable) -> None:
    """Check ``fn(mean, logvar)``: ``KL(N(mean, exp(logvar)) || N(0, I))`` per sample, ``(B,)``.

    ``0.5 * sum(mean^2 + var - 1 - logvar)`` over all axes but the first, with
    ``logvar`` clamped to ``[-30, 20]``, as ``DiagonalGaussian(mean, logvar).kl()``.
    """
    from ..autoencoder import DiagonalGaussian

    def reference(mean, logvar):
        return DiagonalGaussian(mean, logvar).kl()

    def no_half(mean, logvar):
        return 2 * reference(mean, logvar)

    def mean_not_sum(mean, logvar):
        return reference(mean, logvar) / mean[0].numel()

    def no_clamp(mean, logvar):
        return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)

    def std_for_var(mean, logvar):
        logvar = logvar.clamp(-30, 20)
        return 0.5 * (mean.pow(2) + (0.5 * logvar).exp() - 1 - logvar).flatten(1).sum(1)

    _run(fn, _posterior_cases(), reference, "DiagonalGaussian(mean, logvar).kl()", rtol=1e-4, atol=1e-4,
         hidden=_hidden_posterior_cases(),
         mistakes=[Mistake(no_half, "KL = 0.5 * sum(mean^2 + var - 1 - logvar): you forgot the factor 1/2."),
                   Mistake(mean_not_sum, "sum over every axis but the batch axis (the KL of a whole latent), "
                                         "do not average."),
                   Mistake(no_clamp, "clamp logvar to [-30, 20] first, as DiagonalGaussian does."),
                   Mistake(std_for_var, "the term is the variance exp(logvar), not the standard deviation.")],
         hint="return 0.5 * (mean**2 + var - 1 - logvar) summed over all axes but the first: one KL per "
              "sample, shape (B,), with logvar clamped to [-30, 20] and var = exp(logvar).")


def _vae_loss(recon, x, mean, logvar, kl_weight, reconstruction="l1"):
    """minilib's vae_loss as a plain tuple (loss, reconstruction term, KL term), all 0-d."""
    from ..autoencoder import DiagonalGaussian, vae_loss

    return tuple(vae_loss(recon, x, DiagonalGaussian(mean, logvar), kl_weight, reconstruction))


@_keeps_random_state
def check_vae_loss(fn: Callable) -> None:
    """Check ``fn(recon, x, mean, logvar, kl_weight, reconstruction="l1")``: the VAE objective, three 0-d tensors.

    ``rec = mean_b sum_{c,h,w} d(x, recon)`` with ``d = |x - recon|`` ("l1") or ``(x - recon)^2`` ("mse"),
    ``kl = mean_b KL(N(mean, exp(logvar)) || N(0, I))`` (logvar clamped to [-30, 20]) and
    ``loss = rec + kl_weight * kl``; returns ``(loss, rec, kl)``, like ``minilib.autoencoder.vae_loss``.
    Parts: L1 (2 points), squared error (1 point), the KL weight (1 point).
    """
    from ..autoencoder import DiagonalGaussian

    def terms(recon, x, mean, logvar, reconstruction):
        error = (x - recon).abs() if reconstruction == "l1" else (x - recon).pow(2)
        return error, DiagonalGaussian(mean, logvar).kl()

    def pixel_mean(recon, x, mean, logvar, kl_weight, reconstruction="l1"):
        error, kl = terms(recon, x, mean, logvar, reconstruction)
        rec = error.mean()
        return rec + kl_weight * kl.mean(), rec, kl.mean()

    def batch_sum(recon, x, mean, logvar, kl_weight, reconstruction="l1"):
        error, kl = terms(recon, x, mean, logvar, reconstruction)
        rec = error.sum()
        return rec + kl_weight * kl.sum(), rec, kl.sum()

    def unweighted(recon, x, mean, logvar, kl_weight, reconstruction="l1"):
        error, kl = terms(recon, x, mean, logvar, reconstruction)
        rec = error.flatten(1).sum(1).mean()
        return rec + kl.mean(), rec, kl.mean()

    def always_l1(recon, x, mean, logvar, kl_weight, reconstruction="l1"):
        return _vae_loss(recon, x, mean, logvar, kl_weight, "l1")

    def rmse(recon, x, mean, logvar, kl_weight, reconstruction="l1"):
        if reconstruction == "l1":
            return _vae_loss(recon, x, mean, logvar, kl_weight, "l1")
        kl = DiagonalGaussian(mean, logvar).kl().mean()
        rec = (x - recon).pow(2).flatten(1).sum(1).sqrt().mean()
        return rec + kl_weight * kl, rec, kl

    def inputs(seed, shape, kl_weight, latent=(4, 2, 2), *rest):
        B = shape[0]
        return (_randn(*shape, seed=seed), _randn(*shape, seed=seed + 1), _randn(B, *latent, seed=seed + 2),
                _randn(B, *latent, seed=seed + 3), kl_weight) + rest

    parts = [Part("L1 reconstruction", [
                 Case("recon, x (4, 3, 8, 8), latents (4, 4, 2, 2), kl_weight 1e-6", inputs(110, (4, 3, 8, 8), 1e-6)),
                 Case("a single image (1, 1, 4, 4)", inputs(114, (1, 1, 4, 4), 1e-6))], points=2),
             Part("squared error (reconstruction='mse')", [
                 Case("recon, x (3, 2, 4, 4), reconstruction='mse'", inputs(118, (3, 2, 4, 4), 1e-6),
                      dict(reconstruction="mse"))], points=1),
             Part("the KL weight", [
                 Case("kl_weight 1 (the full negative ELBO)", inputs(122, (2, 3, 4, 4), 1.0)),
                 Case("kl_weight 0 (reconstruction alone)", inputs(126, (2, 3, 4, 4), 0.0))], points=1),
             Part("hidden inputs", [
                 Case("kl_weight 0.5, 'mse', recon, x (5, 1, 2, 6)", inputs(130, (5, 1, 2, 6), 0.5, (2, 1, 3)),
                      dict(reconstruction="mse")),
                 Case("recon == x: the reconstruction term is 0", (torch.ones(2, 1, 2, 2), torch.ones(2, 1, 2, 2),
                                                                  _randn(2, 4, 1, 1, seed=134), torch.zeros(2, 4, 1, 1),
                                                                  1e-3))], points=1, hidden=True)]
    _run(fn, parts, _vae_loss, "minilib.autoencoder.vae_loss", rtol=1e-4, atol=1e-5,
         mistakes=[Mistake(pixel_mean, "sum the error over each image's pixels and channels (one number per "
                                       "image), then average over the batch: .flatten(1).sum(1).mean(), not .mean()."),
                   Mistake(batch_sum, "average over the batch: the loss is per image, so it must not grow with "
                                      "the batch size."),
                   Mistake(unweighted, "multiply the KL term by kl_weight (LDM uses 1e-6)."),
                   Mistake(always_l1, "use the reconstruction argument: 'mse' means the squared error."),
                   Mistake(rmse, "'mse' is the squared error summed over the pixels, with no square root.")],
         error_hint="recon and x are (B, C, H, W); mean and logvar are the latent posterior's, (B, C', h, w): "
                    "KL = 0.5 * sum(mean^2 + exp(logvar) - 1 - logvar) per image, with logvar clamped to [-30, 20].",
         hint="rec = d(x, recon).flatten(1).sum(1).mean(); kl = KL per image (as my_kl), .mean(); return "
              "(rec + kl_weight * kl, rec, kl).")
