"""``cellmonitor models list``: each configured segmenter and encoder, its weights, dim, dtype and device.

Fast: a plugin whose spec has ``describe(options, ctx)`` (the foundation
models: HF encoders, SAM) reports where its weights are and its dim from
small files only (config.json, the checkpoint's path), nothing loaded. A
plugin without ``describe`` is built once to find out (the small built-in
ones: EfficientNet-Lite, 20 MB, about a second; the classical segmenter).

Exit status: 0 when every configured model is present, 1 when one is not,
78 for a config that does not load.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="configured segmenter and encoders: weights present (where), dim, dtype, device")
    psub = p.add_subparsers(dest="models_command", metavar="ACTION")
    lp = psub.add_parser("list", help="each configured model, whether its weights are on this machine, dim, dtype, device")
    lp.add_argument("--config", type=Path, metavar="CONFIG", help="the service config (default: the built-in defaults)")
    lp.set_defaults(func=_list)
    p.set_defaults(func=_list, config=None)


def device_line(want: str) -> tuple[str, str]:
    """``(device, note)`` for ``pipeline.device = want`` without failing (the service would fail at start-up)."""
    from monitor.device import cuda_status

    ok, detail = cuda_status()
    if want == "cpu":
        return "cpu", "pipeline.device = cpu"
    if ok:
        return "cuda", f"pipeline.device = {want}; {detail}"
    if want in ("auto", "cuda-or-cpu"):
        return "cpu", f"pipeline.device = {want}; no usable GPU: {detail}"
    return "NONE", f"pipeline.device = {want} but no usable GPU ({detail}): the service would not start (exit 78)"


def describe(registry: Any, kind: str, ref: Any, ctx: Any, source: str, where: str) -> dict[str, Any]:
    """One row: the spec's ``describe`` when it has one, else what building the plugin shows."""
    from monitor.errors import CellmonitorError
    from monitor.protocols import complete

    try:
        spec = registry.spec(kind, ref.name)
        opts = registry.options(kind, ref, source, where)
    except CellmonitorError as e:
        return {"present": False, "where": str(e), "dim": None, "dtype": "-"}
    describer = getattr(spec, "describe", None)  # None: build the plugin to find out
    if describer is not None:
        return dict(describer(opts, ctx))
    try:
        obj = spec.build(opts, ctx)
    except CellmonitorError as e:
        return {"present": False, "where": str(e), "dim": None, "dtype": "-"}
    wid = getattr(obj, "id", None)
    return {
        "present": True,
        "where": f"loaded to check (id {wid})" if wid else "built-in (no weights file)",
        "dim": getattr(obj, "dim", None),
        "dtype": "float32" if wid else "-",
        "runtime": complete(kind, obj).runtime if kind == "encoders" else "-",
    }


def _list(args: argparse.Namespace) -> int:
    from monitor.config import config_or_default
    from monitor.protocols import context_from
    from monitor.registry import Registry

    cfg = config_or_default(args.config)
    reg = Registry(cfg.plugins.paths)
    device, note = device_line(cfg.pipeline.device)
    ctx = context_from(cfg, device="cpu")
    src = cfg.source_name
    rows = [("segmenter", cfg.segmenter.name, describe(reg, "segmenters", cfg.segmenter, ctx, src, "segmenter"))]
    rows += [("encoder", r.name, describe(reg, "encoders", r, ctx, src, f"encoders.{i}")) for i, r in enumerate(cfg.encoders)]
    print(f"device: {device} ({note})")
    table = [("KIND", "NAME", "PRESENT", "DIM", "DTYPE", "DEVICE", "RUNTIME", "WHERE")]
    for kind, name, d in rows:
        dim = "-" if d.get("dim") is None else str(d["dim"])
        mode = f" [{d['mode']}]" if d.get("mode") else ""
        runtime = str(d.get("runtime", "-")) if device == "cpu" or kind != "encoder" else "torch (GPU)"
        table.append((kind, name + mode, "yes" if d["present"] else "NO", dim, str(d.get("dtype", "-")), device, runtime, str(d["where"])))
    widths = [max(len(r[i]) for r in table) for i in range(7)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r[:7], widths, strict=True)) + "  " + r[7])
    return 0 if all(d["present"] for _, _, d in rows) else 1
