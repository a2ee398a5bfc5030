"""Overlay sink: a small PNG per counted frame, each cell outlined in its state's colour.

Off by default; a lab turns it on with one table in the config::

    [[sinks]]
    name = "overlay"
    options = { max_mb = 500, max_px = 768 }

Policy
------
* Files: ``<folder>/<experiment>/<well>/<field>_t<NNNNN>.png`` (default
  folder ``<state_dir>/overlays``), drawn by
  :func:`monitor.report.overlay.draw_overlay` (outlines, legend, scale bar),
  shrunk so the longer side is at most ``max_px``.
* Bounded disk use: when the folder holds more than ``max_mb``, the oldest
  overlays are deleted until it is under (the newest frames are the ones a
  person checks; the CSV keeps every count).
* Never the record of truth: a failure to draw or write is one warning and
  the frame stays counted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from monitor.protocols import SinkBase
from monitor.records import Counts
from monitor.registry import plugin_spec

log = logging.getLogger(__name__)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    folder: Path | None = Field(None, description="default: <state_dir>/overlays")
    max_mb: float = Field(500.0, gt=0, description="oldest overlays are deleted beyond this total size")
    max_px: int = Field(768, ge=64, le=8192, description="longer side of each overlay PNG")


class OverlaySink(SinkBase):
    name = "overlay"
    record_of_truth = False
    #: the pipeline keeps each cell's call for this sink (monitor.pipeline.Pipeline.keep_calls)
    wants_calls = True

    def __init__(self, folder: Path, max_mb: float = 500.0, max_px: int = 768, roles: Mapping[str, str] | None = None):
        self.folder = folder
        self.max_bytes = int(max_mb * 1e6)
        self.max_px = max_px
        self.roles = roles
        self._sizes: dict[Path, tuple[float, int]] = {}
        folder.mkdir(parents=True, exist_ok=True)
        for p in folder.rglob("*.png"):
            st = p.stat()
            self._sizes[p] = (st.st_mtime, st.st_size)

    def path_for(self, c: Counts) -> Path:
        """Where a frame's overlay goes (names made safe for any file system)."""
        from monitor.intake.ledger import safe_text

        def part(s: str) -> str:
            return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in safe_text(s)) or "_"

        k = c.key
        return self.folder / part(k.experiment) / part(k.well) / f"{part(k.field)}_t{k.timepoint:05d}.png"

    def write(self, counts: Counts) -> None:
        """Draw and save the frame's overlay; prune the oldest beyond the budget."""
        from monitor.imageio import png_bytes
        from monitor.imaging import resize
        from monitor.report.overlay import draw_overlay

        calls = counts.calls
        if calls is None:
            return
        k = counts.key
        rgb = draw_overlay(calls.image, calls.labels, calls.predicted, calls.classes, calls.pixel_size_um, cell_ids=calls.cell_ids,
                           uncertain=calls.uncertain, unknown=calls.unknown, roles=self.roles,
                           title=f"{k.experiment} {k.well} field {k.field} t{k.timepoint}")
        h, w = rgb.shape[:2]
        if max(h, w) > self.max_px:
            s = self.max_px / max(h, w)
            rgb = resize(rgb, (max(1, round(h * s)), max(1, round(w * s))))
        path = self.path_for(counts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".png.tmp")
        tmp.write_bytes(png_bytes(rgb.astype("uint8")))
        tmp.replace(path)
        st = path.stat()
        self._sizes[path] = (st.st_mtime, st.st_size)
        self._prune(keep=path)

    def _prune(self, keep: Path) -> None:
        """Delete the oldest overlays until the folder fits ``max_mb`` (never the one just written)."""
        total = sum(s for _, s in self._sizes.values())
        for p, (_, size) in sorted(self._sizes.items(), key=lambda kv: kv[1][0]):
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            del self._sizes[p]

    def close(self) -> None:
        pass


PLUGIN = plugin_spec(
    "overlay", "a small PNG per counted frame, cells outlined by state (bounded disk use; off unless configured)", Options,
    lambda o, ctx: OverlaySink(o.folder or ctx.state_dir / "overlays", o.max_mb, o.max_px, ctx.roles),
)
__all__ = ["OverlaySink", "PLUGIN"]
