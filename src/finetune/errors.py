"""Errors caused by the user's input: reported as one line and exit code 2, not a traceback."""


class UserError(Exception):
    """Bad input: a wrong override, a missing file, a malformed row, a mismatched checkpoint."""


class ConfigError(UserError):
    """A parameter that fails validation; `key` is its dotted name, e.g. `model.n_heads`."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class RunFailed(Exception):
    """A run that one of its processes ended, not its input: a worker killed by a signal, or one
    whose bug was already printed with its traceback. One line and exit code 1: a traceback of
    the process that only noticed it would say nothing more."""
