"""Automatic checks for the book's assignments.

Every chapter ends with an assignment: write one piece of a model yourself
(``modulate``, the timestep embedding, one Euler step, ...) in the cell the
chapter gives you, then run the cell below it, which calls a check from this
module::

    from minilib.checks import check_modulate
    check_modulate(my_modulate)

A check calls your function on several inputs, random ones and edge cases (a
single token, an odd width, the last step, ...), and compares each answer with
minilib's own implementation. If all agree it prints one line starting with
``✓``. Otherwise it raises an :class:`ExerciseError` that says which input
failed, the expected and the actual shape, the first entries that differ and,
where it recognises a common mistake, what that mistake is. A function that
still raises ``NotImplementedError`` is reported as "not implemented yet".

The checks run on the CPU with small inputs, take well under a second, and
leave the global random number generators untouched.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "ExerciseError",
    "check_patchify", "check_sincos_embedding", "check_timestep_embedding", "check_modulate",
    "check_reparameterise", "check_kl", "check_q_sample", "check_ddim_step", "check_velocity_from_eps", "check_to_d",
    "check_euler_step", "check_block_mixing", "check_leave_one_out", "check_nearest_code",
    "check_block_causal_mask", "check_mask_schedule", "check_ddpm_step", "check_compare_state_dicts",
]


class ExerciseError(AssertionError):
    """An assignment's function gave a wrong answer (or none); the message says what is wrong."""


# ---------------------------------------------------------------------------
# The machinery every check shares
# ---------------------------------------------------------------------------


@dataclass
class Case:
    """One input of a check: a description for the messages and the arguments."""

    label: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass
class Mistake:
    """A typical wrong implementation and the hint to give when an answer matches it."""

    wrong: Callable
    hint: str


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            return f"tensor({value.item():.4g})" if value.is_floating_point() else f"tensor({value.item()})"
        return f"tensor {tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, (list, tuple)):
        if len(value) > 12:
            return f"{type(value).__name__} of {len(value)} items: {list(value[:6])} ..."
        return type(value)((_describe(v) for v in value)).__repr__().replace("'", "")
    if isinstance(value, dict):
        return "dict with keys " + ", ".join(map(repr, value))
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    if isinstance(value, torch.nn.Module):
        return type(value).__name__
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def _clone(value):
    """A deep copy of tensors (and containers of tensors), so no call sees another's in-place changes."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _call(fn: Callable, case: Case, error_hint: str = ""):
    """Call the student's function on one case, turning NotImplementedError and crashes into messages."""
    name = _name(fn)
    try:
        return fn(*_clone(case.args), **_clone(case.kwargs))
    except NotImplementedError:
        raise ExerciseError(f"{name} is not implemented yet: replace `raise NotImplementedError()` "
                            "by your code, run its cell, then run this check again.") from None
    except Exception as error:
        message = [f"{name} raised {type(error).__name__} on input {case.label}:", f"    {error}"]
        if error_hint:
            message.append(f"hint: {error_hint}")
        raise ExerciseError("\n".join(message)) from error


def _tensor_difference(got, expected: torch.Tensor, rtol: float, atol: float) -> str | None:
    if not isinstance(got, torch.Tensor):
        return f"expected a tensor {tuple(expected.shape)}, got {_describe(got)}"
    if got.shape != expected.shape:
        return f"expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
    exact = not expected.is_floating_point()
    if got.is_floating_point() != expected.is_floating_point() or (exact and got.dtype != expected.dtype):
        return f"expected dtype {expected.dtype}, got {got.dtype}"
    if exact:
        close = got.cpu() == expected.cpu()
    else:
        close = torch.isclose(got.detach().cpu().double(), expected.detach().cpu().double(), rtol=rtol, atol=atol,
                              equal_nan=True)
    if bool(close.all()):
        return None
    wrong = (~close).nonzero()
    lines = [f"{len(wrong)} of {close.numel()} entries differ"]
    if not exact:
        finite = torch.isfinite(got.detach().cpu().double() - expected.cpu().double())
        diff = (got.detach().cpu().double() - expected.cpu().double()).abs()
        if bool((finite | close).all()):
            lines[0] += f" (largest difference {diff[~close].max().item():.3g})"
    lines[0] += "; the first:"
    for index in wrong[:3].tolist():
        g, e = got.detach().cpu()[tuple(index)].item(), expected.cpu()[tuple(index)].item()
        lines.append(f"  at {index}: expected {e:.6g}, got {g:.6g}" if not exact
                     else f"  at {index}: expected {e}, got {g}")
    return "\n".join(lines)


def _difference(got, expected, rtol: float = 1e-5, atol: float = 1e-5) -> str | None:
    """None if ``got`` matches ``expected`` (tensors, tuples, lists, dicts, numbers), else what differs."""
    if isinstance(expected, torch.Tensor):
        return _tensor_difference(got, expected, rtol, atol)
    if expected is None:
        return None if got is None else f"expected None, got {_describe(got)}"
    if isinstance(expected, tuple):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"expected a tuple of {len(expected)} results, got {_describe(got)}"
        for k, (g, e) in enumerate(zip(got, expected)):
            problem = _difference(g, e, rtol, atol)
            if problem:
                return f"result {k} of the tuple: {problem}"
        return None
    if isinstance(expected, list):
        if isinstance(got, torch.Tensor):
            got = got.tolist()
        if not isinstance(got, (list, tuple)):
            return f"expected a list of {len(expected)} items, got {_describe(got)}"
        if len(got) != len(expected):
            return f"expected {len(expected)} items, got {len(got)}: {list(got)[:12]}"
        bad = [k for k, (g, e) in enumerate(zip(got, expected)) if _difference(g, e, rtol, atol)]
        if not bad:
            return None
        return (f"{len(bad)} of {len(expected)} items differ; the first: "
                + ", ".join(f"[{k}] expected {expected[k]!r}, got {got[k]!r}" for k in bad[:3]))
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"expected a dict with keys {sorted(expected)}, got {_describe(got)}"
        if set(got) != set(expected):
            return f"expected the keys {sorted(expected)}, got {sorted(got)}"
        for key in expected:
            problem = _difference(got[key], expected[key], rtol, atol)
            if problem:
                return f"[{key!r}]: {problem}"
        return None
    if isinstance(expected, float):
        ok = isinstance(got, (int, float)) and math.isclose(got, expected, rel_tol=rtol, abs_tol=atol)
        return None if ok else f"expected {expected!r}, got {got!r}"
    return None if got == expected else f"expected {expected!r}, got {got!r}"


