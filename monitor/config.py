"""The configuration: one TOML file, validated by frozen pydantic models.

Every problem is reported as one line ``file: dotted.path: message (got X)``
and the service exits with status 78 (EX_CONFIG). Plugin options are
validated against each plugin's own ``Options`` model by
:func:`monitor.registry.Registry.validate_config`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from monitor.errors import ConfigError
from monitor.records import channel_key


def _check_regex(v: str) -> str:
    import re

    try:
        re.compile(v)
    except re.error as e:
        raise ValueError(f"not a valid regular expression: {e}") from None
    return v


#: a string option that must compile as a regular expression (plugin options use it too)
Regex = Annotated[str, AfterValidator(_check_regex)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginRef(_Model):
    """A plugin by name (entry point or ``"module:attr"``) and its options table."""

    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


#: masks other tools write beside a frame (celldetective, Cellpose): read by the masks segmenter, never frames
MASK_EXCLUDES = ("!*_labelled.tif", "!*_labelled.tiff", "!*_cp_masks.png", "!*_cp_masks.tif")


class ServiceConfig(_Model):
    """``[service]``: the watch folder, state folder, intake timing, metrics endpoint and frame limits."""

    watch_dir: Path = Path("input")
    state_dir: Path = Path("state")
    experiment: str = Field("default", min_length=1)
    recursive: bool = True
    polling: bool = False
    poll_interval_s: float = Field(2.0, gt=0)
    stable_s: float = Field(1.0, ge=0)
    ready_deadline_s: float = Field(600.0, gt=0)
    #: file names that are frames; "!" excludes (masks written beside frames by segmentation tools)
    patterns: list[str] = Field(default_factory=lambda: ["*.tif", "*.tiff", "*.png", "*.jpg", "*.jpeg", *MASK_EXCLUDES])
    frame_timeout_s: float = Field(900.0, gt=0, description="a frame still processing after this long is quarantined and the service exits 75 (restarted)")
    max_frame_attempts: int = Field(3, ge=1, le=100, description="a frame found in flight at this many start-ups (it crashed or hung the worker each time) is quarantined")
    feedback: bool = Field(True, description="take expert corrections from feedback_dir into the live index (monitor.service.feedback)")
    feedback_dir: Path | None = Field(None, description="expert corrections folder (default: <state_dir>/feedback)")
    metrics_port: int = Field(9108, ge=0, le=65535, strict=True)
    metrics_addr: str = "127.0.0.1"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class AssemblyConfig(_Model):
    """How files are grouped into frames across channels."""

    channels: list[str] = Field(default_factory=list)
    primary: str = "auto"
    control: str = "auto"
    wait_s: float = Field(120.0, ge=0)

    @model_validator(mode="after")
    def _roles_in_channels(self) -> AssemblyConfig:
        names = {channel_key(c) for c in self.channels}
        for role, value in (("primary", self.primary), ("control", self.control)):
            if names and value not in ("auto", "none") and channel_key(value) not in names:
                raise ValueError(f"{role} channel {value!r} is not one of channels {self.channels}")
        return self


class PipelineConfig(_Model):
    """``[pipeline]``: the common pixel size, crops, batching, certainty floor and device."""

    pixel_size_um: float = Field(0.322, ge=0.05, le=5.0)
    crop_px: int = Field(224, ge=16, le=2048)
    blank_background: bool = False
    crop_contrast: Literal["percentile", "background"] = Field(
        "percentile", description="crops' grey levels: the field's 0.5-99.5 percentiles, or its background level +- 15 MADs (faint label-free texture)")
    batch_size: int = Field(64, ge=1, le=4096)
    frames_per_call: int = Field(8, ge=1, le=256, description="queued frames whose crops share encoder calls (only frames already due; never waits)")
    certainty_floor: float = Field(0.5, ge=0.0, le=1.0)
    device: Literal["auto", "cpu", "cuda", "cuda-or-cpu"] = Field("auto", description="see monitor.device: cuda without a usable GPU is a start-up error; cuda-or-cpu falls back, logged")


class ClassifierConfig(_Model):
    """``[classifier]``: the index folder, EWC overrides and class roles (canonical states)."""

    index: Path = Path("index")
    k_min: int | None = Field(None, ge=1)
    k_max: int | None = Field(None, ge=1)
    entropy_threshold: float | None = Field(None, ge=0.0, le=1.0)
    reweight: bool | None = None
    #: reference class -> canonical state; classes not named here map to themselves when the
    #: name is a canonical state (any case), else to "other"
    roles: dict[str, Literal["live", "apoptotic", "necrotic", "dead", "other"]] = Field(default_factory=dict)
    unknown: bool = Field(True, description="count cells farther from their nearest references than the references are from each other (the index's calibrated distance) as unknown, beside their predicted state")

    @model_validator(mode="after")
    def _k_range(self) -> ClassifierConfig:
        if self.k_min is not None and self.k_max is not None and self.k_min > self.k_max:
            raise ValueError(f"k_min must not exceed k_max (got k_min={self.k_min}, k_max={self.k_max})")
        return self


class ControlConfig(_Model):
    """``[control]``: the Otsu control signal and its noise floor."""

    enabled: bool = True
    min_region_px: int = Field(4, ge=1)
    min_snr: float = Field(5.0, ge=0, description="threshold floor: background median + min_snr * sigma (0 = plain Otsu)")


State = Literal["live", "apoptotic", "necrotic", "dead"]


class MarkerRuleConfig(_Model):
    """One ``[[marker.rules]]`` entry: ``channel`` above ``threshold`` means ``state`` (see :mod:`monitor.marker`)."""

    channel: str = Field(min_length=1)
    state: State
    threshold: float | Literal["otsu"] = Field(description="background-corrected marker signal in background-noise units, or 'otsu' (fitted at index build --from-marker)")
    ambiguous_above: float | None = Field(None, description="values above this and below threshold are ambiguous (left out); default: the margin around the threshold")

    @model_validator(mode="after")
    def _band_below_threshold(self) -> MarkerRuleConfig:
        if self.ambiguous_above is not None and self.threshold != "otsu" and self.ambiguous_above >= self.threshold:
            raise ValueError(f"ambiguous_above ({self.ambiguous_above:g}) must be below threshold ({self.threshold:g})")
        return self


class MarkerConfig(_Model):
    """``[marker]``: a death marker's rules, for ``index build --from-marker`` and live agreement."""

    rules: list[MarkerRuleConfig] = Field(default_factory=list)
    negative: State = "live"
    margin: float = Field(0.25, ge=0.0, lt=1.0, description="cells within margin x threshold of a threshold are ambiguous (left out)")
    ring_um: float = Field(3.0, ge=0, description="background: pixels farther than this from every cell (0: outside every mask)")
    noise: Literal["sigma", "mad"] = Field("sigma", description="noise unit of thresholds: 1.4826 x MAD of the background (sigma) or the MAD itself")
    agreement: bool = Field(True, description="on frames with the marker channel, count how many marker-labelled cells the classifier agrees with")


