"""Chapter 2, the timestep embedding and label dropout."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, Part, _generator, _keeps_random_state, _name, _run

__all__ = ['check_timestep_embedding', 'check_label_dropout']


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
    hidden = [Case("an odd dim, 9, and fractional t", (torch.tensor([0.25, 7.5, 999.0]), 9)),
              Case("max_period = 1000, dim 6, one timestep", (torch.tensor([123]), 6), dict(max_period=1000.0))]
    _run(fn, cases, timestep_embedding, "minilib.timestep.timestep_embedding", rtol=1e-3, atol=1e-3, hidden=hidden,
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


def _label_dropout(labels, num_classes, dropout_prob, generator, force_drop_ids=None):
    """DiT's token_drop: labels (N,) -> labels with some replaced by the null class ``num_classes``."""
    if force_drop_ids is None:
        drop = torch.rand(labels.shape[0], generator=generator) < dropout_prob
    else:
        drop = force_drop_ids == 1
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


@_keeps_random_state
def check_label_dropout(fn: Callable) -> None:
    """Check ``fn(labels, num_classes, dropout_prob, generator, force_drop_ids=None)``: label dropout for guidance.

    Without ``force_drop_ids`` each label is replaced by the null class ``num_classes`` where
    ``torch.rand(N, generator=generator) < dropout_prob``; with it, exactly where
    ``force_drop_ids == 1``; like ``LabelEmbedder.token_drop`` (minilib.timestep). The check seeds
    ``generator`` the same way for your function and minilib's. Parts: random dropout (2 points),
    forced dropout (1 point).
    """
    def seeded(function):
        def call(labels, num_classes, dropout_prob, seed, force_drop_ids=None):
            return function(labels, num_classes, dropout_prob, _generator(seed), force_drop_ids)
        call.__name__ = _name(function)
        return call

    def last_class_as_null(labels, num_classes, dropout_prob, generator, force_drop_ids=None):
        return _label_dropout(labels, num_classes - 1, dropout_prob, generator, force_drop_ids)

    def zero_as_null(labels, num_classes, dropout_prob, generator, force_drop_ids=None):
        return _label_dropout(labels, 0, dropout_prob, generator, force_drop_ids)

    def keeps_with_prob_p(labels, num_classes, dropout_prob, generator, force_drop_ids=None):  # rand > p
        if force_drop_ids is not None:
            return _label_dropout(labels, num_classes, dropout_prob, generator, force_drop_ids)
        drop = torch.rand(labels.shape[0], generator=generator) > dropout_prob
        return torch.where(drop, torch.full_like(labels, num_classes), labels)

    def ignores_force(labels, num_classes, dropout_prob, generator, force_drop_ids=None):
        return _label_dropout(labels, num_classes, dropout_prob, generator)

    def random_and_forced(labels, num_classes, dropout_prob, generator, force_drop_ids=None):
        drop = torch.rand(labels.shape[0], generator=generator) < dropout_prob
        if force_drop_ids is not None:
            drop = drop | (force_drop_ids == 1)
        return torch.where(drop, torch.full_like(labels, num_classes), labels)

    labels = torch.arange(10).repeat(4)
    parts = [Part("random dropout", [
                 Case("40 labels 0..9, 10 classes, dropout_prob 0.1", (labels, 10, 0.1, 1)),
                 Case("dropout_prob 0.5, 1,000 classes (ImageNet)", (torch.arange(0, 1000, 37), 1000, 0.5, 2)),
                 Case("dropout_prob 0: no label is dropped", (labels, 10, 0.0, 3)),
                 Case("dropout_prob 1: every label becomes the null class", (labels[:7], 10, 1.0, 4))], points=2),
             Part("forced dropout (sampling with guidance)", [
                 Case("force_drop_ids = 0, 1, 1, 0: exactly the middle two become the null class",
                      (torch.tensor([3, 7, 7, 3]), 10, 0.1, 5), dict(force_drop_ids=torch.tensor([0, 1, 1, 0]))),
                 Case("force_drop_ids all 0 with dropout_prob 1: nothing is dropped (the forced ids decide alone)",
                      (torch.tensor([1, 2, 3]), 10, 1.0, 6), dict(force_drop_ids=torch.zeros(3, dtype=torch.long)))],
                  points=1),
             Part("hidden inputs", [
                 Case("int32 labels, 5 classes, dropout_prob 0.3", (torch.arange(5, dtype=torch.int32).repeat(6), 5,
                                                                   0.3, 7)),
                 Case("a single label, forced (float ids)", (torch.tensor([2]), 5, 0.0, 8),
                      dict(force_drop_ids=torch.ones(1)))],
                  points=1, hidden=True)]
    _run(seeded(fn), parts, seeded(_label_dropout), "LabelEmbedder.token_drop", rtol=0, atol=0,
         mistakes=[Mistake(seeded(last_class_as_null), "the null class is an extra row, index num_classes (one past "
                                                       "the last real class num_classes - 1)."),
                   Mistake(seeded(zero_as_null), "0 is a real class; the null class is num_classes."),
                   Mistake(seeded(keeps_with_prob_p), "drop where rand < dropout_prob, so that a share dropout_prob of "
                                                      "the labels is dropped, not kept."),
                   Mistake(seeded(random_and_forced), "when force_drop_ids is given it decides alone: do not draw "
                                                      "random drops as well."),
                   Mistake(seeded(ignores_force), "when force_drop_ids is given, drop exactly where it is 1 (the "
                                                  "unconditional half of a guided batch), with no random draws.")],
         error_hint="draw torch.rand(N, generator=generator) (one number per label) and use torch.where(drop, "
                    "torch.full_like(labels, num_classes), labels).",
         hint="drop = torch.rand(len(labels), generator=generator) < dropout_prob, or force_drop_ids == 1 when it is "
              "given; return torch.where(drop, torch.full_like(labels, num_classes), labels).")
