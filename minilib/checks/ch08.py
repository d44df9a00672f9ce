"""Chapter 8, few-shot generation: leave-one-out sets."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _keeps_random_state, _randn, _run

__all__ = ['check_leave_one_out']


@_keeps_random_state
def check_leave_one_out(fn: Callable) -> None:
    """Check ``fn(sets)``: ``(B, S, ...)`` -> ``targets (B*S, ...)``, ``contexts (B*S, S-1, ...)``.

    ``targets[b*S + j] = sets[b, j]`` and ``contexts[b*S + j]`` is set b without
    image j, the others in their original order; like ``minilib.fewshot.leave_one_out``.
    """
    from ..fewshot import leave_one_out

    def includes_itself(sets):
        B, S = sets.shape[:2]
        return sets.flatten(0, 1), sets.repeat_interleave(S, dim=0)

    def set_major(sets):
        targets, contexts = leave_one_out(sets.transpose(0, 1).contiguous())
        return targets, contexts

    def rolled(sets):  # the others starting after j: j+1, ..., S-1, 0, ..., j-1
        S = sets.shape[1]
        others = torch.stack([torch.tensor([(j + k) % S for k in range(1, S)]) for j in range(S)])
        return sets.flatten(0, 1), sets[:, others].flatten(0, 1)

    cases = [Case("sets (2, 4, 1, 3, 3): 2 sets of 4 images", (_randn(2, 4, 1, 3, 3, seed=90),)),
             Case("sets (3, 2, 2, 2, 2): pairs, each image's context is the other one", (_randn(3, 2, 2, 2, 2, seed=91),)),
             Case("sets (1, 5, 6): one set of 5 vectors", (_randn(1, 5, 6, seed=92),))]
    _run(fn, cases, leave_one_out, "minilib.fewshot.leave_one_out", rtol=0, atol=0,
         mistakes=[Mistake(includes_itself, "image j must not be in its own context: the context is the set "
                                            "without it, S - 1 images."),
                   Mistake(rolled, "keep the other images in their original order (positions 0 .. S-1 without j)."),
                   Mistake(set_major, "number the targets set by set: targets[b*S + j] = sets[b, j], i.e. "
                                      "sets.flatten(0, 1).")],
         hint="targets = sets.flatten(0, 1); for each j the context is sets[:, others_j] with others_j = the "
              "positions other than j, stacked to (B, S, S-1, ...) and flattened to (B*S, S-1, ...).")
