"""Chapter 9, vector quantisation: the nearest code, the straight-through quantiser, rescuing a codebook."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .runner import Case, Mistake, Part, _describe, _generator, _keeps_random_state, _randn, _run

__all__ = ["check_nearest_code", "check_straight_through", "check_codebook_rescue"]


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
    hidden = [Case("z (3, 7, 2) against 64 codes of a 2-D grid", (_randn(3, 7, 2, seed=106) * 2,
                                                                    torch.cartesian_prod(torch.linspace(-2, 2, 8),
                                                                                         torch.linspace(-2, 2, 8)))),
              Case("z (40, 16) in float64, codebook (300, 16) in float64",
                   (_randn(40, 16, seed=107).double(), _randn(300, 16, seed=108).double()))]
    _run(fn, cases, nearest_code, "minilib.quantize.nearest_code", compare=compare, hidden=hidden,
         mistakes=[Mistake(argmax_distance, "the nearest code has the smallest distance: argmin, not argmax."),
                   Mistake(dot_product, "the largest dot product z . e_k is the nearest code only when all codes "
                                        "have the same norm: use ||z||^2 + ||e_k||^2 - 2 z . e_k (or "
                                        "torch.cdist)."),
                   Mistake(flat, "return one index per vector in z's own shape without the last axis: "
                                 ".reshape(z.shape[:-1]).")],
         hint="flatten z to (N, C), compute the (N, V) squared distances ||z||^2 + ||e||^2 - 2 z e^T, take "
              "argmin over V and reshape to z.shape[:-1].")


def _quantise_reference(z: torch.Tensor, codebook: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``VectorQuantizer.forward``'s arithmetic: ``(z_q, codebook loss + beta * commitment loss)``."""
    import torch.nn.functional as F

    from ..quantize import nearest_code

    e = F.embedding(nearest_code(z, codebook), codebook)
    return z + (e - z).detach(), F.mse_loss(e, z.detach()) + beta * F.mse_loss(z, e.detach())


def _graded_quantiser(quantise: Callable) -> Callable:
    """``quantise(z, codebook, beta) -> (z_q, loss)`` made into ``(z, codebook, beta, weights, what)``.

    ``what = "values"``: the detached ``(z_q, loss)``; ``what = "gradients"``: the
    gradients of ``sum(weights * z_q) + loss`` with respect to ``z`` and to the
    codebook (zeros where none arrives).
    """
    def graded(z, codebook, beta, weights, what):
        with torch.enable_grad():
            z = z.clone().requires_grad_(True)
            codebook = codebook.clone().requires_grad_(True)
            out = quantise(z, codebook, beta)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                return out
            z_q, loss = out
            if what == "values":
                return z_q.detach(), loss.detach()
            total = (z_q * weights).sum() + loss
            grads = torch.autograd.grad(total, [z, codebook], allow_unused=True)
            return tuple(torch.zeros_like(x) if g is None else g for x, g in zip((z, codebook), grads))
    graded.__name__ = getattr(quantise, "__name__", "quantise")
    return graded


