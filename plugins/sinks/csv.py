"""CSV sink: one row per frame (timepoint), the record of truth.

Policy
------
* Whole lines only: each row is formatted in memory and written with one
  ``write`` to a file opened for appending, then flushed and ``fsync``-ed,
  so a row is on disk before the ledger marks its frame done.
* A write that fails (disk full) is undone: the file is truncated back to
  its length before the write, so no torn line is left, and the error goes
  to the service, which stops cleanly (exit 74).
* A torn tail found on start (a last line without its newline: the process
  was killed in the middle of a write) is cut back to the last complete line
  with one WARNING naming the file; the frame it held was never marked done
  in the ledger, so it is processed and written again.
* Idempotent per frame: on start the sink reads the frame keys already in
  the file and never writes a key twice, so a crash between the CSV write and
  the ledger commit cannot duplicate a row.
* If the reference classes change, the header no longer fits: a
  configuration error (exit 78) asking for a new csv path. A file begun by
  an earlier version (without columns added since: ``state_<canonical>``,
  ``n_unknown``, ``index_version``, ``marker_*``) is continued
  in its own columns, so an upgrade in the middle of an experiment goes on.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from monitor.errors import ConfigError
from monitor.protocols import SinkBase
from monitor.records import Counts
from monitor.registry import plugin_spec
from monitor.service.rows import COLUMNS_FIXED, counts_row

log = logging.getLogger(__name__)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: Path | None = None  # default: <state_dir>/counts.csv


def repair_torn_tail(path: Path) -> int:
    """Cut a last line without its newline; returns the number of bytes removed."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # find the last newline, reading backwards in blocks
        pos, keep = size, 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            i = f.read(step).rfind(b"\n")
            if i >= 0:
                keep = pos + i + 1
                break
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning(
        "%s: the last line was incomplete (%d bytes, a write cut short); removed it, its frame is processed again",
        path, size - keep,
    )
    return size - keep


def _older_layout(old: list[str], new: list[str]) -> bool:
    """True when ``old`` is ``new`` without some of the columns later versions added
    (:data:`~monitor.service.rows.LATER_COLUMNS`: ``state_*``, ``n_unknown``, ...)."""
    from monitor.service.rows import LATER_COLUMNS

    later = [c for c in new if c.startswith(LATER_COLUMNS)]
    return set(old) <= set(new) and old == [c for c in new if c in old] and all(c in old or c in later for c in new)


class CsvSink(SinkBase):
    name = "csv"
    record_of_truth = True  # the service marks a frame done only after this sink wrote it

    def __init__(self, path: Path, roles: Mapping[str, str] | None = None):
        self.path = path
        self.roles = roles
        self._header: list[str] | None = None
        self._seen: set[tuple[str, str, str, str]] = set()
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_tail(path)
        if path.is_file() and path.stat().st_size > 0:
            with path.open(newline="", encoding="utf-8", errors="backslashreplace") as f:
                r = csv.DictReader(f)
                self._header = list(r.fieldnames or [])
                for row in r:
                    self._seen.add((row["experiment"], row["well"], row["field"], row["timepoint"]))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _append(self, text: str) -> None:
        data = text.encode("utf-8", "backslashreplace")
        before = os.fstat(self._fd).st_size
        try:
            n = os.write(self._fd, data)
            if n != len(data):
                raise OSError(28, f"short write ({n} of {len(data)} bytes)")
            os.fsync(self._fd)
        except OSError:
            try:  # leave no torn line behind; truncating needs no free space
                os.ftruncate(self._fd, before)
            except OSError:
                pass
            raise

    def write(self, counts: Counts) -> None:
        row = counts_row(counts, self.roles)
        key = (row["experiment"], row["well"], row["field"], str(row["timepoint"]))
        if key in self._seen:
            return
        header = list(row)
        buf = io.StringIO()
        w = csv.writer(buf)
        if self._header is None:
            w.writerow(header)
        elif header != self._header:
            if not _older_layout(self._header, header):
                raise ConfigError(f"{self.path}: columns changed (the classes differ from the file's header); set a new [[sinks]] csv path")
            header = self._header  # a file begun by an earlier version: keep its columns
        w.writerow([row[c] for c in header])
        self._append(buf.getvalue())  # header (first time) and row: one write
        self._header = header
        self._seen.add(key)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


PLUGIN = plugin_spec(
    "csv", "per-timepoint counts appended to a CSV file (idempotent per frame, whole fsync-ed lines)", Options,
    lambda o, ctx: CsvSink(o.path or ctx.state_dir / "counts.csv", ctx.roles),
)
__all__ = ["COLUMNS_FIXED", "CsvSink", "PLUGIN", "repair_torn_tail"]
