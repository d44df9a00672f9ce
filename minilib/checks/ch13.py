"""Chapter 13, the real models: comparing state dicts; counting a DiT's parameters from its configuration."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, Part, _keeps_random_state, _run

__all__ = ["check_compare_state_dicts", "check_dit_parameter_count"]


@_keeps_random_state
def check_compare_state_dicts(fn: Callable) -> None:
    """Check ``fn(expected, found)``: what differs between a model's state dict and a checkpoint's.

    Returns ``{"missing": [...], "unexpected": [...], "shape_mismatch": [(key,
    model shape, checkpoint shape), ...]}``, like
    ``minilib.training.compare_state_dicts``; the order inside each list does
    not matter, shapes may be ``torch.Size`` or tuples.
    """
    from ..training import compare_state_dicts

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
    hidden = [Case("a checkpoint with only the extra keys 'a' and 'b'",
                   (state, {"a": torch.zeros(1), "b": torch.zeros(2)})),
              Case("every shape wrong: each tensor saved with one more entry",
                   (state, {k: torch.zeros(v.numel() + 1) for k, v in state.items()}))]
    _run(fn, cases, compare_state_dicts, "minilib.training.compare_state_dicts", normalise=normalise, hidden=hidden,
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


def _dit_parameters(input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                    mlp_ratio: float, num_classes: int, learn_sigma: bool) -> int:
    """The number of parameters of ``minilib.dit.DiT`` with this configuration, counted on the meta device."""
    from ..dit import DiT

    with torch.device("meta"):
        model = DiT(input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
                    depth=depth, num_heads=1, mlp_ratio=mlp_ratio, num_classes=num_classes, learn_sigma=learn_sigma)
    return sum(p.numel() for p in model.parameters())


def _dit_formula(input_size, patch_size, in_channels, hidden_size, depth, mlp_ratio, num_classes, learn_sigma, *,
                 null_class=True, adaln=6, pos_embed=True, final_adaln=2, biases=True, sigma=True, frequency=256):
    """The count by hand, with switches for the usual slips."""
    D, p, C, M = hidden_size, patch_size, in_channels, int(hidden_size * mlp_ratio)
    b = 1 if biases else 0
    tokens = (input_size // patch_size) ** 2
    out = C * (2 if learn_sigma and sigma else 1)
    block = (3 * D * D + 3 * D * b) + (D * D + D * b) + (M * D + M * b) + (D * M + D * b) + (adaln * D * D + adaln * D * b)
    return ((tokens * D if pos_embed else 0) + (D * C * p * p + D * b) + (frequency * D + D * b + D * D + D * b)
            + (num_classes + (1 if null_class else 0)) * D + depth * block
            + (p * p * out * D + p * p * out * b) + (final_adaln * D * D + final_adaln * D * b))


@_keeps_random_state
def check_dit_parameter_count(fn: Callable) -> None:
    """Check ``fn(input_size, patch_size, in_channels, hidden_size, depth, mlp_ratio, num_classes, learn_sigma)``:
    the number of parameters of a DiT, derived by hand.

    Every parameter counts, the fixed sin-cos ``pos_embed`` too (as the official
    code's count of DiT-XL/2, 675,129,632, does); the label table has one extra
    row for the null class of classifier-free guidance; the timestep MLP reads
    256 frequencies. Compared with the count of ``minilib.dit.DiT`` (as built on the meta device).
    Returns an int.
    """
    def slip(**kwargs):
        def wrong(*args):
            return _dit_formula(*args, **kwargs)
        return wrong

    def compare(got, expected, case):
        if isinstance(got, bool) or not isinstance(got, int) and not (isinstance(got, float) and got.is_integer()) \
                and not (isinstance(got, torch.Tensor) and got.numel() == 1 and not got.is_floating_point()):
            return f"expected an int, got {got!r}"
        got = int(got)
        if got == expected:
            return None
        return f"expected {expected:,} parameters, got {got:,} (a difference of {got - expected:+,})"

    parts = [Part("the blocks and the embedders", [
                 Case("DiT-S/2 on 32x32 latents: (32, 2, 4, 384, 12, 4.0, 1000, True)",
                      (32, 2, 4, 384, 12, 4.0, 1000, True)),
                 Case("DiT-XL/2: (32, 2, 4, 1152, 28, 4.0, 1000, True), 675,129,632 in the official count",
                      (32, 2, 4, 1152, 28, 4.0, 1000, True))], points=2),
             Part("other configurations", [
                 Case("a small pixel DiT: (16, 4, 3, 64, 3, 2.0, 10, False)", (16, 4, 3, 64, 3, 2.0, 10, False)),
                 Case("one block, one token (input_size = patch_size): (2, 2, 1, 32, 1, 4.0, 5, True)",
                      (2, 2, 1, 32, 1, 4.0, 5, True)),
                 Case("mlp_ratio 2.5: (8, 2, 2, 40, 2, 2.5, 3, True)", (8, 2, 2, 40, 2, 2.5, 3, True))], points=1),
             Part("hidden inputs", [
                 Case("DiT-B/4: (32, 4, 4, 768, 12, 4.0, 1000, True)", (32, 4, 4, 768, 12, 4.0, 1000, True)),
                 Case("(28, 7, 1, 48, 2, 3.0, 10, False)", (28, 7, 1, 48, 2, 3.0, 10, False))],
                  points=1, hidden=True)]
    # the reference is the hand count, which tests/test_checks_part_ii_iv.py pins to DiT built on meta for every
    # configuration here (building DiT-XL/2 on meta costs seconds the first time)
    _run(fn, parts, _dit_formula, "minilib.dit.DiT's parameter count", compare=compare,
         mistakes=[Mistake(slip(null_class=False), "the label table has num_classes + 1 rows: the extra one is the "
                                                   "null class that classifier-free guidance uses."),
                   Mistake(slip(pos_embed=False), "count the fixed sin-cos pos_embed (tokens x hidden_size) too: it "
                                                  "is an nn.Parameter (frozen), and the official count includes it."),
                   Mistake(slip(adaln=4), "each block's adaLN-Zero layer maps D to 6D (shift, scale and gate for "
                                          "attention and for the MLP): 6 D^2 + 6 D."),
                   Mistake(slip(final_adaln=6), "the final layer's adaLN has only shift and scale: 2 D^2 + 2 D."),
                   Mistake(slip(final_adaln=0), "the final layer has its own adaLN (shift and scale): 2 D^2 + 2 D."),
                   Mistake(slip(biases=False), "every nn.Linear and the patch embedding's Conv2d have a bias too."),
                   Mistake(slip(sigma=False), "with learn_sigma the model predicts eps and the variance: 2 x "
                                              "in_channels output channels per pixel."),
                   Mistake(slip(frequency=0), "the timestep embedder is an MLP from 256 sinusoidal frequencies to D, "
                                              "then D to D: 256 D + D + D^2 + D.")],
         error_hint="all arguments are numbers; return an int.",
         hint="D = hidden_size, M = int(D mlp_ratio), T = (input_size / patch_size)^2, out = p^2 C (x2 with "
              "learn_sigma); pos T D + patch (C p^2 D + D) + time (256 D + D + D^2 + D) + labels (num_classes + 1) D "
              "+ depth (qkv 3D^2+3D, proj D^2+D, fc1 MD+M, fc2 MD+D, adaLN 6D^2+6D) + final (out D + out) + 2D^2 + 2D.")
