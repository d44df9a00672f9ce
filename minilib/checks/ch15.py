"""Chapter 15, REPA: the patch-wise negative-cosine alignment loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .runner import Case, Mistake, _keeps_random_state, _randn, _run

__all__ = ['check_alignment_loss']


@_keeps_random_state
def check_alignment_loss(fn: Callable) -> None:
    """Check ``fn(projected, target)``: REPA's alignment loss, a 0-d tensor.

    Both ``(B, N, D)``; minus the cosine similarity of each patch's two vectors,
    averaged over patches and batch, like ``minilib.repa.alignment_loss``.
    """
    from ..repa import alignment_loss

    def plus_cosine(projected, target):
        return -alignment_loss(projected, target)

    def no_normalising(projected, target):
        return -(projected * target).sum(-1).mean()

    def normalised_over_patches(projected, target):
        return -(F.normalize(projected, dim=1) * F.normalize(target, dim=1)).sum(-1).mean()

    def whole_image_cosine(projected, target):
        return -F.cosine_similarity(projected.flatten(1), target.flatten(1), dim=-1).mean()

    def summed_over_patches(projected, target):
        return -(F.normalize(projected, dim=-1) * F.normalize(target, dim=-1)).sum(-1).sum(-1).mean()

    a = _randn(2, 4, 8, seed=151)
    cases = [Case("projected, target (2, 4, 8)", (a, _randn(2, 4, 8, seed=152))),
             Case("features of very different lengths per patch (2, 5, 6)",
                  (_randn(2, 5, 6, seed=153) * torch.linspace(0.1, 10, 5)[None, :, None],
                   _randn(2, 5, 6, seed=154) * 3)),
             Case("target = 2 x projected: perfectly aligned, the loss is -1", (a, 2 * a)),
             Case("one image, one patch (1, 1, 16)", (_randn(1, 1, 16, seed=155), _randn(1, 1, 16, seed=156)))]
    hidden = [Case("projected, target (3, 9, 4)", (_randn(3, 9, 4, seed=157), _randn(3, 9, 4, seed=158))),
              Case("target = -projected: opposite directions, the loss is +1", (a, -a))]
    _run(fn, cases, alignment_loss, "minilib.repa.alignment_loss", rtol=1e-5, atol=1e-6, hidden=hidden,
         mistakes=[Mistake(plus_cosine, "the loss is MINUS the cosine similarity: minimising it makes the vectors "
                                        "point the same way."),
                   Mistake(no_normalising, "normalise both vectors of each patch to length 1 (F.normalize(..., "
                                           "dim=-1)) before the dot product: the loss must ignore their lengths."),
                   Mistake(normalised_over_patches, "normalise over the feature axis (dim=-1), one vector per patch, "
                                                    "not over the patches (dim=1)."),
                   Mistake(whole_image_cosine, "compare patch by patch: one cosine per (image, patch), then the "
                                               "mean, not one cosine of the flattened image."),
                   Mistake(summed_over_patches, "average over the patches as well (a mean, not a sum), so that the "
                                                "loss lies in [-1, 1] for any number of patches.")],
         error_hint="projected and target are (B, N, D) tensors; return a 0-d tensor.",
         hint="-(F.normalize(projected, dim=-1) * F.normalize(target, dim=-1)).sum(-1).mean()")
