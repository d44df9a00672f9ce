"""Chapter 11, masked autoregression: the mask schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .runner import Case, Mistake, _keeps_random_state, _run

__all__ = ['check_mask_schedule']


@_keeps_random_state
def check_mask_schedule(fn: Callable) -> None:
    """Check ``fn(seq_len, num_iter)``: how many tokens stay masked after each of the K sampling steps.

    MaskGIT's cosine schedule as MAR uses it: after step k (0-based),
    ``floor(L cos(pi/2 (k+1)/K))``, clamped so that every step reveals at least
    one token and leaves at least one for later; the last entry is 0. Like
    ``minilib.mar.mask_schedule``; a list of K ints.
    """
    from ..mar import mask_schedule

    def no_clamp(seq_len, num_iter):
        return [math.floor(seq_len * math.cos(math.pi / 2 * (k + 1) / num_iter)) for k in range(num_iter - 1)] + [0]

    def off_by_one(seq_len, num_iter):
        masked, schedule = seq_len, []
        for k in range(num_iter - 1):
            masked = max(1, min(masked - 1, math.floor(seq_len * math.cos(math.pi / 2 * k / num_iter))))
            schedule.append(masked)
        return schedule + [0]

    def with_ceil(seq_len, num_iter):
        masked, schedule = seq_len, []
        for k in range(num_iter - 1):
            masked = max(1, min(masked - 1, math.ceil(seq_len * math.cos(math.pi / 2 * (k + 1) / num_iter))))
            schedule.append(masked)
        return schedule + [0]

    def no_final_zero(seq_len, num_iter):
        return mask_schedule(seq_len, num_iter)[:-1]

    def normalise(value):
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        return [int(v) for v in value] if isinstance(value, (list, tuple)) else value

    cases = [Case("seq_len 256, num_iter 64 (MAR's default)", (256, 64)),
             Case("seq_len 16, num_iter 4", (16, 4)),
             Case("seq_len 8, num_iter 8: one token per step", (8, 8)),
             Case("seq_len 10, num_iter 1: everything in one step", (10, 1)),
             Case("seq_len 64, num_iter 30", (64, 30))]
    _run(fn, cases, mask_schedule, "minilib.mar.mask_schedule", normalise=normalise,
         mistakes=[Mistake(off_by_one, "after step k (k = 0 .. K-1) evaluate the cosine at (k + 1) / K: the first "
                                       "step already reveals tokens."),
                   Mistake(with_ceil, "round down: floor(L cos(...)) tokens stay masked."),
                   Mistake(no_final_zero, "return K numbers, one per step; the last step reveals everything, so "
                                          "the last number is 0."),
                   Mistake(no_clamp, "every step must reveal at least one token and leave at least one masked "
                                     "until the last step: clamp with max(1, min(previous - 1, ...)).")],
         hint="masked = L; for k in 0 .. K-2: masked = max(1, min(masked - 1, floor(L cos(pi/2 (k+1)/K)))); "
              "append it; finally append 0.")
