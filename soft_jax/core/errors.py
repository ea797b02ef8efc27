"""User-facing errors: the CLI turns these into one line on stderr and exit code 2; and the rules by which a settings
dataclass (TrainConfig, SamplingConfig, FilterConfig) checks its own fields."""

from __future__ import annotations

from collections.abc import Callable


class UserError(Exception):
    """A problem with what the user asked for (a path, a file, a config), not a bug.

    The message is one line: what is wrong, where, and how to mend it.
    """


Rule = tuple[str, Callable[[object], bool], str]  # field, test, what the value must be


def check_fields(obj, rules: list[Rule]) -> None:
    """Raises UserError "FIELD = VALUE: must be WHAT" for the first field of `obj` that fails its rule."""
    for name, ok, what in rules:
        value = getattr(obj, name)
        if not ok(value):
            raise UserError(f"{name} = {value!r}: must be {what}")
