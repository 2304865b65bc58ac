"""Exceptions that mean "the user asked for something that cannot be done".

Every entry point catches :class:`UserError`, prints its message on stderr and exits with code 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "DataError", "IncompatibleError", "RegistryError", "first_line"]


class UserError(Exception):
    """A mistake in what the user asked for: bad config, missing file, data that does not fit."""


class ConfigError(UserError):
    """One or more problems in a config, all reported together.

    Args:
        problems: one readable line per problem, each already naming its file and key path.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return f"config error: {self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{len(self.problems)} config errors:\n{lines}"


class DataError(UserError):
    """A data file is missing, truncated or not in the expected format (the message names the file)."""


class IncompatibleError(UserError):
    """A model cannot be built for this dataset (e.g. a language model on images)."""


class RegistryError(UserError):
    """A component name that is neither registered nor an importable dotted path, or of the wrong kind."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for a one-line error (some have no message)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
