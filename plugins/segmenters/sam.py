"""Segment Anything (SAM) automatic masks as a cellmonitor segmenter.

SAM proposes masks from a regular grid of point prompts
(:class:`segment_anything.SamAutomaticMaskGenerator`: points decoded in
batches of ``points_per_batch``, filtered by SAM's own predicted IoU and
stability score, de-duplicated by box NMS). cellmonitor then keeps the masks
that look like cells on *this* frame's pixel grid:

- area between ``min_area_um2`` and ``max_area_um2`` (um^2, so one
  configuration serves the 0.19 um/px Nanolive and the 0.322 um/px Lionheart;
  the largest SAM proposals are usually the background or a whole cluster),
- optionally no contact with the image border,
- overlaps resolved into one instance label image: masks are painted from the
  best (predicted IoU x stability) down, a pixel belongs to the first mask that
  claims it, and a mask that keeps less than ``min_unique_fraction`` of its
  area after better masks claimed theirs is a duplicate and dropped.

Weights are a user-supplied artefact (no hub is reachable at run time): a
missing checkpoint is a one-line :class:`~monitor.errors.WeightsMissing`
telling where to put it. Device: ``cuda`` when asked for (or ``auto``) and
available, else CPU with a warning about the expected time.

torch and segment_anything are imported in ``build``/``segment`` only, so
listing plugins stays cheap.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from monitor.device import resolve_device
from monitor.protocols import BuildContext, SegmenterBase
from monitor.records import Cells, Frame
from monitor.registry import plugin_spec
from monitor.segmentation import cells_from_labels

log = logging.getLogger(__name__)

CHECKPOINT_NAMES = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}

#: ``BuildContext.models`` key prefix: (SHARED_KEY, model_type, checkpoint) -> a SAM segmenter's FrameEmbeddings
SHARED_KEY = "sam.frame_embeddings"

#: rough CPU seconds per frame on a 2-core machine (vit_b measured: 100 s at 16x16 points)
_CPU_SECONDS_HINT = {"vit_h": 400, "vit_l": 250, "vit_b": 100}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model_type: str = Field("vit_h", min_length=1, description="a key of segment_anything.sam_model_registry")
    checkpoint: Path | None = Field(None, description="SAM weights (.pth); default <state_dir>/models/<official name>")
    points_per_side: int = Field(32, ge=1, le=256)
    points_per_batch: int = Field(64, ge=1, le=4096, description="point prompts decoded per batch")
    pred_iou_thresh: float = Field(0.88, ge=0.0, le=1.0)
    stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0)
    box_nms_thresh: float = Field(0.7, gt=0.0, le=1.0)
    crop_n_layers: int = Field(0, ge=0, le=3)
    min_area_um2: float = Field(20.0, ge=0)
    max_area_um2: float = Field(20000.0, gt=0)
    exclude_border: bool = False
    min_unique_fraction: float = Field(0.5, gt=0.0, le=1.0, description="share of a mask not claimed by better masks to keep it")


def checkpoint_path(options: Options, ctx: BuildContext) -> Path:
    """Where the weights are expected: the configured path, else ``<state_dir>/models/<official name>``."""
    if options.checkpoint is not None:
        path = Path(options.checkpoint).expanduser()
        if not path.is_absolute() and ctx.config_path is not None:
            path = Path(ctx.config_path).parent / path
        return path
    name = CHECKPOINT_NAMES.get(options.model_type, f"sam_{options.model_type}.pth")
    return Path(ctx.state_dir) / "models" / name


def resolve_checkpoint(options: Options, ctx: BuildContext) -> Path:
    """:func:`checkpoint_path`, which must exist.

    Raises
    ------
    WeightsMissing
        When the file does not exist (one line saying how to provide it).
    """
    from monitor.errors import WeightsMissing

    path = checkpoint_path(options, ctx)
    if not path.is_file():
        official = CHECKPOINT_NAMES.get(options.model_type, "the matching SAM .pth file")
        raise WeightsMissing(
            f"segmenter sam: checkpoint not found at {path}: download {official} on a machine with "
            f"internet access, copy it here and set [segmenter.options] checkpoint = \"/path/to/{official}\""
        )
    return path


def describe_checkpoint(options: Options, ctx: BuildContext) -> dict[str, Any]:
    """For ``cellmonitor models list``: where the checkpoint is (or is expected), nothing loaded.

    ``dim`` is SAM's image-embedding channels (256 for the official
    ``vit_h``/``vit_l``/``vit_b``; unknown for other registry entries).
    """
    import importlib.util

    path = checkpoint_path(options, ctx)
    present = path.is_file()
    size = f", {path.stat().st_size / 2**30:.2f} GiB" if present else ""
    where = f"{path}{size}" if present else f"{path} (missing: copy {CHECKPOINT_NAMES.get(options.model_type, 'the .pth file')} there)"
    package = importlib.util.find_spec("segment_anything") is not None
    return {
        "present": present and package,
        "where": where if package else f"{where}; segment-anything missing: pip install 'cellmonitor[sam]'",
        "dim": 256 if options.model_type in CHECKPOINT_NAMES else None,
        "dtype": "float32",
    }


def require_sam(who: str = "segmenter sam") -> None:
    """segment-anything (and the torchvision it imports) are the ``sam`` extra: a one-line error without them."""
    from monitor.errors import PluginError

    try:
        import segment_anything  # noqa: F401
    except ImportError as e:
        raise PluginError(f"{who} needs the segment-anything package ({e.msg}): pip install 'cellmonitor[sam]'") from None


def load_sam(model_type: str, checkpoint: Path, device: str) -> Any:
    """Build SAM's architecture from ``sam_model_registry`` and load a state dict.

    The weights are loaded here (``weights_only``, mapped to ``device``) rather
    than by segment_anything's builder so that a checkpoint saved on a GPU
    loads on a CPU-only machine and a wrong file is one clear line.
    """
    import torch
    from segment_anything import sam_model_registry

    from monitor.errors import WeightsMissing

    if model_type not in sam_model_registry:
        raise WeightsMissing(
            f"segmenter sam: unknown model_type {model_type!r} (expected one of {', '.join(sorted(sam_model_registry))})"
        )
    model = sam_model_registry[model_type](checkpoint=None)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:  # unreadable file, wrong model type, truncated download
        raise WeightsMissing(
            f"segmenter sam: cannot load {checkpoint} as a {model_type} checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        ) from None
    return model.to(device).eval()


def masks_to_labels(masks: list[dict[str, Any]], shape: tuple[int, int], min_unique_fraction: float = 0.5) -> np.ndarray:
    """One instance label image from overlapping SAM masks.

    Policy: masks are painted from the highest ``predicted_iou *
    stability_score`` down; each pixel goes to the first mask claiming it; a
    mask left with less than ``min_unique_fraction`` of its own area is a
    duplicate (or the union of cells already found) and is dropped.
    """
    labels = np.zeros(shape, dtype=np.int32)
    order = sorted(
        range(len(masks)),
        key=lambda i: -float(masks[i].get("predicted_iou", 1.0)) * float(masks[i].get("stability_score", 1.0)),
    )
    n = 0
    for i in order:
        m = np.asarray(masks[i]["segmentation"], dtype=bool)
        area = int(m.sum())
        if area == 0:
            continue
        free = m & (labels == 0)
        if free.sum() < min_unique_fraction * area:
            continue
        n += 1
        labels[free] = n
    return labels


class FrameEmbeddings:
    """SAM image embeddings of the last few frames, computed once and shared (thread-safe).

    The segmenter's mask generator and SAM's fast encoder
    (:mod:`cellmonitor_plugins.encoders.sam`) ask for the same frame; the
    image encoder (34 ms a frame for ViT-H on an H100, minutes on a CPU) runs
    once. The image is the frame's primary channel in display range
    (:func:`monitor.imaging.display_range`), resized by SAM's own
    ``ResizeLongestSide`` exactly as ``SamPredictor.set_image`` does. A frame
    is known by its image array's identity (the array is held while cached)
    and key; ``capacity`` frames are kept, the oldest dropped first.
    """

    def __init__(self, model: Any, capacity: int = 16):
        import threading
        from collections import OrderedDict

        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model
        self.capacity = capacity
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.computed = 0  # image-encoder runs, for tests and logs
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, Any], tuple[np.ndarray, Any, tuple[int, int], tuple[int, int]]] = OrderedDict()

    def get(self, frame: Frame, rgb: np.ndarray | None = None) -> tuple[Any, tuple[int, int], tuple[int, int]]:
        """``(features (1, C, G, G), input_size, original_size)`` of ``frame`` (computed if not cached)."""
        key = (id(frame.image), frame.key)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] is frame.image:
                self._entries.move_to_end(key)
                return hit[1], hit[2], hit[3]
        import torch

        from monitor.imaging import display_range

        rgb = display_range(frame.image) if rgb is None else rgb
        device = next(self.model.parameters()).device
        x = torch.as_tensor(self.transform.apply_image(rgb), device=device).permute(2, 0, 1).contiguous()[None]
        with torch.inference_mode():
            features = self.model.image_encoder(self.model.preprocess(x))
        entry = (frame.image, features, (int(x.shape[-2]), int(x.shape[-1])), (int(rgb.shape[0]), int(rgb.shape[1])))
        with self._lock:
            self.computed += 1
            self._entries[key] = entry
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return entry[1], entry[2], entry[3]


def _shared_predictor(model: Any, cache: FrameEmbeddings) -> Any:
    """A ``SamPredictor`` whose ``set_image`` takes the whole frame's embedding from ``cache``."""
    from segment_anything import SamPredictor

    class SharedPredictor(SamPredictor):
        frame: Frame | None = None

        def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
            f = self.frame
            if f is None or image.shape[:2] != f.shape_px or image_format != self.model.image_format:
                return super().set_image(image, image_format)  # a sub-crop (crop_n_layers > 0)
            self.reset_image()
            self.features, self.input_size, self.original_size = cache.get(f, image)
            self.is_image_set = True

    return SharedPredictor(model)


