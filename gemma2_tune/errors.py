"""Errors a user can fix. The CLI prints them without a traceback and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (file, key, row, model); the message says what to change."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConfigError(UserError):
    """One or more configuration problems, each naming its key."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))