def _run(fn: Callable, cases: Sequence[Case], reference: Callable, reference_name: str, *,
         mistakes: Sequence[Mistake] = (), hint: str = "", error_hint: str = "", rtol: float = 1e-5,
         atol: float = 1e-5, compare: Callable | None = None, normalise: Callable | None = None) -> None:
    """Compare ``fn`` with ``reference`` on every case; raise an ExerciseError at the first difference.

    ``compare(got, expected, case)`` replaces the default comparison where an
    answer may differ from minilib's and still be right; ``normalise`` maps
    both answers to a canonical form first.
    """
    if not callable(fn):
        raise ExerciseError(f"pass your function itself to the check, not {_describe(fn)}")
    name = _name(fn)
    with torch.no_grad():
        for number, case in enumerate(cases, 1):
            expected = reference(*_clone(case.args), **_clone(case.kwargs))
            got = _call(fn, case, error_hint)
            if normalise is not None:
                expected, got = normalise(expected), normalise(got)
            problem = (compare(got, expected, case) if compare is not None
                       else _difference(got, expected, rtol, atol))
            if problem is None:
                continue
            advice = hint
            for mistake in mistakes:
                try:
                    wrong = mistake.wrong(*_clone(case.args), **_clone(case.kwargs))
                except Exception:  # this mistake cannot even run on this input
                    continue
                if normalise is not None:
                    wrong = normalise(wrong)
                if _difference(got, wrong, rtol, atol) is None:
                    advice = mistake.hint
                    break
            message = [f"{name} gives a wrong answer on input {number} of {len(cases)}, {case.label}:"]
            if not problem.startswith("expected") and not isinstance(expected, (dict, list)):
                message.append(f"  expected {_describe(expected)}, got {_describe(got)}")
            message += ["  " + line for line in problem.splitlines()]
            if advice:
                message.append(f"hint: {advice}")
            raise ExerciseError("\n".join(message))
    print(f"✓ {name} agrees with {reference_name} on all {len(cases)} test inputs.")


def _keeps_random_state(check: Callable) -> Callable:
    """Run a check with the global random state saved and restored, so a notebook's numbers do not change."""

    @functools.wraps(check)
    def wrapper(fn: Callable) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return check(fn)

    return wrapper


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(seed)) * scale


# ---------------------------------------------------------------------------
# Chapter 1: images as tokens
# ---------------------------------------------------------------------------


@_keeps_random_state
def check_patchify(fn: Callable) -> None:
    """Check ``fn(x, patch_size)``: images ``(B, C, H, W)`` -> patches ``(B, L, p*p*C)``.

    Patches in row-major order, the values inside a patch ordered (row, column,
    channel), like ``minilib.patch_embed.patchify``.
    """
    from .patch_embed import patchify

    def channels_first(x, p):  # (c p q) inside a patch
        B, C, H, W = x.shape
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)

    def column_major(x, p):  # patches numbered column by column
        B, C, H, W = x.shape
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 4, 2, 3, 5, 1).reshape(B, -1, p * p * C)

    cases = [Case("x (2, 3, 8, 8), p = 2", (_randn(2, 3, 8, 8, seed=1), 2)),
             Case("x (1, 4, 4, 6), p = 2 (a wide image: 2 x 3 patches)", (_randn(1, 4, 4, 6, seed=2), 2)),
             Case("x (2, 1, 6, 6), p = 3", (_randn(2, 1, 6, 6, seed=3), 3)),
             Case("x (1, 2, 4, 4), p = 1 (every pixel a token)", (_randn(1, 2, 4, 4, seed=4), 1)),
             Case("x (1, 3, 4, 4), p = 4 (one patch)", (_randn(1, 3, 4, 4, seed=5), 4))]
    _run(fn, cases, patchify, "minilib.patch_embed.patchify", rtol=0, atol=0,
         mistakes=[Mistake(channels_first, "inside a patch the values are ordered (row, column, channel): "
                                           "move the channel axis last before you flatten a patch."),
                   Mistake(column_major, "number the patches row by row: the patch row index h varies slowest, "
                                         "then the column w, so permute to (B, h, w, p, q, C).")],
         hint="reshape to (B, C, H/p, p, W/p, p), permute to (B, H/p, W/p, p, p, C), then reshape to "
              "(B, L, p*p*C).")


