"""Chapter 9, vector quantisation: the nearest code."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _describe, _generator, _keeps_random_state, _randn, _run

__all__ = ['check_nearest_code']


@_keeps_random_state
def check_nearest_code(fn: Callable) -> None:
    """Check ``fn(z, codebook)``: the index of the nearest code (squared Euclidean distance) for every vector.

    ``z (..., C)``, ``codebook (V, C)`` -> int64 indices ``(...)``, like
    ``minilib.quantize.nearest_code``. Where two codes are equally near
    (up to rounding) either index is accepted.
    """
    from ..quantize import nearest_code

    def argmax_distance(z, codebook):
        return torch.cdist(z.reshape(-1, z.shape[-1]), codebook).argmax(1).reshape(z.shape[:-1])

    def dot_product(z, codebook):
        return (z.reshape(-1, z.shape[-1]) @ codebook.T).argmax(1).reshape(z.shape[:-1])

    def flat(z, codebook):
        return nearest_code(z, codebook).reshape(-1)

    def compare(got, expected, case):
        z, codebook = case.args
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor of indices {tuple(expected.shape)}, got {_describe(got)}"
        if got.shape != expected.shape:
            return f"expected indices of shape {tuple(expected.shape)} (z's shape without its last axis), " \
                   f"got {tuple(got.shape)}"
        if got.is_floating_point() or got.dtype == torch.bool:
            return f"expected integer indices (torch.long), got {got.dtype}"
        got = got.long()
        if got.numel() and (got.min() < 0 or got.max() >= len(codebook)):
            return f"indices must lie in [0, {len(codebook) - 1}], got min {got.min().item()} max {got.max().item()}"
        d_got = (z - codebook[got]).square().sum(-1)
        d_best = (z - codebook[expected]).square().sum(-1)
        wrong = (d_got > d_best + 1e-5 * (1 + d_best)).nonzero()
        if len(wrong) == 0:
            return None
        lines = [f"{len(wrong)} of {got.numel()} vectors got a code that is not the nearest; the first:"]
        for index in wrong[:3].tolist():
            i = tuple(index)
            lines.append(f"  at {index}: expected code {expected[i].item()} (squared distance "
                         f"{d_best[i].item():.4g}), got code {got[i].item()} (squared distance {d_got[i].item():.4g})")
        return "\n".join(lines)

    codebook = _randn(16, 4, seed=100) * torch.linspace(0.2, 3.0, 16)[:, None]  # codes of very different norms
    cases = [Case("z (50, 4), a codebook (16, 4) of codes with different norms",
                  (_randn(50, 4, seed=101), codebook)),
             Case("z (2, 3, 5, 4): any leading shape", (_randn(2, 3, 5, 4, seed=102), codebook)),
             Case("z = the codes themselves, shuffled: each is its own nearest code",
                  (codebook[torch.randperm(16, generator=_generator(103))], codebook)),
             Case("a codebook with a single code (1, 8)", (_randn(6, 8, seed=104), _randn(1, 8, seed=105)))]
    _run(fn, cases, nearest_code, "minilib.quantize.nearest_code", compare=compare,
         mistakes=[Mistake(argmax_distance, "the nearest code has the smallest distance: argmin, not argmax."),
                   Mistake(dot_product, "the largest dot product z . e_k is the nearest code only when all codes "
                                        "have the same norm: use ||z||^2 + ||e_k||^2 - 2 z . e_k (or "
                                        "torch.cdist)."),
                   Mistake(flat, "return one index per vector in z's own shape without the last axis: "
                                 ".reshape(z.shape[:-1]).")],
         hint="flatten z to (N, C), compute the (N, V) squared distances ||z||^2 + ||e||^2 - 2 z e^T, take "
              "argmin over V and reshape to z.shape[:-1].")
