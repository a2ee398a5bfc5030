"""SAM's image encoder as a frozen cell encoder (the paper's SAM ViT-H member of the zoo), two modes.

``mode = "faithful"`` (default, what the paper's crop-level use implies): each
224x224 crop is resized to SAM's input size (longest side 1024), normalised
and padded by SAM's own ``preprocess``, run through the image encoder, and the
(256, 64, 64) image embedding is averaged over space: 256 values per crop.
One image-encoder pass per cell: about 34 ms a cell for ViT-H on an H100.
(The paper does not say how it pooled SAM; the spatial mean is chosen here
and recorded in the encoder id.)

``mode = "fast"``: the frame's own image embedding (one pass per frame, shared
with the SAM segmenter when both are configured: see
:class:`cellmonitor_plugins.segmenters.sam.FrameEmbeddings`) is pooled under
each cell's mask: every pixel of the mask maps to the embedding patch
(16x16 input pixels) it falls in, and the cell's vector is the
pixel-count-weighted mean of those patches' features. 200 cells cost one
image-encoder pass instead of 200. A cell smaller than a patch still gets the
patch it lies in. Crops without a frame (reference sets of single-cell
images, the service's warm-up) are embedded as small frames whose cell is the
central square of half the crop's side (where :func:`monitor.imaging.crop_cells`
centres it), upscaled like the faithful mode. The two modes give different
vectors and different encoder ids: an index built with one refuses the other.

Weights are the user-supplied checkpoint of the segment-anything package,
loaded with the segmenter plugin's loader (same checks, same one-line errors).
On a CPU this is slow (seconds per crop for ViT-H); it is meant for a GPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from monitor.device import resolve_device
from monitor.errors import WeightsMissing
from monitor.protocols import BuildContext, EncoderBase
from monitor.registry import plugin_spec


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model_type: str = Field("vit_h", min_length=1, description="a key of segment_anything.sam_model_registry")
    checkpoint: Path | None = Field(None, description="SAM weights (.pth); default <state_dir>/models/<official name>")
    mode: Literal["faithful", "fast"] = Field("faithful", description="faithful: each crop upscaled to 1024; fast: pool the frame's embedding under each mask")


def _tag(path: Path) -> str:
    """Content tag from the size and the first 16 MiB (hashing 2.5 GB at start-up would be slow)."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(16 << 20))
    return h.hexdigest()[:12]


