"""Error types and the exit statuses they map to.

Policy: configuration, plugin and index errors are fatal at start-up (exit 78,
EX_CONFIG, and systemd does not restart); a bad input file is logged in one
line, counted and quarantined; a file still being written is retried.
"""

from __future__ import annotations

EX_CONFIG = 78
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_IOERR = 74


class CellmonitorError(Exception):
    """Base class: ``str(err)`` is a complete one-line message for a user."""

    exit_status = 1


class ConfigError(CellmonitorError):
    """One or more configuration problems, one line each."""

    exit_status = EX_CONFIG

    def __init__(self, lines: list[str] | str):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


class PluginError(ConfigError):
    """A plugin named in the configuration could not be loaded or built."""


class IndexError_(ConfigError):
    """The reference index is missing, corrupt or does not match the encoders."""


class WeightsMissing(ConfigError):
    """Foundation-model weights are not on this machine."""


class Unavailable(CellmonitorError):
    """Something outside cellmonitor is not there yet (an unmounted share): exit 69, systemd retries."""

    exit_status = EX_UNAVAILABLE


class BadInput(CellmonitorError):
    """A file that will never be readable: ``path: problem``."""

    exit_status = EX_DATAERR

    def __init__(self, path: object, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class NotReady(BadInput):
    """A file that may still be being written (truncated TIFF, size changing)."""


class StageError(Exception):
    """A pipeline stage failed on one frame: the frame is quarantined, the service goes on.

    ``stage`` names the stage (``rescale``, ``segment``, ``crop``, ``embed``,
    ``classify``, ``control``); the original exception is ``__cause__``.
    """

    def __init__(self, stage: str, cause: BaseException):
        self.stage = stage
        self.cause = cause
        super().__init__(f"{stage}: {type(cause).__name__}: {cause}")
