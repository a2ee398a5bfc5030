"""A reference index labelled by a death marker, not by hand (``index build --from-marker``).

Frames that carry a marker channel (Apo-15, PI) beside the label-free one go
through the service's own components: its readers and frame assembler, the
rescale to the pipeline's pixel size, its segmenter on the label-free
(primary) channel, its crop path. Each cell's marker signal is measured in
its mask (:func:`monitor.marker.measure`), the config's ``[marker]`` rules
label it (``"otsu"`` thresholds fitted on all cells of all frames), cells
within the margin of a threshold are left out as ambiguous, and the index
is built from the label-free crops of the labelled cells only. The resolved
rules are recorded in the index (``preprocessing.marker``), so the service
can check live agreement with the same thresholds.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.config import Config
from monitor.errors import BadInput, ConfigError
from monitor.imaging import crop_cells, rescale
from monitor.index.store import ReferenceIndex
from monitor.intake.assemble import FrameAssembler
from monitor.intake.events import FileEvent
from monitor.intake.files import scan
from monitor.intake.readers import ReaderSet, read_file
from monitor.marker import AMBIGUOUS, MarkerRules, label_cells, measure_channels, resolve, summarise
from monitor.pipeline import Pipeline, embed, in_encoder_order
from monitor.protocols import FrameEncoder
from monitor.records import Cells, Frame

log = logging.getLogger(__name__)


@dataclass
class MarkerLabels:
    """What the marker said: crops and labels of the kept cells, and the bookkeeping."""

    crops: np.ndarray
    labels: list[str]
    names: list[str]
    rules: MarkerRules
    counts: dict[str, int]
    frames: int
    frames_without_marker: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: the vectors of each frame encoder (its position among the encoders -> (N, dim)), made
    #: while the frames were at hand: such an encoder embeds a cell in its frame, not its crop
    frame_vectors: dict[int, np.ndarray] = field(default_factory=dict)


def frames_in(cfg: Config, readers: ReaderSet, folder: Path, skipped: list[tuple[str, str]]) -> list[Frame]:
    """Every frame in ``folder``, read and assembled as the service would (incomplete ones released).

    Files that do not become part of a frame (unreadable, still being
    written, a channel not configured, dropped by the assembler) are appended
    to ``skipped`` as (path, problem) and left out.
    """
    asm = FrameAssembler.from_config(cfg)
    outcomes: list[Frame | FileEvent | None] = []
    for path in sorted(scan(folder, cfg.service.patterns, cfg.service.recursive)):
        acq = read_file(readers, path)
        outcomes.append(acq if isinstance(acq, FileEvent) else asm.add(acq))
    outcomes += asm.due(force=True)
    skipped += [(";".join(o.paths), o.problem) for o in outcomes if isinstance(o, FileEvent)]
    return [o for o in outcomes if isinstance(o, Frame)]


def label_frames(cfg: Config, pipeline: Pipeline, frames: list[Frame], folder: Path, progress: bool = True) -> MarkerLabels:
    """Segment, measure the marker and label every cell of ``frames`` by the config's rules.

    Raises
    ------
    ConfigError
        No ``[marker]`` rules in the config.
    BadInput
        No frame (of ``folder``) carries the marker channels, or fewer than two
        states got cells (an index that can only say one thing).
    """
    from tqdm import tqdm

    check_rules(cfg)
    table = cfg.marker.model_dump()
    channels = list(dict.fromkeys(r["channel"] for r in table["rules"]))
    per_frame: list[tuple[Frame, Any, dict[str, np.ndarray]]] = []
    without: list[str] = []
    for frame in tqdm(frames, desc="marker: segment + measure", unit="frame", file=sys.stderr, disable=None if progress else True):
        missing = [c for c in channels if c not in frame.channels]
        if missing:
            without.append(f"{frame.key.well}/{frame.key.field}/t{frame.key.timepoint} (no {', '.join(missing)})")
            continue
        f = rescale(frame, pipeline.pixel_size_um)
        cells = pipeline.segmenter.segment(f)
        values = measure_channels(f, cells, channels, float(table["ring_um"]), str(table.get("noise", "sigma")))
        per_frame.append((f, cells, values))
    if not per_frame:
        raise BadInput(folder, f"no frame carries the marker channel(s) {', '.join(channels)} ({len(frames)} frame(s) read)")
    pooled = {c: np.concatenate([v[c] for _, _, v in per_frame]) for c in channels}
    rules = resolve(table, pooled)
    crops, labels, names, every = [], [], [], []
    in_frame = {j: e for j, e in enumerate(pipeline.encoders) if isinstance(e, FrameEncoder)}
    frame_vectors: dict[int, list[np.ndarray]] = {j: [] for j in in_frame}
    for f, cells, values in per_frame:
        lab = label_cells(values, rules)
        every += list(lab)
        keep = [i for i, x in enumerate(lab) if x != AMBIGUOUS]
        labels += [str(lab[i]) for i in keep]
        names += [f"{f.key.experiment}/{f.key.well}/{f.key.field}/t{f.key.timepoint}/cell{cells.cells[i].id}" for i in keep]
        if keep:

            sub = Cells(cells.labels, tuple(cells.cells[i] for i in keep), cells.pixel_size_um)
            crops.append(crop_cells(f, sub, pipeline.crop_px, pipeline.blank_background, pipeline.crop_framing, pipeline.crop_margin,
                                    pipeline.crop_contrast))
            for j, enc in in_frame.items():
                frame_vectors[j].append(np.asarray(enc.encode_cells(f, sub), dtype=np.float32))
    if len(set(labels)) < 2:
        got = ", ".join(f"{k} {v}" for k, v in sorted(summarise(every).items())) or "no cell segmented"
        raise BadInput(folder, f"the marker gave fewer than two states ({got}); an index needs cells of at least two states: "
                               "use a calibration run where cells die, or adjust the [marker] thresholds")
    return MarkerLabels(np.concatenate(crops), labels, names, rules, summarise(every), len(per_frame), without,
                        frame_vectors={j: np.concatenate(v) for j, v in frame_vectors.items()})


def check_rules(cfg: Config) -> None:
    """A config without ``[[marker.rules]]`` is one line (before any frame is read)."""
    if not cfg.marker.rules:
        raise ConfigError(f"{cfg.source_name}: no [[marker.rules]]: say which marker channel above which threshold means which state "
                          "(see README, 'Labelling references by a death marker'); with --from-marker FOLDER, name the config with --config")


def build_index(cfg: Config, pipeline: Pipeline, marked: MarkerLabels, cross_validate: bool = True,
                cv: dict[str, Any] | None = None, **build_kw: Any) -> Any:
    """The reference index from the marker-labelled crops (encoders as configured).

    With ``cross_validate``, the references are also scored against the marker by grouped
    cross-validation (:func:`marker_cv`), recorded in the index (``preprocessing.marker_cv``);
    ``cv`` is that record when it was made before (:func:`marker_cv_refit`, a fit per fold).
    """

    classes, y = marker_classes(marked)
    vectors = marker_vectors(pipeline, marked)
    encs = [{"name": ref.name, "options": dict(ref.options), "id": e.id, "dim": e.dim}
            for ref, e in zip(cfg.encoders, pipeline.encoders, strict=True)]
    prep = {"source": "marker", "pixel_size_um": pipeline.pixel_size_um, "crop_px": pipeline.crop_px,
            "blank_background": pipeline.blank_background, "crop_contrast": pipeline.crop_contrast, "marker": marked.rules.record(), "marker_counts": marked.counts}
    if cv is not None:
        prep["marker_cv"] = cv
    elif cross_validate:
        fitted = [e.name for e in pipeline.encoders if "fit-" in e.id]
        prep["marker_cv"] = ({"skipped": f"encoder {fitted[0]} was fitted on every reference: a cross-validation needs a fit per fold "
                                         "([fit] cross_validate = true)"}
                             if fitted else marker_cv(vectors, y, classes, marked.names, build_kw))
    index = ReferenceIndex.build(vectors, y, classes, encs, ref_names=marked.names, preprocessing=prep, **build_kw)
    index.extra_files = [f"fit/{e.name}{suffix}" for e in pipeline.encoders if "fit-" in e.id for suffix in (".npz", ".json")]
    return index


FoldVectors = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def marker_cv(vectors: np.ndarray, y: np.ndarray, classes: tuple[str, ...], names: list[str], build_kw: dict[str, Any],
              folds: int = 5) -> dict[str, Any]:
    """How well the label-free calls agree with the marker on references they did not see.

    The references are split into up to ``folds`` groups by **experiment** (the first part
    of each reference's name), or by field when fewer than two experiments are there, never
    by cell; each group's cells are called by an index built from the others with the same
    settings (conditioning, EWC). Returns the per-class recall, the balanced accuracy, the
    unit and number of folds, and how many references were scored; or ``{"skipped": why}``
    when there are too few groups or a fold lacks a class.
    """
    return grouped_cv(lambda train, test: (vectors[train], vectors[test]), y, classes, names, build_kw, folds)


def marker_cv_refit(cfg: Config, pipeline: Pipeline, marked: MarkerLabels, build_kw: dict[str, Any], progress: bool = True,
                    folds: int = 5) -> dict[str, Any]:
    """:func:`marker_cv` for an index whose encoders are fitted on the references: each fold fits a
    fresh copy of every ``needs_fit`` encoder on the other folds' references only (same ``[fit]``
    settings, weights in a scratch folder), then embeds every reference with it (:func:`marker_vectors`).
    Call it before :func:`fit_encoders` (it copies the encoders as they are, unfitted). About ``folds``
    more fits."""
    import copy
    import tempfile
    from dataclasses import replace

    classes, y = marker_classes(marked)

    def vectors(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with tempfile.TemporaryDirectory(prefix="cellmonitor-cv-") as scratch:  # the fold's weights (and runtime export)
            encoders = [copy.deepcopy(e) if e.needs_fit else e for e in pipeline.encoders]
            for e in encoders:
                if e.needs_fit:
                    e.fit(marked.crops[train], y[train], classes, cfg.fit, Path(scratch), progress)
            v = marker_vectors(replace(pipeline, encoders=encoders), marked)
        return v[train], v[test]

    cv = grouped_cv(vectors, y, classes, marked.names, build_kw, folds)
    return cv if "skipped" in cv else cv | {"refit": True}


def grouped_cv(vectors: FoldVectors, y: np.ndarray, classes: tuple[str, ...], names: list[str], build_kw: dict[str, Any],
               folds: int = 5) -> dict[str, Any]:
    """The grouped cross-validation of :func:`marker_cv`; ``vectors(train, test)`` gives each fold's two parts' vectors."""
    from monitor.index.ewc import EWCClassifier
    from monitor.index.store import ReferenceIndex
    from monitor.records import Embeddings

    unit, groups = "experiment", [n.split("/")[0] for n in names]
    if len(set(groups)) < 2:
        unit, groups = "field", ["/".join(n.split("/")[:3]) for n in names]
    names_g = sorted(set(groups))
    if len(names_g) < 2:
        return {"skipped": "the references come from one field: nothing to hold out"}
    k = min(folds, len(names_g))
    fold = group_folds(groups, y, k, int(np.argmin(np.bincount(y, minlength=len(classes)))))
    for j in range(k):  # every fold checked before any is embedded: a fold's vectors may cost a fit
        if len(set(y[fold != j].tolist())) < len(classes):
            return {"skipped": f"a fold's training part lacks a class ({k} folds by {unit}): too few groups for a cross-validation"}
    called = np.full(len(y), -1)
    kw = {key: v for key, v in build_kw.items() if key in ("metric", "ewc", "conditioning")}
    for j in range(k):
        train, test = fold != j, fold == j
        v_train, v_test = vectors(train, test)
        dims = [{"name": "cv", "id": "cv", "dim": v_train.shape[1]}]
        idx = ReferenceIndex.build(v_train, y[train], classes, dims, structure="flat", unknown_quantile=None, **kw)
        called[test] = EWCClassifier(idx).classify(Embeddings(np.ascontiguousarray(v_test), ("cv",), (v_train.shape[1],))).predicted
    recall = {c: float((called[y == i] == i).mean()) for i, c in enumerate(classes) if (y == i).any()}
    return {"unit": unit, "folds": k, "groups": len(names_g), "references": int(len(y)),
            "recall": {c: round(r, 4) for c, r in recall.items()}, "balanced_accuracy": round(float(np.mean(list(recall.values()))), 4)}


def group_folds(groups: list[str], y: np.ndarray, k: int, counted: int) -> np.ndarray:
    """Each cell's fold (0..k-1), whole groups together: the groups with the most cells of class
    ``counted`` (the rarest) first, each to the fold with the fewest such cells so far (then the
    fewest cells, then the lowest number). Deterministic."""
    g = np.array(groups)
    rare = {n: int(((g == n) & (y == counted)).sum()) for n in set(groups)}
    size = {n: int((g == n).sum()) for n in set(groups)}
    load = [(0, 0)] * k
    of: dict[str, int] = {}
    for name in sorted(rare, key=lambda n: (-rare[n], -size[n], n)):
        j = min(range(k), key=lambda j: (*load[j], j))
        of[name] = j
        load[j] = (load[j][0] + rare[name], load[j][1] + size[name])
    return np.array([of[n] for n in groups])


def describe_cv(cv: dict[str, Any]) -> str:
    """One line for a person: what the cross-validation at build said, or why there is none."""
    if "skipped" in cv:
        return f"label-free calls vs the marker: not cross-validated ({cv['skipped']})"
    rec = ", ".join(f"{c} {r:.2f}" for c, r in cv["recall"].items())
    refit = ", the encoder fitted again in each" if cv.get("refit") else ""
    return (f"label-free calls vs the marker, cross-validated at build ({cv['folds']} folds by {cv['unit']}{refit}, "
            f"{cv['references']} references): balanced accuracy {cv['balanced_accuracy']:.2f} (recall: {rec})")


def marker_vectors(pipeline: Pipeline, marked: MarkerLabels) -> np.ndarray:
    """The kept cells' vectors in the configured encoder order: crop encoders on the crops (one
    batched call), frame encoders from what :func:`label_frames` measured in the frames."""
    crop_encs = [e for j, e in enumerate(pipeline.encoders) if j not in marked.frame_vectors]
    crop_v = embed(marked.crops, crop_encs, pipeline.batch_size).vectors if crop_encs else np.zeros((len(marked.crops), 0), np.float32)
    return in_encoder_order(pipeline.encoders, crop_v, marked.frame_vectors)


def marker_classes(marked: MarkerLabels) -> tuple[tuple[str, ...], np.ndarray]:
    """The index's classes (canonical order) and each kept cell's class number."""
    classes = tuple(s for s in ("live", "apoptotic", "necrotic", "dead") if s in set(marked.labels))
    return classes, np.array([classes.index(s) for s in marked.labels], dtype=np.int64)


def fit_encoders(cfg: Config, pipeline: Pipeline, marked: MarkerLabels, folder: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Fit every encoder configured ``fitted = true`` on the marker-labelled crops (settings: ``[fit]``);
    their weights go into the index folder. Returns one record per fitted encoder."""
    classes, y = marker_classes(marked)
    return [enc.fit(marked.crops, y, classes, cfg.fit, Path(folder), progress) for enc in pipeline.encoders if enc.needs_fit]


def describe(marked: MarkerLabels, say: Callable[[str], None]) -> None:
    """The label counts and the thresholds used, one line each."""
    for r in marked.rules.rules:
        unit = "MADs" if marked.rules.noise == "mad" else "SNR"
        band = (f"ambiguous between {r.ambiguous_above:.3g} and {r.threshold:.3g}" if r.ambiguous_above is not None
                else f"ambiguous within +-{marked.rules.margin * abs(r.threshold):.3g}")
        say(f"  rule: {r.channel} {'>=' if r.ambiguous_above is not None else '>'} {r.threshold:.3g} ({unit}) -> {r.state}  ({band})")
    say(f"  else: {marked.rules.negative}")
    say("  cells: " + ", ".join(f"{k} {v}" for k, v in sorted(marked.counts.items())) + f" in {marked.frames} frame(s)")
    if marked.frames_without_marker:
        say(f"  {len(marked.frames_without_marker)} frame(s) without the marker left out, e.g. {marked.frames_without_marker[0]}")
