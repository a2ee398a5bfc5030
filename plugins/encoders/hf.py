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

Multi-layer tokens (``tokens = "cls+mean"``, the transformer families dinov2,
clip and vit-mae): the equivalent of the EfficientNet multi-layer option and
DINOv2's linear-probe recipe. For each of the last ``layers`` transformer
blocks (1: the last only), the block's tokens are passed through the model's
final layer norm, and the CLS token and the mean of the patch tokens are
concatenated: ``2 x hidden x layers`` dims, last block first. The id says so
(``...:cls+mean-l4:...``), so an index refuses the encoder configured otherwise.
The convolutional families have no CLS token and keep their pooler.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from monitor.errors import PluginError, WeightsMissing
from monitor.protocols import BuildContext, EncoderBase
from monitor.registry import plugin_spec

log = logging.getLogger(__name__)

PAPER_MODELS = {
    "dinov2": "facebook/dinov2-giant",
    "convnextv2": "facebook/convnextv2-large-22k-224",
    "swinv2": "microsoft/swinv2-large-patch4window12-192-22k",
    "clip": "openai/clip-vit-large-patch14",
    "vit-mae": "facebook/vit-mae-huge",
}


#: pooled dims of the paper's models (reported by ``models list`` before the weights are there)
PAPER_DIMS = {"dinov2": 1536, "convnextv2": 1536, "swinv2": 1536, "clip": 1024, "vit-mae": 1280}

#: families whose transformers classes run attention through torch's SDPA kernels
SDPA_FAMILIES = frozenset({"dinov2", "clip", "vit-mae"})
#: families with a CLS token and patch tokens (``tokens = "cls+mean"``)
TOKEN_FAMILIES = frozenset({"dinov2", "clip", "vit-mae"})


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str | None = Field(None, description="local folder or cached hub id; default: the paper's model")
    cache_dir: Path | None = Field(None, description="HuggingFace cache folder (default: HF_HOME)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights and activations (bfloat16: GPUs since Ampere)")
    autocast: Literal["off", "bfloat16", "float16"] = Field("off", description="float32 weights, matmuls in this dtype (torch.autocast)")
    attention: Literal["sdpa", "eager"] = Field("sdpa", description="torch SDPA kernels where the model has them (dinov2, clip, vit-mae)")
    compile: bool = Field(False, description="torch.compile at start-up (GPU; 20-45 s, cached in <state_dir>/torch-compile)")
    compile_batch: int = Field(128, ge=1, le=4096, description="compiled graphs run at this one batch size (smaller calls are padded)")
    tokens: Literal["pooler", "cls+mean"] = Field(
        "pooler", description="pooler: the model's pooled vector; cls+mean: CLS token + mean patch token (dinov2, clip, vit-mae)"
    )
    layers: int = Field(1, ge=1, le=64, description="tokens=cls+mean: from each of the last N transformer blocks")


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


