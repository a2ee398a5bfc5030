"""Watching the export folder without reading a file too early.

* The watchdog handler only enqueues paths (an exception in a handler would
  kill the observer's dispatcher thread for good).
* ``polling = true`` uses watchdog's PollingObserver, for SMB/NFS shares
  where inotify sees nothing; a periodic rescan backs up either observer.
* :class:`FileTracker` admits a file once its size and mtime have been stable
  for ``stable_s``; a file that then fails to decode is retried with
  exponential back-off until ``ready_deadline_s`` after it was first seen,
  and only then quarantined (one INFO line when it is first found not ready).
* Paths keep whatever bytes the file system gave (``os.fsdecode``'s
  surrogate escapes for names that are not UTF-8); the ledger and every log
  line show them through :func:`monitor.intake.ledger.path_text`.
* Only regular files are taken: a directory named like a frame, a dangling
  symlink or a symlink loop is never tracked.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import queue
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.errors import Unavailable
from monitor.intake.events import FileEvent
from monitor.intake.ledger import path_text

log = logging.getLogger(__name__)


def matches(path: Path, patterns: Sequence[str]) -> bool:
    """Whether a file name matches the watch patterns (case-insensitive; hidden files never).

    A pattern starting with ``!`` excludes what it matches, whatever the
    others say: the defaults leave out segmentation masks that other tools
    write beside a frame (``!*_labelled.tif``, ``!*_cp_masks.png``), which the
    ``masks`` segmenter reads and which are never frames themselves.
    """
    name = path.name.lower()
    if name.startswith("."):
        return False
    if any(fnmatch.fnmatch(name, p[1:].lower()) for p in patterns if p.startswith("!")):
        return False
    return any(fnmatch.fnmatch(name, p.lower()) for p in patterns if not p.startswith("!"))


def scan(root: Path, patterns: Sequence[str], recursive: bool = True, regular_only: bool = True) -> Iterator[Path]:
    """Every matching file under ``root``, sorted so timepoints arrive in order
    (``regular_only=False``: also directories and links named like a frame)."""
    if not root.is_dir():
        return
    if recursive:
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [Path(dirpath) / f for f in filenames]
            if not regular_only:  # a directory named like a frame is reported, not walked as one
                found += [Path(dirpath) / d for d in dirnames if matches(Path(d), patterns)]
    else:
        found = list(root.iterdir())
    if regular_only:
        found = [p for p in found if _regular(p)]
    yield from sorted(p for p in found if matches(p, patterns))


def _regular(p: Path) -> bool:
    try:
        return p.is_file()  # follows symlinks: a loop or a dangling link is False
    except OSError:
        return False


def _handler(q: queue.Queue[Path], patterns: Sequence[str]) -> Any:
    from watchdog.events import FileSystemEventHandler

    class _Handler(FileSystemEventHandler):
        """watchdog event handler: enqueue, nothing else."""

        def __init__(self) -> None:
            super().__init__()
            self.q = q
            self.patterns = patterns

        def dispatch(self, event: Any) -> None:
            try:
                if event.is_directory:
                    return
                p = Path(os.fsdecode(getattr(event, "dest_path", "") or event.src_path))
                if event.event_type in ("created", "modified", "moved", "closed") and matches(p, self.patterns):
                    self.q.put_nowait(p)
            except Exception:  # never let an exception reach watchdog's dispatcher thread
                log.exception("watch handler failed on %r", event)

    return _Handler()


def start_observer(root: Path, q: queue.Queue[Path], patterns: Sequence[str], polling: bool, poll_interval_s: float, recursive: bool = True):  # type: ignore[no-untyped-def]
    """Start and return a watchdog observer feeding ``q``."""
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver

    obs: Any = PollingObserver(timeout=poll_interval_s) if polling else Observer()
    obs.schedule(_handler(q, patterns), str(root), recursive=recursive)
    obs.daemon = True
    obs.start()
    return obs


def backoff_s(tries: int) -> float:
    """Seconds before the next read of a file found not ready ``tries`` times: 1, 2, 4 ... 60."""
    return min(60.0, 0.5 * 2 ** min(tries, 8))


@dataclass
class Retry:
    """A file (or a frame's files) found not ready: when it was first tried, how often, when next."""

    first_seen: float
    tries: int = 0
    next_try: float = 0.0

    def fail(self, now: float, deadline_s: float) -> bool:
        """Count one not-ready read; True when ``deadline_s`` since :attr:`first_seen` has passed
        (give up), else the next try is :func:`backoff_s` later."""
        self.tries += 1
        if now - self.first_seen >= deadline_s:
            return True
        self.next_try = now + backoff_s(self.tries)
        return False


def retry_or_give_up(ev: FileEvent, retry: Retry, deadline_s: float, now: float) -> FileEvent | None:
    """The one policy for a file still being written, in every engine.

    Returns None while the file is retried (one INFO line the first time it
    is found not ready, DEBUG after), or, once ``deadline_s`` has passed
    since it was first tried, the ``bad`` event that quarantines it.
    """
    first = retry.tries == 0
    if retry.fail(now, deadline_s):
        return FileEvent("bad", ev.paths, f"still unreadable after {deadline_s:.0f}s: {ev.problem}", ev.key)
    if first:
        log.info("%s: not ready (%s); waiting up to %.0f s for it to be complete", path_text(ev.paths[0]), ev.problem, deadline_s)
    else:
        log.debug("not ready, will retry: %s", path_text(ev.paths[0]))
    return None


@dataclass
class _Tracked:
    size: int
    mtime_ns: int
    stable_since: float
    retry: Retry


class FileTracker:
    """Decides when a seen file may be read, and when to give up on it."""

    def __init__(self, stable_s: float, deadline_s: float, clock: Callable[[], float] = time.monotonic):
        self.stable_s = stable_s
        self.deadline_s = deadline_s
        self.clock = clock
        self._files: dict[Path, _Tracked] = {}

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, path: Path) -> bool:
        return path in self._files

    def see(self, path: Path) -> None:
        """Note a file (again); a change of size or mtime restarts its stability clock."""
        now = self.clock()
        try:
            st = path.stat()
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            return  # a directory named like a frame, a device, ...
        t = self._files.get(path)
        if t is None:
            self._files[path] = _Tracked(st.st_size, st.st_mtime_ns, now, Retry(now))
        elif (st.st_size, st.st_mtime_ns) != (t.size, t.mtime_ns):
            t.size, t.mtime_ns, t.stable_since = st.st_size, st.st_mtime_ns, now

    def ready(self) -> list[Path]:
        """Files stable for ``stable_s`` and due for a (re)try, oldest first."""
        now = self.clock()
        out = []
        for p, t in list(self._files.items()):
            try:
                st = p.stat()
            except OSError:
                del self._files[p]  # deleted or moved away before we read it
                log.info("%s: deleted or moved away before it could be read; ignored", path_text(p))
                continue
            if (st.st_size, st.st_mtime_ns) != (t.size, t.mtime_ns):
                t.size, t.mtime_ns, t.stable_since = st.st_size, st.st_mtime_ns, now
                continue
            if now - t.stable_since >= self.stable_s and now >= t.retry.next_try:
                out.append(p)
        out.sort(key=lambda p: self._files[p].retry.first_seen)
        return out

    def done(self, path: Path) -> None:
        """Stop tracking a file (read, or given up)."""
        self._files.pop(path, None)

    def retry(self, path: Path) -> Retry:
        """The retry state of a tracked file (an untracked one is given up at once)."""
        t = self._files.get(path)
        return t.retry if t is not None else Retry(float("-inf"))  # untracked: nothing to wait for

    def not_ready(self, ev: FileEvent) -> FileEvent | None:
        """A tracked file read too early: :func:`retry_or_give_up`; given up, it is no longer tracked."""
        path = Path(ev.paths[0])
        gave_up = retry_or_give_up(ev, self.retry(path), self.deadline_s, self.clock())
        if gave_up is not None:
            self.done(path)
        return gave_up


