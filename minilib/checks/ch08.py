"""Chapter 8, few-shot generation: leave-one-out sets and locality self-attention."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .runner import Case, Mistake, Part, _keeps_random_state, _randn, _run

__all__ = ["check_leave_one_out", "check_lsa_attention"]


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
    hidden = [Case("sets (4, 3, 2, 1, 1): 4 sets of 3 tiny images", (_randn(4, 3, 2, 1, 1, seed=93),)),
              Case("sets (2, 6, 3, 2, 2) in float64", (_randn(2, 6, 3, 2, 2, seed=94).double(),))]
    _run(fn, cases, leave_one_out, "minilib.fewshot.leave_one_out", rtol=0, atol=0, hidden=hidden,
         mistakes=[Mistake(includes_itself, "image j must not be in its own context: the context is the set "
                                            "without it, S - 1 images."),
                   Mistake(rolled, "keep the other images in their original order (positions 0 .. S-1 without j)."),
                   Mistake(set_major, "number the targets set by set: targets[b*S + j] = sets[b, j], i.e. "
                                      "sets.flatten(0, 1).")],
         hint="targets = sets.flatten(0, 1); for each j the context is sets[:, others_j] with others_j = the "
              "positions other than j, stacked to (B, S, S-1, ...) and flattened to (B*S, S-1, ...).")


def _lsa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """LSA's attention: ``softmax(q k^T exp(temperature), diagonal masked) v``; (B, H, L, d) each -> (B, H, L, d)."""
    import torch.nn.functional as F

    L = q.shape[-2]
    allowed = ~torch.eye(L, dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q * temperature.exp(), k, v, attn_mask=allowed, scale=1.0)


def _plain_softmax_attention(q, k, v, scale, mask=None, dim=-1):
    logits = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(dim) @ v


@_keeps_random_state
def check_lsa_attention(fn: Callable) -> None:
    """Check ``fn(q, k, v, temperature)``: locality self-attention's attention step (section 8.3).

    ``q, k, v (B, H, L, d)``, ``temperature`` a 0-d tensor holding the learned
    log-scale; returns ``softmax(q k^T exp(temperature) + M) v`` of shape
    ``(B, H, L, d)``, with ``M_ij = -inf`` on the diagonal (no token attends to
    itself) and 0 elsewhere, like ``minilib.fewshot.LocalitySelfAttention``.
    """
    def no_mask(q, k, v, temperature):
        return _plain_softmax_attention(q, k, v, temperature.exp())

    def scale_not_exp(q, k, v, temperature):
        eye = torch.eye(q.shape[-2], dtype=torch.bool)
        return _plain_softmax_attention(q, k, v, temperature, ~eye)

    def also_sqrt_d(q, k, v, temperature):
        eye = torch.eye(q.shape[-2], dtype=torch.bool)
        return _plain_softmax_attention(q, k, v, temperature.exp() / math.sqrt(q.shape[-1]), ~eye)

    def fixed_scale(q, k, v, temperature):
        eye = torch.eye(q.shape[-2], dtype=torch.bool)
        return _plain_softmax_attention(q, k, v, 1 / math.sqrt(q.shape[-1]), ~eye)

    def only_diagonal(q, k, v, temperature):
        eye = torch.eye(q.shape[-2], dtype=torch.bool)
        return _plain_softmax_attention(q, k, v, temperature.exp(), eye)

    def wrong_axis(q, k, v, temperature):
        eye = torch.eye(q.shape[-2], dtype=torch.bool)
        return _plain_softmax_attention(q, k, v, temperature.exp(), ~eye, dim=-2)

    def qkv(shape, seed):
        return tuple(_randn(*shape, seed=seed + i) for i in range(3))

    log = math.log
    cases = [Part("the diagonal mask and the learned temperature", [
                 Case("q, k, v (2, 4, 6, 8), temperature log(1/sqrt(8)) (the initial value)",
                      (*qkv((2, 4, 6, 8), 400), torch.tensor(log(8 ** -0.5)))),
                 Case("q, k, v (1, 2, 5, 4), a learned temperature 0.7 (sharper than 1/sqrt(d))",
                      (*qkv((1, 2, 5, 4), 410), torch.tensor(0.7))),
                 Case("q, k, v (3, 1, 7, 16), temperature -2.0", (*qkv((3, 1, 7, 16), 420), torch.tensor(-2.0)))],
                 points=2),
             Part("edge cases", [
                 Case("L = 2: each token can only see the other one, so the output is the other token's value",
                      (*qkv((2, 3, 2, 4), 430), torch.tensor(0.3))),
                 Case("float64 inputs (the dtype is kept)",
                      (*(t.double() for t in qkv((1, 2, 4, 6), 440)), torch.tensor(0.1, dtype=torch.float64)))],
                 points=1),
             Part("hidden inputs", [
                 Case("q, k, v (2, 2, 9, 8), temperature 1.5", (*qkv((2, 2, 9, 8), 450), torch.tensor(1.5))),
                 Case("L = 3, large logits (queries x 4, temperature 3.0): a softmax must not overflow",
                      (*(t * s for t, s in zip(qkv((4, 1, 3, 2), 460), (4, 1, 1))), torch.tensor(3.0)))],
                 points=1, hidden=True)]
    _run(fn, cases, _lsa_reference, "minilib.fewshot.LocalitySelfAttention's attention", rtol=1e-4, atol=1e-5,
         mistakes=[Mistake(no_mask, "mask the diagonal: set the logits of (i, i) to -inf before the softmax, so no "
                                    "token attends to itself (its own value reaches the output through the "
                                    "residual connection anyway)."),
                   Mistake(only_diagonal, "the mask is the other way round: every token may see all the OTHER "
                                          "tokens; only the diagonal (i, i) is -inf. Yours keeps only the diagonal."),
                   Mistake(scale_not_exp, "the temperature is a log-scale: multiply the logits by "
                                          "exp(temperature), not by temperature (a learned log keeps the scale "
                                          "positive)."),
                   Mistake(also_sqrt_d, "exp(temperature) replaces the 1/sqrt(d) of ordinary attention (it starts "
                                        "at log(1/sqrt(d))): do not divide by sqrt(d) as well."),
                   Mistake(fixed_scale, "use the learned temperature: the scale is exp(temperature), not the fixed "
                                        "1/sqrt(d)."),
                   Mistake(wrong_axis, "take the softmax over the keys (the last axis of the (L, L) logits), so "
                                       "each query's weights sum to 1.")],
         hint="logits = q @ k.transpose(-2, -1) * temperature.exp() (B, H, L, L); logits.masked_fill(eye, -inf) "
              "with eye = torch.eye(L, dtype=torch.bool); softmax over the last axis; @ v.")
