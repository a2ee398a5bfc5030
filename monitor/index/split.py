"""``cellmonitor index split``: a labelled data set split for an honest evaluation, as folders of links.

Policy
------
* Unit: a file (a class-folder image is one cell; a VOC frame, all its boxed
  cells), so a frame's cells never sit on both sides.
* Stratified by class (a file's class: its folder, or the most frequent box
  label of a frame), reproducible with ``seed``; every class with at least
  two files keeps at least one on each side.
* ``by_group`` (a regular expression on the file's path relative to the data
  root; its first group, or the whole match, names the group: an experiment,
  a plate, a day): whole groups go to one side, chosen at random with
  ``seed`` until the test side holds about ``test`` of the files. Files the
  expression does not match form a group each.
* Output: ``OUT/train`` and ``OUT/test`` with the data's own layout (class
  folders, or frames beside their annotations) as symbolic links to the
  original files (never copies), and ``OUT/split.json`` recording the seed,
  the fraction, the grouping and every file's side, so the split can be
  rebuilt and cited.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from monitor.errors import UsageError
from monitor.index.dataset import Dataset, group_split, stratified_split


def file_class(labels: tuple[str, ...]) -> str:
    """A file's class for stratification: its (most frequent) label."""
    return Counter(labels).most_common(1)[0][0] if labels else ""


def group_of(name: str, rx: re.Pattern[str] | None) -> str:
    """The group a file belongs to (``by_group``'s first group or whole match; else the file itself)."""
    if rx is None:
        return name
    m = rx.search(name)
    if m is None:
        return name
    return m.group(1) if m.groups() and m.group(1) is not None else m.group(0)


def split_dataset(ds: Dataset, out: Path, test: float, seed: int = 0, by_group: str | None = None) -> dict[str, Any]:
    """Write ``out/train``, ``out/test`` (links) and ``out/split.json``; returns the record.

    Raises
    ------
    UsageError
        ``test`` outside (0, 1), an invalid ``by_group`` expression, ``out``
        not empty, or too few files or groups to put one on each side.
    """
    if not 0 < test < 1:
        raise UsageError(f"--test {test:g}: a fraction between 0 and 1")
    try:
        rx = re.compile(by_group) if by_group else None
    except re.error as e:
        raise UsageError(f"--by-group {by_group!r}: not a regular expression ({e})") from None
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out}: not empty (a split is never written over another)")
    files = list(ds.files)
    classes = np.array([file_class(f.labels) for f in files])
    if rx is not None:
        groups = np.array([group_of(f.name, rx) for f in files])
        if len(set(groups)) < 2:
            raise UsageError(f"--by-group {by_group!r}: all {len(files)} files fall in one group; nothing to split")
        train, test_idx = group_split(classes, groups, test, seed)
    else:
        if len(files) < 2:
            raise UsageError(f"{ds.root}: {len(files)} file(s); nothing to split")
        groups = None
        train, test_idx = stratified_split(classes, test, seed)
    side = {int(i): "train" for i in train} | {int(i): "test" for i in test_idx}
    for i, f in enumerate(files):
        for src in (f.path, f.annotation):
            if src is None:
                continue
            rel = src.relative_to(ds.root)
            dst = out / side[i] / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src.resolve())
    record: dict[str, Any] = {
        "data": str(ds.root.resolve()), "layout": ds.layout, "seed": seed, "test_fraction": test, "by_group": by_group,
        "counts": {s: dict(Counter(str(classes[i]) for i, v in side.items() if v == s)) for s in ("train", "test")},
        "cells": {s: sum(files[i].n_cells for i, v in side.items() if v == s) for s in ("train", "test")},
        "files": {f.name: side[i] for i, f in enumerate(files)},
    }
    if groups is not None:
        record["groups"] = {s: sorted({str(groups[i]) for i, v in side.items() if v == s}) for s in ("train", "test")}
    (out / "split.json").write_text(json.dumps(record, indent=2))
    return record