class Intake:
    """Paths from the observer and from rescans, admitted once stable and not yet finished.

    The observer's handler only enqueues (:meth:`queue`); the worker drains the
    queue in :meth:`collect`. A file the ledger finished with its current size
    and mtime is not tracked again.
    """

    def __init__(self, tracker: FileTracker, ledger: Any, watch_dir: Path, patterns: Sequence[str], recursive: bool = True):
        self.tracker = tracker
        self.ledger = ledger
        self.watch_dir = watch_dir
        self.patterns = tuple(patterns)
        self.recursive = recursive
        self.queue: queue.Queue[Path] = queue.Queue()

    def see(self, p: Path) -> bool:
        """Track ``p`` unless finished; True when it was not tracked before.

        A path that is there but is not a regular file (a directory named like
        a frame, a symlink loop, a dangling link) is never tracked: one INFO
        line the first time it is seen, and a ``skipped`` row in the ledger so
        that no later start tells it again.
        """
        if not _regular(p):
            self._irregular(p)
            return False
        new = p not in self.tracker
        if not new or not self.ledger.is_known(p):
            self.tracker.see(p)
            return new
        return False

    def backlog(self) -> int:
        """Track every file in the watch folder that the ledger has not finished."""
        return sum(self.see(p) for p in scan(self.watch_dir, self.patterns, self.recursive, regular_only=False))

    def _irregular(self, p: Path) -> None:
        try:
            if p.is_dir():
                what = "a directory"
            elif p.is_symlink():
                what = "a symlink that leads nowhere (dangling, or a loop)"
            elif os.path.lexists(p):
                what = "not a regular file"
            else:
                return  # gone: deleted before it was looked at
        except OSError as e:
            what = f"cannot be examined ({e.strerror or e})"
        if self.ledger.was_finished(p):
            return  # told at an earlier start
        log.info("%s: %s, named like a frame; ignored", path_text(p), what)
        self.ledger.mark_files([p], "skipped", None, f"{what}, named like a frame")

    def collect(self) -> list[Path]:
        """Drain the event queue; return the files that are stable and due for reading."""
        while True:
            try:
                self.see(self.queue.get_nowait())
            except queue.Empty:
                break
        return self.tracker.ready()

    def idle(self) -> bool:
        """No queued event and no tracked file."""
        return self.queue.empty() and len(self.tracker) == 0


def check_watch_dir(path: Path) -> None:
    """The watch folder must exist; it is never created (an unmounted share would be
    silently replaced by an empty local folder): :class:`Unavailable`, exit 69, retried."""
    if not path.is_dir():
        raise Unavailable(f"service.watch_dir {path}: no such folder (is the export share mounted?)")