@_keeps_random_state
def check_straight_through(fn: Callable) -> None:
    """Check ``fn(z, codebook, beta) -> (z_q, loss)``: the vector quantiser's forward pass, values and gradients.

    ``z (..., C)``, ``codebook (V, C)``: ``z_q`` has the value of the nearest
    code and the straight-through gradient ``d z_q / d z = I`` (none for the
    codebook); ``loss = mse(e, sg[z]) + beta * mse(z, sg[e])`` (means over all
    entries), whose first term trains only the codes and the second only the
    encoder. Checked by value and by the gradients of ``sum(w * z_q) + loss``
    with respect to ``z`` and to the codebook.
    """
    import torch.nn.functional as F

    from ..quantize import nearest_code

    def code(z, codebook):
        return F.embedding(nearest_code(z.detach(), codebook.detach()), codebook)

    def no_straight_through(z, codebook, beta):
        e = code(z, codebook)
        return e, F.mse_loss(e, z.detach()) + beta * F.mse_loss(z, e.detach())

    def no_stop_gradient(z, codebook, beta):
        e = code(z, codebook)
        return z + (e - z).detach(), (1 + beta) * F.mse_loss(z, e)

    def beta_on_codebook(z, codebook, beta):
        e = code(z, codebook)
        return z + (e - z).detach(), beta * F.mse_loss(e, z.detach()) + F.mse_loss(z, e.detach())

    def summed(z, codebook, beta):
        e = code(z, codebook)
        return z + (e - z).detach(), (e - z.detach()).square().sum() + beta * (z - e.detach()).square().sum()

    def wrong_sign(z, codebook, beta):
        e = code(z, codebook)
        return z + (z - e).detach(), F.mse_loss(e, z.detach()) + beta * F.mse_loss(z, e.detach())

    codebook = _randn(12, 3, seed=480)
    z = _randn(2, 5, 3, seed=481)
    w = _randn(2, 5, 3, seed=482)
    on_codes = codebook[torch.tensor([3, 7, 7, 0])]
    hidden_codebook = _randn(6, 4, seed=485) * torch.linspace(0.5, 2.0, 6)[:, None]

    def both(label, z, codebook, beta, w):
        return [Case(f"{label}: z_q and the loss", (z, codebook, beta, w, "values")),
                Case(f"{label}: the gradients", (z, codebook, beta, w, "gradients"))]

    parts = [Part("the values of z_q and the loss", [
                 Case("z (2, 5, 3), codebook (12, 3), beta 0.25", (z, codebook, 0.25, w, "values")),
                 Case("z (4, 3) equal to codes: z_q = z and the loss is 0",
                      (on_codes, codebook, 0.25, torch.ones(4, 3), "values"))], points=1),
             Part("the gradients (straight-through, stop-gradients, beta)", [
                 Case("z (2, 5, 3), codebook (12, 3), beta 0.25: d/dz and d/dcodebook of sum(w * z_q) + loss",
                      (z, codebook, 0.25, w, "gradients")),
                 Case("the same with beta 1.0", (z, codebook, 1.0, w, "gradients")),
                 Case("z (7, 3), beta 0: only the codebook loss", (_randn(7, 3, seed=483), codebook, 0.0,
                                                                    _randn(7, 3, seed=484), "gradients"))], points=2),
             Part("hidden inputs", both("z (3, 4, 4), a codebook (6, 4) of different norms, beta 0.5",
                                        _randn(3, 4, 4, seed=486), hidden_codebook, 0.5, _randn(3, 4, 4, seed=487))
                  + both("z (1, 3), one code, beta 2", _randn(1, 3, seed=488), _randn(1, 3, seed=489), 2.0,
                         torch.ones(1, 3)), points=1, hidden=True)]
    _run(_graded_quantiser(fn), parts, _graded_quantiser(_quantise_reference), "VectorQuantizer.forward's z_q and loss",
         rtol=1e-4, atol=1e-6,
         mistakes=[Mistake(_graded_quantiser(no_straight_through),
                           "z_q = e (and z + (e - z) without .detach(), which is the same) has the right value but "
                           "no gradient path to z: the decoder's gradient goes to the codebook, and the encoder "
                           "would learn only from the commitment loss. Use the straight-through estimator z_q = z + "
                           "(e - z).detach()."),
                   Mistake(_graded_quantiser(no_stop_gradient),
                           "the two losses have the same value but different stop-gradients: mse(e, z.detach()) "
                           "trains the codes, beta * mse(z, e.detach()) trains the encoder."),
                   Mistake(_graded_quantiser(beta_on_codebook),
                           "beta weighs the commitment loss (the encoder's term, mse(z, e.detach())), not the "
                           "codebook loss."),
                   Mistake(_graded_quantiser(summed),
                           "use means over all entries (F.mse_loss), not sums, as VQ-VAE and minilib do."),
                   Mistake(_graded_quantiser(wrong_sign),
                           "z + (e - z).detach(), not z + (z - e).detach(): the value of z_q must be the code e.")],
         error_hint="return a tuple (z_q, loss): z_q shaped like z, loss a 0-d tensor.",
         hint="k = nearest_code(z, codebook); e = codebook[k]; loss = mse(e, z.detach()) + beta * mse(z, "
              "e.detach()); z_q = z + (e - z).detach().")


_RESCUE_STEPS, _RESCUE_CODES, _RESCUE_TARGETS = 60, 16, dict(perplexity=14.0, error=0.07)
_RESCUE_OPTIONS = {"dead_code_threshold", "kmeans_init", "lr"}


