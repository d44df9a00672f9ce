"""What the tests of the assignments' checks share: expecting a failure with its hint, grading part by part."""

import pytest

from minilib import checks
from minilib.checks import ExerciseError


def fails_with(check, fn, *fragments, hidden=False):
    """Run ``check(fn)``, expect an ExerciseError whose message contains every fragment; return the message."""
    with pytest.raises(ExerciseError) as info:
        check(fn, hidden=hidden)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in the message:\n{message}"
    return message


def not_implemented(*args, **kwargs):
    raise NotImplementedError()


def parts_passed(check, fn):
    """{part name: passed} of ``grade(check, fn)`` with the hidden inputs."""
    return {part.name: part.passed for part in checks.grade(check, fn).parts}
