"""What intake says about a file or a frame: the typed outcomes every engine records alike.

The local loop, the Ray driver and ``index build --from-marker`` learn what
happened to a file from these values, never by comparing counters before
and after a call. They are plain frozen dataclasses of paths and text, so
they cross the wire between a Ray worker and its driver unchanged.

=============  ==========================================================
``not_ready``  the file may still be being written: retried with back-off
               (:func:`monitor.intake.files.retry_or_give_up`)
``bad``        the file will never be readable: quarantined (stage ``read``)
``skip``       a channel this configuration does not count: final, skipped
``assemble``   channels could not be put together: quarantined
``dropped``    a frame without its primary channel, or a channel that
               arrived after its frame was released: quarantined
=============  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from monitor.errors import StageError
from monitor.records import Counts, Frame, FrameKey

EventKind = Literal["not_ready", "bad", "skip", "assemble", "dropped"]

#: the stage a quarantined event is filed under (quarantine.csv, the errors counter)
STAGE: dict[str, str] = {"bad": "read", "not_ready": "read", "assemble": "assemble", "dropped": "assemble"}


@dataclass(frozen=True)
class FileEvent:
    """A file (or files) that did not become part of a counted frame, and why."""

    kind: EventKind
    paths: tuple[str, ...]
    problem: str
    key: FrameKey | None = None

    @property
    def stage(self) -> str:
        """Where it failed, as quarantine.csv and ``cellmonitor_errors_total`` name it."""
        return STAGE.get(self.kind, "read")


@dataclass(frozen=True)
class FrameResult:
    """One frame's outcome: its counts, or the stage that failed (exceptions do not cross the wire)."""

    key: FrameKey
    sources: tuple[Path, ...]
    counts: Counts | None
    stage: str = ""
    problem: str = ""
    incomplete: bool = False


Event = FileEvent | FrameResult


def frame_result(frame: Frame, result: Counts | StageError) -> FrameResult:
    """What the pipeline made of ``frame``, pixels left behind (as a worker ships it)."""
    incomplete = bool(frame.missing_channels)
    if isinstance(result, StageError):
        return FrameResult(frame.key, frame.sources, None, result.stage, result.problem, incomplete)
    return FrameResult(frame.key, frame.sources, result, incomplete=incomplete)
