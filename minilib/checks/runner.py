"""The machinery every check shares: inputs, comparison, hints, parts, hidden inputs and grading.

A check is a function ``check_x(fn, *, hidden=False)`` decorated with
:func:`keeps_random_state` whose body calls :func:`run_check` once::

    @keeps_random_state
    def check_double(fn):
        cases = [Case("x = 3", (3,)), Case("x = -1.5", (-1.5,))]
        run_check(fn, cases, lambda x: 2 * x, "twice x",
                  mistakes=[Mistake(lambda x: x + 2, "double x, do not add 2.")],
                  hidden=[Case("x = 0", (0,))])

``run_check`` calls the student's ``fn`` and the ``reference`` on every
:class:`Case`, compares the answers (tensors, tuples, lists, dicts, numbers),
and at the first difference explains it: the input, what was expected and
what came back, and the hint of the first :class:`Mistake` whose answer is the
student's.

**Parts and points.** Instead of a list of cases a check may pass a list of
:class:`Part`: named groups of cases, each worth some points (partial
credit). Each part stops at its first wrong input; the others still run. A
part with ``hidden=True`` runs only when the check is called with
``hidden=True`` (the autograder does): hidden inputs beside the visible ones.
The ``hidden=`` argument of ``run_check`` adds one such part, "hidden
inputs", to a plain list of cases.

**Two modes.** In a notebook a check prints one line starting with ``✓`` when
every part passed and otherwise raises an :class:`ExerciseError`, whose
message lists the parts when there are several. Under :func:`grade` (the
autograder) nothing is printed or raised: the check's :class:`Report` says
which parts passed and the score.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


class ExerciseError(AssertionError):
    """An assignment's function gave a wrong answer (or none); the message says what is wrong."""


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


@dataclass
class Part:
    """A named group of cases worth ``points``; a ``hidden`` part runs only in ``check(fn, hidden=True)``."""

    name: str
    cases: Sequence[Case]
    points: float = 1.0
    hidden: bool = False

    def __post_init__(self):
        if not self.cases:
            raise ValueError(f"part {self.name!r} has no cases")
        if not (isinstance(self.points, (int, float)) and self.points >= 0):
            raise ValueError(f"part {self.name!r}: points must be a number >= 0, got {self.points!r}")


@dataclass
class PartResult:
    """How one part went: passed, or the message of its first wrong input."""

    name: str
    points: float
    passed: bool
    hidden: bool
    inputs: int
    message: str = ""

    @property
    def score(self) -> float:
        return self.points if self.passed else 0.0


@dataclass
class Report:
    """What a check found, part by part, under :func:`grade`."""

    check: str
    function: str
    parts: list[PartResult] = field(default_factory=list)
    error: str = ""  # set when the check could not even start (it then scores 0)

    @property
    def score(self) -> float:
        return 0.0 if self.error else sum(part.score for part in self.parts)

    @property
    def max_score(self) -> float:
        return sum(part.points for part in self.parts)

    @property
    def fraction(self) -> float:
        """The share of the points earned, 0 .. 1 (0 when the check failed to run or has no points)."""
        return self.score / self.max_score if self.max_score and not self.error else 0.0

    @property
    def passed(self) -> bool:
        return not self.error and all(part.passed for part in self.parts)

    def summary(self, hidden: bool | None = None) -> str:
        """One line per part (only the hidden ones or only the visible ones if ``hidden`` is given)."""
        if self.error:
            return self.error
        lines = []
        for part in self.parts:
            if hidden is not None and part.hidden != hidden:
                continue
            mark = "✓" if part.passed else "✗"
            lines.append(f"{mark} {part.name}: {_points(part.score)} of {_points(part.points)} "
                         f"({part.inputs} inputs)")
            if part.message:
                lines += ["    " + line for line in part.message.splitlines()]
        return "\n".join(lines)


def _points(value: float) -> str:
    return f"{value:g} point" + ("" if value == 1 else "s")


# ---------------------------------------------------------------------------
# The mode: hidden inputs or not, a notebook or the grader
# ---------------------------------------------------------------------------

_HIDDEN: contextvars.ContextVar[bool] = contextvars.ContextVar("minilib_checks_hidden", default=False)
_REPORTS: contextvars.ContextVar[list | None] = contextvars.ContextVar("minilib_checks_reports", default=None)