class SamSegmenter(SegmenterBase):
    """SAM automatic mask generation, filtered into one instance label image."""

    name = "sam"

    def __init__(self, options: Options, model: Any, device: str):
        from segment_anything import SamAutomaticMaskGenerator

        self.o = options
        self.device = device
        self.model = model
        self.generator = SamAutomaticMaskGenerator(
            model,
            points_per_side=options.points_per_side,
            points_per_batch=options.points_per_batch,
            pred_iou_thresh=options.pred_iou_thresh,
            stability_score_thresh=options.stability_score_thresh,
            box_nms_thresh=options.box_nms_thresh,
            crop_n_layers=options.crop_n_layers,
            output_mode="binary_mask",
        )
        self.embeddings = FrameEmbeddings(model)
        self.generator.predictor = _shared_predictor(model, self.embeddings)

    def segment(self, frame: Frame) -> Cells:
        """Masks of the primary channel (display-range uint8 RGB), filtered in um^2."""
        import torch

        from monitor.imaging import display_range

        rgb = display_range(frame.image)
        t = time.perf_counter()
        predictor = self.generator.predictor
        predictor.frame = frame  # the whole-frame embedding goes to (or comes from) the shared cache
        try:
            with torch.inference_mode():
                masks = self.generator.generate(rgb)
        finally:
            predictor.frame = None
        labels = masks_to_labels(masks, rgb.shape[:2], self.o.min_unique_fraction)
        cells = cells_from_labels(
            labels, frame.pixel_size_um, self.o.min_area_um2, self.o.max_area_um2, self.o.exclude_border
        )
        log.debug("sam: %d masks -> %d cells in %.2f s", len(masks), len(cells), time.perf_counter() - t)
        return cells


