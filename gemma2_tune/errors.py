"""Outcomes the CLI reports in one line and an exit code, without a traceback.

    UserError     a problem with the user's input (file, key, row, model): exit 2
    ConfigError   one or more configuration problems, each naming its key: exit 2
    Interrupted   training stopped by SIGTERM or Ctrl-C (SIGINT) after saving a checkpoint (resumable): exit 143
    Diverged      training stopped at a non-finite loss or gradient (the weights stay finite): exit 3
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 143  # 128 + SIGTERM: stopped on request (SIGTERM or Ctrl-C), checkpoint saved, resumable
EXIT_DIVERGED = 3  # the run went wrong numerically: nothing trained after the divergence was kept


class Outcome(Exception):
    """An ending the CLI turns into `message` on stderr and `exit_code`."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UserError(Outcome):
    """A problem with the user's input (file, key, row, model); the message says what to change."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError):
    """One or more configuration problems, each naming its key."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class Interrupted(Outcome):
    """Training stopped by SIGTERM or Ctrl-C after saving a checkpoint; `--resume` continues it."""

    exit_code = EXIT_INTERRUPTED


class Diverged(Outcome):
    """Training stopped before an optimizer step with a non-finite loss or gradient (NaN/inf); the message names
    the step and the last complete checkpoint, which holds finite weights."""

    exit_code = EXIT_DIVERGED
