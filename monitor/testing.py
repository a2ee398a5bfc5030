"""Fakes and contract checks, shipped so a lab can test its own plugins the same way.

Fakes are real implementations of the protocols with trivial behaviour:
:class:`DiscSegmenter` finds bright blobs, :class:`MeanColourEncoder` embeds a
crop as its mean colour and brightness histogram, :class:`ListSink` keeps what
it receives. ``check_*`` functions assert the contract of a plugin instance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monitor.errors import BadInput
from monitor.protocols import Encoder, FrameReader, Segmenter, Sink
from monitor.records import Acquisition, Cells, Counts, Frame, FrameKey
from monitor.segmentation import cells_from_labels


class DiscSegmenter:
    """Threshold at mean + 2 sd of the primary channel, label connected blobs."""

    name = "disc"

    def __init__(self, min_area_um2: float = 5.0):
        self.min_area_um2 = min_area_um2

    def segment(self, frame: Frame) -> Cells:
        from skimage.measure import label

        from monitor.imaging import to_float

        g = to_float(frame.image)
        lab = label(g > g.mean() + 2 * g.std())
        return cells_from_labels(lab, frame.pixel_size_um, self.min_area_um2)


class MeanColourEncoder:
    """8-d embedding: mean R, G, B and a 5-bin brightness histogram of the crop."""

    name = "mean-colour"
    id = "mean-colour@1"
    dim = 8

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, crops: np.ndarray) -> np.ndarray:
        self.calls += 1
        c = np.asarray(crops, dtype=np.float32) / 255.0
        mean = c.mean(axis=(1, 2))
        g = c.mean(axis=3).reshape(len(c), -1)
        hist = np.stack([np.histogram(x, bins=5, range=(0, 1))[0] / x.size for x in g]) if len(c) else np.zeros((0, 5))
        return np.concatenate([mean, hist], axis=1).astype(np.float32)


class ListSink:
    name = "list"

    def __init__(self) -> None:
        self.rows: list[Counts] = []
        self.closed = False

    def write(self, counts: Counts) -> None:
        self.rows.append(counts)

    def close(self) -> None:
        self.closed = True


class ArrayReader:
    """Reads ``.npy`` files named ``<well>_t<N>_<channel>.npy`` at a fixed pixel size."""

    name = "npy"
    specificity = 1

    def __init__(self, pixel_size_um: float = 0.322):
        self.pixel_size_um = pixel_size_um

    def accepts(self, path: Path) -> str | None:
        return None if path.suffix == ".npy" else "not a .npy file"

    def read(self, path: Path) -> Acquisition:
        well, t, channel = path.stem.split("_", 2)
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise BadInput(path, f"not a readable .npy ({e})") from None
        return Acquisition(path, FrameKey("test", well, "1", int(t[1:])), {channel: arr}, self.pixel_size_um, "config", "test")


# ---- contract checks ----------------------------------------------------------
def check_reader(reader: FrameReader, good: Path, bad: Path | None = None) -> Acquisition:
    """A reader accepts and reads ``good`` into a valid Acquisition; ``bad`` raises one-line BadInput."""
    assert isinstance(reader, FrameReader), "reader lacks name/specificity/accepts/read"
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
        except BadInput as e:
            assert "\n" not in str(e) and str(bad) in str(e), f"error is not one line naming the file: {e!r}"
        else:
            raise AssertionError(f"{reader.name} read a bad file without error: {bad}")
    return acq


def check_segmenter(seg: Segmenter, frame: Frame) -> Cells:
    assert isinstance(seg, Segmenter)
    cells = seg.segment(frame)
    assert cells.labels.shape == frame.image.shape[:2], "labels not on the frame's grid"
    ids = set(np.unique(cells.labels)) - {0}
    assert ids == {c.id for c in cells.cells}, "label ids and Cell ids differ"
    for c in cells.cells:
        assert c.area_um2 > 0
    return cells


def check_encoder(enc: Encoder, n: int = 3, size: int = 224) -> np.ndarray:
    assert isinstance(enc, Encoder)
    crops = np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    v = np.asarray(enc.encode(crops))
    assert v.shape == (n, enc.dim), f"{enc.name}: shape {v.shape}, expected ({n}, {enc.dim})"
    assert v.dtype == np.float32 and np.isfinite(v).all()
    again = np.asarray(enc.encode(crops))
    assert np.allclose(v, again, atol=1e-4), f"{enc.name} is not deterministic"
    assert isinstance(enc.id, str) and enc.id
    return v


def check_sink(sink: Sink, counts: Counts) -> None:
    assert isinstance(sink, Sink)
    sink.write(counts)
    sink.close()
