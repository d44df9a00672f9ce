"""Checks of arguments and inputs, one helper for each kind, used across minilib.

``check_arguments`` checks the settings of constructors and samplers (sizes,
ratios, probabilities) by rules; ``check_float_input``, ``check_timesteps`` and
``check_same_batch`` check the tensors of forward passes. Every failure is a
``TypeError`` or ``ValueError`` that names the argument and what was expected.

Range checks that do not stall a GPU.

Checking that integer inputs (labels, timesteps) lie in range needs their
values. On the CPU that is free, and a bad value gets a clear ``ValueError``
naming the range and what was found. On a GPU, reading the values back makes
the host wait for the device to finish its queue; inside a sampling loop that
would happen at every step. There the check is queued on the device instead
(``torch._assert_async``) and fails, a little later, with the same message.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers

import torch


def check_range(values: torch.Tensor, low: float, high: float, what: str) -> None:
    """Raise unless every entry of ``values`` (ints or floats) lies in ``[low, high]`` (inclusive; NaN fails)."""
    if values.numel() == 0:
        return
    message = f"{what} must lie in [{low}, {high}]"
    inside = ((values >= low) & (values <= high)).all()
    if values.device.type == "cpu":
        if not inside:
            raise ValueError(f"{message}, got min {values.min().item()} max {values.max().item()}")
    else:
        torch._assert_async(inside, message)


# --- arguments ---------------------------------------------------------------------------
#
# One declarative check for the settings of constructors and samplers:
#
#     @check_arguments(hidden_size=POSITIVE_INT, mlp_ratio=POSITIVE, class_dropout_prob=PROBABILITY)
#     def __init__(self, hidden_size, mlp_ratio=4.0, class_dropout_prob=0.1): ...
#
# A bad value raises a TypeError (wrong type) or a ValueError (wrong value) that names the
# argument, its function and what was expected, before any tensor is made. NaN fails every
# numeric rule: ``nan < 0`` is False, so the rules test for what is allowed, not for what is not.


class Rule:
    """The allowed values of one argument, for ``check_arguments``: a range, and whether it must be an int.

    ``rule(where, name, value)`` calls ``check_number``, so the messages are the same
    as for arguments checked by hand.
    """

    def __init__(self, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False, integer: bool = False, allow_none: bool = False):
        self.bounds = dict(low=low, high=high, low_open=low_open, high_open=high_open, integer=integer,
                           allow_none=allow_none)

    def __call__(self, where: str, name: str, value) -> None:
        check_number(value, f"{where}: {name}" if where else name, **self.bounds)

    def or_none(self) -> "Rule":
        return Rule(**{**self.bounds, "allow_none": True})


POSITIVE_INT = Rule(1, integer=True)
NON_NEGATIVE_INT = Rule(0, integer=True)
POSITIVE = Rule(0, low_open=True)
NON_NEGATIVE = Rule(0)
FINITE = Rule()
PROBABILITY = Rule(0, 1, high_open=True)
UNIT_INTERVAL = Rule(0, 1)


def check_arguments(**rules: Rule):
    """Decorator: check the named arguments of a function (or ``__init__``) before it runs.

    Only the arguments named here are checked, with their defaults filled in; the
    function itself is unchanged. Relations between arguments (one size dividing
    another) are checked in the function, with ``check_divisible``.
    """
    def decorate(function):
        signature = inspect.signature(function)
        unknown = set(rules) - set(signature.parameters)
        if unknown:
            raise TypeError(f"check_arguments: {function.__qualname__} has no argument(s) {sorted(unknown)}")
        where = function.__qualname__.replace(".__init__", "")

        @functools.wraps(function)
        def checked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            for name, rule in rules.items():
                rule(where, name, bound.arguments[name])
            return function(*args, **kwargs)

        return checked

    return decorate


def check_divisible(where: str, name: str, value: int, by_name: str, by: int) -> None:
    """Raise a ValueError naming both sizes unless ``by`` divides ``value``."""
    if value % by:
        raise ValueError(f"{where}: {name} ({value}) must be divisible by {by_name} ({by})")


# --- tensors ----------------------------------------------------------------------------


def check_float_input(where: str, name: str, x, ndim: int | None = None, layout: str = "",
                      like: torch.Tensor | None = None) -> None:
    """A floating-point tensor of rank ``ndim`` (``layout`` names its axes, e.g. "(B, C, H, W)").

    With ``like`` (one of the model's parameters), its dtype must also match the model's,
    unless autocast is on for its device (then PyTorch casts for each operation).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        hint = " (uint8 images: convert with minilib.datasets.uint8_to_unit)" if x.dtype == torch.uint8 else ""
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got dtype {x.dtype}{hint}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{where}: {name} must have {ndim} dimensions {layout}, got shape {tuple(x.shape)}")
    if like is not None and x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{where}: {name} has dtype {x.dtype} but the model's weights are {like.dtype}; "
                        f"convert it with {name}.to({like.dtype}) (or run under torch.autocast)")


