"""Chapter 11, masked autoregression: the mask schedule, random masking and the MAE encoder's input."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .runner import Case, Mistake, Part, _generator, _keeps_random_state, _randn, _run

__all__ = ["check_mask_schedule", "check_mae_routing"]


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
    hidden = [Case("seq_len 2, num_iter 2", (2, 2)), Case("seq_len 100, num_iter 7", (100, 7)),
              Case("seq_len 1024, num_iter 256", (1024, 256))]
    _run(fn, cases, mask_schedule, "minilib.mar.mask_schedule", normalise=normalise, hidden=hidden,
         mistakes=[Mistake(off_by_one, "after step k (k = 0 .. K-1) evaluate the cosine at (k + 1) / K: the first "
                                       "step already reveals tokens."),
                   Mistake(with_ceil, "round down: floor(L cos(...)) tokens stay masked."),
                   Mistake(no_final_zero, "return K numbers, one per step; the last step reveals everything, so "
                                          "the last number is 0."),
                   Mistake(no_clamp, "every step must reveal at least one token and leave at least one masked "
                                     "until the last step: clamp with max(1, min(previous - 1, ...)).")],
         hint="masked = L; for k in 0 .. K-2: masked = max(1, min(masked - 1, floor(L cos(pi/2 (k+1)/K)))); "
              "append it; finally append 0.")


def _mae_routing(x: torch.Tensor, orders: torch.Tensor, mask_rate: float, class_embedding: torch.Tensor,
                 buffer_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MAR's training mask and the encoder's input sequence (``random_masking`` + ``forward_mae_encoder``'s routing).

    ``x (B, L, D)`` (already projected, with positions), ``orders (B, L)`` permutations,
    ``class_embedding (B, D)``: ``mask (B, L)`` bool, True at the first ``ceil(L r)``
    positions of each order, and ``(B, buffer_size + L - ceil(L r), D)``: the class
    embedding in every buffer slot, then the known tokens in position order.
    """
    from ..mar import mask_by_order

    B, L, D = x.shape
    mask = mask_by_order(math.ceil(L * mask_rate), orders)
    buffer = class_embedding[:, None].expand(B, buffer_size, D)
    known = x[~mask].reshape(B, -1, D)
    return mask, torch.cat([buffer, known], dim=1)


def _pick(route: Callable) -> Callable:
    """``route(x, orders, r, cls, buffer) -> (mask, sequence)`` made into ``(..., what)`` returning one of them."""
    def picked(x, orders, mask_rate, class_embedding, buffer_size, what):
        out = route(x, orders, mask_rate, class_embedding, buffer_size)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            return out
        return out[0] if what == "mask" else out[1]
    picked.__name__ = getattr(route, "__name__", "route")
    return picked