def describe_sam_segmenter(options: Options, ctx: BuildContext) -> dict[str, Any]:
    """For ``cellmonitor models list``: the checkpoint, nothing loaded."""
    return describe_checkpoint(options, ctx) | {"dim": None}


def build_sam_segmenter(options: Options, ctx: BuildContext) -> SamSegmenter:
    """Load SAM (warning with the expected time on a CPU) and share it with SAM's fast encoder."""
    require_sam()
    path = resolve_checkpoint(options, ctx)
    device = resolve_device(ctx.device)
    if device == "cpu":
        log.warning(
            "segmenter sam: running %s on the CPU; expect roughly %d s per frame or more "
            "(a GPU takes well under a second)",
            options.model_type,
            _CPU_SECONDS_HINT.get(options.model_type, 60),
        )
    model = load_sam(options.model_type, path, device)
    seg = SamSegmenter(options, model, device)
    # SAM's fast encoder, built next with the same context, shares the model and the frame embeddings
    ctx.models.put((SHARED_KEY, options.model_type, str(path.resolve())), seg.embeddings)
    return seg


PLUGIN = plugin_spec(
    "sam", "Segment Anything automatic masks (segment-anything), filtered by area in um^2 and border", Options,
    build_sam_segmenter, describe_sam_segmenter,
)
