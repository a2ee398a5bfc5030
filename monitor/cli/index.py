"""``cellmonitor index build|evaluate|search`` and ``cellmonitor classify``.

Heavy imports (torch, faiss, numba) happen inside the handlers. Errors that
are the user's (missing data, index mismatch, unknown encoder) are
:class:`~monitor.errors.CellmonitorError` lines; unreadable files inside a
data set are skipped with one line each and counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from monitor.protocols import BuildContext, context_from


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def resolve_classes(given: list[str] | None, known: list[str], option: str = "--classes") -> list[str] | None:
    """``--classes`` against the data's classes: comma-separated, or space-separated where a part
    is not itself a class ("a b" as well as "a,b"; "Living Cell" stays one class).

    Raises
    ------
    UsageError
        A name that is no class of the data (the line names it and lists the classes).
    """
    from monitor.errors import UsageError

    if not given:
        return None
    out: list[str] = []
    for part in given:
        names = [part] if part in known else part.split()
        missing = [n for n in names if n not in known]
        if missing:
            raise UsageError(f"{option}: {', '.join(map(repr, missing))} not a class of the data (classes: {', '.join(known)})")
        out += [n for n in names if n not in out]
    return out


def _add_prep(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("crops (recorded in the index; part of the cache key)")
    g.add_argument("--framing", choices=("whole", "center", "cell"), default=None, help="class-folder images: whole image, centre crop at the image's scale (the service's crop), or segmented cell (scale-normalised); default: the preset's")
    g.add_argument("--crop-px", type=int, default=224, help="crop side at the target pixel size (default 224)")
    g.add_argument("--pixel-size", type=float, default=0.322, metavar="UM", help="target pixel size, um/px (default 0.322, the service's)")
    g.add_argument("--source-pixel-size", type=float, default=None, metavar="UM", help="the data's pixel size (default: already at the target)")
    g.add_argument("--colour", choices=("rgb", "grey", "reinhard"), default="rgb", help="colour handling (reinhard = stain normalisation)")
    g.add_argument("--cell-diameter-px", type=int, default=120, help="framing=cell: target cell diameter")
    g.add_argument("--box-framing", choices=("box", "window"), default="box", help="boxed frames: each cell framed by its box plus a margin, resized to --crop-px (default; the service frames segmented cells the same way), or a fixed --crop-px window at the target pixel size")
    g.add_argument("--box-margin", type=float, default=0.2, help="box framing: context on each side, as a fraction of the box's longer side")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", type=Path, default=None, help="embedding cache folder (default $CELLMONITOR_CACHE or ~/.cache/cellmonitor/embeddings)")
    p.add_argument("--no-cache", action="store_true", help="embed everything, store nothing")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plugin-path", type=Path, action="append", default=[], help="folder with site-local 'module:attr' encoder plugins")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "cuda-or-cpu"), help="auto: CUDA when available, else CPU; cuda-or-cpu: CUDA, or the CPU with a warning")


def _add_ewc(p: argparse.ArgumentParser, defaults: bool) -> None:
    g = p.add_argument_group("EWC parameters" + (" (default: the preset's)" if defaults else " (default: the index's)"))
    g.add_argument("--k-min", type=int, default=None)
    g.add_argument("--k-max", type=int, default=None)
    g.add_argument("--threshold", type=float, default=None, help="entropy threshold in [0, 1]")
    g.add_argument("--no-reweight", dest="reweight", action="store_false", default=None, help="vote without class weights")


def _add_features(p: argparse.ArgumentParser) -> None:
    from monitor.index.presets import DEFAULT_PRESET, PRESETS

    g = p.add_argument_group("features (default: the preset's)")
    g.add_argument(
        "--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
        help=f"encoders, conditioning, query TTA and EWC parameters in one word (default {DEFAULT_PRESET}); "
        + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()),
    )
    g.add_argument("--encoders", default=None, help="comma-separated encoder plugins, concatenated in this order; options as name:key=value, e.g. efficientnet-lite0:layers=multi")
    g.add_argument("--condition-dim", type=int, default=None, metavar="D", help="conditioning: standardise, PCA-whiten to D dims, L2-normalise, fitted on the references (0: raw vectors)")
    g.add_argument("--shrinkage", type=float, default=None, help="conditioning: eigenvalue shrinkage towards their mean, 0..1")
    g.add_argument("--tta", type=int, choices=(1, 8), default=None, help="query-side test-time augmentation: 8 = mean of the 8 flips/rotations (references are not augmented)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build, evaluate and tune the EWC-FAISS reference index")
    isub = p.add_subparsers(dest="index_command", metavar="SUBCOMMAND")

    b = isub.add_parser("build", help="embed labelled cells (class folders or VOC boxes, or frames labelled by a death marker) and write an index folder")
    b.add_argument("data", type=Path, metavar="DATA", nargs="?", help="class folders or VOC frames; with --from-marker CONFIG: the frames (default: the config's watch_dir)")
    b.add_argument("--out", type=Path, required=True, metavar="INDEX")
    b.add_argument("--from-marker", type=Path, default=None, metavar="CONFIG_OR_FOLDER",
                   help="label the references by the death marker: frames with a marker channel, read, segmented and cropped as the service does, "
                        "labelled by the config's [marker] rules (a folder: the frames, with --config)")
    b.add_argument("--config", type=Path, default=None, metavar="CONFIG", help="--from-marker FOLDER: the config with the readers, segmenter, encoders and [marker] rules")
    _add_features(b)
    b.add_argument("--metric", choices=("l2", "cosine", "canberra"), default="l2")
    b.add_argument("--normalize", action="store_true", help="L2-normalise vectors (off in the paper)")
    b.add_argument("--structure", choices=("auto", "flat", "hnsw"), default="auto")
    b.add_argument("--hnsw-above", type=int, default=50_000, help="auto: HNSW above this many references")
    b.add_argument("--hnsw-m", type=int, default=32)
    b.add_argument("--ef-construction", type=int, default=80, help="HNSW graph build effort (40: recall@100 stays below 0.95 on 10^6 references)")
    b.add_argument("--ef-search", type=int, default=64, help="HNSW efSearch when the probe is off (--recall-target 0); never below k at search time")
    b.add_argument("--recall-target", type=float, default=0.95, metavar="R",
                   help="HNSW: efSearch is the smallest that reaches this recall@k_max against exact search on held-out references (0: no probe)")
    b.add_argument("--probe-queries", type=int, default=1000, metavar="N", help="HNSW: references held out as probe queries (at most a tenth)")
    b.add_argument("--classes", type=_csv, default=None, help="keep only these classes")
    _add_ewc(b, True)
    b.add_argument("--unknown-quantile", type=float, default=None, metavar="Q",
                   help="unknown cells: beyond this quantile of the references' own neighbour distances (default 0.99; lower flags more, also more known cells; 0: no unknown flag)"),
    _add_prep(b)
    _add_common(b)
    b.set_defaults(func=_build)

    sp = isub.add_parser("split", help="split labelled data into train/test folders of links, stratified by class, by group on request")
    sp.add_argument("data", type=Path, metavar="DATA")
    sp.add_argument("--test", type=float, default=0.1, help="fraction of the files (or groups) held out (default 0.1)")
    sp.add_argument("--by-group", default=None, metavar="REGEX", help="keep each group on one side: a regular expression on the file's "
                    "path in DATA, its first group naming the group (an experiment, a plate, a day)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", type=Path, default=None, help="default: DATA-split beside DATA")
    sp.set_defaults(func=_split)

    e = isub.add_parser("evaluate", help="macro accuracy, per-class accuracy, confusion matrix, EWC vs plain k-NN")
    e.add_argument("index", type=Path, metavar="INDEX")
    e.add_argument("data", type=Path, metavar="DATA")
    e.add_argument("--json", action="store_true", help="one JSON document on stdout")
    e.add_argument("--png", type=Path, default=None, help="confusion matrix PNG (default INDEX/confusion.png)")
    e.add_argument("--baseline-k", type=int, default=20, help="k of the plain k-NN baseline")
    e.add_argument("--classes", type=_csv, default=None,
                   help="score only these classes (commas or spaces); default: the data's classes that the index has")
    _add_ewc(e, False)
    _add_common(e)
    e.set_defaults(func=_evaluate)

    s = isub.add_parser("search", help="power-set search over encoders x (k range, threshold) on a validation split")
    s.add_argument("data", type=Path, metavar="DATA")
    s.add_argument("--encoders", required=True, help="comma-separated encoder plugins to combine (name:key=value options)")
    s.add_argument("--condition-dims", type=lambda v: [int(x) for x in _csv(v)], default=None, help="conditioning dims to try, 0 = raw (default 0,128,192,256)")
    s.add_argument("--shrinkage", type=float, default=0.1, help="conditioning shrinkage")
    s.add_argument("--metric", choices=("l2", "cosine", "canberra"), default="l2")
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--thresholds", type=lambda v: [float(x) for x in _csv(v)], default=None, help="e.g. 0.1,0.3,0.5,0.7")
    s.add_argument("--k-ranges", type=lambda v: [tuple(int(y) for y in x.split(":")) for x in _csv(v)], default=None, help="e.g. 10:1000,20:1000")
    s.add_argument("--baseline-k", type=int, default=20)
    s.add_argument("--classes", type=_csv, default=None)
    s.add_argument("--top", type=int, default=15, help="rows of the ranked table")
    s.add_argument("--out", type=Path, default=Path("ewc-search.toml"), help="winning config snippet (TOML)")
    s.add_argument("--json", action="store_true")
    _add_prep(s)
    _add_common(s)
    s.set_defaults(func=_search)

    c = sub.add_parser("classify", help="classify cell images with an index: prediction, certainty, k, nearest references")
    c.add_argument("index", type=Path, metavar="INDEX")
    c.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    c.add_argument("--json", action="store_true", help="one JSON object per image")
    c.add_argument("--html", type=Path, default=None, metavar="OUT", help="self-contained page with the query and its neighbours")
    c.add_argument("--neighbours", type=int, default=5, help="nearest references shown (default 5)")
    c.add_argument("--certainty-floor", type=float, default=0.5)
    c.add_argument("--config", type=Path, default=None, metavar="CONFIG", help="config whose segmenter checks each image for several cells (default: the built-in classical segmenter)")
    c.add_argument("--per-cell", action="store_true", help="an image with several cells: classify each segmented cell (IMAGE#cellN) instead of the image as one cell")
    _add_ewc(c, False)
    _add_common(c)
    c.set_defaults(func=_classify)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


# ---------------------------------------------------------------- helpers
def _encoders(specs: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> list[Any]:
    from monitor.config import PluginRef
    from monitor.device import resolve_device
    from monitor.registry import Registry

    reg = Registry(args.plugin_path)
    ctx = BuildContext(state_dir=Path.cwd(), device=resolve_device(args.device))
    encoders = [reg.build("encoders", PluginRef(name=n, options=o), ctx, where=f"--encoders {n}") for n, o in specs]
    in_frame = [e.name for e in encoders if e.frame_only]
    if in_frame:
        from monitor.errors import ConfigError

        raise ConfigError(f"encoder {in_frame[0]} measures each cell in its frame, under its mask: it cannot embed a folder of crops. "
                          "Build its references with `cellmonitor index build FRAMES --from-marker CONFIG`; the service's marker "
                          "agreement (run or replay) measures its calls")
    return encoders


def _encoder_specs(text: str) -> list[tuple[str, dict[str, Any]]]:
    from monitor.errors import CellmonitorError
    from monitor.index.presets import parse_encoder

    try:
        return [parse_encoder(x) for x in _csv(text)]
    except ValueError as e:
        raise CellmonitorError(f"--encoders: {e}") from None


def _prep(args: argparse.Namespace) -> Any:
    from monitor.index.dataset import Preprocess
    from monitor.index.presets import DEFAULT_PRESET, PRESETS

    framing = args.framing or PRESETS[getattr(args, "preset", None) or DEFAULT_PRESET].framing
    return Preprocess(framing, args.crop_px, args.pixel_size, args.source_pixel_size, args.colour, args.cell_diameter_px, args.box_framing, args.box_margin)


def _cache(args: argparse.Namespace) -> Any:
    from monitor.index.cache import EmbeddingCache

    return None if args.no_cache else EmbeddingCache(args.cache)


def _report_skips(skipped: list[str]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s) (listed above)", file=sys.stderr)


def _encoder_record(enc: Any, name: str, options: dict[str, Any]) -> dict[str, Any]:
    from monitor import __version__

    return {
        "name": name, "options": dict(options), "id": enc.id, "dim": int(enc.dim),
        "version": enc.version or f"cellmonitor {__version__}", "module": type(enc).__module__,
    }


def _load_index(args: argparse.Namespace) -> tuple[Any, list[Any], Any]:
    """Load the index, rebuild its encoders by name, and validate ids/dims against it."""
    import json as _json

    from monitor.errors import IndexError_
    from monitor.index.dataset import Preprocess
    from monitor.index.store import ReferenceIndex

    meta_path = args.index / "meta.json"
    try:
        meta = _json.loads(meta_path.read_text())
        specs = [(e["name"], dict(e.get("options") or {})) for e in meta["encoders"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ReferenceIndex.load(args.index)  # raises the precise one-line refusal
        raise IndexError_(f"{args.index}: meta.json does not name its encoders") from None
    encoders = _encoders(specs, args)
    index = ReferenceIndex.load(args.index, [{"id": e.id, "dim": e.dim} for e in encoders])
    prep = Preprocess.from_dict(index.preprocessing or {})
    return index, encoders, prep


def _params(args: argparse.Namespace, index: Any) -> Any:
    from monitor.index.ewc import params_from_config

    return params_from_config(index, args.k_min, args.k_max, args.threshold, args.reweight)


# ---------------------------------------------------------------- handlers
def _unknown_q(args: argparse.Namespace) -> float | None:
    """``--unknown-quantile``: None (no flag) for 0, the index's default when not given."""
    from monitor.errors import ConfigError
    from monitor.index.unknown import QUANTILE

    q = args.unknown_quantile
    if q is None:
        return QUANTILE
    if not 0.0 <= q < 1.0:
        raise ConfigError(f"--unknown-quantile must be in [0, 1) (got {q})")
    return q or None


