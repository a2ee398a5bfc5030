"""Named index presets a lab picks in one line: ``cellmonitor index build DATA --preset fast``.

A preset fixes what the benchmarks chose (``bench/bench_presets.py``, figures in
``bench/results/presets.md``): the encoders and their options, the feature
conditioning, the query-side test-time augmentation and the EWC parameters.
Any of them can still be overridden on the command line. The service config
must name the same encoders with the same options (the index refuses others,
one line); :func:`encoders_toml` prints that part of the config, and
``config/presets/*.toml`` hold it for each preset.

* ``balanced`` (the default): one small encoder (Lite0 at its native 224 px,
  GeM-pooled ends of all seven stages beside the head, conditioned), class-folder
  images framed as the service frames a cell (a 224 px crop around the image
  centre at the image's own scale, ``framing="center"``, instead of the whole
  image shrunk to 224 px). Chosen on a validation split of the pbc training
  part (5 folds): EWC 0.825 (multi-layer, whole image) -> 0.900 (centre
  framing) -> 0.919 (+ GeM, all stages). Confirmed once on the pbc test
  split: EWC 0.921, plain 20-NN 0.896; 18 cells/s end to end on a
  Lionheart-size frame on 2 CPU cores (the encoder costs what the earlier
  multi-layer mean pool cost) (``bench/results/presets_*centre_gem.md``).
* ``accurate``: Lite0 + Lite2, each as in ``balanced``, conditioned to 192-d:
  better on the pbc validation split (0.921 vs 0.907 for Lite0 alone, ``index
  search``), the same on the test split (EWC 0.921), 2.6x slower (7 cells/s on
  2 cores): for a PC with a GPU.
* ``zoo``: Lite0 + Lite1 + Lite2, each as in ``balanced``, conditioned to 256-d:
  the best on both pbc splits (validation 0.926, test EWC 0.933), three
  encoders' time: for a GPU.
* ``fast``: for a weak CPU (2 cores): Lite0 at a 128 px input, as in
  ``balanced`` otherwise: pbc test EWC 0.896, livedead 0.886, 46 cells/s.
* ``raw``: the paper's setting (EfficientNet-Lite0 last layer, raw vectors,
  no conditioning), for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from monitor.index.condition import ConditioningSpec
from monitor.index.dataset import Framing
from monitor.index.ewc import EWCParams


@dataclass(frozen=True)
class Preset:
    """Encoders (plugin name, options) in concatenation order, conditioning, query TTA, EWC,
    and the framing of class-folder images (:class:`monitor.index.dataset.Preprocess`;
    ``--framing`` overrides it; boxed frames are framed by their boxes whatever it says)."""

    encoders: tuple[tuple[str, dict[str, Any]], ...]
    conditioning: ConditioningSpec | None
    tta: int = 1
    ewc: EWCParams = field(default_factory=EWCParams)
    description: str = ""
    framing: Framing = "whole"

    def merged(self, *, k_min: int | None = None, k_max: int | None = None, entropy_threshold: float | None = None,
               reweight: bool | None = None, condition_dim: int | None = None, shrinkage: float | None = None,
               tta: int | None = None) -> BuildChoice:
        """This preset with the values a user gave (None: the preset's own), as the build uses them.

        ``condition_dim = 0`` turns conditioning off; a preset without
        conditioning has shrinkage 0.1 when a dimension is given.
        """
        pe, pc = self.ewc, self.conditioning
        ewc = EWCParams(
            k_min if k_min is not None else pe.k_min,
            k_max if k_max is not None else pe.k_max,
            entropy_threshold if entropy_threshold is not None else pe.entropy_threshold,
            pe.reweight if reweight is None else reweight,
        )
        dim = condition_dim if condition_dim is not None else (pc.dim if pc is not None else 0)
        shrink = shrinkage if shrinkage is not None else (pc.shrinkage if pc is not None else 0.1)
        return BuildChoice(ewc, ConditioningSpec(dim, shrink) if dim > 0 else None, tta if tta is not None else self.tta)


@dataclass(frozen=True)
class BuildChoice:
    """What an index is built with once a preset and the user's overrides are merged."""

    ewc: EWCParams
    conditioning: ConditioningSpec | None
    tta: int


_ALL_GEM = {"layers": "all", "pool": "gem"}

PRESETS: dict[str, Preset] = {
    "accurate": Preset(
        encoders=(("efficientnet-lite0", _ALL_GEM), ("efficientnet-lite2", _ALL_GEM)),
        conditioning=ConditioningSpec(dim=192, shrinkage=0.1),
        tta=1,
        ewc=EWCParams(k_min=10, k_max=100, entropy_threshold=0.5, reweight=True),
        description="EfficientNet-Lite0 + Lite2, GeM-pooled stages 1-7 + head, centre framing, conditioned to 192-d",
        framing="center",
    ),
    "balanced": Preset(
        encoders=(("efficientnet-lite0", _ALL_GEM),),
        conditioning=ConditioningSpec(dim=128, shrinkage=0.1),
        tta=1,
        ewc=EWCParams(k_min=10, k_max=100, entropy_threshold=0.5, reweight=True),
        description="EfficientNet-Lite0, GeM-pooled stages 1-7 + head, centre framing, conditioned to 128-d",
        framing="center",
    ),
    "fast": Preset(
        encoders=(("efficientnet-lite0", {**_ALL_GEM, "input_px": 128}),),
        conditioning=ConditioningSpec(dim=128, shrinkage=0.1),
        tta=1,
        ewc=EWCParams(k_min=10, k_max=100, entropy_threshold=0.5, reweight=True),
        description="EfficientNet-Lite0 at a 128 px input, GeM-pooled stages 1-7 + head, centre framing, conditioned to 128-d",
        framing="center",
    ),
    "zoo": Preset(
        encoders=(("efficientnet-lite0", _ALL_GEM), ("efficientnet-lite1", _ALL_GEM), ("efficientnet-lite2", _ALL_GEM)),
        conditioning=ConditioningSpec(dim=256, shrinkage=0.1),
        tta=1,
        ewc=EWCParams(k_min=10, k_max=100, entropy_threshold=0.5, reweight=True),
        description="EfficientNet-Lite0 + Lite1 + Lite2, GeM-pooled stages 1-7 + head, centre framing, conditioned to 256-d",
        framing="center",
    ),
    "raw": Preset(
        encoders=(("efficientnet-lite0", {}),),
        conditioning=None,
        tta=1,
        ewc=EWCParams(k_min=10, k_max=1000, entropy_threshold=0.5, reweight=True),
        description="the paper's setting: Lite0 last layer, raw vectors",
    ),
}
DEFAULT_PRESET = "balanced"  # the best on the pbc validation folds, at one Lite0's speed (bench/results/presets_*.md)


def parse_encoder(spec: str) -> tuple[str, dict[str, Any]]:
    """``"efficientnet-lite0:layers=multi:input_px=192"`` -> ``("efficientnet-lite0", {"layers": "multi", "input_px": 192})``.

    Values that parse as JSON numbers or booleans become those; anything else
    stays a string. A ``module:attr`` plugin name keeps its colon when its
    second part holds no ``=``.
    """
    parts = spec.split(":")
    name_parts = [parts[0]]
    rest = parts[1:]
    while rest and "=" not in rest[0]:
        name_parts.append(rest.pop(0))
    options: dict[str, Any] = {}
    for kv in rest:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ValueError(f"encoder option {kv!r} in {spec!r} is not key=value")
        options[k.strip()] = _value(v.strip())
    return ":".join(name_parts), options


def _value(v: str) -> Any:
    import json

    try:
        out = json.loads(v)
    except ValueError:
        return v
    return out if isinstance(out, int | float | bool) else v


def encoder_spec(name: str, options: dict[str, Any]) -> str:
    """The inverse of :func:`parse_encoder`."""
    return ":".join([name, *(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items())])


def encoders_toml(encoders: list[tuple[str, dict[str, Any]]]) -> str:
    """The ``[[encoders]]`` tables of a service config naming these encoders and options."""
    lines: list[str] = []
    for name, opts in encoders:
        lines += ["[[encoders]]", f'name = "{name}"']
        if opts:
            inner = ", ".join(f"{k} = {_toml(v)}" for k, v in opts.items())
            lines.append(f"options = {{ {inner} }}")
        lines.append("")
    return "\n".join(lines)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