def keeps_random_state(check: Callable) -> Callable:
    """Make a check body ``check(fn)`` into ``check(fn, *, hidden=False)``.

    The check runs with the global random state saved and restored (and seeded
    with 0 inside), so a notebook's numbers do not change when a check runs;
    ``hidden=True`` adds the check's hidden inputs (see :class:`Part`).
    """

    @functools.wraps(check)
    def wrapper(fn: Callable, *, hidden: bool = False) -> None:
        token = _HIDDEN.set(bool(hidden))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return check(fn)
        finally:
            _HIDDEN.reset(token)

    return wrapper


def grade(check: Callable, fn: Callable, *, hidden: bool = True) -> Report:
    """Run ``check(fn, hidden=hidden)`` for the autograder: never raises, prints nothing, returns a Report.

    A check that stops before comparing anything (an error in the check's own
    code, say) gives a report with ``error`` set and a score of 0.
    """
    reports: list[Report] = []
    token = _REPORTS.set(reports)
    error = ""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            check(fn, hidden=hidden)
    except Exception as exc:  # noqa: BLE001 - the grader must survive anything
        error = f"{_name(check)} stopped with {type(exc).__name__}: {exc}"
    finally:
        _REPORTS.reset(token)
    report = Report(_name(check), _name(fn))
    for found in reports:
        report.parts += found.parts
    if error or not report.parts:
        report.error = error or f"{_name(check)} compared nothing"
    return report


# ---------------------------------------------------------------------------
# Comparing answers
# ---------------------------------------------------------------------------


