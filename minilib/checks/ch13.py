"""Chapter 13, the real models: comparing state dicts."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _keeps_random_state, _run

__all__ = ['check_compare_state_dicts']


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
