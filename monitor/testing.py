"""Fakes and contract checks, shipped so a lab can test its own plugins the same way.

Fakes are real implementations of the protocols with trivial behaviour:
:class:`DiscSegmenter` finds bright blobs, :class:`MeanColourEncoder` embeds a
crop as its mean colour and brightness histogram, :class:`ListSink` keeps what
it receives. ``check_*`` functions assert the contract of a plugin instance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from monitor.errors import BadInput, NotReady
from monitor.imaging import to_float
from monitor.protocols import (
    Encoder,
    EncoderBase,
    FrameReader,
    ReaderBase,
    Segmenter,
    SegmenterBase,
    Sink,
    SinkBase,
    complete,
)
from monitor.readkit import guess_role
from monitor.records import Acquisition, Cells, Counts, Frame, FrameKey
from monitor.segmentation import cells_from_labels


class DiscSegmenter(SegmenterBase):
    """Threshold at mean + 2 sd of the primary channel, label connected blobs."""

    name = "disc"

    def __init__(self, min_area_um2: float = 5.0):
        self.min_area_um2 = min_area_um2

    def segment(self, frame: Frame) -> Cells:
        """Blobs brighter than mean + 2 sd of the primary channel."""
        from skimage.measure import label

        g = to_float(frame.image)
        lab = label(g > g.mean() + 2 * g.std())
        return cells_from_labels(lab, frame.pixel_size_um, self.min_area_um2)


class MeanColourEncoder(EncoderBase):
    """8-d embedding: mean R, G, B and a 5-bin brightness histogram of the crop."""

    name = "mean-colour"
    id = "mean-colour@1"
    dim = 8

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, crops: np.ndarray) -> np.ndarray:
        """Mean RGB and a 5-bin grey histogram per crop (counts calls in ``calls``)."""
        self.calls += 1
        c = np.asarray(crops, dtype=np.float32) / 255.0
        mean = c.mean(axis=(1, 2))
        g = c.mean(axis=3).reshape(len(c), -1)
        hist = np.stack([np.histogram(x, bins=5, range=(0, 1))[0] / x.size for x in g]) if len(c) else np.zeros((0, 5))
        return np.concatenate([mean, hist], axis=1).astype(np.float32)


class ListSink(SinkBase):
    """Keeps every Counts it receives in ``rows``; ``record_of_truth`` is settable."""

    name = "list"

    def __init__(self, record_of_truth: bool = False) -> None:
        self.rows: list[Counts] = []
        self.closed = False
        self.record_of_truth = record_of_truth

    def write(self, counts: Counts) -> None:
        """Append ``counts`` to ``rows``."""
        self.rows.append(counts)

    def close(self) -> None:
        """Mark the sink closed."""
        self.closed = True


class ArrayReader(ReaderBase):
    """Reads ``.npy`` files named ``<well>_t<N>_<channel>.npy`` at a fixed pixel size.

    Like a real reader it tells a file still being written from a broken one:
    a file that starts like ``.npy`` (or is shorter than its magic) but does
    not decode is :class:`~monitor.errors.NotReady` (retried); anything else
    that is not ``.npy`` is :class:`~monitor.errors.BadInput` (quarantined).
    """

    name = "npy"
    specificity = 1

    def __init__(self, pixel_size_um: float = 0.322):
        self.pixel_size_um = pixel_size_um

    def accepts(self, path: Path) -> str | None:
        """Take ``.npy`` files."""
        return None if path.suffix == ".npy" else "not a .npy file"

    def read(self, path: Path) -> Acquisition:
        """Decode; NotReady for a truncated file, BadInput for a foreign one (class docstring)."""
        try:
            well, t, channel = path.stem.split("_", 2)
            timepoint = int(t[1:])
        except ValueError:
            raise BadInput(path, "name does not match <well>_t<N>_<channel>.npy") from None
        try:
            with path.open("rb") as f:
                head = f.read(6)
        except OSError as e:
            raise NotReady(path, f"cannot open ({e.strerror})") from None
        if len(head) == 6 and head != b"\x93NUMPY":
            raise BadInput(path, "not a .npy file (bad magic)")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:  # header or data cut short: still being written
            raise NotReady(path, f"truncated .npy ({type(e).__name__})") from None
        role = guess_role(channel)
        return Acquisition(path, FrameKey("test", well, "1", timepoint), {channel: arr}, self.pixel_size_um, "config", "test",
                           roles={channel: role} if role else {})


# ---- contract checks ----------------------------------------------------------
def check_reader(reader: FrameReader, good: Path, bad: Path | None = None) -> Acquisition:
    """A reader accepts and reads ``good`` into a valid Acquisition; ``bad`` raises one-line BadInput."""
    reader = complete("readers", reader)  # as the registry builds it: optional members get their defaults
    assert isinstance(reader, FrameReader), "reader lacks name/accepts/read"
    assert reader.accepts(good) is None, f"{reader.name} declined {good}: {reader.accepts(good)}"
    acq = reader.read(good)
    assert isinstance(acq, Acquisition)
    assert acq.channels, "no channels"
    for name, img in acq.channels.items():
        assert img.ndim in (2, 3), f"channel {name} has ndim {img.ndim}"
    assert 0.05 <= acq.pixel_size_um <= 5.0, f"pixel size {acq.pixel_size_um} out of range"
    assert acq.pixel_size_source == "config" or acq.pixel_size_source.startswith("metadata:")
    if bad is not None:
        try:
            reader.read(bad)
        except (BadInput, NotReady) as e:  # never readable, or (a cut file) retried until the deadline
            assert "\n" not in str(e) and str(bad) in str(e), f"error is not one line naming the file: {e!r}"
        else:
            raise AssertionError(f"{reader.name} read a bad file without error: {bad}")
    return acq


def check_segmenter(seg: Segmenter, frame: Frame) -> Cells:
    """Labels on the frame's grid, ids matching the Cell list, positive areas; returns the Cells."""
    seg = complete("segmenters", seg)  # as the registry builds it: optional members get their defaults
    assert isinstance(seg, Segmenter)
    cells = seg.segment(frame)
    assert cells.labels.shape == frame.image.shape[:2], "labels not on the frame's grid"
    ids = set(np.unique(cells.labels)) - {0}
    assert ids == {c.id for c in cells.cells}, "label ids and Cell ids differ"
    for c in cells.cells:
        assert c.area_um2 > 0
    return cells


