"""Chapter 15, REPA: the patch-wise negative-cosine alignment loss, and the hidden states after block k computed
without a hook."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .runner import Case, Mistake, _keeps_random_state, _randn, _run

__all__ = ['check_alignment_loss', 'check_block_hidden_states']


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


def _random_tiny_denoiser(seed: int, **sizes) -> torch.nn.Module:
    """A TinyDenoiser (adaLN-Zero) with every weight random, so that every block changes the tokens; eval mode."""
    from ..adaln import TinyDenoiser

    torch.manual_seed(seed)
    model = TinyDenoiser(**sizes)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.2)
    return model.eval()


@_keeps_random_state
def check_block_hidden_states(fn: Callable) -> None:
    """Check ``fn(model, depth, x, t, y)``: the tokens after block ``depth`` of a TinyDenoiser, without a hook.

    ``x (B, C, H, W)``, ``t (B,)`` in [0, 1], ``y (B,)``; returns ``(B, L, D)``: the
    patch embedding plus the fixed positions, run through ``model.blocks[:depth]``
    with ``c = t_embedder(1000 t) + y_embedder(y)``, like the hook of
    ``minilib.repa.hidden_states``.
    """
    from ..repa import hidden_states

    def reference(model, depth, x, t, y):
        return hidden_states(model, depth, x, t, y)[1]

    def by_hand(blocks=0, time_scale=1000.0, positions=True, label=True):
        def wrong(model, depth, x, t, y):
            tokens = model.x_embedder(x) + (model.pos_embed if positions else 0)
            c = model.t_embedder(t * time_scale) + (model.y_embedder(y) if label else 0)
            for block in model.blocks[:max(depth + blocks, 0)]:
                tokens = block(tokens, c)
            return tokens
        return wrong

    model = _random_tiny_denoiser(180, image_size=8, patch_size=4, hidden_size=16, depth=3, num_heads=2)
    wide = _random_tiny_denoiser(181, image_size=8, patch_size=2, hidden_size=24, depth=4, num_heads=3)
    x, t, y = _randn(2, 1, 8, 8, seed=182), torch.tensor([0.3, 0.8]), torch.tensor([3, 7])
    cases = [Case("depth 1 of 3, x (2, 1, 8, 8), patches of 4 (4 tokens of width 16)", (model, 1, x, t, y)),
             Case("depth 2 of 3", (model, 2, x, t, y)),
             Case("depth 3 of 3: every block (but not the final layer)", (model, 3, x, t, y))]
    hidden = [Case("depth 2 of 4, patches of 2 (16 tokens of width 24), three images",
                   (wide, 2, _randn(3, 1, 8, 8, seed=183), torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0, 5, 9])))]
    _run(fn, cases, reference, "the hook of minilib.repa.hidden_states", rtol=1e-4, atol=1e-5, hidden=hidden,
         mistakes=[Mistake(by_hand(time_scale=1.0), "the model scales t in [0, 1] to DiT's 0..1000 before its "
                                                    "timestep embedder: c = t_embedder(t * 1000) + y_embedder(y)."),
                   Mistake(by_hand(blocks=1), "block k is blocks[k - 1]: run model.blocks[:depth], depth blocks, "
                                              "not depth + 1."),
                   Mistake(by_hand(blocks=-1), "run depth blocks, model.blocks[:depth]: the hook sits on "
                                               "blocks[depth - 1] and captures ITS output."),
                   Mistake(by_hand(positions=False), "add the fixed 2-D positions, model.pos_embed, to the patch "
                                                     "embedding before the first block."),
                   Mistake(by_hand(label=False), "the conditioning vector is the sum of both embeddings: "
                                                 "c = t_embedder(t * 1000) + y_embedder(y).")],
         error_hint="tokens = model.x_embedder(x) + model.pos_embed; c = model.t_embedder(t * 1000) + "
                    "model.y_embedder(y); each block is called as block(tokens, c).",
         hint="tokens = model.x_embedder(x) + model.pos_embed; c = model.t_embedder(t * 1000) + model.y_embedder(y); "
              "for block in model.blocks[:depth]: tokens = block(tokens, c); return tokens (no final layer).")