def _build_from_marker(args: argparse.Namespace) -> int:
    """``index build --from-marker``: references labelled by the death marker (monitor.index.from_marker)."""
    import time

    from monitor.config import config_or_default
    from monitor.errors import ConfigError
    from monitor.index.condition import ConditioningSpec
    from monitor.index.ewc import EWCParams
    from monitor.index.from_marker import (
        build_index,
        check_rules,
        describe,
        describe_cv,
        fit_encoders,
        frames_in,
        label_frames,
        marker_cv_refit,
    )
    from monitor.index.presets import PRESETS
    from monitor.intake.readers import build_readers
    from monitor.registry import Registry
    from monitor.service.wiring import pipeline_without_index

    t0 = time.perf_counter()
    src = args.from_marker
    if src.is_dir():
        cfg_path, folder = args.config, src
    elif src.is_file():
        cfg_path, folder = src, args.data
    else:
        raise ConfigError(f"{src}: --from-marker takes a config file or a folder of frames; this is neither")
    cfg = config_or_default(cfg_path)
    folder = folder if folder is not None else cfg.service.watch_dir
    if not Path(folder).is_dir():
        raise ConfigError(f"{folder}: no such folder of frames")
    if args.encoders:
        raise ConfigError("--from-marker embeds with the config's [[encoders]] (the index must fit the service); drop --encoders")
    check_rules(cfg)
    registry = Registry(cfg.plugins.paths)
    ctx = context_from(cfg, index_dir=args.out, fitting=True)  # an encoder named fitted = true is fitted below
    pipeline = pipeline_without_index(cfg, registry, ctx)
    skipped: list[tuple[str, str]] = []
    frames = frames_in(cfg, build_readers(cfg, registry, ctx), Path(folder), skipped)
    for path, problem in skipped:
        print(f"skipped {path}: {' '.join(problem.split())}", file=sys.stderr)
    print(f"{folder}: {len(frames)} frame(s)", file=sys.stderr)
    marked = label_frames(cfg, pipeline, frames, Path(folder), progress=not args.no_progress)
    describe(marked, lambda line: print(line, file=sys.stderr))
    # a calibration run gives hundreds of cells, not thousands: the preset's k and conditioning
    # are capped so that no class is outvoted by k alone and the whitening is not fitted on noise
    preset = PRESETS[args.preset]
    pe, pc = preset.ewc, preset.conditioning
    # the config's [classifier] EWC settings are what the service will use: the index is built with them
    c = cfg.classifier
    smallest = min(marked.labels.count(s) for s in set(marked.labels))
    asked = args.k_min or c.k_min
    k_max = args.k_max or c.k_max or max(asked or pe.k_min, min(pe.k_max, smallest))
    threshold = next(t for t in (args.threshold, c.entropy_threshold, pe.entropy_threshold) if t is not None)
    reweight = next(r for r in (args.reweight, c.reweight, pe.reweight) if r is not None)
    ewc = EWCParams(asked or min(pe.k_min, k_max), k_max, threshold, reweight)
    to_fit = any(e.needs_fit for e in pipeline.encoders)
    auto_dim = cfg.fit.condition_dim if to_fit else (pc.dim if pc is not None else 0)  # a fitted encoder: [fit] condition_dim
    dim = args.condition_dim if args.condition_dim is not None else min(auto_dim, len(marked.labels) // 8)
    conditioning = None
    if cfg.fit.projection == "logistic":
        conditioning = ConditioningSpec(1, method="logistic", penalty=cfg.fit.penalty)
    elif dim > 0:
        conditioning = ConditioningSpec(dim, args.shrinkage if args.shrinkage is not None else 0.1)
    shown = f"logistic projection (penalty {cfg.fit.penalty:g})" if cfg.fit.projection == "logistic" else (dim or "off")
    print(f"  EWC k {ewc.k_min}..{ewc.k_max} (smallest class: {smallest} cells); conditioning {shown}", file=sys.stderr)
    build_kw: dict[str, Any] = {"metric": args.metric, "ewc": ewc, "conditioning": conditioning}
    # an encoder fitted on every reference is cross-validated only by fitting it again per fold (before the real fit)
    cv = marker_cv_refit(cfg, pipeline, marked, build_kw, progress=not args.no_progress) if to_fit and cfg.fit.cross_validate else None
    fitted = fit_encoders(cfg, pipeline, marked, args.out, progress=not args.no_progress)
    for rec in fitted:
        print(f"  fitted {rec['encoder']} on {sum(rec['references'].values())} references in {rec['seconds']:.0f} s "
              f"({rec['epochs']} epochs, loss {rec['loss_per_epoch'][0]:.3f} -> {rec['loss_per_epoch'][-1]:.3f}): {rec['id']}", file=sys.stderr)
    index = build_index(cfg, pipeline, marked, cv=cv, query={"tta": args.tta} if args.tta and args.tta != 1 else None,
                        unknown_quantile=_unknown_q(args), **build_kw)
    print(f"  {describe_cv(index.preprocessing['marker_cv'])}", file=sys.stderr)
    index.save(args.out)
    counts = ", ".join(f"{c} {n}" for c, n in index.class_counts.items())
    print(f"wrote {args.out}: {len(index)} references labelled by the marker ({counts}); {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def _build(args: argparse.Namespace) -> int:
    import time

    if args.from_marker is not None:
        return _build_from_marker(args)
    if args.data is None:
        from monitor.errors import ConfigError

        raise ConfigError("index build: give DATA (class folders or VOC frames), or --from-marker CONFIG")

    from monitor.index.cache import embed_dataset
    from monitor.index.dataset import scan
    from monitor.index.presets import PRESETS, encoders_toml
    from monitor.index.search import HNSWParams, ProbeSpec
    from monitor.index.store import ReferenceIndex

    t0 = time.perf_counter()
    preset = PRESETS[args.preset]
    specs = _encoder_specs(args.encoders) if args.encoders else [(n, dict(o)) for n, o in preset.encoders]
    encoders = _encoders(specs, args)
    ds = scan(args.data, resolve_classes(args.classes, list(scan(args.data).classes)) if args.classes else None)
    prep = _prep(args)
    print(f"{args.data}: {ds.n_cells} cells in {len(ds.files)} files, classes {', '.join(ds.classes)} ({ds.layout})", file=sys.stderr)
    cache = _cache(args)
    emb = embed_dataset(ds, encoders, prep, cache, args.batch_size, progress=not args.no_progress)
    _report_skips(emb.skipped)
    if len(emb) == 0:
        from monitor.errors import BadInput

        raise BadInput(args.data, "no readable cells")
    choice = preset.merged(k_min=args.k_min, k_max=args.k_max, entropy_threshold=args.threshold, reweight=args.reweight,
                           condition_dim=args.condition_dim, shrinkage=args.shrinkage, tta=args.tta)
    ewc, conditioning, tta = choice.ewc, choice.conditioning, choice.tta
    try:
        index = ReferenceIndex.build(
            emb.concat([e.id for e in encoders]),
            emb.labels,
            emb.classes,
            [_encoder_record(e, n, o) for e, (n, o) in zip(encoders, specs, strict=True)],
            metric=args.metric,
            structure=args.structure,
            ewc=ewc,
            hnsw=HNSWParams(args.hnsw_m, args.ef_construction, args.ef_search),
            hnsw_above=args.hnsw_above,
            probe=ProbeSpec(args.recall_target, args.probe_queries) if args.recall_target > 0 else None,
            normalize=args.normalize,
            ref_names=emb.names,
            preprocessing={**prep.as_dict(), "layout": ds.layout, "data_root": str(args.data.resolve())},
            conditioning=conditioning,
            query={"tta": tta} if tta != 1 else None,
            unknown_quantile=_unknown_q(args),
        )
    except ValueError as err:
        from monitor.errors import BadInput

        raise BadInput(args.data, str(err)) from None
    index.save(args.out)
    counts = ", ".join(f"{c} {n}" for c, n in index.class_counts.items())
    hits = f", cache {cache.hits} hit(s) / {cache.misses} miss(es)" if cache is not None else ""
    cond = f", conditioned {index.meta.dim} -> {index.dim}" if index.conditioner is not None else ", raw vectors"
    e, pr = index.ewc, index.meta.search_probe
    probed = f" efSearch {pr.ef_search} (recall@{pr.k} {pr.recall:.3f} on {pr.queries} held-out)" if pr is not None else ""
    print(
        f"wrote {args.out}: {len(index)} references x {index.dim} dims ({index.metric}, {index.structure}{probed}{cond}); {counts}{hits}; "
        f"EWC k {e.k_min}..{e.k_max} thr {e.entropy_threshold:g}{'' if e.reweight else ' no reweight'}; query TTA {tta}; {time.perf_counter() - t0:.1f} s"
    )
    print(f"the service config names these encoders (the index refuses others):\n\n{encoders_toml(specs)}", file=sys.stderr)
    return 0


def _split(args: argparse.Namespace) -> int:
    from monitor.index.dataset import scan
    from monitor.index.split import split_dataset

    out = args.out or args.data.parent / f"{args.data.name}-split"
    rec = split_dataset(scan(args.data), out, args.test, args.seed, args.by_group)
    for side in ("train", "test"):
        counts = ", ".join(f"{c} {n}" for c, n in sorted(rec["counts"][side].items()))
        groups = f"; {len(rec['groups'][side])} group(s)" if "groups" in rec else ""
        print(f"{out / side}: {sum(rec['counts'][side].values())} file(s), {rec['cells'][side]} cell(s) ({counts}){groups}")
    print(f"recorded in {out / 'split.json'}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from monitor.index.cache import embed_dataset
    from monitor.index.dataset import scan
    from monitor.index.evaluate import evaluate
    from monitor.index.query import query_encoders
    from monitor.report.classification import confusion_png, evaluation_text

    index, encoders, prep = _load_index(args)
    found = scan(args.data).classes
    keep = resolve_classes(args.classes, list(found)) or [c for c in found if c in index.classes]
    if not keep:
        from monitor.errors import BadInput

        raise BadInput(args.data, f"none of its classes ({', '.join(found)}) is a class of the index ({', '.join(index.classes)}); "
                                  "name the ones to score with --classes")
    left_out = [c for c in found if c not in keep]
    if left_out:
        print(f"scored on the classes {', '.join(keep)}; left out: {', '.join(left_out)}"
              + (" (not in the index; --classes to choose)" if not args.classes else ""), file=sys.stderr)
    ds = scan(args.data, keep)
    emb = embed_dataset(ds, query_encoders(encoders, index.meta), prep, _cache(args), args.batch_size, progress=not args.no_progress)
    _report_skips(emb.skipped)
    y = [emb.classes[i] for i in emb.labels]
    ev = evaluate(index, emb.concat([e.id for e in encoders]), y, _params(args, index), args.baseline_k)
    png = args.png or (args.index / "confusion.png")
    confusion_png(ev.ewc, png)
    unknown = sorted(set(y) - set(index.classes))
    if args.json:
        print(json.dumps({**ev.to_dict(), "confusion_png": str(png), "classes_not_in_index": unknown, "classes_left_out": left_out}, indent=2))
        return 0
    c = index.conditioner
    features = f"conditioned {index.meta.dim} -> {c.dim} (shrinkage {c.shrinkage:g})" if c is not None else f"raw {index.dim}-d"
    print(f"{len(y)} cells; features: {features}, query TTA {index.meta.tta}; EWC and plain k-NN on the same features\n")
    print(evaluation_text(ev))
    if unknown:
        print(f"\nclasses not in the index (always wrong): {', '.join(unknown)}")
    print(f"\nconfusion matrix PNG: {png}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from monitor.index.cache import embed_dataset
    from monitor.index.dataset import group_split, scan, stratified_split
    from monitor.index.presets import encoder_spec
    from monitor.index.tune import (
        DEFAULT_CONDITION_DIMS,
        DEFAULT_K_RANGES,
        DEFAULT_THRESHOLDS,
        best_ewc,
        combination_search,
        winner_toml,
    )
    from monitor.report.classification import table

    specs = _encoder_specs(args.encoders)
    encoders = _encoders(specs, args)
    ds = scan(args.data, resolve_classes(args.classes, list(scan(args.data).classes)) if args.classes else None)
    emb = embed_dataset(ds, encoders, _prep(args), _cache(args), args.batch_size, progress=not args.no_progress)
    _report_skips(emb.skipped)
    # boxed frames: split by frame, so cells of one frame never sit on both sides
    if ds.layout == "voc":
        train, val = group_split(emb.labels, emb.groups, args.val_fraction, args.seed)
    else:
        train, val = stratified_split(emb.labels, args.val_fraction, args.seed)
    rows = combination_search(
        emb,
        [e.id for e in encoders],
        train,
        val,
        args.metric,
        args.thresholds or DEFAULT_THRESHOLDS,
        args.k_ranges or DEFAULT_K_RANGES,
        baseline_k=args.baseline_k,
        condition_dims=args.condition_dims if args.condition_dims is not None else DEFAULT_CONDITION_DIMS,
        shrinkage=args.shrinkage,
    )
    id2name = {e.id: encoder_spec(n, o) for e, (n, o) in zip(encoders, specs, strict=True)}
    win = best_ewc(rows)
    snippet = winner_toml(win, id2name, len(rows), args.metric)
    args.out.write_text(snippet)
    if args.json:
        print(json.dumps({"rows": [{**r.__dict__, "encoders": [id2name[e] for e in r.encoders]} for r in rows], "winner_toml": str(args.out)}, indent=2, default=float))
        return 0
    print(f"validation: {len(val)} cells, training: {len(train)} cells, {len(rows)} configurations")
    shown = [
        ["+".join(id2name[e] for e in r.encoders), r.condition_dim or "raw", r.method, f"{r.k_min}..{r.k_max}", r.threshold, "on" if r.reweight else "off", r.macro_accuracy, r.mean_k]
        for r in rows[: args.top]
    ]
    print(table(["encoders", "conditioning", "method", "k", "threshold", "reweight", "macro acc", "mean k"], shown))
    print(f"\nwinner written to {args.out}:\n")
    print(snippet)
    return 0


def _classify(args: argparse.Namespace) -> int:
    import numpy as np

    from monitor.errors import BadInput
    from monitor.index.dataset import crops_for, read_image
    from monitor.index.ewc import EWCClassifier
    from monitor.index.query import crop_framing, query_encoders, segment_query
    from monitor.pipeline import embed
    from monitor.report.classification import crop_geometry

    index, encoders, prep = _load_index(args)

    crops: list[Any] = []
    shown: list[Path] = []
    scales: list[tuple[float | None, Any]] = []
    status = 0
    segmenter, seg_cfg = _classify_segmenter(args)
    single_cell = (index.preprocessing or {}).get("layout") == "folders"
    framing = crop_framing(index.meta) or ("window", 0.2)
    per_cell: dict[int, Any] = {}  # query row -> (source image index, cell id); the cells of a multi-cell image
    found: list[int] = []
    overlays_src: dict[str, Any] = {}
    for path in args.images:
        try:
            image = read_image(path)
            cells = segment_query(image, prep, segmenter, seg_cfg.pipeline.blank_background, framing)
        except BadInput as e:
            print(f"cellmonitor: error: {e}", file=sys.stderr)
            status = 65
            continue
        n = len(cells[1]) if cells is not None else 1
        if cells is not None and n > 1 and args.per_cell:
            frame, cs, cell_crops = cells
            overlays_src[str(path)] = (frame, cs)
            for k, c in enumerate(cs.cells):
                per_cell[len(crops)] = (len(shown), c.id)
                crops.append(cell_crops[k])
                scales.append((frame.pixel_size_um if framing[0] == "window" else None, None))
                shown.append(path)
                found.append(n)
            continue
        if n > 1:
            # an index built from class folders holds single-cell crops: an image like them is one cell (the
            # segmenter's "cells" there are fragments or debris), so --per-cell is not suggested
            hint = ("; the index's references are single-cell images, so this one is too" if single_cell
                    else " (--per-cell classifies each)")
            print(f"cellmonitor: warning: {path}: the segmenter found {n} cells; classified as one cell{hint}", file=sys.stderr)
        crops.append(crops_for(image, prep)[0])
        scales.append(crop_geometry(image.shape, prep))
        shown.append(path)
        found.append(n)
    if not crops:
        return status or 65
    emb = embed(np.stack(crops), query_encoders(encoders, index.meta), args.batch_size)
    states = EWCClassifier(index, _params(args, index), args.certainty_floor).classify(emb)
    results: list[dict[str, Any]] = []
    for i, path in enumerate(shown):
        nbrs = []
        for j in range(min(args.neighbours, int(states.k_used[i]))):
            rid = int(states.neighbor_ids[i, j])
            if rid < 0:
                break
            nbrs.append(
                {
                    "id": rid,
                    "name": index.ref_names[rid] if index.ref_names else None,
                    "label": index.classes[int(states.neighbor_labels[i, j])],
                    "distance": float(states.neighbor_distances[i, j]),
                }
            )
        cell = per_cell.get(i)
        results.append(
            {
                "image": f"{path}#cell{cell[1]}" if cell else str(path),
                **({"source_image": str(path), "cell": cell[1]} if cell else {}),
                "cells_found": found[i],
                "label": states.label(i),
                "certainty": float(states.certainty[i]),
                "k_used": int(states.k_used[i]),
                "uncertain": bool(states.uncertain[i]),
                "unknown": bool(states.unknown[i]) if states.unknown is not None else None,
                "neighbours": nbrs,
            }
        )
    for r in results:
        if args.json:
            print(json.dumps(r))
            continue
        flag = "  (uncertain)" if r["uncertain"] else ""
        if r["unknown"]:
            flag += "  (unknown: farther from every reference than the index's calibrated distance)"
        if r["cells_found"] > 1 and "cell" not in r:
            flag += f"  (warning: {r['cells_found']} cells in the image)"
        print(f"{r['image']}: {r['label']}  certainty {r['certainty']:.2f}  k {r['k_used']}{flag}")
        for n in r["neighbours"]:
            print(f"    {n['label']:<16} d={n['distance']:<10.4g} {n['name'] or '#' + str(n['id'])}")
    if args.html:
        from monitor.report.classification import (
            annotate_crop,
            classify_html,
            query_overlays,
            reference_crop,
        )

        nimgs = [[reference_crop(index, n["name"], prep) for n in r["neighbours"]] for r in results]
        qimgs = [annotate_crop(c, um, box) for c, (um, box) in zip(crops, scales, strict=True)]
        overlays = query_overlays(overlays_src, results, states)
        args.html.write_text(classify_html(results, qimgs, nimgs, title=f"cellmonitor classify ({index.classes and len(index)} references)", overlays=overlays,
                                                 single_cell_references=single_cell))
        print(f"wrote {args.html}", file=sys.stderr)
    return status


def _classify_segmenter(args: argparse.Namespace) -> tuple[Any, Any]:
    """The configured segmenter (``--config``, else the defaults) that checks query images for several cells."""
    from monitor.config import config_or_default
    from monitor.registry import Registry

    cfg = config_or_default(args.config)
    reg = Registry(cfg.plugins.paths)
    ctx = context_from(cfg, device="cpu")
    return reg.build("segmenters", cfg.segmenter, ctx, cfg.source_name, "segmenter"), cfg
