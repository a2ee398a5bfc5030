"""A counts CSV begun by an earlier version is continued in its own columns; other changes are refused."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from cellmonitor_plugins.sinks.csv import CsvSink

from monitor.errors import ConfigError
from monitor.records import Counts, FrameKey, MarkerAgreement
from monitor.service.rows import counts_row


def _counts(t: int, marker: MarkerAgreement | None = None) -> Counts:
    return Counts(FrameKey("e", "A1", "1", t), "x", None, 0.5, "config", 4, {"live": 3, "dead": 1}, 0, 0.9, None,
                  n_unknown=1, index_version=2, marker=marker)


def _write_old(path: Path, drop: tuple[str, ...]) -> list[str]:
    row = counts_row(_counts(0))
    header = [c for c in row if not c.startswith(drop)]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerow([row[c] for c in header])
    return header


@pytest.mark.parametrize("drop", [("state_", "n_unknown", "index_version", "marker_"), ("n_unknown", "index_version", "marker_"), ("marker_",)])
def test_file_of_an_earlier_version_is_continued(tmp_path: Path, drop: tuple[str, ...]) -> None:
    path = tmp_path / "counts.csv"
    header = _write_old(path, drop)
    sink = CsvSink(path)
    sink.write(_counts(1, MarkerAgreement(3, 2, 1)))
    sink.close()
    with path.open(newline="") as f:
        r = csv.DictReader(f)
        assert r.fieldnames == header
        rows = list(r)
    assert [int(x["timepoint"]) for x in rows] == [0, 1]


def test_new_columns_are_written_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "counts.csv"
    sink = CsvSink(path)
    sink.write(_counts(1, MarkerAgreement(4, 3, 2)))
    sink.close()
    with path.open(newline="") as f:
        row = next(csv.DictReader(f))
    assert (row["n_unknown"], row["index_version"], row["marker_cells"], row["marker_agree"], row["marker_agreement"]) == ("1", "2", "4", "3", "0.7500")


def test_a_file_with_other_classes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "counts.csv"
    _write_old(path, ("n_dead", "frac_dead"))
    with pytest.raises(ConfigError, match="columns changed"):
        CsvSink(path).write(_counts(1))


def test_acquisition_times_keep_the_instruments_clock() -> None:
    """Zone-less times (Gen5: local) stay naive, never relabelled UTC; zoned ones go to UTC; a mix is named."""
    from monitor.service.rows import parse_times

    local, clock = parse_times(["2024-11-28T11:10:10", "", "2024-11-28T12:10:10"])
    assert clock == "local" and local.dt.tz is None
    assert [x.isoformat() if x == x else None for x in local] == ["2024-11-28T11:10:10", None, "2024-11-28T12:10:10"]
    zoned, clock = parse_times(["2024-11-28T11:10:10+01:00", "2024-11-28T11:10:10Z"])
    assert clock == "UTC" and str(zoned.dt.tz) == "UTC"
    assert [x.isoformat() for x in zoned] == ["2024-11-28T10:10:10+00:00", "2024-11-28T11:10:10+00:00"]
    mixed, clock = parse_times(["2024-11-28T11:10:10+01:00", "2024-11-28T11:10:10"])
    assert clock == "mixed" and [x.isoformat() for x in mixed] == ["2024-11-28T10:10:10", "2024-11-28T11:10:10"]
