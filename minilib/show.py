"""Show minilib's own code inside a notebook.

The book never keeps a second copy of a model in a notebook: a chapter prints
the real source with ``show_source(DiTBlock)`` so that what the reader reads is
what runs.
"""

from __future__ import annotations

import inspect
import textwrap


class SourceCode:
    """Source text that renders as a highlighted Python block in Jupyter."""

    def __init__(self, source: str, title: str):
        self.source = source
        self.title = title

    def _repr_markdown_(self) -> str:
        return f"`{self.title}`\n\n```python\n{self.source}\n```"

    def __repr__(self) -> str:
        return f"# {self.title}\n{self.source}"


def show_source(obj, *, lines: tuple[int, int] | None = None) -> SourceCode:
    """The source of a minilib function, class or method, ready to display.

    Args:
        obj: anything ``inspect.getsource`` accepts (a class, function, method, module).
        lines: optional ``(first, last)`` line numbers (1-based, inclusive, relative
            to the object's own source) to show only part of a long object.
    """
    try:
        source = inspect.getsource(obj)
        # inspect.unwrap: a decorated function (e.g. @torch.no_grad()) reports the decorator's file.
        file = inspect.getsourcefile(inspect.unwrap(obj) if callable(obj) else obj) or "?"
    except (TypeError, OSError) as error:
        raise TypeError(f"show_source needs a Python function, class, method or module; "
                        f"could not read the source of {obj!r} ({error})") from None
    source = textwrap.dedent(source).rstrip()
    if lines is not None:
        first, last = lines
        all_lines = source.splitlines()
        if not 1 <= first <= last <= len(all_lines):
            raise ValueError(f"lines must satisfy 1 <= first <= last <= {len(all_lines)}, got {lines}")
        source = "\n".join(all_lines[first - 1:last])
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", type(obj).__name__))
    module = file.split("minilib/")[-1] if "minilib/" in file else file
    return SourceCode(source, f"minilib/{module}: {name}" if "minilib/" in file else f"{module}: {name}")
