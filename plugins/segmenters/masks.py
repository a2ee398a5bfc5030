"""``masks``: segmentation made by another tool, found beside the frame by name.

Labs that segment with Cellpose, StarDist or celldetective feed their masks
in: for a frame read from ``<name>.tif`` the segmenter looks, in order of
``suffixes``, for ``<name>_labelled.tif`` (celldetective), ``<name>_cp_masks.png``
(Cellpose's PNG), ``<name>_cp_masks.tif`` and ``<name>_seg.npy`` (Cellpose's
GUI file, read without unpickling: only its ``masks`` array, see below), in
the frame's own folder or in ``folder``.

Policy
------
* A mask is an instance label image on the instrument's own grid (the frame
  before the rescale to the common pixel size: ``Frame.source_shape_yx``):
  0 is background, each other integer one object. It is resampled to the
  frame's working grid by nearest neighbour (ids never invented).
* Not there yet: the frame waits like a half-written file
  (:class:`~monitor.errors.NotReady`: retried with back-off until
  ``service.ready_deadline_s``, then quarantined), since another tool writes
  masks after the microscope writes the frame.
* A mask of another size than its frame, one that is not an integer label
  image (floats, RGB, negative ids), or a file that does not decode is one
  :class:`~monitor.errors.BadInput` line naming the mask file: the frame is
  quarantined.
* ``_seg.npy`` files are NumPy pickles of a dict; cellmonitor never unpickles,
  so a lab converts them once (``np.save(name + "_cp_masks.npy", masks)``)
  or, better, saves PNG masks from Cellpose (``--save_png``). A ``.npy`` mask
  that holds a plain integer array is read.
* Objects smaller than ``min_area_um2`` (mask debris) are left out; object
  ids are kept, so a per-cell row names the label the other tool gave.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from monitor.errors import BadInput, NotReady
from monitor.imaging import resize
from monitor.protocols import BuildContext, SegmenterBase
from monitor.readkit import stem_of
from monitor.records import Cells, Frame
from monitor.registry import plugin_spec
from monitor.segmentation import cells_from_labels

log = logging.getLogger(__name__)

DEFAULT_SUFFIXES = ("_labelled.tif", "_labelled.tiff", "_cp_masks.png", "_cp_masks.tif", "_cp_masks.npy", "_seg.npy")


class Options(BaseModel):
    """Options of the ``masks`` segmenter (``[segmenter.options]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    suffixes: list[str] = Field(default_factory=lambda: list(DEFAULT_SUFFIXES), min_length=1,
                                description="mask file = frame file name without its suffix + one of these, first found wins")
    folder: Path | None = Field(None, description="where the masks are (default: beside each frame; relative to the config)")
    min_area_um2: float = Field(0.0, ge=0, description="objects smaller than this are left out")


class MaskSegmenter(SegmenterBase):
    """Reads the instance masks another tool wrote for each frame (module docstring)."""

    name = "masks"

    def __init__(self, options: Options, folder: Path | None = None):
        self.o = options
        self.folder = folder

    def candidates(self, source: Path) -> list[Path]:
        """Where the mask of the frame read from ``source`` may be, in order."""
        where = self.folder or source.parent
        return [where / (stem_of(source) + suf) for suf in self.o.suffixes]

    def mask_path(self, frame: Frame) -> Path:
        """The first mask found for ``frame``'s primary file.

        Raises
        ------
        NotReady
            No mask yet (another tool may still be writing it).
        """
        if not frame.sources:
            raise BadInput(frame.key, "the masks segmenter needs the frame's file name to find its mask")
        source = Path(frame.sources[0])
        found = [p for p in self.candidates(source) if p.is_file()]
        if not found:
            names = ", ".join(p.name for p in self.candidates(source)[:3])
            raise NotReady(source, f"no segmentation mask yet (looked for {names}, ...{' in ' + str(self.folder) if self.folder else ''})")
        return found[0]

    def segment(self, frame: Frame) -> Cells:
        """The frame's mask on its working grid, as cells (one per label id)."""
        path = self.mask_path(frame)
        labels = read_mask(path)
        want = frame.source_shape_yx or frame.shape_px
        if labels.shape != tuple(want):
            raise BadInput(path, f"mask is {labels.shape[0]}x{labels.shape[1]} px but its frame is {want[0]}x{want[1]} px")
        if labels.shape != frame.shape_px:
            labels = resize(labels, frame.shape_px, labels=True)
        return cells_from_labels(labels, frame.pixel_size_um, self.o.min_area_um2, relabel=False)


def read_mask(path: Path) -> np.ndarray:
    """An integer label image from a TIFF, PNG or plain ``.npy`` file (never unpickled).

    Raises
    ------
    NotReady
        The file is cut short (still being written).
    BadInput
        Not a 2-D image of non-negative integer labels, or a pickled ``.npy``.
    """
    from monitor.imageio import read_raster, read_tiff

    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except ValueError as e:
                if "pickle" in str(e).lower():
                    raise BadInput(path, "a pickled .npy (Cellpose's _seg.npy holds a dict); save the masks as PNG "
                                         "(cellpose --save_png) or as a plain integer array") from None
                raise NotReady(path, f"mask .npy does not decode yet ({e})") from None
        elif suffix in (".tif", ".tiff"):
            pages = read_tiff(path).pages
            if len(pages) != 1:
                raise BadInput(path, f"not a label image: {len(pages)} planes (a mask is one 2-D plane of object ids)")
            arr = pages[0]
        else:
            arr = read_raster(path)
    except OSError as e:
        raise NotReady(path, f"cannot open the mask ({e.strerror or e})") from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and np.all(arr[..., :3] == arr[..., :1]):
        arr = arr[..., 0]  # grey saved as RGB
    if arr.ndim != 2:
        raise BadInput(path, f"not a label image: {arr.ndim}-D array of shape {arr.shape} (a mask is one 2-D plane of object ids)")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise BadInput(path, f"not a label image: {arr.dtype} values that are not whole numbers")
    if arr.size and arr.min() < 0:
        raise BadInput(path, "not a label image: negative object ids")
    return arr.astype(np.int32, copy=False)


def _build(options: Options, ctx: BuildContext) -> MaskSegmenter:
    folder = options.folder
    if folder is not None and not folder.is_absolute() and ctx.config_path is not None:
        folder = Path(ctx.config_path).parent / folder
    if folder is not None and not folder.is_dir():
        raise BadInput(folder, "segmenter.options.folder: no such folder")
    return MaskSegmenter(options, folder)


PLUGIN = plugin_spec("masks", "instance masks written by another tool (celldetective, Cellpose, StarDist) beside each frame",
                     Options, _build)
