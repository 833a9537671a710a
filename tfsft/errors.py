"""Errors a user can act on, and the pipeline stage an error happened in. Stdlib only.

Scripts print a `TfsftError` as one line and exit non-zero; any other exception is a bug or an
environment problem, reported by `tfsft.cli.run_cli` as `error: <stage> failed: ...` with the
traceback in a log file.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional


class TfsftError(Exception):
    """Base class: a problem with the user's input, config or artifacts, not a bug."""

    exit_code = 2


class ConfigError(TfsftError):
    """A config value or flag is invalid."""


class DataError(TfsftError):
    """A data file is missing, malformed or inconsistent (names the file and row)."""


class ArtifactError(TfsftError):
    """A checkpoint, run directory or ONNX bundle is missing, corrupt or inconsistent."""


class ExportFailed(ArtifactError):
    """The run was trained and published, but its ONNX export did not finish.

    The run directory is complete without `onnx/`; `tfsft export RUN_DIR` (or the
    same finetune command again) finishes the export. `__cause__` holds the original error.
    """

    exit_code = 1

    def __init__(self, message: str, run_dir: Optional[str] = None) -> None:
        super().__init__(message)
        self.run_dir = run_dir


class RunInterrupted(TfsftError):
    """Training was stopped by Ctrl-C; the partial run is kept so the same command resumes it."""

    exit_code = 130


STAGE_ATTRIBUTE = "tfsft_stage"


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Tag any exception raised inside with the pipeline stage it came from (the innermost wins),
    so the CLI can say `error: export failed: ...` instead of printing a traceback."""
    try:
        yield
    except BaseException as error:
        if getattr(error, STAGE_ATTRIBUTE, None) is None:
            try:
                setattr(error, STAGE_ATTRIBUTE, name)
            except (AttributeError, TypeError):
                pass
        raise


def stage_of(error: BaseException) -> Optional[str]:
    """The stage `stage()` recorded on `error`, or None."""
    return getattr(error, STAGE_ATTRIBUTE, None)