def _rescue_toy(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring of section 9.1 (2000 points, radius 1.5, noise 0.15) and 16 codes bunched far away at (3, 3)."""
    generator = _generator(seed)
    angles = 2 * math.pi * torch.rand(2000, generator=generator)
    data = torch.stack([angles.cos(), angles.sin()], 1) * 1.5 + 0.15 * torch.randn(2000, 2, generator=generator)
    codes = torch.randn(_RESCUE_CODES, 2, generator=generator) * 0.05 + torch.tensor([3.0, 3.0])
    return data, codes


def rescue_codebook(options: dict, seed: int = 0) -> dict:
    """Fit 16 codes to the ring with the codebook loss for 60 Adam steps (batches of 256) with ``options``.

    ``options`` may set ``dead_code_threshold`` (float >= 0, default 0),
    ``kmeans_init`` (bool, default False) and ``lr`` (float in (0, 0.2], default
    0.05); anything else is an error. Returns ``{"perplexity": ..., "error": ...}``
    of all 2000 points after training (the error is the mean squared distance to
    the nearest code). Deterministic for a given seed.
    """
    from ..quantize import VectorQuantizer, nearest_code, perplexity

    if not isinstance(options, dict):
        raise ValueError(f"return a dict of options, got {_describe(options)}")
    unknown = set(options) - _RESCUE_OPTIONS
    if unknown:
        raise ValueError(f"only {sorted(_RESCUE_OPTIONS)} may be changed, got {sorted(unknown)}")
    threshold = float(options.get("dead_code_threshold", 0.0))
    lr = float(options.get("lr", 0.05))
    if threshold < 0 or not 0 < lr <= 0.2:
        raise ValueError(f"dead_code_threshold must be >= 0 and lr in (0, 0.2], got {threshold} and {lr}")
    data, codes = _rescue_toy(seed)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        vq = VectorQuantizer(_RESCUE_CODES, 2, dead_code_threshold=threshold)
        with torch.no_grad():
            vq.embedding.weight.copy_(codes)
        if options.get("kmeans_init", False):
            vq.kmeans_init_(data, generator=_generator(seed))
        optimizer = torch.optim.Adam(vq.parameters(), lr=lr)
        batches = _generator(seed + 1)
        for _ in range(_RESCUE_STEPS):
            out = vq(data[torch.randint(len(data), (256,), generator=batches)])
            optimizer.zero_grad()
            out.codebook_loss.backward()
            optimizer.step()
    with torch.no_grad():
        codebook = vq.codebook()
        indices = nearest_code(data, codebook)
        return dict(perplexity=float(perplexity(indices, _RESCUE_CODES)),
                    error=float((data - codebook[indices]).square().sum(1).mean()))


@_keeps_random_state
def check_codebook_rescue(fn: Callable) -> None:
    """Check ``fn() -> options``: an experiment with a target, rescuing a collapsed codebook.

    16 codes start bunched at (3, 3), far from the ring of section 9.1, and are
    fitted with the codebook loss for 60 steps (:func:`rescue_codebook`). With
    the default options one code wins every point (perplexity 1). The options
    ``fn()`` returns must reach a perplexity of at least 14 of the 16 codes
    (2 points) and a mean squared quantisation error of at most 0.07 (1 point)
    on the ring; the hidden part repeats both on a ring drawn with another seed.
    """
    runs: dict = {}

    def measured(seed, metric, recipe=fn):
        key = (id(recipe), seed)
        if key not in runs:
            runs[key] = rescue_codebook(recipe(), seed)
        return runs[key][metric]

    def student(seed, metric):
        return measured(seed, metric)

    student.__name__ = getattr(fn, "__name__", "recipe")

    def target(seed, metric):
        return _RESCUE_TARGETS[metric]

    def compare(got, expected, case):
        metric = case.args[1]
        reached = got >= expected if metric == "perplexity" else got <= expected
        if reached:
            return None
        sign = ">=" if metric == "perplexity" else "<="
        return f"the {metric} after training is {got:.4g}; the target is {sign} {expected:g}"

    def default(seed, metric):
        return measured(seed, metric, recipe=dict)

    def faster(seed, metric):
        return measured(seed, metric, recipe=lambda: dict(lr=0.2))

    parts = [Part("perplexity >= 14 of 16 codes", [Case("the ring, seed 0: perplexity", (0, "perplexity"))], points=2),
             Part("quantisation error <= 0.07", [Case("the ring, seed 0: mean squared error", (0, "error"))],
                  points=1),
             Part("hidden inputs", [Case("another ring: perplexity", (5, "perplexity")),
                                    Case("another ring: mean squared error", (5, "error"))], points=1, hidden=True)]
    _run(student, parts, target, "the targets (perplexity >= 14, error <= 0.07)", compare=compare,
         mistakes=[Mistake(default, "with the default options all codes start far from the data, one code wins "
                                    "every point and the others never receive a gradient (dead codes). Use a "
                                    "remedy of section 9.4: restart dead codes (dead_code_threshold > 0) or "
                                    "initialise the codes by k-means (kmeans_init=True)."),
                   Mistake(faster, "a larger learning rate only moves the codes that already win points; the dead "
                                   "codes get no gradient at any learning rate.")],
         error_hint="return a dict such as {'dead_code_threshold': ..., 'kmeans_init': ..., 'lr': ...}; other keys "
                    "are not allowed.",
         hint="codes that never win a point never move: restart them on data points (dead_code_threshold) or "
              "start them on the data (kmeans_init).")
