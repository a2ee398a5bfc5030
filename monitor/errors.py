"""Error types and the exit statuses they map to.

Policy: configuration, plugin and index errors are fatal at start-up (exit 78,
EX_CONFIG, and systemd does not restart); a bad input file is logged in one
line, counted and quarantined; a file still being written is retried.
"""

from __future__ import annotations

EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = 78

#: every exit status of ``cellmonitor``, for the README and ``--help`` (sysexits.h numbers)
EXIT_STATUSES = (
    (0, "success (run/replay: stopped by SIGTERM/SIGINT after finishing the current frame)"),
    (1, "other error the command reports in one line"),
    (2, "command-line syntax (argparse usage)"),
    (EX_USAGE, "a command-line value out of range (e.g. demo --timepoints 0)"),
    (EX_DATAERR, "a file named on the command line is not readable data (no reader takes it, foreign CSV)"),
    (EX_NOINPUT, "a file named on the command line does not exist"),
    (EX_UNAVAILABLE, "something outside is not there yet: watch folder missing (share not mounted), metrics port in use, state folder locked by another instance; systemd retries"),
    (EX_SOFTWARE, "internal error (a bug: run with -v for the traceback)"),
    (EX_IOERR, "cannot write the record of truth or the state folder (disk full, read-only): stopped cleanly, nothing marked done that is not written"),
    (EX_TEMPFAIL, "inspect: the file is still being written; run: a frame exceeded service.frame_timeout_s (quarantined, restart to continue)"),
    (EX_CONFIG, "configuration, plugin, index or weights error; systemd does not restart"),
    (130, "interrupted (Ctrl-C outside the service loop)"),
)


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


class UsageError(CellmonitorError):
    """A command-line value out of range: exit 64 (EX_USAGE)."""

    exit_status = EX_USAGE


class StateWriteError(CellmonitorError):
    """The record of truth or the state folder cannot be written (disk full): exit 74.

    The service stops cleanly: nothing that was not written is marked done,
    so every frame is processed again after the space returns.
    """

    exit_status = EX_IOERR


class InputProblem(CellmonitorError):
    """A file that cannot be read now: ``path: problem``. Catch one of its two kinds, never this:
    :class:`BadInput` (never readable: quarantined) or :class:`NotReady` (retried)."""

    exit_status = EX_DATAERR

    def __init__(self, path: object, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class BadInput(InputProblem):
    """A file that will never be readable: ``path: problem``."""


class NoInput(BadInput):
    """A file named on the command line does not exist: exit 66 (EX_NOINPUT) in every command."""

    exit_status = EX_NOINPUT

    def __init__(self, path: object, problem: str = "no such file"):
        super().__init__(path, problem)


class NotReady(InputProblem):
    """A file that may still be being written (truncated TIFF, size changing): retried until
    ``service.ready_deadline_s``, then quarantined. Not a :class:`BadInput`, so no handler of
    one can swallow it by the order of its ``except`` clauses."""


class StageError(Exception):
    """A pipeline stage failed on one frame: the frame is quarantined, the service goes on.

    ``stage`` names the stage (``rescale``, ``segment``, ``crop``, ``embed``,
    ``classify``, ``control``); the original exception is ``__cause__``.
    """

    def __init__(self, stage: str, cause: BaseException):
        self.stage = stage
        self.cause = cause
        super().__init__(f"{stage}: {type(cause).__name__}: {cause}")

    @property
    def retryable(self) -> bool:
        """The stage waits for a file that is not there yet (:class:`NotReady`: a segmentation
        mask another tool has still to write): the frame is retried like a half-written file."""
        return isinstance(self.cause, NotReady)

    @property
    def problem(self) -> str:
        """The one line a quarantine or a retry shows."""
        return str(self.cause) if isinstance(self.cause, InputProblem) else f"{type(self.cause).__name__}: {self.cause}"