class FitConfig(_Model):
    """``[fit]``: how ``index build --from-marker`` fine-tunes an encoder named with ``fitted = true``.

    The encoder starts from its ImageNet weights and learns the lab's marker-labelled
    references (class-balanced cross-entropy, a small projection to ``embed_dim``, dihedral,
    translation and contrast augmentation); its output is then that learned embedding, and
    EWC-FAISS classifies over it. The weights go into the index folder (``fit/<encoder>.npz``,
    checksummed, no pickle) and the encoder's id carries their digest.

    ``projection`` says how the index conditions the features it is built from (with or
    without a fitted encoder): ``pca-whiten`` to ``condition_dim`` dimensions, or
    ``logistic``, a class-weighted logistic projection learned on the references with
    L2 penalty ``penalty`` (:mod:`monitor.index.condition`); EWC-FAISS searches the result.
    """

    projection: Literal["pca-whiten", "logistic"] = Field(
        "pca-whiten", description="the index's conditioning at --from-marker: PCA-whitening, or a logistic projection learned on the references")
    penalty: float = Field(1e-2, ge=0, description="L2 penalty of the logistic projection")
    epochs: int = Field(8, ge=1, le=200)
    lr: float = Field(1e-3, gt=0, le=1.0, description="peak learning rate (one-cycle schedule, AdamW)")
    batch_size: int = Field(32, ge=2, le=1024)
    embed_dim: int = Field(64, ge=2, le=1280, description="size of the projection the class head is trained on")
    embedding: Literal["features", "projection"] = Field(
        "features", description="what the fitted encoder gives EWC: its pooled 1280-d features (the index conditions them) or the projection")
    input_px: int = Field(64, ge=32, le=512, description="the encoder's input size while fitting and after (crops are resized to it)")
    jitter_px: int = Field(4, ge=0, le=64, description="random translation of each crop while fitting")
    weight_decay: float = Field(1e-2, ge=0)
    label_smoothing: float = Field(0.05, ge=0, lt=1)
    seed: int = 0
    threads: int = Field(0, ge=0, description="torch CPU threads while fitting (0: torch's default)")
    condition_dim: int = Field(64, ge=0, description="the index whitens the fitted features to this many dimensions (0: raw)")
    cross_validate: bool = Field(False, description="score a fitted index against the marker by fitting the encoder again in each "
                                 "of 5 folds by experiment (about 6 times the fit's time); off: the index says it is not cross-validated")


