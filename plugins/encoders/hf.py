"""Frozen HuggingFace foundation-model encoders: DINOv2, ConvNeXtV2, SwinV2, CLIP, ViT-MAE.

Weights are never downloaded: ``options.model`` is a local folder (written by
``save_pretrained`` or ``huggingface-cli download --local-dir``) or a hub id
already in the local HuggingFace cache; both are loaded with
``local_files_only=True``. Missing weights are a start-up error that says how
to provide them.

Each model is preprocessed by its own AutoImageProcessor and pooled as follows
(the paper does not say; chosen and documented here):

==========  ====================================================  =========
family      embedding                                             dim
==========  ====================================================  =========
dinov2      pooler_output (layer-normed CLS token)                hidden
convnextv2  pooler_output (layer-normed global average)           last stage
swinv2      pooler_output (global average of the last stage)      last stage
clip        vision pooler_output (post-layernorm CLS, no proj.)   hidden
vit-mae     CLS token of the last hidden state, mask_ratio = 0    hidden
==========  ====================================================  =========

ViTMAEModel masks 75% of patches at random by default; the loader sets
``mask_ratio = 0`` so the embedding is deterministic.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from monitor.errors import WeightsMissing
from monitor.protocols import BuildContext

log = logging.getLogger(__name__)

PAPER_MODELS = {
    "dinov2": "facebook/dinov2-giant",
    "convnextv2": "facebook/convnextv2-large-22k-224",
    "swinv2": "microsoft/swinv2-large-patch4window12-192-22k",
    "clip": "openai/clip-vit-large-patch14",
    "vit-mae": "facebook/vit-mae-huge",
}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str | None = Field(None, description="local folder or cached hub id; default: the paper's model")
    cache_dir: Path | None = Field(None, description="HuggingFace cache folder (default: HF_HOME)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compile: bool = Field(False, description="torch.compile the model (GPU; 20-45 s at start-up)")


def _identity(model_dir: Path | None, name: str) -> str:
    """A short content tag: hash of config.json and the weight files' names and sizes."""
    if model_dir is None or not model_dir.is_dir():
        return name
    h = hashlib.sha256()
    cfg = model_dir / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:12]


def _missing(family: str, ref: str, err: Exception) -> WeightsMissing:
    hub_id = ref if ("/" in ref and not Path(ref).exists()) else PAPER_MODELS[family]
    return WeightsMissing(
        f"{ref}: {family} weights not found on this machine ({type(err).__name__}); nothing is downloaded at run time: "
        f"on a connected machine run `huggingface-cli download {hub_id} --local-dir DIR`, "
        f'copy DIR here and set encoders.options.model = "DIR"'
    )


class HFEncoder:
    def __init__(self, family: str, model: Any, processor: Any, ref: str, tag: str, device: str, dtype: str):
        import torch

        self.family = family
        self.name = family
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.torch_dtype = getattr(torch, dtype)
        if dtype != "float32":
            self.model = self.model.to(self.torch_dtype)
        cfg = model.config
        if family == "convnextv2":
            self.dim = int(cfg.hidden_sizes[-1])
        elif family == "swinv2":
            self.dim = int(cfg.embed_dim * 2 ** (len(cfg.depths) - 1))
        else:
            self.dim = int(cfg.hidden_size)
        pool = {"dinov2": "cls-pooler", "convnextv2": "avg-pooler", "swinv2": "avg-pooler", "clip": "cls-pooler", "vit-mae": "cls-mask0"}[family]
        self.id = f"{family}:{Path(ref).name}@{tag}:{pool}:{dtype}"

    def encode(self, crops: Any) -> Any:
        import numpy as np
        import torch

        inputs = self.processor(images=list(np.asarray(crops)), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.torch_dtype)
        with torch.inference_mode():
            out = self.model(pixel_values=pixel_values)
            if self.family == "vit-mae":
                v = out.last_hidden_state[:, 0]
            else:
                v = out.pooler_output
            v = v.reshape(v.shape[0], -1)
        return v.float().cpu().numpy()


def load_hf_encoder(family: str, options: Options, device: str = "cpu") -> HFEncoder:
    """Load model and image processor from local files only; WeightsMissing otherwise."""
    import transformers as tf

    ref = options.model or PAPER_MODELS[family]
    kw: dict[str, Any] = {"local_files_only": True}
    if options.cache_dir is not None:
        kw["cache_dir"] = str(options.cache_dir)
    classes = {
        "dinov2": tf.Dinov2Model,
        "convnextv2": tf.ConvNextV2Model,
        "swinv2": tf.Swinv2Model,
        "clip": tf.CLIPVisionModel,
        "vit-mae": tf.ViTMAEModel,
    }
    extra: dict[str, Any] = {"mask_ratio": 0.0} if family == "vit-mae" else {}
    try:
        model = classes[family].from_pretrained(ref, **kw, **extra)
        processor = tf.AutoImageProcessor.from_pretrained(ref, **kw)
    except (OSError, ValueError) as e:
        raise _missing(family, ref, e) from None
    if family == "vit-mae" and getattr(model.config, "mask_ratio", 0.0) != 0.0:
        raise WeightsMissing(f"{ref}: could not disable ViT-MAE random masking")
    enc = HFEncoder(family, model, processor, ref, _identity(Path(ref) if Path(ref).is_dir() else None, ref), device, options.dtype)
    if options.compile:
        import torch

        enc.model = torch.compile(enc.model)
    return enc


class _Spec:
    Options = Options

    def __init__(self, family: str):
        self.family = family
        self.name = family
        self.description = f"{family} ({PAPER_MODELS[family]} by default), frozen; local weights only"

    def build(self, options: Options, ctx: BuildContext) -> HFEncoder:
        return load_hf_encoder(self.family, options, ctx.device)


DINOV2 = _Spec("dinov2")
CONVNEXTV2 = _Spec("convnextv2")
SWINV2 = _Spec("swinv2")
CLIP = _Spec("clip")
VITMAE = _Spec("vit-mae")
