"""Per-encoder embedding cache: no cell is embedded twice.

Key: SHA-256 of the file's bytes (plus its annotation for boxed frames) x the
:class:`~monitor.index.dataset.Preprocess` digest x the encoder id (which carries
its weights digest and input convention). Layout::

    CACHE/<sha(encoder id)[:16]>/encoder.json            {"id": ..., "dim": ...}
    CACHE/<sha(encoder id)[:16]>/<prep key>/prep.json    the Preprocess
    CACHE/<sha(encoder id)[:16]>/<prep key>/<d[:2]>/<d>.npy   (cells, dim) float32

Plain ``.npy`` written atomically (temp file, then rename), read with
``allow_pickle=False``: an interrupted build leaves only whole entries, and the
re-run picks up where it stopped. A cache entry of the wrong shape is ignored
(re-embedded and overwritten), never trusted.

The default folder is ``$CELLMONITOR_CACHE`` or ``~/.cache/cellmonitor/embeddings``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitor.errors import BadInput
from monitor.index.dataset import (
    Dataset,
    Preprocess,
    SourceFile,
    crops_for,
    file_digest,
    read_image,
)
from monitor.pipeline import embed

log = logging.getLogger(__name__)


def cache_id(encoder: Any) -> str:
    """The cache key of an encoder: its ``cache_id`` when it has one (a query-side wrapper
    such as :class:`monitor.index.query.TTAEncoder` keeps the wrapped id for the index
    check but embeds differently), else its ``id``."""
    return str(encoder.cache_id)


def default_cache_dir() -> Path:
    """Where embeddings are cached when no ``--cache`` is given: ``$CELLMONITOR_CACHE``, else ``~/.cache/cellmonitor/embeddings``."""
    env = os.environ.get("CELLMONITOR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cellmonitor" / "embeddings"


class EmbeddingCache:
    """Folder of cached per-file embeddings (see the module docstring for the key)."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def _dir(self, encoder_id: str, prep: Preprocess) -> Path:
        return self.folder / hashlib.sha256(encoder_id.encode()).hexdigest()[:16] / prep.key()

    def path(self, encoder_id: str, prep: Preprocess, digest: str) -> Path:
        """The cache file for this encoder, preprocessing and file digest."""
        return self._dir(encoder_id, prep) / digest[:2] / f"{digest}.npy"

    def get(self, encoder_id: str, prep: Preprocess, digest: str, shape: tuple[int, int]) -> np.ndarray | None:
        """The cached (cells, dim) array, or None when absent or of the wrong shape."""
        p = self.path(encoder_id, prep, digest)
        if not p.is_file():
            self.misses += 1
            return None
        try:
            v = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable cache entry %s (%s)", p, e)
            self.misses += 1
            return None
        if v.shape != shape or v.dtype != np.float32:
            log.warning("ignoring cache entry %s of shape %s (expected %s)", p, v.shape, shape)
            self.misses += 1
            return None
        self.hits += 1
        return v

    def put(self, encoder: Any, prep: Preprocess, digest: str, vectors: np.ndarray) -> None:
        """Store one file's (cells, dim) vectors under the encoder's cache id and the preprocessing."""
        cid = cache_id(encoder)
        d = self._dir(cid, prep)
        if not (d / "prep.json").is_file():
            d.mkdir(parents=True, exist_ok=True)
            (d / "prep.json").write_text(json.dumps(prep.as_dict(), sort_keys=True))
            (d.parent / "encoder.json").write_text(json.dumps({"id": cid, "name": encoder.name, "dim": int(encoder.dim)}))
        p = self.path(cid, prep, digest)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            np.save(f, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
        os.replace(tmp, p)


@dataclass(frozen=True)
class EmbeddedSet:
    """Embeddings of the readable cells of a data set, one matrix per encoder id."""

    vectors: dict[str, np.ndarray]  # encoder id -> (N, dim)
    labels: np.ndarray  # (N,) int index into classes
    classes: tuple[str, ...]
    names: list[str]  # reference names, "<relpath>" or "<relpath>#<box>"
    groups: np.ndarray  # (N,) index of the source file (for grouped splits)
    skipped: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def concat(self, encoder_ids: Sequence[str]) -> np.ndarray:
        """Vectors of ``encoder_ids`` concatenated in that order (no normalisation)."""
        return np.ascontiguousarray(np.concatenate([self.vectors[e] for e in encoder_ids], axis=1), dtype=np.float32)

    def subset(self, rows: np.ndarray) -> EmbeddedSet:
        """The embedded set restricted to ``rows`` (e.g. a train or test split)."""
        return EmbeddedSet(
            {k: v[rows] for k, v in self.vectors.items()},
            self.labels[rows],
            self.classes,
            [self.names[i] for i in rows],
            self.groups[rows],
            self.skipped,
        )


def embed_dataset(
    ds: Dataset,
    encoders: Sequence[Any],
    prep: Preprocess,
    cache: EmbeddingCache | None,
    batch_size: int = 32,
    progress: bool = True,
) -> EmbeddedSet:
    """Embed every cell of ``ds`` with every encoder, through the cache.

    Each file is hashed; encoders whose entry is cached are not called for it.
    Files needing any encoder are decoded and cropped once, and crops of
    several files are batched to ``batch_size``. Policy: an unreadable file is
    skipped with one warning line naming it (and left out for every encoder,
    so rows line up); an encoder failure is fatal (raised).
    """
    from tqdm import tqdm


    per_file: list[dict[str, np.ndarray] | None] = [None] * len(ds.files)
    skipped: list[str] = []
    pending: list[tuple[int, str, np.ndarray, list[Any]]] = []  # file idx, digest, crops, encoders to run

    def flush() -> None:
        """Embed the pending crops, one call per encoder, and store them in the cache."""
        if not pending:
            return
        for enc in encoders:
            jobs = [(i, dg, cr) for i, dg, cr, encs in pending if enc in encs]
            if not jobs:
                continue
            crops = np.concatenate([cr for _, _, cr in jobs], axis=0)
            v = embed(crops, [enc], batch_size).vectors
            s = 0
            for i, dg, cr in jobs:
                part = v[s : s + len(cr)]
                s += len(cr)
                if cache is not None:
                    cache.put(enc, prep, dg, part)
                per_file[i][enc.id] = part  # type: ignore[index]
        pending.clear()

    bar = tqdm(total=len(ds.files), desc="embedding", unit="file", file=sys.stderr, disable=not progress, leave=False)
    n_pending_crops = 0
    for i, sf in enumerate(ds.files):
        bar.update(1)
        try:
            digest = file_digest(sf.path, sf.annotation)
        except OSError as e:
            _skip(skipped, sf, f"cannot read ({e.strerror or e})")
            continue
        got: dict[str, np.ndarray] = {}
        missing = []
        for enc in encoders:
            v = cache.get(cache_id(enc), prep, digest, (sf.n_cells, int(enc.dim))) if cache is not None else None
            if v is None:
                missing.append(enc)
            else:
                got[enc.id] = v
        per_file[i] = got
        if not missing:
            continue
        try:
            crops = _crops(sf, prep)
        except BadInput as e:
            per_file[i] = None
            _skip(skipped, sf, e.problem)
            continue
        pending.append((i, digest, crops, missing))
        n_pending_crops += len(crops)
        if n_pending_crops >= batch_size:
            flush()
            n_pending_crops = 0
    flush()
    bar.close()

    label_index = {c: j for j, c in enumerate(ds.classes)}
    rows: dict[str, list[np.ndarray]] = {e.id: [] for e in encoders}
    labels: list[int] = []
    names: list[str] = []
    groups: list[int] = []
    for i, (sf, found) in enumerate(zip(ds.files, per_file, strict=True)):
        if found is None:
            continue
        for enc in encoders:
            rows[enc.id].append(found[enc.id])
        labels += [label_index[lab] for lab in sf.labels]
        names += [sf.name] if sf.boxes is None else [f"{sf.name}#{j}" for j in range(len(sf.boxes))]
        groups += [i] * sf.n_cells
    vectors = {e.id: (np.concatenate(rows[e.id], axis=0) if rows[e.id] else np.zeros((0, int(e.dim)), np.float32)) for e in encoders}
    return EmbeddedSet(vectors, np.asarray(labels, dtype=np.int64), ds.classes, names, np.asarray(groups, dtype=np.int64), skipped)


def _crops(sf: SourceFile, prep: Preprocess) -> np.ndarray:
    img = read_image(sf.path)
    try:
        return crops_for(img, prep, sf.boxes)
    except Exception as e:  # an odd image (zero size, strange dtype) is this file's problem
        raise BadInput(sf.path, f"cannot crop ({type(e).__name__}: {e})") from None


def _skip(skipped: list[str], sf: SourceFile, why: str) -> None:
    line = f"{sf.path}: {why}"
    skipped.append(line)
    log.warning("skipped %s", line)
