"""SAM's image encoder as a frozen crop encoder (the paper's SAM ViT-H member of the zoo).

Embedding: each 224x224 crop is resized to SAM's input size (longest side
1024), normalised and padded by SAM's own ``preprocess``, run through the
image encoder, and the (256, 64, 64) image embedding is averaged over space:
256 values per crop. (The paper does not say how it pooled SAM; the spatial
mean is chosen here and recorded in the encoder id.)

Weights are the user-supplied checkpoint of the segment-anything package,
loaded with the segmenter plugin's loader (same checks, same one-line errors).
On a CPU this is slow (seconds per crop for ViT-H); it is meant for a GPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from monitor.errors import WeightsMissing
from monitor.protocols import BuildContext


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model_type: str = Field("vit_h", min_length=1, description="a key of segment_anything.sam_model_registry")
    checkpoint: Path | None = Field(None, description="SAM weights (.pth); default <state_dir>/models/<official name>")


def _tag(path: Path) -> str:
    """Content tag from the size and the first 16 MiB (hashing 2.5 GB at start-up would be slow)."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(16 << 20))
    return h.hexdigest()[:12]


class SamEncoder:
    name = "sam"

    def __init__(self, model: Any, model_type: str, tag: str, device: str):
        self.model = model
        self.device = device
        self.dim = int(model.prompt_encoder.embed_dim)
        self.size = int(model.image_encoder.img_size)
        self.id = f"sam-{model_type}@{tag}:{self.size}px:mean-image-embedding"

    def encode(self, crops: Any) -> Any:
        import numpy as np
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device).permute(0, 3, 1, 2).float()
        h, w = x.shape[-2:]
        scale = self.size / max(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False, antialias=True)
        with torch.inference_mode():
            x = torch.stack([self.model.preprocess(img) for img in x])  # normalise + pad to size x size
            emb = self.model.image_encoder(x)
        return emb.mean(dim=(2, 3)).float().cpu().numpy()


class _Spec:
    name = "sam"
    description = "SAM image encoder (segment-anything checkpoint), spatial mean of the image embedding"
    Options = Options

    @staticmethod
    def build(options: Options, ctx: BuildContext) -> SamEncoder:
        from cellmonitor_plugins.segmenters import sam as seg

        seg_opts = seg.Options(model_type=options.model_type, checkpoint=options.checkpoint)
        try:
            path = seg.resolve_checkpoint(seg_opts, ctx)
            model = seg.load_sam(options.model_type, path, seg.choose_device(ctx.device))
        except WeightsMissing as e:
            raise WeightsMissing(str(e).replace("segmenter sam:", "encoder sam:").replace("[segmenter.options]", "[encoders.options]")) from None
        return SamEncoder(model, options.model_type, _tag(path), seg.choose_device(ctx.device))


SAM_ENCODER = _Spec()