class TrackingConfig(_Model):
    """``[tracking]``: cells linked across timepoints, one-way state smoothing and the plate map
    (see monitor.fate). On whenever the per-cell sink (``cells``) is on."""

    enabled: bool = Field(True, description="link each field's cells across timepoints (track_id in the per-cell rows)")
    max_step_um: float = Field(25.0, gt=0, le=1000, description="the farthest a cell moves between consecutive timepoints")
    max_gap: int = Field(1, ge=0, le=5, description="timepoints a cell may be missing (or a frame may not arrive) and keep its track")
    divisions: bool = Field(True, description="a dividing cell's daughters start tracks of their own, with the mother's as parent")
    memory_timepoints: int = Field(
        48, ge=0, description="the latest timepoints of each field kept in memory for linking and smoothing (older ones are "
        "final and stay on disk; a frame older than this window re-reads its field's files); 0: the whole run")
    interval_h: float = Field(1.0, gt=0, description="hours between timepoints, used where frames carry no acquisition time")
    apoptosis_per_h: float = Field(0.05, ge=0, description="smoothing: live -> apoptotic rate per hour")
    death_per_h: float = Field(0.3, ge=0, description="smoothing: apoptotic -> dead rate per hour")
    necrosis_per_h: float = Field(0.01, ge=0, description="smoothing: live -> necrotic rate per hour")
    accuracy: float = Field(0.85, gt=0.25, le=1.0, description="smoothing: how often a call of full certainty is right")
    unknown_weight: float = Field(0.5, ge=0.0, le=1.0, description="smoothing: an unknown cell's call counts with this share of its certainty")
    plate_map: Path | None = Field(None, description="plate-layout CSV (well, compound, concentration, unit, role); relative to the config; re-read when edited")

    @model_validator(mode="after")
    def _window_holds_links(self) -> TrackingConfig:
        # the window must hold a frame's linking context (max_gap + 1 timepoints back) and as much
        # again for frames that arrive late, or every late frame would re-read its field from disk
        if 0 < self.memory_timepoints <= 2 * (self.max_gap + 1):
            raise ValueError(f"memory_timepoints = {self.memory_timepoints} must be more than 2 x (max_gap + 1) = "
                             f"{2 * (self.max_gap + 1)} (or 0: the whole run in memory)")
        return self


