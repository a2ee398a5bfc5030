"""``cellmonitor segment IMAGE --out LABELS.tif``: the configured segmenter on one image;
``cellmonitor segment-fit FOLDER --config C --out MODEL.json``: the blob mode's acceptance rule learned from boxed frames.

``segment`` writes the instance label image on the input's own pixel grid
(whatever rescaling the pipeline does inside), so anyone can score the
segmenter against their own masks. ``segment-fit`` is
:mod:`cellmonitor_plugins.segmenters.acceptance` on a folder of Pascal VOC
frames.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``segment`` and ``segment-fit`` subcommands."""
    p = sub.add_parser(
        "segment",
        help="segment one image with the configured segmenter and write its instance label image",
        description=(
            "Read IMAGE with the configured reader (or the generic TIFF reader when --pixel-size is given), "
            "rescale it to the pipeline's pixel size, segment it, and write the labels (0 = background; "
            "uint16, or uint32 above 65535 cells) on the input's own pixel grid. Prints the number of cells."
        ),
    )
    p.add_argument("image", type=Path, metavar="IMAGE")
    p.add_argument("--out", type=Path, required=True, metavar="LABELS.tif")
    p.add_argument("--config", type=Path, metavar="CONFIG", help="config (segmenter, pipeline pixel size, readers)")
    p.add_argument("--pixel-size", type=float, metavar="UM", help="pixel size of IMAGE in um (overrides its metadata)")
    p.set_defaults(func=_segment)
    register_fit(sub)


def label_dtype(n_labels: int) -> type[np.unsignedinteger[Any]]:
    """uint16 up to 65535 labels, uint32 above."""
    return np.uint16 if n_labels <= np.iinfo(np.uint16).max else np.uint32