def check_encoder(enc: Encoder, n: int = 3, size: int = 224) -> np.ndarray:
    """(n, dim) finite float32 vectors, deterministic across calls, and a non-empty ``id``."""
    enc = complete("encoders", enc)  # as the registry builds it: optional members get their defaults
    assert isinstance(enc, Encoder)
    crops = np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    v = np.asarray(enc.encode(crops))
    assert v.shape == (n, enc.dim), f"{enc.name}: shape {v.shape}, expected ({n}, {enc.dim})"
    assert v.dtype == np.float32 and np.isfinite(v).all()
    again = np.asarray(enc.encode(crops))
    assert np.allclose(v, again, atol=1e-4), f"{enc.name} is not deterministic"
    assert isinstance(enc.id, str) and enc.id
    return v


def check_sink(sink: Sink, counts: Counts, read_back: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
    """A sink keeps what it is given: ``read_back()`` must show ``counts`` after ``write``.

    ``read_back`` returns what the sink holds as mappings (a CSV's rows, a
    registry's samples) with at least ``well`` and ``n_cells`` and, where the
    sink keeps them, ``timepoint`` and one entry per class. A record-of-truth
    sink must also be idempotent: writing the same frame twice keeps one row.
    """
    sink = complete("sinks", sink)  # as the registry builds it: optional members get their defaults
    assert isinstance(sink, Sink), "sink lacks name/write"
    assert isinstance(sink.name, str) and sink.name
    assert isinstance(sink.record_of_truth, bool)

    def matches(row: Mapping[str, Any]) -> bool:
        want: dict[str, Any] = {"well": counts.key.well, "n_cells": counts.n_cells, "timepoint": counts.key.timepoint, **counts.counts}
        return all(str(row[k]) == str(v) for k, v in want.items() if k in row) and "n_cells" in row and "well" in row

    sink.write(counts)
    if sink.record_of_truth:
        sink.write(counts)
    held = list(read_back())
    found = [r for r in held if matches(r)]
    assert found, f"sink {sink.name} does not hold what was written ({len(held)} row(s) read back)"
    if sink.record_of_truth:
        assert len(found) == 1, f"record-of-truth sink {sink.name} wrote the same frame {len(found)} times"
    sink.close()