def describe(value) -> str:
    """A short description of a value for a message: a tensor's shape and dtype, a container's items."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            return f"tensor({value.item():.4g})" if value.is_floating_point() else f"tensor({value.item()})"
        return f"tensor {tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, (list, tuple)):
        if len(value) > 12:
            return f"{type(value).__name__} of {len(value)} items: {list(value[:6])} ..."
        return type(value)((describe(v) for v in value)).__repr__().replace("'", "")
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
        return f"expected a tensor {tuple(expected.shape)}, got {describe(got)}"
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


def difference(got, expected, rtol: float = 1e-5, atol: float = 1e-5) -> str | None:
    """None if ``got`` matches ``expected`` (tensors, tuples, lists, dicts, numbers), else what differs."""
    if isinstance(expected, torch.Tensor):
        return _tensor_difference(got, expected, rtol, atol)
    if expected is None:
        return None if got is None else f"expected None, got {describe(got)}"
    if isinstance(expected, tuple):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"expected a tuple of {len(expected)} results, got {describe(got)}"
        for k, (g, e) in enumerate(zip(got, expected)):
            problem = difference(g, e, rtol, atol)
            if problem:
                return f"result {k} of the tuple: {problem}"
        return None
    if isinstance(expected, list):
        if isinstance(got, torch.Tensor):
            got = got.tolist()
        if not isinstance(got, (list, tuple)):
            return f"expected a list of {len(expected)} items, got {describe(got)}"
        if len(got) != len(expected):
            return f"expected {len(expected)} items, got {len(got)}: {list(got)[:12]}"
        bad = [k for k, (g, e) in enumerate(zip(got, expected)) if difference(g, e, rtol, atol)]
        if not bad:
            return None
        return (f"{len(bad)} of {len(expected)} items differ; the first: "
                + ", ".join(f"[{k}] expected {expected[k]!r}, got {got[k]!r}" for k in bad[:3]))
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"expected a dict with keys {sorted(expected)}, got {describe(got)}"
        if set(got) != set(expected):
            return f"expected the keys {sorted(expected)}, got {sorted(got)}"
        for key in expected:
            problem = difference(got[key], expected[key], rtol, atol)
            if problem:
                return f"[{key!r}]: {problem}"
        return None
    if isinstance(expected, float):
        ok = isinstance(got, (int, float)) and math.isclose(got, expected, rel_tol=rtol, abs_tol=atol)
        return None if ok else f"expected {expected!r}, got {got!r}"
    return None if got == expected else f"expected {expected!r}, got {got!r}"


# ---------------------------------------------------------------------------
# Running a check
# ---------------------------------------------------------------------------


def _parts(cases: Sequence[Case] | Sequence[Part], hidden: Sequence[Case]) -> list[Part]:
    if cases and all(isinstance(c, Part) for c in cases):
        parts = list(cases)
    elif all(isinstance(c, Case) for c in cases):
        parts = [Part("test inputs", list(cases))]
    else:
        raise TypeError("a check's cases must all be Case or all be Part")
    if hidden:
        parts.append(Part("hidden inputs", list(hidden), points=parts[0].points if len(parts) == 1 else 1.0,
                          hidden=True))
    names = [part.name for part in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"the parts of a check need different names, got {names}")
    return parts


def run_check(fn: Callable, cases: Sequence[Case] | Sequence[Part], reference: Callable, reference_name: str, *,
              mistakes: Sequence[Mistake] = (), hint: str = "", error_hint: str = "", rtol: float = 1e-5,
              atol: float = 1e-5, compare: Callable | None = None, normalise: Callable | None = None,
              hidden: Sequence[Case] = ()) -> None:
    """Compare ``fn`` with ``reference`` on every case of every part (see the module's docstring).

    ``compare(got, expected, case)`` replaces the default comparison where an
    answer may differ from minilib's and still be right; ``normalise`` maps
    both answers to a canonical form first. ``hidden`` adds a hidden part.
    """
    parts = [part for part in _parts(cases, hidden) if _HIDDEN.get() or not part.hidden]
    total = sum(len(part.cases) for part in parts)
    reports = _REPORTS.get()
    if not callable(fn):
        error = ExerciseError(f"pass your function itself to the check, not {describe(fn)}")
        if reports is None:
            raise error
        reports.append(Report("", _name(fn), [PartResult(p.name, p.points, False, p.hidden, len(p.cases), str(error))
                                              for p in parts]))
        return
    name = _name(fn)
    results, errors, number = [], [], 0
    with torch.no_grad():
        for part in parts:
            first, error = number, None
            for case in part.cases:
                number += 1
                try:
                    _compare_case(fn, case, number, total, reference, mistakes=mistakes, hint=hint,
                                  error_hint=error_hint, rtol=rtol, atol=atol, compare=compare, normalise=normalise)
                except ExerciseError as exc:
                    error = exc
                    break
            number = first + len(part.cases)
            results.append(PartResult(part.name, part.points, error is None, part.hidden, len(part.cases),
                                      "" if error is None else str(error)))
            if error is not None:
                errors.append(error)
    if reports is not None:
        reports.append(Report("", name, results))
        return
    if not errors:
        shown = sum(len(part.cases) for part in parts if part.hidden)
        hidden_note = f" ({shown} of them hidden)" if shown else ""
        print(f"✓ {name} agrees with {reference_name} on all {total} test inputs{hidden_note}.")
        return
    if len(parts) == 1:
        raise errors[0]
    summary = Report("", name, results)
    lines = [str(errors[0]), "", "parts:"] + ["  " + line for line in summary.summary().splitlines()
                                              if not line.startswith("    ")]
    raise ExerciseError("\n".join(lines)) from errors[0].__cause__


def _compare_case(fn: Callable, case: Case, number: int, total: int, reference: Callable, *,
                  mistakes: Sequence[Mistake], hint: str, error_hint: str, rtol: float, atol: float,
                  compare: Callable | None, normalise: Callable | None) -> None:
    """Raise an ExerciseError if ``fn`` and ``reference`` disagree on ``case`` (input ``number`` of ``total``)."""
    expected = reference(*_clone(case.args), **_clone(case.kwargs))
    got = _call(fn, case, error_hint)
    if normalise is not None:
        expected, got = normalise(expected), normalise(got)
    problem = compare(got, expected, case) if compare is not None else difference(got, expected, rtol, atol)
    if problem is None:
        return
    advice = hint
    for mistake in mistakes:
        try:
            wrong = mistake.wrong(*_clone(case.args), **_clone(case.kwargs))
        except Exception:  # this mistake cannot even run on this input
            continue
        if normalise is not None:
            wrong = normalise(wrong)
        if difference(got, wrong, rtol, atol) is None:
            advice = mistake.hint
            break
    message = [f"{_name(fn)} gives a wrong answer on input {number} of {total}, {case.label}:"]
    if not problem.startswith("expected") and not isinstance(expected, (dict, list)):
        message.append(f"  expected {describe(expected)}, got {describe(got)}")
    message += ["  " + line for line in problem.splitlines()]
    if advice:
        message.append(f"hint: {advice}")
    raise ExerciseError("\n".join(message))


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (the checks never touch the global one)."""
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Standard normal numbers of ``shape`` from ``generator(seed)``, times ``scale``."""
    return torch.randn(shape, generator=generator(seed)) * scale


# The names the chapter modules were written with.
_run = run_check
_keeps_random_state = keeps_random_state
_describe = describe
_difference = difference
_generator = generator
_randn = randn
