"""Expert corrections while the service runs: a feedback folder feeding the live index.

A person who sees a wrong call (in the report's gallery, an overlay,
``classify --html``) drops what the right answer is into the feedback folder
(``service.feedback_dir``, default ``<state_dir>/feedback``):

* a labelled crop: ``feedback/<class>/<name>.png|tif|jpg``, one cell image
  (resized to the pipeline's crop size);
* rows: ``feedback/<name>.csv`` with columns ``frame,cell,state``: ``frame``
  a source file of a frame (relative to the watch folder, or absolute),
  ``cell`` the cell's id in that frame's segmentation (the ids an overlay
  and ``classify --per-cell`` show), ``state`` its class.

Between frames, the loop embeds them with the service's own encoders, adds
them to the running index (:meth:`~monitor.index.store.ReferenceIndex.add`:
no restart, no retraining; the index version grows by one) and persists them
beside the index (:meth:`~monitor.index.store.ReferenceIndex.save_corrections`),
so a restart keeps them. Every counts row records the index version it was
counted with. Each file ends in ``applied/`` or, with one log line naming it
and the problem, in ``rejected/``. A file is taken once it has not changed
for ``stable_s``; a file already applied (same content, found in the
index's corrections after a crash before the move) is not added twice.
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.hashing import file_sha256
from monitor.imaging import crop_cells, display_range, rescale, resize
from monitor.index.dataset import read_image
from monitor.intake.assemble import merge
from monitor.pipeline import Pipeline, embed, embed_cells
from monitor.records import Cells

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
DONE_DIRS = ("applied", "rejected")


class Rejected(Exception):
    """A feedback file that cannot be used; the message says why."""


@dataclass
class Feedback:
    """Polls the feedback folder and adds corrections to the live index."""

    folder: Path
    index_dir: Path
    pipeline: Pipeline
    readers: Any  # monitor.intake.readers.ReaderSet
    watch_dir: Path
    metrics: Any = None
    primary: str = "auto"
    stable_s: float = 1.0
    interval_s: float = 2.0
    _last: float = field(default=0.0, repr=False)

    @property
    def index(self) -> Any:
        return self.pipeline.classifier.index  # type: ignore[attr-defined]

    def maybe_poll(self, now: float | None = None) -> int:
        """:meth:`poll` at most every ``interval_s``; returns references added."""
        now = time.monotonic() if now is None else now
        if now - self._last < self.interval_s:
            return 0
        self._last = now
        return self.poll()

    def pending(self) -> list[Path]:
        """Every stable file in the folder outside ``applied/`` and ``rejected/`` (what is not a
        labelled crop or a rows file is rejected by :meth:`poll` with one line)."""
        if not self.folder.is_dir():
            return []
        now = time.time()
        out = [p for p in self.folder.rglob("*") if p.is_file() and p.relative_to(self.folder).parts[0] not in DONE_DIRS]
        return sorted(p for p in out if now - p.stat().st_mtime >= self.stable_s)

    def poll(self) -> int:
        """Take every stable feedback file: embed, add to the index, persist, move; returns references added."""
        index = self.index
        if index.saved_version != index.version:  # the last save failed (disk full): nothing moves until it is on disk
            index.save_corrections(self.index_dir)
        files = self.pending()
        if not files:
            return 0
        known = {n.split(":")[1] for n in index.correction_names if n.startswith("feedback:")}
        vectors, labels, names, taken = [], [], [], []
        for path in files:
            try:
                kind = self._kind(path)
                # an image's label is its folder: the same crop relabelled is a new correction
                digest = file_sha256(path)[:16] + (f"-{path.parent.name.lower()}" if kind == "image" else "")
                if digest in known:
                    taken.append(path)  # applied already (before a crash, or twice in this batch)
                    continue
                c, y = self._image(path) if kind == "image" else self._rows(path)
                known.add(digest)
            except Rejected as e:
                log.warning("feedback %s: %s (moved to rejected/)", path, e)
                self._move(path, "rejected")
                continue
            except Exception as e:  # a bad feedback file never stops the service
                log.warning("feedback %s: %s: %s (moved to rejected/)", path, type(e).__name__, e)
                self._move(path, "rejected")
                continue
            vectors.append(c)
            labels += y
            names += [f"feedback:{digest}:{path.name}:{i}" for i in range(len(y))]
            taken.append(path)
        if vectors:
            version = index.add(np.concatenate(vectors), np.array(labels), names)
            index.save_corrections(self.index_dir)
            if self.metrics is not None:
                self.metrics.index_version.set(version)
            per = {index.classes[i]: labels.count(i) for i in sorted(set(labels))}
            log.info("index version %d: %d correction(s) added (%s) from %d file(s)", version, len(labels),
                     ", ".join(f"{k} {v}" for k, v in per.items()), len(taken))
        for path in taken:
            self._move(path, "applied")
        return len(labels)

    # ---- one file -------------------------------------------------------
    def _kind(self, path: Path) -> str:
        """``image`` (feedback/<class>/<image>) or ``rows`` (feedback/<name>.csv); anything else is rejected."""
        depth = len(path.relative_to(self.folder).parts)
        if depth == 1 and path.suffix.lower() == ".csv":
            return "rows"
        if depth == 2 and path.suffix.lower() in IMAGE_SUFFIXES:
            return "image"
        raise Rejected(f"not a labelled crop (feedback/<class>/<name>{'|'.join(IMAGE_SUFFIXES)}) nor a frame,cell,state .csv at the top of the folder")

    def _class(self, name: str) -> int:
        classes = [c.lower() for c in self.index.classes]
        if name.strip().lower() not in classes:
            raise Rejected(f"{name!r} is not a class of the index (classes: {', '.join(self.index.classes)})")
        return classes.index(name.strip().lower())

    @property
    def _encoders(self) -> list[Any]:
        """Reference-side encoders: a query-side wrapper (TTA) is not applied to references."""
        return [e.reference_encoder for e in self.pipeline.encoders]

    def _image(self, path: Path) -> tuple[np.ndarray, list[int]]:
        """(vectors, labels) of one crop image filed under its class's folder."""
        in_frame = [e.name for e in self._encoders if e.frame_only]
        if in_frame:
            raise Rejected(f"a crop image has no frame, and encoder {in_frame[0]} measures each cell in its frame: "
                           "correct it with a CSV of frame,cell,state rows instead")

        y = self._class(path.parent.name)
        img = display_range(read_image(path))
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        size = self.pipeline.crop_px
        crop = resize(img[..., :3], (size, size)).astype(np.uint8)
        return embed(crop[None], self._encoders, self.pipeline.batch_size).vectors, [y]

    def _rows(self, path: Path) -> tuple[np.ndarray, list[int]]:
        """(vectors, labels) of the cells a CSV names, embedded in their frames as the service does."""

        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            need = {"frame", "cell", "state"}
            if not need <= set(reader.fieldnames or []):
                raise Rejected(f"needs columns frame,cell,state (has {', '.join(reader.fieldnames or []) or 'none'})")
            rows = list(reader)
        if not rows:
            raise Rejected("no rows")
        vectors, labels = [], []
        by_frame: dict[str, list[tuple[int, int, int]]] = {}
        for line, r in enumerate(rows, start=2):
            try:
                cell = int(r["cell"])
            except (TypeError, ValueError):
                raise Rejected(f"line {line}: cell {r['cell']!r} is not a cell id") from None
            try:
                y = self._class(r["state"] or "")
            except Rejected as e:
                raise Rejected(f"line {line}: {e}") from None
            by_frame.setdefault(r["frame"], []).append((line, cell, y))
        for name, wanted in by_frame.items():
            src = Path(name) if Path(name).is_absolute() else self.watch_dir / name
            if not src.is_file():
                raise Rejected(f"line {wanted[0][0]}: frame {name!r} not found (looked for {src})")
            acq = self.readers.choose(src).read(src)
            frame = rescale(merge([acq], self.primary, "none"), self.pipeline.pixel_size_um)
            seg = self.pipeline.segmenter.segment(frame)
            ids = {c.id: c for c in seg.cells}
            missing = [f"line {ln}: cell {c}" for ln, c, _ in wanted if c not in ids]
            if missing:
                raise Rejected(f"{name}: no such cell in its segmentation ({'; '.join(missing)}; ids 1..{max(ids, default=0)})")
            sub = Cells(seg.labels, tuple(ids[c] for _, c, _ in wanted), seg.pixel_size_um)
            p = self.pipeline
            crops = crop_cells(frame, sub, p.crop_px, p.blank_background, p.crop_framing, p.crop_margin, p.crop_contrast)
            vectors.append(embed_cells(frame, sub, crops, self._encoders, p.batch_size).vectors)
            labels += [y for _, _, y in wanted]
        return np.concatenate(vectors), labels

    def _move(self, path: Path, where: str) -> None:
        dest = self.folder / where / (path.parent.name if path.parent != self.folder else "")
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / path.name
        if target.exists():
            target = dest / f"{path.stem}.{int(time.time() * 1000)}{path.suffix}"
        try:
            shutil.move(str(path), str(target))
        except OSError as e:
            log.warning("feedback %s: could not move it to %s/ (%s); it will be seen again", path, where, e)
