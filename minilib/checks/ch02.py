"""Chapter 2, the timestep embedding."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _keeps_random_state, _run

__all__ = ['check_timestep_embedding']


@_keeps_random_state
def check_timestep_embedding(fn: Callable) -> None:
    """Check ``fn(t, dim, max_period=10000)``: sinusoidal features ``(N, dim)`` of timesteps ``(N,)``.

    Frequencies ``f_i = max_period ** (-i / half)``, ``half = dim // 2``; cosines
    first, then sines; one zero column appended when ``dim`` is odd, like
    ``minilib.timestep.timestep_embedding``.
    """
    from ..timestep import timestep_embedding

    def features(t, freqs, cos_first=True):
        args = t[:, None].double() * freqs[None]
        parts = [torch.cos(args), torch.sin(args)] if cos_first else [torch.sin(args), torch.cos(args)]
        return torch.cat(parts, dim=-1)

    def pad(embedding, dim):
        return torch.cat([embedding, torch.zeros(len(embedding), dim % 2, dtype=embedding.dtype)], dim=-1)

    def sin_first(t, dim, max_period=10000.0):
        half = dim // 2
        return pad(features(t, max_period ** (-torch.arange(half, dtype=torch.float64) / half), False), dim)

    def over_half_minus_one(t, dim, max_period=10000.0):
        half = dim // 2
        return pad(features(t, max_period ** (-torch.arange(half, dtype=torch.float64) / max(half - 1, 1))), dim)

    def linear_frequencies(t, dim, max_period=10000.0):
        return pad(features(t, torch.linspace(1, 1 / max_period, dim // 2, dtype=torch.float64)), dim)

    def no_padding(t, dim, max_period=10000.0):
        return timestep_embedding(t, dim - dim % 2, max_period)

    def ignores_max_period(t, dim, max_period=10000.0):
        return timestep_embedding(t, dim)

    cases = [Case("t = 0, 1, 10, 100, 999, dim 16", (torch.tensor([0, 1, 10, 100, 999]), 16)),
             Case("fractional t (float32), dim 8", (torch.tensor([0.0, 0.5, 2.5, 500.25]), 8)),
             Case("an odd dim, 7", (torch.tensor([3, 40, 700]), 7)),
             Case("max_period = 100, dim 12", (torch.tensor([0, 5, 50, 99]), 12), dict(max_period=100.0)),
             Case("dim 2 (one frequency)", (torch.tensor([0, 1, 2]), 2)),
             Case("256 features, as DiT uses", (torch.arange(0, 1000, 111), 256))]
    _run(fn, cases, timestep_embedding, "minilib.timestep.timestep_embedding", rtol=1e-3, atol=1e-3,
         mistakes=[Mistake(sin_first, "the cosines come first, then the sines: [cos(t f), sin(t f)], as in DiT "
                                      "and SD3."),
                   Mistake(over_half_minus_one, "f_i = max_period^(-i / half) for i = 0 .. half - 1: divide by "
                                                "half, not half - 1 (the lowest frequency stays just above "
                                                "1 / max_period)."),
                   Mistake(linear_frequencies, "the frequencies must be log-spaced (a geometric sequence) from 1 "
                                               "down towards 1 / max_period, not evenly spaced."),
                   Mistake(ignores_max_period, "use the max_period argument: it sets the lowest frequency."),
                   Mistake(no_padding, "when dim is odd, append one column of zeros: dim // 2 cosines, dim // 2 "
                                       "sines and a zero.")],
         error_hint="t has shape (N,): form the angles t[:, None] * freqs[None] of shape (N, dim // 2); "
                    "when dim is odd, append one zero column.",
         hint="freqs = exp(-log(max_period) * arange(half) / half) with half = dim // 2, angles = "
              "t[:, None] * freqs[None], result [cos(angles), sin(angles)] plus a zero column when dim is odd.")
