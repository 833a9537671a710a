"""Errors a user can act on. Scripts print them as one line and exit non-zero."""


class TfsftError(Exception):
    """Base class: a problem with the user's input, config or artifacts, not a bug."""

    exit_code = 2


class ConfigError(TfsftError):
    """A config value or flag is invalid."""


class DataError(TfsftError):
    """A data file is missing, malformed or inconsistent (names the file and row)."""


class ArtifactError(TfsftError):
    """A checkpoint, run directory or ONNX bundle is missing, corrupt or inconsistent."""


class RunInterrupted(TfsftError):
    """Training was stopped by Ctrl-C; the partial run is kept so the same command resumes it."""

    exit_code = 130