class SamEncoder(EncoderBase):
    """Faithful mode: one image-encoder pass per crop, spatial mean."""

    name = "sam"

    def __init__(self, model: Any, model_type: str, tag: str, device: str):
        self.model = model
        self.device = device
        self.dim = int(model.prompt_encoder.embed_dim)
        self.size = int(model.image_encoder.img_size)
        self.id = f"sam-{model_type}@{tag}:{self.size}px:mean-image-embedding"

    def _features(self, crops: Any) -> Any:
        """(N, C, G, G) image embeddings of crops upscaled (longest side) to SAM's input size."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device).permute(0, 3, 1, 2).float()
        h, w = x.shape[-2:]
        scale = self.size / max(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False, antialias=True)
        with torch.inference_mode():
            x = torch.stack([self.model.preprocess(img) for img in x])  # normalise + pad to size x size
            return self.model.image_encoder(x)

    def encode(self, crops: Any) -> Any:
        return self._features(crops).mean(dim=(2, 3)).float().cpu().numpy()

    def to_device(self, device: str) -> bool:
        """The out-of-memory fallback (monitor.batching)."""
        self.model.to(device)
        self.device = device
        return True


def pool_under_masks(features: Any, labels: np.ndarray, ids: list[int], input_size: tuple[int, int], img_size: int) -> np.ndarray:
    """(len(ids), C) pixel-weighted mean of ``features`` (C, G, G) under each label's mask.

    ``labels`` is on the original image grid; ``input_size`` is that image
    resized by ``ResizeLongestSide`` (before padding to ``img_size``). A
    pixel centre ``y + 0.5`` lands at input row ``(y + 0.5) * h_in / H``, in
    patch ``floor(that / (img_size / G))``.
    """
    f = np.asarray(features.float().cpu().numpy() if hasattr(features, "cpu") else features, dtype=np.float32)
    c, g = f.shape[0], f.shape[-1]
    n = len(ids)
    if n == 0:
        return np.zeros((0, c), np.float32)
    h, w = labels.shape[:2]
    patch = img_size / g
    gy = np.minimum(((np.arange(h) + 0.5) * input_size[0] / h / patch).astype(np.int64), g - 1)
    gx = np.minimum(((np.arange(w) + 0.5) * input_size[1] / w / patch).astype(np.int64), g - 1)
    from scipy import ndimage

    boxes = ndimage.find_objects(labels)  # one pass; then each cell is counted inside its own box
    table = np.ascontiguousarray(f.reshape(c, g * g).T)  # (patches, C)
    out = np.zeros((n, c), np.float32)
    for r, i in enumerate(ids):
        box = boxes[i - 1] if 0 < i <= len(boxes) else None
        if box is None:
            continue
        m = labels[box] == i
        patches, counts = np.unique((gy[box[0]][:, None] * g + gx[box[1]][None, :])[m], return_counts=True)
        if len(patches):  # a cell covers a handful of patches: a small weighted sum, not a dense matmul
            out[r] = counts.astype(np.float32) @ table[patches] / counts.sum()
    return out


class SamFastEncoder(SamEncoder):
    """Fast mode: the frame's image embedding (shared with the SAM segmenter) pooled under each cell's mask."""

    def __init__(self, model: Any, model_type: str, tag: str, device: str, embeddings: Any, shared: bool):
        super().__init__(model, model_type, tag, device)
        self.embeddings = embeddings
        self.shared = shared  # with a SAM segmenter's cache
        if shared:  # the model is the segmenter's: an OOM fallback must not move it from under the segmenter
            self.to_device = None  # type: ignore[assignment,method-assign]
        self.id = f"sam-{model_type}@{tag}:{self.size}px:frame-mask-pool"

    def encode_cells(self, frame: Any, cells: Any) -> np.ndarray:
        features, input_size, _ = self.embeddings.get(frame)
        return pool_under_masks(features[0], cells.labels, [c.id for c in cells.cells], input_size, self.size)

    def encode(self, crops: Any) -> Any:
        crops = np.asarray(crops)
        n, h, w = crops.shape[:3]
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        labels = np.zeros((h, w), np.int32)
        labels[h // 4 : h // 4 + max(1, h // 2), w // 4 : w // 4 + max(1, w // 2)] = 1  # the cell's place in a crop
        scale = self.size / max(h, w)
        input_size = (round(h * scale), round(w * scale))
        feats = self._features(crops)
        return np.concatenate([pool_under_masks(feats[i], labels, [1], input_size, self.size) for i in range(n)])


def build_sam_encoder(options: Options, ctx: BuildContext) -> SamEncoder:
    from cellmonitor_plugins.segmenters import sam as seg

    seg.require_sam("encoder sam")
    seg_opts = seg.Options(model_type=options.model_type, checkpoint=options.checkpoint)
    try:
        path = seg.resolve_checkpoint(seg_opts, ctx)
    except WeightsMissing as e:
        raise WeightsMissing(str(e).replace("segmenter sam:", "encoder sam:").replace("[segmenter.options]", "[encoders.options]")) from None
    shared = ctx.models.get((seg.SHARED_KEY, options.model_type, str(path.resolve())))
    if options.mode == "fast" and shared is not None:  # the segmenter's model and frame embeddings
        model = shared.model
        return SamFastEncoder(model, options.model_type, _tag(path), str(next(model.parameters()).device), shared, True)
    device = resolve_device(ctx.device)
    try:
        model = seg.load_sam(options.model_type, path, device)
    except WeightsMissing as e:
        raise WeightsMissing(str(e).replace("segmenter sam:", "encoder sam:")) from None
    if options.mode == "fast":
        return SamFastEncoder(model, options.model_type, _tag(path), device, seg.FrameEmbeddings(model), False)
    return SamEncoder(model, options.model_type, _tag(path), device)


def describe_sam_encoder(options: Options, ctx: BuildContext) -> dict[str, Any]:
    """For ``cellmonitor models list``: checkpoint location and dim, nothing loaded."""
    from cellmonitor_plugins.segmenters import sam as seg

    return seg.describe_checkpoint(seg.Options(model_type=options.model_type, checkpoint=options.checkpoint), ctx) | {"mode": options.mode}


SAM_ENCODER = plugin_spec(
    "sam", "SAM image encoder (segment-anything checkpoint): faithful (crop at 1024, mean) or fast (frame embedding pooled under masks)",
    Options, build_sam_encoder, describe_sam_encoder,
)
