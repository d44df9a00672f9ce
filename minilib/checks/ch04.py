"""Chapter 4, latent autoencoders: the reparameterised sample and the KL term."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _generator, _keeps_random_state, _name, _randn, _run

__all__ = ['check_reparameterise', 'check_kl']


def _posterior_cases() -> list[Case]:
    logvar_wild = _randn(2, 3, 4, 4, seed=22, scale=3.0)
    logvar_wild[0, 0, 0, :3] = torch.tensor([25.0, -45.0, 20.5])  # outside the clamp [-30, 20]
    return [Case("mean, logvar (2, 4, 3, 3)", (_randn(2, 4, 3, 3, seed=20), _randn(2, 4, 3, 3, seed=21))),
            Case("log-variances outside [-30, 20] (25, -45, 20.5)", (_randn(2, 3, 4, 4, seed=23), logvar_wild)),
            Case("a single latent (1, 4, 2, 2)", (_randn(1, 4, 2, 2, seed=24), _randn(1, 4, 2, 2, seed=25))),
            Case("mean = 0, logvar = 0 (already N(0, I))", (torch.zeros(3, 2, 2, 2), torch.zeros(3, 2, 2, 2)))]


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
    _run(seeded, cases, with_generator(reference), "DiagonalGaussian(mean, logvar).sample(generator)",
         rtol=1e-4, atol=1e-5,
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
         mistakes=[Mistake(no_half, "KL = 0.5 * sum(mean^2 + var - 1 - logvar): you forgot the factor 1/2."),
                   Mistake(mean_not_sum, "sum over every axis but the batch axis (the KL of a whole latent), "
                                         "do not average."),
                   Mistake(no_clamp, "clamp logvar to [-30, 20] first, as DiagonalGaussian does."),
                   Mistake(std_for_var, "the term is the variance exp(logvar), not the standard deviation.")],
         hint="return 0.5 * (mean**2 + var - 1 - logvar) summed over all axes but the first: one KL per "
              "sample, shape (B,), with logvar clamped to [-30, 20] and var = exp(logvar).")