def check_same_batch(where: str, **tensors: torch.Tensor) -> None:
    """All tensors have the same batch size (first dimension)."""
    sizes = {name: len(t) for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.ndim}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(f"{where}: {', '.join(sizes)} must have the same batch size, got {listed}")


def check_finite(where: str, name: str, x: torch.Tensor) -> None:
    """No NaN or infinity in ``x`` (checked on the CPU only: on a GPU it would wait for the device)."""
    if x.device.type == "cpu" and not torch.isfinite(x).all():
        raise ValueError(f"{where}: {name} contains NaN or infinite values")



def check_number(value, name: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, allow_none: bool = False, *, high_open: bool = False,
                 integer: bool = False) -> None:
    """Raise unless ``value`` is a finite real number (an int, with ``integer``) in the given range.

    Args:
        value: the argument to check.
        name: its name, for the message (e.g. ``"grad_clip"``, or ``"DiT: depth"``).
        low, high: bounds, inclusive unless ``low_open`` / ``high_open``.
        allow_none: accept ``None`` (e.g. "no clipping").
        integer: require an int (``numbers.Integral``; a float such as 2.0 is refused).

    NaN fails every comparison, so ``nan < 0`` is False and a check written as
    ``if value < 0: raise`` lets it through. Here finiteness is tested first.

    Raises:
        TypeError: not a real number (a string, a tensor, a bool), or not an int with ``integer``.
        ValueError: NaN, infinite, or out of range; the message names ``name``.
    """
    if value is None and allow_none:
        return
    none = " or None" if allow_none else ""
    kind = "an int" if integer else "a number"
    wanted_type = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, wanted_type):
        raise TypeError(f"{name} must be {kind}{none}, got {value!r} ({type(value).__name__})")
    finite = "" if integer else "finite "
    if integer and low == 1 and high is None and not low_open:
        wanted = "a positive int"
    elif low is None and high is None:
        wanted = f"a {finite}number"
    elif high is None:
        wanted = f"{'an int' if integer else f'a {finite}number'} {'>' if low_open else '>='} {low:g}"
    elif low is None:
        wanted = f"{'an int' if integer else f'a {finite}number'} {'<' if high_open else '<='} {high:g}"
    else:
        wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        raise ValueError(f"{name} must be {wanted}{none}, got {value!r}")


def check_timesteps(where: str, name: str, t) -> None:
    """A 1-D tensor of times or timesteps, of any real dtype, without NaN or infinity (on the CPU)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a 1-D torch.Tensor of times, got {type(t).__name__}")
    if t.ndim != 1:
        raise ValueError(f"{where}: {name} must be 1-D (B,), got shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{where}: {name} must hold real numbers, got dtype {t.dtype}")
    if t.is_floating_point():
        check_finite(where, name, t)
