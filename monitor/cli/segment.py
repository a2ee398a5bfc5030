"""``cellmonitor segment IMAGE --out LABELS.tif``: the configured segmenter on one image.

Writes the instance label image on the input's own pixel grid (whatever
rescaling the pipeline does inside), so anyone can score the segmenter
against their own masks.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``segment`` subcommand."""
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
    p.add_argument("--config", type=Path, metavar="FILE", help="config (segmenter, pipeline pixel size, readers)")
    p.add_argument("--pixel-size", type=float, metavar="UM", help="pixel size of IMAGE in um (overrides its metadata)")
    p.set_defaults(func=_segment)


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
    from monitor.protocols import BuildContext
    from monitor.registry import Registry
    from monitor.service.assemble import merge

    path: Path = args.image
    if not path.is_file():
        raise NoInput(path)  # exit 66, as in every command
    registry = Registry(cfg.plugins.paths)
    ctx = BuildContext(state_dir=cfg.service.state_dir, config_path=cfg.source, extra={"experiment": cfg.service.experiment})
    if args.pixel_size is not None:
        if not args.pixel_size > 0:
            raise BadInput(path, f"--pixel-size must be positive (got {args.pixel_size})")
        from cellmonitor_plugins.readers.tiff import PLUGIN as TIFF

        reader = TIFF.build(TIFF.Options(pixel_size_um=args.pixel_size, prefer_config_pixel_size=True), ctx)
        acq = reader.read(path)
    else:
        from monitor.service.reading import build_readers

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
    from monitor.errors import BadInput
    from monitor.imaging import rescale
    from monitor.service.loop import resolve_device

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