class PluginsConfig(_Model):
    """``[plugins]``: folders searched for site-local ``module:attr`` plugins."""

    paths: list[Path] = Field(default_factory=list)


class Config(_Model):
    """The whole configuration; unknown keys are errors, every default lives here."""

    service: ServiceConfig = ServiceConfig()
    reader: PluginRef = PluginRef(name="auto")
    readers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    assembly: AssemblyConfig = AssemblyConfig()
    pipeline: PipelineConfig = PipelineConfig()
    segmenter: PluginRef = PluginRef(name="classical")
    #: the default index preset's encoders (monitor.index.presets.DEFAULT_PRESET; a test keeps them equal),
    #: so an index built with `cellmonitor index build DATA --out index` is taken by a config that names none
    encoders: list[PluginRef] = Field(default_factory=lambda: [PluginRef(name="efficientnet-lite0", options={"layers": "all", "pool": "gem"})], min_length=1)
    classifier: ClassifierConfig = ClassifierConfig()
    control: ControlConfig = ControlConfig()
    marker: MarkerConfig = MarkerConfig()
    fit: FitConfig = FitConfig()
    tracking: TrackingConfig = TrackingConfig()
    sinks: list[PluginRef] = Field(default_factory=lambda: [PluginRef(name="csv"), PluginRef(name="prometheus")])
    plugins: PluginsConfig = PluginsConfig()

    #: where this config was read from, as given (error messages); relative paths resolve against its folder
    source: Path | None = Field(None, exclude=True)
    #: the same file as an absolute path (what plugins resolve their relative paths against, whatever the cwd)
    path: Path | None = Field(None, exclude=True)

    @property
    def source_name(self) -> str:
        """The config file for error messages (``<config>`` when built in code)."""
        return str(self.source or "<config>")


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def format_validation_error(source: str, err: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem: ``file: dotted.path: message (got X)``."""
    lines = []
    for e in err.errors():
        loc = _dotted(tuple(x for x in e["loc"] if x != "__root__"))
        if prefix:
            loc = f"{prefix}.{loc}" if loc != "(top level)" else prefix
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        shown = repr(got) if not isinstance(got, dict) else "a table"
        if len(shown) > 60:
            shown = shown[:57] + "..."
        lines.append(f"{source}: {loc}: {msg} (got {shown})")
    return lines


def _resolve(base: Path, p: Path) -> Path:
    p = p.expanduser()
    return p if p.is_absolute() else (base / p)


def parse_config(data: dict[str, Any], source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate a config mapping; relative paths resolve against ``base_dir``."""
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None
    if base_dir is None:
        return cfg
    service = cfg.service.model_copy(
        update={
            "watch_dir": _resolve(base_dir, cfg.service.watch_dir),
            "state_dir": _resolve(base_dir, cfg.service.state_dir),
            "feedback_dir": _resolve(base_dir, cfg.service.feedback_dir) if cfg.service.feedback_dir is not None else None,
        }
    )
    classifier = cfg.classifier.model_copy(update={"index": _resolve(base_dir, cfg.classifier.index)})
    plugins = cfg.plugins.model_copy(update={"paths": [_resolve(base_dir, p) for p in cfg.plugins.paths]})
    tracking = cfg.tracking.model_copy(update={"plate_map": _resolve(base_dir, cfg.tracking.plate_map) if cfg.tracking.plate_map is not None else None})
    return cfg.model_copy(
        update={"service": service, "classifier": classifier, "plugins": plugins, "tracking": tracking, "source": Path(source),
                "path": Path(base_dir).resolve() / Path(source).name}
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; raise :class:`ConfigError` (one line per problem)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    return parse_config(data, str(path), path.resolve().parent)


def config_or_default(path: Path | None) -> Any:
    """The config at ``path``, or the built-in defaults (paths relative to the cwd)."""
    return load_config(path) if path is not None else Config()
