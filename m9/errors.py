"""Exceptions a user can cause; the CLI turns them into one `Error: …` line."""

from typing import Any


class M9Error(Exception):
    """A problem the user can fix (bad input, bad option, missing tool); shown without a traceback."""


class InputError(M9Error):
    """The input is missing, empty or not what the stage expects."""


class WeightsError(M9Error):
    """No usable MobileNetV2 ImageNet weights could be obtained or verified."""


class EngineError(M9Error):
    """Spark, Java or Ray could not be started or reached."""


class TooManyRejectedError(M9Error):
    """More images were rejected than --max-errors allows; everything was still written.

    `result` holds what the stage (or run) returned, so the CLI can print its summary before the error.
    """

    def __init__(self, message: str, result: Any):  # a stage's Manifest or the run's RunResult
        super().__init__(message)
        self.result = result


class StorageError(M9Error):
    """An S3 bucket or prefix cannot be reached, read or written (missing bucket, refused credentials)."""


def first_line(exc: BaseException, named: bool = False) -> str:
    """The first line of exc's message (a library's message may go on for pages), or its type's name when
    the message is empty; named=True puts the type's name before the line (`OSError: broken data stream`)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    if not line:
        return type(exc).__name__
    return f"{type(exc).__name__}: {line}" if named else line