def labels_on_input_grid(labels: np.ndarray, shape_yx: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Nearest-neighbour labels on ``shape_yx``, renumbered 1..N (ids lost by resampling are closed up).

    Returns the label image in the smallest unsigned type that holds N
    (:func:`label_dtype`) and N.
    """
    from monitor.imaging import resize

    lab = resize(np.asarray(labels), shape_yx, labels=True)
    ids, inv = np.unique(lab, return_inverse=True)
    if ids[0] != 0:  # no background pixel at all
        ids = np.concatenate([[0], ids])
        inv = inv + 1
    n = len(ids) - 1
    out = inv.reshape(lab.shape).astype(label_dtype(n))
    return out, n


def _read_frame(args: argparse.Namespace, cfg: Any) -> Any:
    from dataclasses import replace

    from monitor.errors import BadInput, NoInput
    from monitor.intake.assemble import merge
    from monitor.protocols import context_from
    from monitor.registry import Registry

    path: Path = args.image
    if not path.is_file():
        raise NoInput(path)  # exit 66, as in every command
    registry = Registry(cfg.plugins.paths)
    ctx = context_from(cfg, device="cpu")
    if args.pixel_size is not None:
        if not args.pixel_size > 0:
            raise BadInput(path, f"--pixel-size must be positive (got {args.pixel_size})")
        from cellmonitor_plugins.readers.tiff import PLUGIN as TIFF

        reader = TIFF.build(TIFF.Options(pixel_size_um=args.pixel_size, prefer_config_pixel_size=True), ctx)
        acq = reader.read(path)
    else:
        from monitor.intake.readers import build_readers

        acq = build_readers(cfg, registry, ctx).choose(path).read(path)
    if not acq.channels:
        raise BadInput(path, "no image channel in the file")
    primary = cfg.assembly.primary if cfg.assembly.primary in acq.channels else next(iter(acq.channels))
    img = acq.channels[primary]
    if img.ndim not in (2, 3) or min(img.shape[:2]) < 2:
        raise BadInput(path, f"not a 2-D image (shape {img.shape})")
    frame = merge([replace(acq, channels={primary: img})], primary, "none")
    return frame, registry, ctx


def _segment(args: argparse.Namespace) -> int:
    import tifffile

    from monitor.config import config_or_default
    from monitor.device import resolve_device
    from monitor.errors import BadInput
    from monitor.imaging import rescale

    cfg = config_or_default(args.config)
    frame, registry, ctx = _read_frame(args, cfg)
    ctx.device = resolve_device(cfg.pipeline.device)
    segmenter = registry.build("segmenters", cfg.segmenter, ctx, cfg.source_name, "segmenter")
    shape0 = frame.shape_px
    work = rescale(frame, cfg.pipeline.pixel_size_um)
    log.info(
        "%s: %dx%d px at %.4f um/px (%s) -> %dx%d at %.4f um/px",
        args.image, shape0[1], shape0[0], frame.pixel_size_um, frame.pixel_size_source,
        work.shape_px[1], work.shape_px[0], work.pixel_size_um,
    )
    cells = segmenter.segment(work)
    labels, n = labels_on_input_grid(cells.labels, shape0)
    if n != len(cells):
        log.info("%d of %d cells vanished when the labels were resampled to the input grid", len(cells) - n, len(cells))
    if not args.out.parent.is_dir():
        raise BadInput(args.out, "output folder does not exist")
    try:
        tifffile.imwrite(args.out, labels, compression="zlib", metadata={"axes": "YX"})
    except OSError as e:
        raise BadInput(args.out, f"cannot write ({e.strerror or e})") from None
    print(f"{n} cells -> {args.out}")
    return 0


def register_fit(sub: argparse._SubParsersAction) -> None:
    """Add the ``segment-fit`` subcommand."""
    p = sub.add_parser(
        "segment-fit",
        help="learn which blobs are cells from boxed frames (blob mode): writes an acceptance model for the segmenter",
        description=(
            "For a classical segmenter in mode \"blobs\" (counting-chamber frames): draw candidate blobs at a low seed "
            "threshold on every annotated frame of FOLDER (Pascal VOC: IMAGE + IMAGE.xml; an .xml with no box is an "
            "empty frame), label each candidate by matching it to the boxes, fit a quadratic logistic acceptance rule, "
            "choose its penalty and threshold by cross-validation over frames (the per-frame count error), and write "
            "it to --out. Prints the hand-set rule's count error beside the learned rule's. Use it with "
            "acceptance = \"MODEL.json\" in [segmenter.options]."
        ),
    )
    p.add_argument("folder", type=Path, metavar="FOLDER", help="boxed frames (Pascal VOC), e.g. the frames the index is built from")
    p.add_argument("--config", type=Path, required=True, metavar="CONFIG", help="the lab config: its [segmenter] (mode blobs) and pipeline pixel size")
    p.add_argument("--out", type=Path, required=True, metavar="MODEL.json")
    p.add_argument("--pixel-size", type=float, metavar="UM", help="pixel size of the frames in um (default: the pipeline's, no resampling)")
    p.add_argument("--candidate-snr", type=float, default=None, metavar="X", help="seed threshold of the candidates (default 20)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds over frames (default 5)")
    p.add_argument("--no-class-balance", action="store_true",
                   help="weigh every boxed cell alike (default: each box class weighs alike, so a rare state's faint cells are not traded away)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_segment_fit)


def annotated_frames(folder: Path) -> list[tuple[Path, Path]]:
    """(image, annotation) of every image in ``folder`` with a Pascal VOC .xml beside it, sorted."""
    from monitor.index.dataset import voc_image

    pairs = ((voc_image(x), x) for x in sorted(folder.glob("*.xml")))
    return [(img, x) for img, x in pairs if img is not None]


def fit_candidates(folder: Path, options: Any, frame_um: float, pipeline_um: float, snr: float, progress: bool) -> tuple[list[Any], list[str]]:
    """Per annotated frame: its candidates at ``snr`` labelled against its boxes, and the hand-set rule's count.

    Frames are read with the readers' decoding, rescaled to the pipeline's
    pixel size as the service does (boxes with them), and segmented by the
    blob mode's own candidate step. Returns (frames, one problem line per skipped file).
    """
    import sys
    import xml.etree.ElementTree as ET

    from cellmonitor_plugins.segmenters.acceptance import FrameCandidates
    from cellmonitor_plugins.segmenters.blobs import FEATURE_INDEX, feature_matrix
    from cellmonitor_plugins.segmenters.classical import ClassicalSegmenter, blob_candidates_on
    from tqdm import tqdm

    from monitor.errors import BadInput
    from monitor.imaging import rescale
    from monitor.index.dataset import _frame, parse_voc, read_image
    from monitor.segmentation import match_boxes

    frames, problems = [], []
    pairs = annotated_frames(folder)
    rule_segmenter = ClassicalSegmenter(options)
    # the configured size limits stay hard limits under a learned rule (the segmenter applies them to every cell)
    lo, hi = np.log(options.min_area_um2 or 1e-9), np.log(options.max_area_um2)
    for img_path, xml in tqdm(pairs, desc="candidates", unit="frame", file=sys.stderr, disable=not progress, leave=False):
        try:
            labels, boxes = parse_voc(xml)
        except (ET.ParseError, OSError, ValueError) as e:
            problems.append(f"{xml}: unreadable annotation ({e})")
            continue
        try:
            frame = rescale(_frame(read_image(img_path), frame_um), pipeline_um)
        except BadInput as e:
            problems.append(str(e))
            continue
        except OSError as e:
            problems.append(f"{img_path}: cannot read ({e.strerror or e})")
            continue
        f = frame_um / pipeline_um
        b = np.array(boxes, dtype=np.float64).reshape(-1, 4) * f
        cands, cent = blob_candidates_on(frame.image, frame.pixel_size_um, options, snr)
        # what the segmenter drops whatever the rule says is not a candidate: outside the size limits, or on the edge under exclude_border
        area, edge = FEATURE_INDEX["log_area_um2"], FEATURE_INDEX["touches_edge"]
        keep = [i for i, c in enumerate(cands) if lo <= c.features[area] <= hi and not (options.exclude_border and c.features[edge])]
        cands, cent = [cands[i] for i in keep], cent[keep]
        matched = np.zeros(len(cands), bool)
        box_class = [""] * len(cands)
        for i, j in match_boxes(cent, b):
            matched[i] = True
            box_class[i] = labels[j]
        rule = len(rule_segmenter.segment(frame).cells)
        frames.append(FrameCandidates(img_path.name, feature_matrix(cands), matched, len(b), rule, tuple(box_class)))
    return frames, problems


def _segment_fit(args: argparse.Namespace) -> int:
    import sys
    from dataclasses import replace

    from cellmonitor_plugins.segmenters.acceptance import (
        CANDIDATE_OPTIONS,
        CANDIDATE_SNR,
        fit_acceptance,
    )
    from cellmonitor_plugins.segmenters.classical import Options
    from tqdm import tqdm

    from monitor.config import load_config
    from monitor.errors import BadInput, ConfigError, UsageError
    from monitor.registry import Registry

    cfg = load_config(args.config)
    if cfg.segmenter.name != "classical":
        raise ConfigError(f"{args.config}: segmenter.name: segment-fit fits the classical segmenter's blob mode (got {cfg.segmenter.name!r})")
    opts = Registry(cfg.plugins.paths).options("segmenters", cfg.segmenter, cfg.source_name, "segmenter")
    assert isinstance(opts, Options)
    if opts.mode != "blobs":
        raise ConfigError(f"{args.config}: segmenter.options.mode: segment-fit is for mode = \"blobs\" (got {opts.mode!r})")
    opts = opts.model_copy(update={"acceptance": None})
    if not args.folder.is_dir():
        raise BadInput(args.folder, "not a folder")
    if args.pixel_size is not None and not args.pixel_size > 0:
        raise UsageError(f"--pixel-size must be positive (got {args.pixel_size})")
    if args.folds < 2:
        raise UsageError(f"--folds must be at least 2 (got {args.folds})")
    snr = CANDIDATE_SNR if args.candidate_snr is None else args.candidate_snr
    if not snr > 0:
        raise UsageError(f"--candidate-snr must be positive (got {snr})")
    pipeline_um = cfg.pipeline.pixel_size_um
    frame_um = args.pixel_size or pipeline_um
    progress = not args.no_progress and sys.stderr.isatty()
    frames, problems = fit_candidates(args.folder, opts, frame_um, pipeline_um, snr, progress)
    for line in problems:
        log.warning("skipped %s", line)
    if not frames:
        raise BadInput(args.folder, "no annotated frame (IMAGE + Pascal VOC IMAGE.xml)")
    bar = tqdm(total=1, desc="fitting", file=sys.stderr, disable=not progress, leave=False)

    def step(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        model, rep = fit_acceptance(frames, candidate_snr=snr, options={k: getattr(opts, k) for k in CANDIDATE_OPTIONS}, folds=args.folds, balance=not args.no_class_balance, progress=step)
    except ValueError as e:
        raise BadInput(args.folder, str(e)) from None
    finally:
        bar.close()
    # the working grid the features were measured on (the segmenter warns when frames come on another)
    model = replace(model, fitted={**model.fitted, "work_um": max(opts.work_pixel_size_um, pipeline_um)})
    try:
        model.save(args.out)
    except OSError as e:
        raise BadInput(args.out, f"cannot write ({e.strerror or e})") from None
    print(f"{rep.frames} frames, {rep.boxes} boxes; {rep.candidates} candidates at seed threshold {snr:g}, "
          f"{rep.boxes_with_candidate} of them on a box ({rep.boxes_with_candidate / max(rep.boxes, 1):.1%} of the boxes)")
    print(f"count error per frame ({args.folds}-fold cross-validation over frames): hand-set rule {rep.rule_count_error:.3f}, "
          f"learned rule {rep.cv_count_error:.3f} (penalty {rep.lam:g}, threshold {rep.threshold:.2f})")
    print(f"model -> {args.out}; use it with acceptance = \"{args.out.resolve()}\" in [segmenter.options]")
    if rep.cv_count_error >= rep.rule_count_error:
        print("note: the learned rule does not count better than the hand-set rule on these frames; keep the hand-set rule")
    return 0
