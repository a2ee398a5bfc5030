"""CSV sink: one row per frame (timepoint), the record of truth.

Rows are appended and flushed as each frame is counted. On start the sink
reads the frame keys already in the file and never writes a key twice, so a
crash between the CSV write and the ledger commit cannot duplicate a row.
If the reference classes change, a new file is started beside the old one
rather than mixing columns.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from monitor.protocols import BuildContext
from monitor.records import Counts
from monitor.service.rows import COLUMNS_FIXED, counts_row


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: Path | None = None  # default: <state_dir>/counts.csv


class CsvSink:
    name = "csv"
    record_of_truth = True  # the service marks a frame done only after this sink wrote it

    def __init__(self, path: Path):
        self.path = path
        self._header: list[str] | None = None
        self._seen: set[tuple[str, str, str, str]] = set()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.stat().st_size > 0:
            with path.open(newline="") as f:
                r = csv.DictReader(f)
                self._header = list(r.fieldnames or [])
                for row in r:
                    self._seen.add((row["experiment"], row["well"], row["field"], row["timepoint"]))
        self._fh = path.open("a", newline="")

    def write(self, counts: Counts) -> None:
        row = counts_row(counts)
        key = (row["experiment"], row["well"], row["field"], str(row["timepoint"]))
        if key in self._seen:
            return
        header = list(row)
        if self._header is None:
            self._header = header
            csv.writer(self._fh).writerow(header)
        elif header != self._header:
            raise RuntimeError(f"{self.path}: columns changed (classes differ from the file's header); use a new csv path")
        csv.DictWriter(self._fh, fieldnames=self._header).writerow(row)
        self._fh.flush()
        self._seen.add(key)

    def close(self) -> None:
        self._fh.close()


class _Spec:
    name = "csv"
    description = "per-timepoint counts appended to a CSV file (idempotent per frame)"
    Options = Options

    @staticmethod
    def build(options: Options, ctx: BuildContext) -> CsvSink:
        return CsvSink(options.path or ctx.state_dir / "counts.csv")


PLUGIN = _Spec()
__all__ = ["COLUMNS_FIXED", "CsvSink", "PLUGIN"]
