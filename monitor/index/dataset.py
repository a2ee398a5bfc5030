"""Labelled cell data sets on disk, and how each item becomes a crop.

Two layouts are recognised (:func:`scan`):

* **class folders** -- ``DATA/<class>/<image>``: each image is one cell; its
  class is the folder name.
* **boxed frames** -- ``DATA/<image>`` with a Pascal VOC ``<image stem>.xml``
  beside it: each ``<object>`` is one cell, labelled ``<name>``, framed by its
  box (default: the box plus a margin, resized to the crop size; the
  service frames segmented cells by their bounding box the same way) or by
  a fixed window around the box centre at the target pixel size.

Crops are made only through the service's own image path
(:func:`monitor.imaging.rescale`, :func:`~monitor.imaging.display_range`,
:func:`~monitor.imaging.crop_at`), so a reference cell looks to an encoder as a
live cell does. :class:`Preprocess` holds every parameter that changes the
pixels an encoder sees; it is part of the embedding-cache key and is written
into the index metadata.

Policy: an unreadable image or XML is skipped with one warning line naming the
file (never fatal); an empty data set is a :class:`~monitor.errors.BadInput`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from monitor import imaging
from monitor.errors import BadInput, NoInput, NotReady
from monitor.hashing import file_sha256
from monitor.imageio import TIFF_SUFFIXES, as_plane, read_raster, read_tiff
from monitor.records import Frame, FrameKey

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

Framing = Literal["whole", "center", "cell"]
BoxFraming = Literal["box", "window"]
Colour = Literal["rgb", "grey", "reinhard"]

# Reinhard colour transfer target (cv2 8-bit Lab): mean and std of L, a, b,
# measured on a sample of PBC smears, so normalised images look like PBC.
_LAB_TARGET_MEAN = np.array([196.0, 138.0, 122.0], dtype=np.float32)
_LAB_TARGET_STD = np.array([30.0, 9.0, 9.0], dtype=np.float32)


@dataclass(frozen=True)
class Preprocess:
    """Everything that turns a file into the crop an encoder sees.

    Parameters
    ----------
    framing
        Class-folder images only (boxed frames are always cropped at the box
        centre). ``whole``: the whole image, padded square with its median
        colour, resized to ``crop_px``. ``center``: rescaled from
        ``source_pixel_size_um`` to ``pixel_size_um`` and cropped
        ``crop_px`` square around the image centre (the service's crop).
        ``cell``: scale normalisation: the stained cell nearest the centre is
        segmented (Otsu on colour saturation), the image is rescaled so that
        its equivalent diameter becomes ``cell_diameter_px``, then cropped
        ``crop_px`` around its centroid.
    crop_px
        Crop side in pixels at the target pixel size.
    pixel_size_um, source_pixel_size_um
        Target and data pixel sizes; ``source_pixel_size_um=None`` means the
        data is already at the target (no rescale).
    colour
        ``rgb`` unchanged; ``grey`` luminance replicated to 3 channels;
        ``reinhard`` per-crop Lab mean/std transfer to a fixed PBC-like target
        (a stain normalisation).
    cell_diameter_px
        Target cell diameter for ``framing="cell"``.
    box_framing, box_margin
        Boxed frames only. ``box`` (default): each cell framed by its box,
        the square of the box's longer side plus ``box_margin`` of it on each
        side, resized to ``crop_px`` (:func:`monitor.imaging.crop_boxes`; the
        pipeline's ``crop_framing = "box"`` frames segmented cells the same
        way). ``window``: a ``crop_px`` window around the box centre at the
        target pixel size (the service's fixed-window crop).
    """

    framing: Framing = "whole"
    crop_px: int = 224
    pixel_size_um: float = 0.322
    source_pixel_size_um: float | None = None
    colour: Colour = "rgb"
    cell_diameter_px: int = 120
    box_framing: BoxFraming = "box"
    box_margin: float = 0.2

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, recorded in the index's ``preprocessing``."""
        return asdict(self)

    def key(self) -> str:
        """Stable short digest of the parameters (part of the cache key)."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Back from :meth:`as_dict` (unknown keys from newer versions ignored)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class SourceFile:
    """One image file and the cells it holds (one per box, or one whole-image cell)."""

    path: Path
    name: str  # path relative to the data root
    labels: tuple[str, ...]
    boxes: tuple[tuple[float, float, float, float], ...] | None = None  # xmin, ymin, xmax, ymax
    annotation: Path | None = None

    @property
    def n_cells(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    """A scanned data set: files in a stable order and the sorted class names."""

    root: Path
    layout: Literal["folders", "voc"]
    files: tuple[SourceFile, ...]
    classes: tuple[str, ...]
    skipped: tuple[str, ...] = field(default=())

    @property
    def n_cells(self) -> int:
        return sum(f.n_cells for f in self.files)

    def labels(self) -> list[str]:
        """The class name of every cell, in file order."""
        return [lab for f in self.files for lab in f.labels]

    def names(self) -> list[str]:
        """A stable name per cell (``file`` or ``file#box``), in file order."""
        out = []
        for f in self.files:
            if f.boxes is None:
                out.append(f.name)
            else:
                out += [f"{f.name}#{i}" for i in range(len(f.boxes))]
        return out

    def counts(self) -> dict[str, int]:
        """Cells per class."""
        labs = self.labels()
        return {c: labs.count(c) for c in self.classes}


def parse_voc(xml_path: Path) -> tuple[list[str], list[tuple[float, float, float, float]]]:
    # ElementTree does not expand external entities; annotation files are small
    """Labels and boxes (xmin, ymin, xmax, ymax in pixels) of a Pascal VOC annotation; no entity expansion."""
    root = ET.parse(xml_path).getroot()
    labels, boxes = [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if not name or bb is None:
            continue
        vals = [float(bb.findtext(t) or "nan") for t in ("xmin", "ymin", "xmax", "ymax")]
        if not all(np.isfinite(vals)):
            continue
        labels.append(name)
        boxes.append((vals[0], vals[1], vals[2], vals[3]))
    return labels, boxes


def voc_image(xml: Path) -> Path | None:
    """The image a Pascal VOC annotation describes: the file beside it with its stem and an image suffix, if any."""
    return next((xml.with_suffix(s) for s in IMAGE_SUFFIXES if xml.with_suffix(s).is_file()), None)


def scan(root: str | Path, classes: list[str] | None = None) -> Dataset:
    """Find the cells of a data folder (class sub-folders or VOC-boxed frames).

    ``classes`` restricts (and orders) the classes kept; other cells are
    dropped. Unreadable annotations are skipped with one warning line each.
    Raises :class:`BadInput` when the folder holds no labelled cell.
    """
    root = Path(root)
    if not root.exists():
        raise NoInput(root, "no such folder")  # exit 66, as a missing file in every command
    if not root.is_dir():
        raise BadInput(root, "not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    xmls = sorted(root.glob("*.xml"))
    files: list[SourceFile] = []
    skipped: list[str] = []
    if xmls:
        layout: Literal["folders", "voc"] = "voc"
        for x in xmls:
            img = voc_image(x)
            if img is None:
                skipped.append(f"{x}: no image beside the annotation")
                continue
            try:
                labels, boxes = parse_voc(x)
            except (ET.ParseError, OSError, ValueError) as e:
                skipped.append(f"{x}: unreadable annotation ({e})")
                continue
            if classes is not None:
                keep = [i for i, lab in enumerate(labels) if lab in classes]
                labels, boxes = [labels[i] for i in keep], [boxes[i] for i in keep]
            if labels:
                files.append(SourceFile(img, img.name, tuple(labels), tuple(boxes), x))
    elif subdirs:
        layout = "folders"
        for d in subdirs:
            if classes is not None and d.name not in classes:
                continue
            for p in sorted(d.iterdir()):
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(SourceFile(p, f"{d.name}/{p.name}", (d.name,)))
    else:
        raise BadInput(root, "no class sub-folders and no Pascal VOC .xml files")
    for s in skipped:
        log.warning("skipped %s", s)
    found = sorted({lab for f in files for lab in f.labels})
    names = [c for c in classes if c in found] if classes is not None else found
    if not files:
        raise BadInput(root, "no labelled cells found")
    return Dataset(root, layout, tuple(files), tuple(names), tuple(skipped))


def file_digest(path: Path, annotation: Path | None = None) -> str:
    """SHA-256 of the file's bytes (and of its annotation, whose boxes shape the crops)."""
    return file_sha256(path, annotation, separator=b"\0")


def read_image(path: Path) -> np.ndarray:
    """Decode a labelled image with the readers' own decoding (:mod:`monitor.imageio`).

    The same code the service's readers use: declared-size cap before
    decoding, NaN/inf handling, one plane per image (the first page of a
    multi-page TIFF). A file that cannot be decoded is :class:`BadInput` (a
    data set is not being written while it is indexed, so no retry).
    """

    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            return as_plane(path, "image", read_tiff(path).pages[0])
        return as_plane(path, "image", read_raster(path))
    except NotReady as e:
        raise BadInput(path, e.problem) from None


def _frame(image: np.ndarray, pixel_size_um: float) -> Any:

    return Frame(
        key=FrameKey("index", "-", "-", 0),
        channels={"image": image},
        primary="image",
        control=None,
        pixel_size_um=pixel_size_um,
        pixel_size_source="config",
        instrument="dataset",
    )


def _colour(crops: np.ndarray, colour: Colour) -> np.ndarray:
    if colour == "rgb":
        return crops
    import cv2

    out = np.empty_like(crops)
    for i, c in enumerate(crops):
        if colour == "grey":
            g = cv2.cvtColor(c, cv2.COLOR_RGB2GRAY)
            out[i] = g[..., None]
        else:
            lab = cv2.cvtColor(c, cv2.COLOR_RGB2LAB).astype(np.float32)
            mu = lab.reshape(-1, 3).mean(axis=0)
            sd = lab.reshape(-1, 3).std(axis=0) + 1e-3
            lab = (lab - mu) / sd * _LAB_TARGET_STD + _LAB_TARGET_MEAN
            out[i] = cv2.cvtColor(np.clip(lab, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)
    return out


def _central_cell(rgb: np.ndarray) -> tuple[tuple[float, float], float] | None:
    """(centroid y, x) and equivalent diameter of the stained object nearest the centre."""
    import cv2
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    sat = np.asarray(cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32), (0, 0), 2.0))
    if sat.max() <= sat.min():
        return None
    fg = ndi.binary_fill_holes(sat > threshold_otsu(sat))
    lab, n = ndi.label(fg)
    if n == 0:
        return None
    h, w = fg.shape
    idx = np.arange(1, n + 1)
    areas = ndi.sum(fg, lab, idx)
    cents = np.array(ndi.center_of_mass(fg, lab, idx)).reshape(-1, 2)
    big = areas >= 0.002 * h * w
    if not big.any():
        return None
    d2 = ((cents - [h / 2, w / 2]) ** 2).sum(axis=1) / np.maximum(areas, 1) ** 0.5
    d2[~big] = np.inf
    j = int(np.argmin(d2))
    return (float(cents[j, 0]), float(cents[j, 1])), float(2.0 * np.sqrt(areas[j] / np.pi))


def crops_for(image: np.ndarray, prep: Preprocess, boxes: tuple[tuple[float, float, float, float], ...] | None = None) -> np.ndarray:
    """(N, crop_px, crop_px, 3) uint8 crops of one image under ``prep``.

    Boxes are in the file's own pixel grid; their centres are mapped through
    the same rescale as the image.
    """

    src_um = prep.source_pixel_size_um or prep.pixel_size_um
    size = prep.crop_px
    if boxes is not None and prep.box_framing == "box":
        rgb = imaging.display_range(image)
        yxyx = np.array([(b[1], b[0], b[3], b[2]) for b in boxes], dtype=np.float64).reshape(-1, 4)
        return _colour(imaging.crop_boxes(rgb, yxyx, size, prep.box_margin), prep.colour)
    if boxes is not None:
        frame = imaging.rescale(_frame(image, src_um), prep.pixel_size_um)
        f = frame.shape_px[0] / image.shape[0]
        rgb = imaging.display_range(frame.image)
        centres = np.array([((b[1] + b[3]) / 2 * f, (b[0] + b[2]) / 2 * f) for b in boxes], dtype=np.float64).reshape(-1, 2)
        return _colour(imaging.crop_at(rgb, centres, size), prep.colour)
    if prep.framing == "whole":
        rgb = imaging.display_range(image)
        h, w = rgb.shape[:2]
        side = max(h, w)
        sq = imaging.crop_at(rgb, np.array([[h / 2, w / 2]]), side)[0]
        crop = imaging.resize(sq, (size, size))
        return _colour(np.asarray(crop, dtype=np.uint8)[None], prep.colour)
    if prep.framing == "cell":
        rgb0 = imaging.display_range(image)
        found = _central_cell(rgb0)
        if found is not None:
            (cy, cx), diam = found
            # choose the source pixel size that maps the cell to cell_diameter_px
            eff_um = prep.pixel_size_um * prep.cell_diameter_px / max(diam, 1.0)
            frame = imaging.rescale(_frame(image, eff_um), prep.pixel_size_um)
            f = frame.shape_px[0] / image.shape[0]
            rgb = imaging.display_range(frame.image)
            return _colour(imaging.crop_at(rgb, np.array([[cy * f, cx * f]]), size), prep.colour)
        log.debug("no stained cell found; centre crop instead")
    frame = imaging.rescale(_frame(image, src_um), prep.pixel_size_um)
    rgb = imaging.display_range(frame.image)
    h, w = rgb.shape[:2]
    return _colour(imaging.crop_at(rgb, np.array([[h / 2, w / 2]]), size), prep.colour)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays, stratified by class, reproducible with ``seed``.

    Every class with at least two cells keeps at least one in each part.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def group_split(labels: np.ndarray, groups: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split by group (e.g. source frame), so cells of one frame never sit on both sides."""
    groups = np.asarray(groups)
    ug = np.unique(groups)
    rng = np.random.default_rng(seed)
    ug = ug[rng.permutation(len(ug))]
    n_test = max(1, int(round(len(ug) * test_fraction)))
    test_groups = set(ug[:n_test].tolist())
    is_test = np.array([g in test_groups for g in groups])
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)