def embedding_dim(family: str, cfg: Any) -> int:
    """The pooled vector's length from a model config (object or config.json dict)."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k))
    if family == "convnextv2":
        return int(get("hidden_sizes")[-1])
    if family == "swinv2":
        return int(get("embed_dim") * 2 ** (len(get("depths")) - 1))
    if family == "clip" and isinstance(cfg, dict) and "vision_config" in cfg:  # a full CLIPModel folder
        return int(cfg["vision_config"].get("hidden_size", 1024))
    return int(get("hidden_size"))


class TensorPrep:
    """The model's AutoImageProcessor as batched tensor work: uint8 (N, 3, H, W) -> float32 (N, 3, h, w).

    The same steps as transformers' torchvision image processors, on whatever
    device the crops are (the GPU in service): resize (bicubic or bilinear
    with antialiasing, rounded back to 0..255 as a uint8 image would be),
    centre crop, rescale and normalise. ConvNeXt's ``crop_pct`` rule (resize
    the short side to ``size / crop_pct`` then crop ``size``) included.
    Tested against the processor itself.
    """

    def __init__(self, processor: Any):
        def sd(v: Any) -> dict[str, Any]:
            return {} if v is None else {k: x for k, x in dict(v if isinstance(v, dict) else vars(v)).items() if x is not None}

        self.size = sd(getattr(processor, "size", None))
        self.crop = sd(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else {}
        self.crop_pct = getattr(processor, "crop_pct", None) if type(processor).__name__.startswith("ConvNext") else None
        self.do_resize = bool(getattr(processor, "do_resize", True))
        resample = int(getattr(processor, "resample", 2) or 2)
        self.mode = {0: "nearest", 2: "bilinear"}.get(resample, "bicubic")  # PIL ids; lanczos -> bicubic, as torchvision does on tensors
        scale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
        mean = list(processor.image_mean) if getattr(processor, "do_normalize", True) else [0.0, 0.0, 0.0]
        std = list(processor.image_std) if getattr(processor, "do_normalize", True) else [1.0, 1.0, 1.0]
        self.mean = [m / scale for m in mean]  # fused: (x - mean / scale) / (std / scale) == (x * scale - mean) / std
        self.std = [s / scale for s in std]

    def _resize(self, x: Any, hw: tuple[int, int]) -> Any:
        import torch.nn.functional as F

        if tuple(x.shape[-2:]) == hw:
            return x
        if self.mode == "nearest":
            return F.interpolate(x, size=hw, mode="nearest")
        y = F.interpolate(x, size=hw, mode=self.mode, align_corners=False, antialias=True)
        return y.clamp_(0, 255).round_()

    @staticmethod
    def _short_side(h: int, w: int, s: int) -> tuple[int, int]:
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(s * long / short)
        return (s, new_long) if h <= w else (new_long, s)

    @staticmethod
    def _center_crop(x: Any, ch: int, cw: int) -> Any:
        h, w = x.shape[-2:]
        if ch > h or cw > w:
            import torch.nn.functional as F

            pad = [(cw - w) // 2 if cw > w else 0, (cw - w + 1) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0, (ch - h + 1) // 2 if ch > h else 0]
            x = F.pad(x, pad)
            h, w = x.shape[-2:]
        top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
        return x[..., top : top + ch, left : left + cw]

    def __call__(self, x: Any) -> Any:
        import torch

        x = x.float()
        h, w = x.shape[-2:]
        if self.do_resize:
            se = self.size.get("shortest_edge")
            if self.crop_pct is not None and se is not None:
                if se < 384:
                    x = self._resize(x, self._short_side(h, w, int(se / self.crop_pct)))
                    x = self._center_crop(x, se, se)
                else:
                    x = self._resize(x, (se, se))
            elif se is not None:
                x = self._resize(x, self._short_side(h, w, se))
            else:
                x = self._resize(x, (int(self.size["height"]), int(self.size["width"])))
        if self.crop:
            x = self._center_crop(x, int(self.crop["height"]), int(self.crop["width"]))
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()


class HFEncoder(EncoderBase):
    """One frozen HF model: crops -> tensor preprocessing -> forward -> pooled vector.

    ``prepare`` (host side, run in the batching prefetch thread) turns crops
    into a tensor, in pinned memory when the model is on a GPU so the copy
    is asynchronous; on the CPU it also resizes and normalises there.
    ``encode_prepared`` copies to the device, preprocesses there (GPU) and
    runs the model under ``inference_mode`` (and ``autocast`` if set).
    ``to_device("cpu")`` is the out-of-memory fallback (see monitor.batching).
    """

    prefetches = True  # prepare() on the host in a thread while the model runs the previous chunk

    def __init__(self, family: str, model: Any, processor: Any, ref: str, tag: str, device: str, options: Options):
        import torch

        self.family = family
        self.name = family
        self.device = device
        self.options = options
        self.torch_dtype = getattr(torch, options.dtype)
        self.model = model.to(device=device, dtype=self.torch_dtype).eval()
        self.runner: Any = self.model
        self.compiled = False
        self.processor = processor
        self.prep = TensorPrep(processor)
        self.dim = embedding_dim(family, model.config)
        self.attention = str(getattr(model.config, "_attn_implementation", None) or "eager")
        pool = {"dinov2": "cls-pooler", "convnextv2": "avg-pooler", "swinv2": "avg-pooler", "clip": "cls-pooler", "vit-mae": "cls-mask0"}[family]
        self.tokens = options.tokens
        if options.tokens == "cls+mean":
            if family not in TOKEN_FAMILIES:
                raise PluginError(f"encoder {family}: tokens = \"cls+mean\" needs a CLS token ({', '.join(sorted(TOKEN_FAMILIES))}); use the pooler")
            n_blocks = int(model.config.num_hidden_layers)
            if options.layers > n_blocks:
                raise PluginError(f"encoder {family}: layers = {options.layers} but the model has {n_blocks} transformer blocks")
            self.dim = 2 * int(model.config.hidden_size) * options.layers
            pool = f"cls+mean-l{options.layers}" + ("-mask0" if family == "vit-mae" else "")
        precision = options.dtype if options.autocast == "off" else f"{options.dtype}+autocast-{options.autocast}"
        self.id = f"{family}:{Path(ref).name}@{tag}:{pool}:{precision}"

    def compile(self, cache_dir: Path | None) -> float:
        """``torch.compile`` the model and pay for it now, at ``compile_batch``; returns seconds."""
        import os
        import time

        import numpy as np
        import torch

        if cache_dir is not None:  # inductor's on-disk cache: a restart reuses the compiled kernels
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
        t = time.perf_counter()
        self.runner = torch.compile(self.model, dynamic=False)
        self.compiled = True
        s = self._input_px()
        self.encode_prepared(self.prepare(np.zeros((self.options.compile_batch, s, s, 3), np.uint8)))
        return time.perf_counter() - t

    def _input_px(self) -> int:
        c = self.prep.crop or {}
        return int(c.get("height") or self.prep.size.get("shortest_edge") or self.prep.size.get("height") or 224)

    def prepare(self, crops: Any) -> Any:
        import numpy as np
        import torch

        x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2)
        if self.device == "cpu":
            return self.prep(x)
        return x.contiguous().pin_memory() if torch.cuda.is_available() else x.contiguous()

    def encode_prepared(self, x: Any) -> Any:
        import contextlib

        import torch

        if x.device.type != self.device.split(":")[0]:
            x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = self.prep(x)
        x = x.to(self.torch_dtype)
        n = x.shape[0]
        step = self.options.compile_batch if self.compiled else max(n, 1)
        parts = []
        amp = (
            torch.autocast(self.device.split(":")[0], dtype=getattr(torch, self.options.autocast))
            if self.options.autocast != "off"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), amp:
            for s in range(0, n, step):
                xb = x[s : s + step]
                m = xb.shape[0]
                if self.compiled and m < step:  # one compiled shape: pad, never recompile
                    xb = torch.cat([xb, xb.new_zeros((step - m, *xb.shape[1:]))])
                if self.tokens == "cls+mean":
                    out = self.runner(pixel_values=xb, output_hidden_states=True)
                    v = cls_mean_tokens(out.hidden_states, self._final_norm(), self.options.layers)
                else:
                    out = self.runner(pixel_values=xb)
                    v = out.last_hidden_state[:, 0] if self.family == "vit-mae" else out.pooler_output
                parts.append(v.reshape(v.shape[0], -1)[:m])
        v = torch.cat(parts) if parts else x.new_zeros((0, self.dim))
        return v.float().cpu().numpy()

    def encode(self, crops: Any) -> Any:
        return self.encode_prepared(self.prepare(crops))

    def _final_norm(self) -> Any:
        """The layer norm the model applies to its last block's tokens (dinov2, vit-mae: ``layernorm``;
        clip: ``post_layernorm``, which the model applies to the CLS token only)."""
        m = self.model
        return getattr(m, "vision_model", m).post_layernorm if self.family == "clip" else m.layernorm

    def to_device(self, device: str) -> bool:
        """Move the model (the eager one: compiled graphs are device-specific) to ``device``."""
        self.model.to(device)
        self.runner, self.compiled, self.device = self.model, False, device
        return True


def cls_mean_tokens(hidden_states: Any, norm: Any, layers: int) -> Any:
    """(N, 2 x hidden x layers): for each of the last ``layers`` blocks' outputs (last first), normed
    by ``norm``, the CLS token (position 0) then the mean of the other tokens.

    ``hidden_states`` is the model's tuple (embeddings output, then one entry per block).
    """
    import torch

    parts = []
    for h in reversed(hidden_states[-layers:]):
        t = norm(h)
        parts += [t[:, 0], t[:, 1:].mean(dim=1)]
    return torch.cat(parts, dim=1)


def load_hf_encoder(family: str, options: Options, device: str = "cpu", compile_cache: Path | None = None) -> HFEncoder:
    """Load model and image processor from local files only; WeightsMissing otherwise."""
    try:
        import transformers as tf
    except ImportError as e:
        raise PluginError(f"encoder {family} needs the transformers package ({e.msg}): pip install 'cellmonitor[hf]'") from None

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
    if family in SDPA_FAMILIES:
        extra["attn_implementation"] = options.attention
    try:
        model = classes[family].from_pretrained(ref, **kw, **extra)
        processor = tf.AutoImageProcessor.from_pretrained(ref, **kw)
    except (OSError, ValueError) as e:
        raise _missing(family, ref, e) from None
    if family == "vit-mae" and getattr(model.config, "mask_ratio", 0.0) != 0.0:
        raise WeightsMissing(f"{ref}: could not disable ViT-MAE random masking")
    enc = HFEncoder(family, model, processor, ref, _identity(Path(ref) if Path(ref).is_dir() else None, ref), device, options)
    if options.compile:
        log.info("encoder %s: compiled at batch %d in %.0f s", family, options.compile_batch, enc.compile(compile_cache))
    return enc


def locate(family: str, options: Options) -> tuple[Path | None, str]:
    """Where the weights are (a folder with config.json), without loading them: ``(folder or None, ref)``."""
    ref = options.model or PAPER_MODELS[family]
    p = Path(ref).expanduser()
    if p.is_dir():
        return (p if (p / "config.json").is_file() else None), ref
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(ref, "config.json", cache_dir=str(options.cache_dir) if options.cache_dir else None)
    except Exception:  # not a repo id, no hub library: not present
        return None, ref
    return (Path(hit).parent if isinstance(hit, str) else None), ref


def describe_hf(family: str, options: Options, ctx: BuildContext) -> dict[str, Any]:
    """For ``cellmonitor models list``: weights location and dim from config.json, nothing loaded."""
    import json

    folder, ref = locate(family, options)
    dim = None
    if folder is not None:
        try:
            dim = embedding_dim(family, json.loads((folder / "config.json").read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            dim = None
        has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    else:
        has_weights = False
        dim = PAPER_DIMS[family] if ref == PAPER_MODELS[family] else None
    precision = options.dtype if options.autocast == "off" else f"{options.dtype} (autocast {options.autocast})"
    import importlib.util

    package = importlib.util.find_spec("transformers") is not None
    where = str(folder) if folder is not None else f"{ref} (not found: huggingface-cli download on a connected machine)"
    return {
        "present": folder is not None and has_weights and package,
        "where": where if package else f"{where}; transformers missing: pip install 'cellmonitor[hf]'",
        "dim": dim,
        "dtype": precision + (", compiled" if options.compile else ""),
    }



def _spec(family: str) -> Any:
    return plugin_spec(
        family, f"{family} ({PAPER_MODELS[family]} by default), frozen; local weights only", Options,
        lambda o, ctx: load_hf_encoder(family, o, ctx.device, Path(ctx.state_dir) / "torch-compile"),
        lambda o, ctx: describe_hf(family, o, ctx),
    )


DINOV2 = _spec("dinov2")
CONVNEXTV2 = _spec("convnextv2")
SWINV2 = _spec("swinv2")
CLIP = _spec("clip")
VITMAE = _spec("vit-mae")