@_keeps_random_state
def check_mae_routing(fn: Callable) -> None:
    """Check ``fn(x, orders, mask_rate, class_embedding, buffer_size) -> (mask, sequence)``: MAR's training mask
    and the MAE encoder's input.

    ``mask (B, L)`` bool, True = masked: the first ``ceil(L * mask_rate)``
    positions of each image's order ``orders[b]`` (a permutation of 0..L-1).
    ``sequence (B, buffer_size + L - ceil(L * mask_rate), D)``: ``buffer_size``
    copies of the class embedding, then the unmasked tokens of ``x (B, L, D)`` in
    their position order; the masked tokens are dropped, not replaced. Like
    ``MAR.random_masking`` and the routing in ``MAR.forward_mae_encoder``.
    """
    from ..mar import mask_by_order

    def orders_for(B, L, seed):
        generator = _generator(seed)
        return torch.stack([torch.randperm(L, generator=generator) for _ in range(B)])

    def with_mask(make_mask):
        def route(x, orders, mask_rate, class_embedding, buffer_size):
            B, L, D = x.shape
            mask = make_mask(orders, L, mask_rate)
            buffer = class_embedding[:, None].expand(B, buffer_size, D)
            return mask, torch.cat([buffer, x[~mask].reshape(B, -1, D)], dim=1)
        return route

    def with_sequence(make_sequence):
        def route(x, orders, mask_rate, class_embedding, buffer_size):
            mask = mask_by_order(math.ceil(x.shape[1] * mask_rate), orders)
            return mask, make_sequence(x, mask, class_embedding, buffer_size)
        return route

    def buffer_of(class_embedding, buffer_size, D):
        return class_embedding[:, None].expand(len(class_embedding), buffer_size, D)

    rounded = with_mask(lambda orders, L, r: mask_by_order(round(L * r), orders))
    floored = with_mask(lambda orders, L, r: mask_by_order(math.floor(L * r), orders))
    last_of_order = with_mask(lambda orders, L, r: mask_by_order(math.ceil(L * r), orders.flip(1)))
    inverse = with_mask(lambda orders, L, r: orders < math.ceil(L * r))
    inverted = with_mask(lambda orders, L, r: ~mask_by_order(math.ceil(L * r), orders))
    zero_buffer = with_sequence(lambda x, mask, c, n: torch.cat(
        [x.new_zeros(len(x), n, x.shape[2]), x[~mask].reshape(len(x), -1, x.shape[2])], 1))
    all_tokens = with_sequence(lambda x, mask, c, n: torch.cat([buffer_of(c, n, x.shape[2]), x], 1))
    masked_kept = with_sequence(lambda x, mask, c, n: torch.cat(
        [buffer_of(c, n, x.shape[2]), x[mask].reshape(len(x), -1, x.shape[2])], 1))
    buffer_last = with_sequence(lambda x, mask, c, n: torch.cat(
        [x[~mask].reshape(len(x), -1, x.shape[2]), buffer_of(c, n, x.shape[2])], 1))

    def case(label, B, L, D, rate, buffer_size, seed, what):
        return Case(f"{label}: the {'mask' if what == 'mask' else 'sequence'}",
                    (_randn(B, L, D, seed=seed), orders_for(B, L, seed + 1), rate, _randn(B, D, seed=seed + 2),
                     buffer_size, what))

    parts = [Part("the random mask", [case("x (2, 16, 4), mask_rate 0.7 (12 masked)", 2, 16, 4, 0.7, 4, 600, "mask"),
                                      case("L = 10, mask_rate 0.25: ceil(2.5) = 3 masked", 3, 10, 2, 0.25, 2, 610,
                                           "mask"),
                                      case("mask_rate 1.0: every token masked", 2, 6, 3, 1.0, 1, 620, "mask")],
                  points=1),
             Part("the encoder's input: buffer + known tokens", [
                 case("x (2, 16, 4), mask_rate 0.7, buffer_size 4", 2, 16, 4, 0.7, 4, 600, "sequence"),
                 case("L = 10, mask_rate 0.25, buffer_size 2", 3, 10, 2, 0.25, 2, 610, "sequence"),
                 case("mask_rate 1.0: only the buffer is left", 2, 6, 3, 1.0, 1, 620, "sequence"),
                 case("buffer_size 0", 2, 9, 5, 0.5, 0, 630, "sequence")], points=2),
             Part("hidden inputs", [case("x (4, 64, 8), mask_rate 0.85, buffer_size 64", 4, 64, 8, 0.85, 64, 640,
                                         "mask"),
                                    case("x (4, 64, 8), mask_rate 0.85, buffer_size 64", 4, 64, 8, 0.85, 64, 640,
                                         "sequence"),
                                    case("one image, L = 5, mask_rate 0.1", 1, 5, 3, 0.1, 3, 650, "sequence")],
                  points=1, hidden=True)]
    _run(_pick(fn), parts, _pick(_mae_routing), "MAR.random_masking and forward_mae_encoder's routing", rtol=0,
         atol=0,
         mistakes=[Mistake(_pick(rounded), "mask ceil(L * mask_rate) tokens (math.ceil), not round(...)."),
                   Mistake(_pick(floored), "mask ceil(L * mask_rate) tokens (math.ceil), not floor(...)."),
                   Mistake(_pick(inverse), "orders[b] lists positions: mask the positions orders[b, :n] "
                                           "(mask.scatter(1, orders[:, :n], True)), not the positions j whose "
                                           "orders[b, j] is below n."),
                   Mistake(_pick(last_of_order), "mask the FIRST n positions of each order, orders[:, :n]."),
                   Mistake(_pick(inverted), "True means masked: the n masked tokens are True, the known ones False."),
                   Mistake(_pick(zero_buffer), "fill every buffer slot with the image's class embedding "
                                               "(class_embedding[:, None].expand(B, buffer_size, D)), not zeros."),
                   Mistake(_pick(all_tokens), "the MAE encoder drops the masked tokens: keep only x[~mask] (the "
                                              "known ones), reshaped to (B, L - n, D)."),
                   Mistake(_pick(masked_kept), "keep the KNOWN tokens, x[~mask]; the masked ones are what the "
                                               "model must predict."),
                   Mistake(_pick(buffer_last), "the buffer comes first: cat([buffer, known], dim=1).")],
         error_hint="return a tuple (mask, sequence); mask (B, L) bool, sequence (B, buffer_size + L - n, D) with "
                    "n = math.ceil(L * mask_rate).",
         hint="n = math.ceil(L * mask_rate); mask = zeros (B, L) bool scattered True at orders[:, :n]; sequence = "
              "cat([class_embedding[:, None].expand(B, buffer_size, D), x[~mask].reshape(B, -1, D)], dim=1).")