@_keeps_random_state
def check_sincos_embedding(fn: Callable) -> None:
    """Check ``fn(embed_dim, positions)``: 1-D sin-cos features ``(M, D)`` of the positions (any shape, M = numel).

    ``omega_i = 10000 ** (-i / (D/2))``, ``i = 0 .. D/2 - 1``; sines first, then
    cosines, like ``minilib.patch_embed.get_1d_sincos_pos_embed``.
    """
    from .patch_embed import get_1d_sincos_pos_embed

    def omega(D):
        return 1.0 / 10000 ** (torch.arange(D // 2, dtype=torch.float64) / (D / 2))

    def cos_first(D, pos):
        angles = pos.reshape(-1).double()[:, None] * omega(D)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)

    def interleaved(D, pos):
        angles = pos.reshape(-1).double()[:, None] * omega(D)
        return torch.stack([torch.sin(angles), torch.cos(angles)], dim=2).reshape(len(angles), D)

    def over_D(D, pos):
        angles = pos.reshape(-1).double()[:, None] * (1.0 / 10000 ** (torch.arange(D // 2) / D))
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    cases = [Case("embed_dim 8, positions 0..4", (8, torch.arange(5))),
             Case("embed_dim 16, positions of a 3 x 4 grid (shape (3, 4))", (16, torch.arange(12).reshape(3, 4))),
             Case("embed_dim 2 (a single frequency)", (2, torch.arange(4))),
             Case("embed_dim 32, fractional positions", (32, torch.tensor([0.0, 0.5, 2.25, 31.0])))]
    _run(fn, cases, get_1d_sincos_pos_embed, "minilib.patch_embed.get_1d_sincos_pos_embed", rtol=1e-4, atol=1e-5,
         mistakes=[Mistake(cos_first, "the sines come first, then the cosines (MAE's and DiT's convention; "
                                      "the timestep embedding of chapter 2 puts the cosines first)."),
                   Mistake(interleaved, "concatenate [sin(all frequencies), cos(all frequencies)]; do not "
                                        "interleave sin and cos."),
                   Mistake(over_D, "there are D/2 frequencies, omega_i = 10000^(-i / (D/2)): divide i by D/2, "
                                   "not by D.")],
         hint="omega_i = 1 / 10000^(i / (D/2)) for i = 0 .. D/2 - 1, angles = positions.reshape(-1)[:, None] * "
              "omega[None], result [sin(angles), cos(angles)] along the last axis.")


# ---------------------------------------------------------------------------
# Chapter 2: the timestep embedding
# ---------------------------------------------------------------------------


@_keeps_random_state
def check_timestep_embedding(fn: Callable) -> None:
    """Check ``fn(t, dim, max_period=10000)``: sinusoidal features ``(N, dim)`` of timesteps ``(N,)``.

    Frequencies ``f_i = max_period ** (-i / half)``, ``half = dim // 2``; cosines
    first, then sines; one zero column appended when ``dim`` is odd, like
    ``minilib.timestep.timestep_embedding``.
    """
    from .timestep import timestep_embedding

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


# ---------------------------------------------------------------------------
# Chapter 3: adaLN modulation
# ---------------------------------------------------------------------------


@_keeps_random_state
def check_modulate(fn: Callable) -> None:
    """Check ``fn(x, shift, scale)``: ``x * (1 + scale) + shift`` for tokens ``(B, L, D)``.

    ``shift`` and ``scale`` are ``(B, D)``, broadcast over the L tokens; ``shift``
    may be None (SD3's scale-only variant). Reference: ``minilib.adaln.modulate``.
    """
    from .adaln import modulate

    def without_one(x, shift, scale):
        out = x * scale.unsqueeze(1)
        return out if shift is None else out + shift.unsqueeze(1)

    def not_broadcast_over_tokens(x, shift, scale):  # (B, D) against (B, L, D) lines up B with L
        out = x * (1 + scale)
        return out if shift is None else out + shift

    B, L, D = 3, 5, 8
    cases = [Case("x (3, 5, 8), shift (3, 8), scale (3, 8)",
                  (_randn(B, L, D, seed=1), _randn(B, D, seed=2), _randn(B, D, seed=3))),
             Case("x (4, 4, 6), shift (4, 6), scale (4, 6): as many tokens as samples",
                  (_randn(4, 4, 6, seed=4), _randn(4, 6, seed=5), _randn(4, 6, seed=6))),
             Case("shift=None (the scale-only case), x (3, 5, 8), scale (3, 8)",
                  (_randn(B, L, D, seed=7), None, _randn(B, D, seed=8))),
             Case("scale = 0 and shift = 0: modulate must return x unchanged",
                  (_randn(2, 3, 4, seed=9), torch.zeros(2, 4), torch.zeros(2, 4))),
             Case("a single token, x (2, 1, 8)", (_randn(2, 1, 8, seed=10), _randn(2, 8, seed=11), _randn(2, 8, seed=12)))]
    _run(fn, cases, modulate, "minilib.adaln.modulate",
         mistakes=[Mistake(without_one, "the scale is applied as x * (1 + scale), so that a scale of 0 (the "
                                        "adaLN-Zero start) leaves x unchanged."),
                   Mistake(not_broadcast_over_tokens, "shift and scale are (B, D), one vector per sample: give "
                                                      "them a token axis, scale.unsqueeze(1), so they broadcast "
                                                      "over the L tokens of (B, L, D).")],
         error_hint="shift and scale are (B, D): unsqueeze(1) makes them (B, 1, D), which broadcasts against "
                    "x (B, L, D); shift may be None (then there is no shift).",
         hint="modulate(x, shift, scale) = x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1), without the shift "
              "when it is None.")


# ---------------------------------------------------------------------------
# Chapter 4: latent autoencoders
# ---------------------------------------------------------------------------


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
    from .autoencoder import DiagonalGaussian

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
    from .autoencoder import DiagonalGaussian

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


# ---------------------------------------------------------------------------
# Chapter 5: diffusion with a transformer
# ---------------------------------------------------------------------------


def _processes():
    from .diffusion import GaussianDiffusion, beta_schedule
    cosine = GaussianDiffusion(beta_schedule("cosine", 1000))
    return cosine, GaussianDiffusion(beta_schedule("linear", 1000)).respace(50)


@_keeps_random_state
def check_q_sample(fn: Callable) -> None:
    """Check ``fn(process, x0, t, noise)``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    ``abar = process.alphas_cumprod`` (float64, ``(T,)``), ``t`` is ``(N,)``
    integer steps, one per sample; like ``process.q_sample(x0, t, noise)``.
    """
    cosine, respaced = _processes()

    def reference(process, x0, t, noise):
        return process.q_sample(x0, t, noise)

    def no_square_roots(process, x0, t, noise):
        abar = process.alphas_cumprod[t].float().view(-1, *[1] * (x0.ndim - 1))
        return abar * x0 + (1 - abar) * noise

    def first_t_for_all(process, x0, t, noise):
        abar = process.alphas_cumprod[t[0]].float()
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    cases = [Case("cosine schedule, x0 (4, 1, 8, 8), t = 0, 10, 500, 999",
                  (cosine, _randn(4, 1, 8, 8, seed=30), torch.tensor([0, 10, 500, 999]), _randn(4, 1, 8, 8, seed=31))),
             Case("cosine schedule, x0 (3, 2, 4, 4), all t = 250",
                  (cosine, _randn(3, 2, 4, 4, seed=32), torch.full((3,), 250), _randn(3, 2, 4, 4, seed=33))),
             Case("a linear schedule respaced to 50 steps, x0 (2, 3), t = 0 and 49",
                  (respaced, _randn(2, 3, seed=34), torch.tensor([0, 49]), _randn(2, 3, seed=35)))]
    _run(fn, cases, reference, "GaussianDiffusion.q_sample", rtol=1e-4, atol=1e-5,
         mistakes=[Mistake(no_square_roots, "x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise: take the square "
                                            "roots (abar is the variance that is kept, not the scale)."),
                   Mistake(first_t_for_all, "every sample has its own t: index alphas_cumprod with the whole "
                                            "t and reshape to (N, 1, 1, ...) to broadcast.")],
         error_hint="abar = process.alphas_cumprod[t] has shape (N,): reshape it to (N, 1, 1, ...) with "
                    ".view(-1, *[1] * (x0.ndim - 1)) so it broadcasts against x0 (N, ...).",
         hint="abar = process.alphas_cumprod[t] reshaped to (N, 1, ...), then sqrt(abar) * x0 + sqrt(1 - abar) * "
              "noise (the square roots in float64, cast to x0's dtype).")


@_keeps_random_state
def check_ddim_step(fn: Callable) -> None:
    """Check ``fn(process, x_t, t, x0_hat)``: one deterministic DDIM step (eta = 0) from t to t - 1.

    With ``abar = process.alphas_cumprod`` and ``abar_{-1} = 1``:
    ``eps = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)``,
    ``x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1}) eps``, as
    ``process._ddim_step(x_t, t, x0_hat, 0, eta=0.0)``.
    """
    cosine, respaced = _processes()

    def reference(process, x_t, t, x0_hat):
        return process._ddim_step(x_t, t, x0_hat, torch.zeros_like(x_t), eta=0.0)

    def ddim_step(x_t, x0_hat, abar, abar_prev):  # (N,) float64 abar_t and abar_{t-1}: the arithmetic in float64
        view = (-1,) + (1,) * (x_t.ndim - 1)
        def per_sample(values):
            return values.to(x_t.dtype).view(view)
        eps = (x_t - per_sample(abar.sqrt()) * x0_hat) / per_sample((1 - abar).sqrt())
        return per_sample(abar_prev.sqrt()) * x0_hat + per_sample((1 - abar_prev).sqrt()) * eps

    def wraps_at_zero(process, x_t, t, x0_hat):  # abar[t - 1] reads abar[-1] at t = 0
        return ddim_step(x_t, x0_hat, process.alphas_cumprod[t], process.alphas_cumprod[t - 1])

    def float32_first(process, x_t, t, x0_hat):  # right formula, but 1 - abar_t computed in float32
        view = (-1,) + (1,) * (x_t.ndim - 1)
        abar = process.alphas_cumprod[t].float().view(view)
        abar_prev = process.alphas_cumprod_prev[t].float().view(view)
        eps = (x_t - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
        return abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * eps

    def same_t(process, x_t, t, x0_hat):  # x_t returned unchanged from the x0_hat formula: abar_prev = abar
        return x_t

    cases = [Case("cosine schedule, x_t (4, 1, 4, 4), t = 1, 10, 500, 999",
                  (cosine, _randn(4, 1, 4, 4, seed=40), torch.tensor([1, 10, 500, 999]), _randn(4, 1, 4, 4, seed=41))),
             Case("t = 0, the last step: abar_{-1} = 1, so the step returns x0_hat",
                  (cosine, _randn(2, 3, seed=42), torch.tensor([0, 0]), _randn(2, 3, seed=43))),
             Case("a linear schedule respaced to 50 steps, t = 0, 1, 25, 49",
                  (respaced, _randn(4, 2, 2, 2, seed=44), torch.tensor([0, 1, 25, 49]), _randn(4, 2, 2, 2, seed=45)))]
    _run(fn, cases, reference, "GaussianDiffusion._ddim_step(..., eta=0.0)", rtol=1e-4, atol=1e-4,
         mistakes=[Mistake(float32_first, "compute 1 - abar_t and the square roots in float64, on "
                                          "process.alphas_cumprod, and cast only the results to x_t's dtype: near "
                                          "t = 0 abar_t is 0.9999..., and in float32 1 - abar_t keeps only a few "
                                          "digits, which the step then divides by."),
                   Mistake(wraps_at_zero, "abar_{t-1} at t = 0 is 1 (use process.alphas_cumprod_prev, or treat "
                                          "t = 0 apart): alphas_cumprod[t - 1] reads the last entry there."),
                   Mistake(same_t, "the step must move to t - 1: use abar_{t-1} (process.alphas_cumprod_prev[t]) "
                                   "for the new point.")],
         error_hint="index the schedules with t (N,) and reshape to (N, 1, ...) to broadcast against x_t.",
         hint="eps = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t), then x_{t-1} = sqrt(abar_{t-1}) x0_hat + "
              "sqrt(1 - abar_{t-1}) eps with abar_{t-1} = process.alphas_cumprod_prev[t] (the square roots "
              "computed in float64, then cast to x_t's dtype).")


# ---------------------------------------------------------------------------
# Chapter 6: flow matching and Euler sampling
# ---------------------------------------------------------------------------


@_keeps_random_state
def check_to_d(fn: Callable) -> None:
    """Check ``fn(x, sigma, denoised)``: the ODE slope ``(x - denoised) / sigma``.

    ``sigma`` is a 0-d tensor or one level per sample ``(B,)``; like ``minilib.flow.to_d``.
    """
    from .flow import to_d

    def flipped(x, sigma, denoised):
        return -to_d(x, sigma, denoised)

    cases = [Case("x (3, 1, 4, 4), sigma = 0.7 (0-d)", (_randn(3, 1, 4, 4, seed=50), torch.tensor(0.7),
                                                          _randn(3, 1, 4, 4, seed=51))),
             Case("one sigma per sample, (3,), x (3, 2, 3, 3)", (_randn(3, 2, 3, 3, seed=52),
                                                                  torch.tensor([1.0, 0.5, 0.1]),
                                                                  _randn(3, 2, 3, 3, seed=53))),
             Case("sigma (4,) with x (4, 4): the last axis has the batch's size too",
                  (_randn(4, 4, seed=54), torch.tensor([0.9, 0.6, 0.3, 0.2]), _randn(4, 4, seed=55)))]
    _run(fn, cases, to_d, "minilib.flow.to_d", rtol=1e-5, atol=1e-5,
         mistakes=[Mistake(flipped, "the slope is (x - denoised) / sigma: x minus the denoised image, so that "
                                    "a step towards sigma = 0 (dt < 0) moves x towards denoised.")],
         error_hint="sigma may be (B,): reshape it to (B, 1, 1, ...) (minilib.flow.append_dims) before dividing.",
         hint="(x - denoised) / sigma, with sigma reshaped to (B, 1, 1, ...) when it has one entry per sample "
              "(a (B,) sigma would otherwise line up with x's last axis).")


def check_velocity_from_eps(fn: Callable) -> None:
    """Check ``fn(x_t, eps, a, b, da, db)``: the path velocity ``da * x0_hat + db * eps`` from an eps prediction.

    ``x_t = a x0 + b eps`` with a and b floats or tensors broadcastable to ``x_t``; like
    ``minilib.parameterisation.velocity_from_eps``.
    """
    from .parameterisation import velocity_from_eps

    def forgot_x0(x_t, eps, a, b, da, db):
        return da * x_t + db * eps

    def wrong_x0(x_t, eps, a, b, da, db):
        return da * (x_t - eps) / a + db * eps

    abar = torch.tensor([0.9, 0.5, 0.05]).reshape(3, 1, 1, 1)
    cases = [Case("rectified flow at t = 0.3 (a = 0.7, b = 0.3, da = -1, db = 1): v = eps - x0",
                  (_randn(2, 1, 4, 4, seed=60), _randn(2, 1, 4, 4, seed=61), 0.7, 0.3, -1.0, 1.0)),
             Case("DDPM-like coefficients per sample, a = sqrt(abar), b = sqrt(1 - abar), (3, 1, 1, 1) each",
                  (_randn(3, 2, 3, 3, seed=62), _randn(3, 2, 3, 3, seed=63), abar.sqrt(), (1 - abar).sqrt(),
                   -0.5 / abar.sqrt(), 0.5 / (1 - abar).sqrt())),
             Case("a = 1 (no signal lost) and b = 0.01", (_randn(4, 8, seed=64), _randn(4, 8, seed=65), 1.0, 0.01,
                                                          -1.0, 1.0))]
    _run(fn, cases, velocity_from_eps, "minilib.parameterisation.velocity_from_eps", rtol=1e-5, atol=1e-5,
         mistakes=[Mistake(forgot_x0, "da multiplies the *clean* image x0_hat = (x_t - b eps) / a, not x_t itself."),
                   Mistake(wrong_x0, "x0_hat = (x_t - b * eps) / a: the noise enters x_t scaled by b.")],
         hint="first x0_hat = (x_t - b * eps) / a (Tweedie's formula in eps form), then v = da * x0_hat + db * eps.")


def _toy_denoiser(x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
    """A smooth, nonlinear stand-in for a trained denoiser D(x, sigma); sigma is 0-d or (B,)."""
    sigma = sigma.reshape(-1, *[1] * (x.ndim - 1)) if sigma.ndim else sigma
    return torch.tanh(x) * (1 - sigma) + 0.3 * sigma * x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)


@_keeps_random_state
def check_euler_step(fn: Callable) -> None:
    """Check ``fn(denoiser, x, sigma, sigma_next)``: one Euler step of the flow ODE.

    ``d = (x - denoiser(x, sigma)) / sigma`` and ``x + (sigma_next - sigma) * d``,
    where ``sigma`` and ``sigma_next`` are 0-d tensors; it must equal
    ``sample_euler(denoiser, x, torch.stack([sigma, sigma_next]))``.
    """
    from .flow import sample_euler, sigmas, to_d

    def reference(denoiser, x, sigma, sigma_next):
        return sample_euler(denoiser, x, torch.stack([sigma, sigma_next]))

    def wrong_sign(denoiser, x, sigma, sigma_next):
        return x - (sigma_next - sigma) * to_d(x, sigma, denoiser(x, sigma.expand(len(x))))

    def divides_by_next(denoiser, x, sigma, sigma_next):
        return x + (sigma_next - sigma) * (x - denoiser(x, sigma.expand(len(x)))) / sigma_next

    def no_step(denoiser, x, sigma, sigma_next):
        return denoiser(x, sigma.expand(len(x)))

    levels = sigmas(10)
    cases = [Case("x (3, 1, 4, 4), sigma = sigmas(10)[0] = 1 to sigmas(10)[1]",
                  (_toy_denoiser, _randn(3, 1, 4, 4, seed=60), levels[0], levels[1])),
             Case("a middle step, sigmas(10)[4] to [5]", (_toy_denoiser, _randn(2, 2, 3, 3, seed=61), levels[4], levels[5])),
             Case("the last step, to sigma = 0 (the clean image)",
                  (_toy_denoiser, _randn(2, 1, 4, 4, seed=62), levels[-2], levels[-1]))]
    _run(fn, cases, reference, "sample_euler(denoiser, x, torch.stack([sigma, sigma_next]))", rtol=1e-5, atol=1e-5,
         mistakes=[Mistake(wrong_sign, "x_next = x + (sigma_next - sigma) * d: dt = sigma_next - sigma is "
                                       "negative, so x moves towards the denoised image."),
                   Mistake(divides_by_next, "the slope uses the current level: d = (x - D(x, sigma)) / sigma."),
                   Mistake(no_step, "an Euler step does not jump to the denoised image: it moves x along the "
                                    "slope d by dt = sigma_next - sigma.")],
         error_hint="call the denoiser as denoiser(x, sigma * torch.ones(len(x))), one level per sample, as "
                    "sample_euler does.",
         hint="denoised = denoiser(x, sigma * x.new_ones(len(x))), d = (x - denoised) / sigma, "
              "return x + (sigma_next - sigma) * d.")


# ---------------------------------------------------------------------------
# Chapter 7: MM-DiT
# ---------------------------------------------------------------------------


@_keeps_random_state
def check_block_mixing(fn: Callable) -> None:
    """Check ``fn(context, x, context_block, x_block, c)``: MM-DiT's joint attention.

    Both streams' q, k, v are concatenated along the sequence (context first),
    one attention runs over all tokens, the result is split back and each block
    finishes with ``post_attention``; returns ``(context or None, x)`` (None when
    ``context_block.pre_only``), like ``minilib.mmdit.block_mixing``.
    """
    from .mmdit import JointBlock, attention, block_mixing

    def separate_attention(context, x, context_block, x_block, c):
        context_qkv, context_state = context_block.pre_attention(context, c)
        x_qkv, x_state = x_block.pre_attention(x, c)
        context_attn = attention(*context_qkv, context_block.attn.num_heads)
        x_attn = attention(*x_qkv, x_block.attn.num_heads)
        context = None if context_block.pre_only else context_block.post_attention(context_attn, *context_state)
        return context, x_block.post_attention(x_attn, *x_state)

    def swapped_split(context, x, context_block, x_block, c):
        context_qkv, context_state = context_block.pre_attention(context, c)
        x_qkv, x_state = x_block.pre_attention(x, c)
        q, k, v = (torch.cat(pair, dim=1) for pair in zip(context_qkv, x_qkv))
        attn = attention(q, k, v, x_block.attn.num_heads)
        x_attn, context_attn = attn[:, :x.shape[1]], attn[:, x.shape[1]:]
        context = None if context_block.pre_only else context_block.post_attention(context_attn, *context_state)
        return context, x_block.post_attention(x_attn, *x_state)

    def blocks(seed: int, **kwargs):
        torch.manual_seed(seed)
        block = JointBlock(32, 4, **kwargs).eval()
        generator = _generator(seed)
        with torch.no_grad():
            for p in block.parameters():  # random, non-zero weights everywhere (adaLN included)
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
        return block

    one, pre_only, rms = blocks(70), blocks(71, pre_only=True), blocks(72, qk_norm="rms")
    cases = [Case("context (2, 3, 32), x (2, 5, 32), c (2, 32)",
                  (_randn(2, 3, 32, seed=73), _randn(2, 5, 32, seed=74), one.context_block, one.x_block,
                   _randn(2, 32, seed=75))),
             Case("a pre_only context block (the last layer): the context result is None",
                  (_randn(2, 4, 32, seed=76), _randn(2, 6, 32, seed=77), pre_only.context_block, pre_only.x_block,
                   _randn(2, 32, seed=78))),
             Case("qk_norm='rms', context (1, 1, 32), x (1, 7, 32)",
                  (_randn(1, 1, 32, seed=79), _randn(1, 7, 32, seed=80), rms.context_block, rms.x_block,
                   _randn(1, 32, seed=81)))]
    _run(fn, cases, block_mixing, "minilib.mmdit.block_mixing", rtol=1e-4, atol=1e-5,
         mistakes=[Mistake(separate_attention, "the two streams must attend jointly: concatenate their q, k and v "
                                               "along the sequence axis (dim=1) and run ONE attention over all "
                                               "L_c + L_x tokens."),
                   Mistake(swapped_split, "split the attention output in the order you concatenated: the first "
                                          "L_c rows belong to the context, the rest to x.")],
         error_hint="pre_attention returns ((q, k, v), state); concatenate along dim=1, call "
                    "attention(q, k, v, x_block.attn.num_heads), split with [L_c, L_x], and call post_attention(attn, "
                    "*state) for each stream, except a pre_only context block (return None for it).",
         hint="(q_c, k_c, v_c), s_c = context_block.pre_attention(context, c) and likewise for x; q = cat([q_c, "
              "q_x], dim=1) (k, v too); attn = attention(q, k, v, num_heads); split at L_c; post_attention each.")


# ---------------------------------------------------------------------------
# Chapter 8: few-shot generation
# ---------------------------------------------------------------------------


@_keeps_random_state
def check_leave_one_out(fn: Callable) -> None:
    """Check ``fn(sets)``: ``(B, S, ...)`` -> ``targets (B*S, ...)``, ``contexts (B*S, S-1, ...)``.

    ``targets[b*S + j] = sets[b, j]`` and ``contexts[b*S + j]`` is set b without
    image j, the others in their original order; like ``minilib.fewshot.leave_one_out``.
    """
    from .fewshot import leave_one_out

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


# ---------------------------------------------------------------------------
# Chapter 9: vector quantisation
# ---------------------------------------------------------------------------


@_keeps_random_state
def check_nearest_code(fn: Callable) -> None:
    """Check ``fn(z, codebook)``: the index of the nearest code (squared Euclidean distance) for every vector.

    ``z (..., C)``, ``codebook (V, C)`` -> int64 indices ``(...)``, like
    ``minilib.quantize.nearest_code``. Where two codes are equally near
    (up to rounding) either index is accepted.
    """
    from .quantize import nearest_code

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


# ---------------------------------------------------------------------------
# Chapter 10: VAR
# ---------------------------------------------------------------------------


@_keeps_random_state
def check_block_causal_mask(fn: Callable) -> None:
    """Check ``fn(patch_nums)``: VAR's additive attention mask, float ``(1, 1, L, L)``, ``L = sum(pn^2)``.

    Entry ``(i, j)`` is 0 when token j's scale is not later than token i's and
    ``-inf`` otherwise, like ``minilib.var.block_causal_mask``.
    """
    from .var import block_causal_mask, scale_levels

    def token_causal(patch_nums):
        L = sum(pn * pn for pn in patch_nums)
        return torch.full((L, L), -torch.inf).triu(1).view(1, 1, L, L)

    def strict(patch_nums):
        d = scale_levels(patch_nums)
        return torch.where(d[:, None] > d[None, :], 0.0, -torch.inf).view(1, 1, len(d), len(d))

    def transposed(patch_nums):
        return block_causal_mask(patch_nums).transpose(2, 3)

    def boolean(patch_nums):
        d = scale_levels(patch_nums)
        return (d[:, None] >= d[None, :]).view(1, 1, len(d), len(d))

    def square(patch_nums):
        return block_causal_mask(patch_nums)[0, 0]

    cases = [Case("patch_nums (1, 2, 3): L = 1 + 4 + 9 = 14", ((1, 2, 3),)),
             Case("patch_nums (1,): a single token", ((1,),)),
             Case("patch_nums (2, 2): two scales of the same size", ((2, 2),)),
             Case("VAR's (1, 2, 3, 4, 5, 6, 8, 10, 13, 16): L = 680", ((1, 2, 3, 4, 5, 6, 8, 10, 13, 16),))]
    _run(fn, cases, block_causal_mask, "minilib.var.block_causal_mask", rtol=0, atol=0,
         mistakes=[Mistake(token_causal, "the mask is causal over scales, not over tokens: a token sees every "
                                         "token of its own scale (attention within a scale is bidirectional)."),
                   Mistake(strict, "a token must see its own scale: allow level(j) <= level(i), not only <."),
                   Mistake(transposed, "rows are the queries i and columns the keys j: i may see j when "
                                       "level(j) <= level(i); yours lets coarse tokens see finer ones."),
                   Mistake(boolean, "return an additive float mask, 0 where attention is allowed and -inf where "
                                    "it is not (it is added to the attention logits), not a boolean one."),
                   Mistake(square, "return shape (1, 1, L, L), so the mask broadcasts over batch and heads.")],
         hint="levels = the scale index of every token (scale_levels), then torch.where(levels[:, None] >= "
              "levels[None, :], 0.0, -inf) reshaped to (1, 1, L, L).")


# ---------------------------------------------------------------------------
# Chapter 11: masked autoregression
# ---------------------------------------------------------------------------


@_keeps_random_state
def check_mask_schedule(fn: Callable) -> None:
    """Check ``fn(seq_len, num_iter)``: how many tokens stay masked after each of the K sampling steps.

    MaskGIT's cosine schedule as MAR uses it: after step k (0-based),
    ``floor(L cos(pi/2 (k+1)/K))``, clamped so that every step reveals at least
    one token and leaves at least one for later; the last entry is 0. Like
    ``minilib.mar.mask_schedule``; a list of K ints.
    """
    from .mar import mask_schedule

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


# ---------------------------------------------------------------------------
# Chapter 12: the diffusion loss
# ---------------------------------------------------------------------------


class _ToyHead(torch.nn.Module):
    """A diffusion head for the check: nearly the exact eps of N(0, I) data, plus a random MLP's share.

    ``forward(x, t, c)``: tokens ``(N, C)``, original timesteps ``(N,)``,
    conditions ``(N, z)`` -> eps and variance values ``(N, 2C)``. For data from
    N(0, I) the best eps is ``sqrt(1 - abar_t) x_t``; a random network alone
    would make the samples grow by ``1 / sqrt(abar)`` over the chain.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, seed: int):
        super().__init__()
        from .diffloss import SimpleMLPAdaLN

        torch.manual_seed(seed)
        self.net = SimpleMLPAdaLN(in_channels=2, model_channels=16, out_channels=4, z_channels=8, num_res_blocks=2)
        generator = _generator(seed)
        with torch.no_grad():
            for p in self.net.parameters():  # adaLN-Zero starts at zero: make every output depend on its input
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.eval()

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = self.net(x, t, c)
        abar = self.alphas_cumprod[t][:, None]
        eps = (1 - abar).sqrt() * x + 0.2 * out[:, :2]
        return torch.cat([eps, out[:, 2:].tanh()], dim=1)


def _random_head(seed: int):
    """A 10-step respaced process with the learned variance (DiT's linear schedule) and a ``_ToyHead``."""
    from .diffusion import GaussianDiffusion, beta_schedule

    process = GaussianDiffusion(beta_schedule("linear", 1000), learn_sigma=True)
    return process.respace(10), _ToyHead(process.alphas_cumprod, seed)


def _reference_ddpm_step(process, net, x_t, i, z, temperature, xi):
    t = torch.full((len(x_t),), i, dtype=torch.long)
    eps, var_values = process._model_output(net, x_t, t, dict(c=z))
    x0 = process.predict_x0_from_eps(x_t, t, eps)
    return process._ddpm_step(x_t, t, x0, xi if i > 0 else torch.zeros_like(x_t), var_values, temperature=temperature)


@_keeps_random_state
def check_ddpm_step(fn: Callable) -> None:
    """Check ``fn(process, net, x_t, i, z, temperature, xi)``: one DDPM step with the learned variance.

    The network is called as ``net(x_t, process.timestep_map[t], z)`` and returns
    eps and the variance values v (``2C`` channels); ``x0_hat`` from eps, the
    posterior mean, ``log Sigma = f log beta_i + (1 - f) log beta~_i`` with ``f =
    (v + 1) / 2``, and ``mean + temperature * sqrt(Sigma) * xi`` (no noise at
    ``i = 0``). Also checked over a whole chain against ``process.p_sample_loop``.
    """
    process, net = _random_head(110)

    def loop_with(step):
        def chain(process, net, x_t, i, z, temperature, xi):  # i: the number of steps, xi: the seed
            generator = _generator(xi)
            x = x_t
            for k in reversed(range(i)):
                noise = torch.randn(x.shape, generator=generator) if k > 0 else torch.zeros_like(x)
                x = step(process, net, x, k, z, temperature, noise)
            return x
        return chain

    def reference(process, net, x_t, i, z, temperature, xi):
        if isinstance(xi, int):  # the whole chain: the reference is minilib's sampler
            return process.p_sample_loop(net, tuple(x_t.shape), dict(c=z), noise=x_t, seed=xi, temperature=temperature)
        return _reference_ddpm_step(process, net, x_t, i, z, temperature, xi)

    def fixed_variance(process, net, x_t, i, z, temperature, xi):
        t = torch.full((len(x_t),), i, dtype=torch.long)
        eps, _ = process._model_output(net, x_t, t, dict(c=z))
        x0 = process.predict_x0_from_eps(x_t, t, eps)
        mean, variance = process.q_posterior_mean_variance(x0, x_t, t)
        return mean + temperature * variance.sqrt() * (xi if i > 0 else 0)

    def temperature_on_variance(process, net, x_t, i, z, temperature, xi):
        step = _reference_ddpm_step(process, net, x_t, i, z, 1.0, xi)
        mean = _reference_ddpm_step(process, net, x_t, i, z, 0.0, xi)
        return mean + math.sqrt(temperature) * (step - mean)

    def noise_at_zero(process, net, x_t, i, z, temperature, xi):  # the same formula at i = 0 too
        t = torch.full((len(x_t),), i, dtype=torch.long)
        mean = _reference_ddpm_step(process, net, x_t, i, z, 0.0, xi)
        _, var_values = process._model_output(net, x_t, t, dict(c=z))
        return mean + temperature * (0.5 * process.learned_range_log_variance(var_values, t)).exp() * xi

    z = _randn(5, 8, seed=111)
    x = _randn(5, 2, seed=112)
    xi = _randn(5, 2, seed=113)
    student = fn

    def student_or_chain(process, net, x_t, i, z, temperature, xi):
        if isinstance(xi, int):
            return loop_with(student)(process, net, x_t, i, z, temperature, xi)
        return student(process, net, x_t, i, z, temperature, xi)

    student_or_chain.__name__ = _name(fn)

    def mistake(step):
        def either(process, net, x_t, i, z, temperature, xi):
            if isinstance(xi, int):
                return loop_with(step)(process, net, x_t, i, z, temperature, xi)
            return step(process, net, x_t, i, z, temperature, xi)
        return either

    cases = [Case("i = 5 of a 10-step respaced process (timestep 555), temperature 1", (process, net, x, 5, z, 1.0, xi)),
             Case("i = 9, the first step (timestep 999), temperature 0.7", (process, net, x, 9, z, 0.7, xi)),
             Case("i = 3, temperature 0 (no noise: the posterior mean)", (process, net, x, 3, z, 0.0, xi)),
             Case("i = 0, the last step: no noise is added", (process, net, x, 0, z, 1.0, xi)),
             Case("the whole chain of 10 steps from a fixed start, noise from torch.Generator().manual_seed(0), "
                  "temperature 0.7, against process.p_sample_loop(net, ..., seed=0, temperature=0.7)",
                  (process, net, x, process.num_timesteps, z, 0.7, 0))]
    _run(student_or_chain, cases, reference, "GaussianDiffusion's DDPM step (p_sample_loop)", rtol=1e-4, atol=1e-4,
         mistakes=[Mistake(mistake(_unmapped_step), "call the network with the original timestep "
                                                         "process.timestep_map[i], not the respaced index i."),
                   Mistake(mistake(fixed_variance), "use the learned variance: v = the last C channels of the "
                                                    "output, f = (v + 1) / 2, log Sigma = f log beta_i + (1 - f) "
                                                    "log beta~_i (process.posterior_log_variance_clipped)."),
                   Mistake(mistake(temperature_on_variance), "the temperature multiplies the standard deviation: "
                                                             "mean + temperature * sigma * xi."),
                   Mistake(mistake(noise_at_zero), "add no noise at the last step, i = 0: return the posterior "
                                                   "mean there.")],
         error_hint="net(x_t, t, z) takes t of shape (N,): torch.full((len(x_t),), ...) of the mapped timestep.",
         hint="t = full((N,), i); out = net(x_t, process.timestep_map[t], z); eps, v = out[:, :C], out[:, C:]; "
              "x0_hat = (x_t - sqrt(1 - abar_i) eps) / sqrt(abar_i); mean = posterior_mean_coef_x0[i] x0_hat + "
              "posterior_mean_coef_xt[i] x_t; return mean + temperature * exp(log Sigma / 2) * xi for i > 0.")


def _unmapped_step(process, net, x_t, i, z, temperature, xi):
    """The DDPM step, wrongly calling the network with the respaced index i."""
    def told_i(x, t, c):
        return net(x, torch.full_like(t, i), c)
    return _reference_ddpm_step(process, told_i, x_t, i, z, temperature, xi)


# ---------------------------------------------------------------------------
# Chapter 13: the real models
# ---------------------------------------------------------------------------


@_keeps_random_state
def check_compare_state_dicts(fn: Callable) -> None:
    """Check ``fn(expected, found)``: what differs between a model's state dict and a checkpoint's.

    Returns ``{"missing": [...], "unexpected": [...], "shape_mismatch": [(key,
    model shape, checkpoint shape), ...]}``, like
    ``minilib.training.compare_state_dicts``; the order inside each list does
    not matter, shapes may be ``torch.Size`` or tuples.
    """
    from .training import compare_state_dicts

    torch.manual_seed(120)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def edited(drop=(), add=None, reshape=None):
        found = {k: v.clone() for k, v in state.items() if k not in drop}
        found.update(add or {})
        for key, shape in (reshape or {}).items():
            found[key] = torch.zeros(shape)
        return found

    def normalise(report):
        if not isinstance(report, dict):
            return report
        out = dict(report)
        for key in ("missing", "unexpected"):
            if isinstance(out.get(key), (list, tuple, set)):
                out[key] = sorted(out[key])
        if isinstance(out.get("shape_mismatch"), (list, tuple, set)):
            try:
                out["shape_mismatch"] = sorted((k, tuple(a), tuple(b)) for k, a, b in out["shape_mismatch"])
            except (TypeError, ValueError):
                pass
        return out

    def swapped(expected, found):
        report = compare_state_dicts(expected, found)
        return dict(report, missing=report["unexpected"], unexpected=report["missing"])

    def shapes_swapped(expected, found):
        report = compare_state_dicts(expected, found)
        return dict(report, shape_mismatch=[(k, b, a) for k, a, b in report["shape_mismatch"]])

    def mismatch_as_missing(expected, found):
        report = compare_state_dicts(expected, found)
        keys = [k for k, _, _ in report["shape_mismatch"]]
        return dict(report, missing=sorted(report["missing"] + keys), shape_mismatch=[])

    cases = [Case("a checkpoint that fits exactly", (state, edited())),
             Case("a checkpoint without '2.bias' and with an extra 'head.weight'",
                  (state, edited(drop=("2.bias",), add={"head.weight": torch.zeros(3)}))),
             Case("'0.weight' saved as (8, 5) instead of (8, 4), '1.running_mean' as (9,)",
                  (state, edited(reshape={"0.weight": (8, 5), "1.running_mean": (9,)}))),
             Case("every key with a 'module.' prefix (a DataParallel checkpoint)",
                  (state, {f"module.{k}": v for k, v in state.items()})),
             Case("an empty checkpoint", (state, {})),
             Case("all three problems at once",
                  (state, edited(drop=("1.weight", "1.num_batches_tracked"), add={"extra": torch.zeros(1)},
                                 reshape={"2.weight": (2, 9)})))]
    _run(fn, cases, compare_state_dicts, "minilib.training.compare_state_dicts", normalise=normalise,
         mistakes=[Mistake(swapped, "'missing' are the keys the model has and the checkpoint lacks; 'unexpected' "
                                    "are the checkpoint's keys that the model lacks. Yours are swapped."),
                   Mistake(shapes_swapped, "each shape mismatch is (key, model shape, checkpoint shape): the "
                                           "model's (expected) shape first."),
                   Mistake(mismatch_as_missing, "a key that both have but with different shapes is a shape "
                                                "mismatch, not a missing key.")],
         error_hint="expected and found are dicts from key to tensor; compare their key sets (expected.keys() - "
                    "found.keys(), ...) and, for the common keys, the tensors' .shape.",
         hint="return {'missing': expected's keys not in found, 'unexpected': found's keys not in expected, "
              "'shape_mismatch': [(key, tuple(expected[key].shape), tuple(found[key].shape)) for the common "
              "keys whose shapes differ]}.")
