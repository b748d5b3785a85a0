"""Errors a user can act on. The CLI prints their message, never a traceback."""


class ThermocalError(Exception):
    """A failure with a message meant for the user; `exit_code` is what the CLI returns."""

    exit_code = 1


class InvalidInput(ThermocalError):
    """The data file or an option is wrong: the user's mistake."""

    exit_code = 2


class TrainingDiverged(ThermocalError):
    """The loss turned inf or NaN; no model was persisted."""

    exit_code = 3


class StoreError(ThermocalError):
    """The store lacks what was asked for, or a file in it fails its recorded hash."""

    exit_code = 2


UNREADABLE = (FileNotFoundError, IsADirectoryError, PermissionError)


def unreadable(path, error: OSError) -> InvalidInput:
    """The message for a data file that cannot be opened: missing, a directory, or not permitted."""
    if isinstance(error, FileNotFoundError):
        return InvalidInput(f"{path}: no such file")
    if isinstance(error, IsADirectoryError):
        return InvalidInput(f"{path}: is a directory, not a CSV file")
    return InvalidInput(f"{path}: permission denied")
