"""The errors a user sees as one line: a bad config, a bad data source."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, reported as one line that names the file and the field."""


class DataError(ConfigError):
    """A data source that cannot be used: one line naming the file, the field or the record."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
