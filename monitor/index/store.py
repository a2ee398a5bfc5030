"""The reference index on disk: its description, labels and search back-end (EWC over it: :mod:`monitor.index.ewc`).

An index is a folder::

    meta.json      format version, encoders (name, id, dim, version),
                   preprocessing (how files became crops), metric,
                   normalisation, search structure and HNSW parameters (with the
                   efSearch probe's choice and recall: ``search_probe``),
                   classes and counts, class weights, EWC parameters,
                   SHA-256 of every other file
    vectors.faiss  the FAISS index (written by faiss.write_index)
    labels.npy     int64 class index per reference (np.load, allow_pickle=False)
    ids.json       optional source name per reference (file name, box)
    condition_*.npy  optional feature conditioning (mean, scale, projection;
                   :mod:`monitor.index.condition`), fitted on the references
    unknown_refs.npy raw reference vectors of the unknown-cell check
                   (:mod:`monitor.index.unknown`), its distance in meta.json
    corrections.json, corrections/   expert corrections added since the build
                   (:meth:`ReferenceIndex.add`), with their own checksums

Nothing is unpickled. Loading checks the format version, that every file
is present and matches its checksum, the label count against the FAISS size
(and the names in ids.json), the dimension against the encoders' dims, and
(when encoders are given) that their ids and dims match; any mismatch is
fatal: one :class:`~monitor.errors.IndexError_` line naming the index folder.

The index is three parts: a frozen :class:`IndexMeta` (what the index is),
the labels, and a :class:`~monitor.index.search.VectorSearch` (how it is
searched); EWC over it is :mod:`monitor.index.ewc`.

Conditioning: when the index has one, the stored vectors are the
conditioned references and every query is conditioned the same way inside
the search (:meth:`~monitor.index.search.VectorSearch.prepare`): whoever
classifies (the service, ``classify``, ``evaluate``) hands raw encoder
vectors. Query options (``meta.json`` ``query``, e.g. ``{"tta": 8}``) are
applied to the encoders by whoever embeds queries
(:func:`monitor.index.query.query_encoders`); the reference side is
embedded without them.

Metrics: ``l2`` (default, squared L2 distances as FAISS reports them),
``cosine`` (vectors L2-normalised, inner product; distance = 1 - cos) and
``canberra`` (always exact, through the fast path of :mod:`monitor.index.canberra`;
the vectors are stored in a FAISS ``IndexFlat`` but FAISS's own slow Canberra
search is never used). Search structure: exact (``flat``) up to
``hnsw_above`` references, HNSW above, or forced. HNSW's efSearch is picked at
build time by a recall probe on held-out references (recall@k_max against
exact search, target 0.95: :func:`monitor.index.search.build_faiss`) and
recorded in ``meta.json`` (``search_probe``); at query time it is raised to k
whenever k exceeds it, so a search never returns fewer than k neighbours.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from monitor import __version__, classify
from monitor.errors import IndexError_
from monitor.hashing import file_sha256, verify_files
from monitor.index import unknown as unknown_mod
from monitor.index.condition import Conditioner, ConditioningSpec
from monitor.index.corrections import CORRECTIONS, load_corrections, save_corrections
from monitor.index.ewc import EWCParams
from monitor.index.metafile import (
    FORMAT_VERSION,
    EncoderRecord,
    MetaFile,
    SearchProbeRecord,
    encoders_hint,
    read_meta,
    write_meta,
)
from monitor.index.search import (
    HNSWParams,
    Metric,
    ProbeResult,
    ProbeSpec,
    Structure,
    VectorSearch,
    _prepare,
    build_faiss,
)
from monitor.index.unknown import UnknownCheck
from monitor.records import COUNT_TALLIES

log = logging.getLogger(__name__)

_DEFAULT_EWC = EWCParams()
_DEFAULT_HNSW = HNSWParams()
_DEFAULT_PROBE = ProbeSpec()


@dataclass(frozen=True)
class IndexMeta:
    """What an index is: recorded in ``meta.json``, checked against the service's encoders.

    ``encoders`` lists ``{"name", "id", "dim"}`` (optionally ``"version"``,
    ``"options"``) in concatenation order; ``preprocessing`` records how files
    became crops; ``conditioning`` is the fitted conditioning's record
    (:meth:`~monitor.index.condition.Conditioner.record`) or None; ``query``
    holds query-side options (``{"tta": 8}``: mean of the 8 flips/rotations of
    each query crop) or None.
    """

    encoders: tuple[dict[str, Any], ...]
    classes: tuple[str, ...]
    metric: Metric = "l2"
    structure: str = "flat"
    ewc: EWCParams = field(default_factory=EWCParams)
    hnsw: HNSWParams = field(default_factory=HNSWParams)
    normalize: bool = False
    preprocessing: dict[str, Any] | None = None
    conditioning: dict[str, Any] | None = None
    query: dict[str, Any] | None = None
    #: the unknown-cell calibration's record (:class:`~monitor.index.unknown.UnknownCheck`) or None
    unknown: dict[str, Any] | None = None
    #: how the HNSW efSearch (``hnsw.ef_search``) was chosen at build time; None: flat, no probe, or an older index
    search_probe: ProbeResult | None = None

    @property
    def dim(self) -> int:
        """Dimension of the raw (concatenated encoder) vectors a query hands in."""
        return sum(int(e["dim"]) for e in self.encoders)

    @property
    def tta(self) -> int:
        """Query-side test-time augmentation: 1 (off) or 8 (the dihedral group)."""
        return int((self.query or {}).get("tta", 1))


class ReferenceIndex:
    """Labelled reference embeddings behind a search back-end, described by an :class:`IndexMeta`."""

    def __init__(self, meta: IndexMeta, labels: np.ndarray, searcher: VectorSearch, ref_names: Sequence[str] | None = None,
                 unknown: UnknownCheck | None = None):
        self.meta = meta
        self.labels = np.asarray(labels, dtype=np.int64)
        self.searcher = searcher
        self.ref_names = list(ref_names) if ref_names is not None else None
        self.weights = classify.class_weights(self.labels, len(meta.classes))
        #: unknown-cell check (raw reference vectors and calibrated distance), or None
        self.unknown = unknown
        #: 1 as built; each batch of expert corrections adds one (:meth:`add`)
        self.version = 1
        #: files beside the index that it depends on (weights fitted for its encoders), checksummed in meta.json
        self.extra_files: list[str] = []
        #: the version on disk (built, or the last saved corrections): below ``version`` = unsaved corrections
        self.saved_version = 1
        #: SHA-256 of the meta.json this index was loaded from or saved as: corrections name their base
        self.base_sha: str | None = None
        #: raw vectors, labels and names of the corrections added since the build
        self._corr: tuple[np.ndarray, np.ndarray, list[str]] = (np.zeros((0, meta.dim), np.float32), np.zeros(0, np.int64), [])

    # what callers read most, from the meta
    classes = property(lambda self: self.meta.classes)
    encoders = property(lambda self: self.meta.encoders)
    metric = property(lambda self: self.meta.metric)
    structure = property(lambda self: self.meta.structure)
    ewc = property(lambda self: self.meta.ewc)
    hnsw = property(lambda self: self.meta.hnsw)
    normalize = property(lambda self: self.meta.normalize)
    preprocessing = property(lambda self: self.meta.preprocessing)
    faiss_index = property(lambda self: self.searcher.faiss_index)
    conditioner = property(lambda self: self.searcher.conditioner)

    # ---- construction -------------------------------------------------
    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        labels: np.ndarray,
        classes: Sequence[str],
        encoders: Sequence[dict[str, Any]],
        *,
        metric: Metric = "l2",
        structure: Structure = "auto",
        ewc: EWCParams = _DEFAULT_EWC,
        hnsw: HNSWParams = _DEFAULT_HNSW,
        hnsw_above: int = 50_000,
        probe: ProbeSpec | None = _DEFAULT_PROBE,
        normalize: bool = False,
        ref_names: Sequence[str] | None = None,
        preprocessing: dict[str, Any] | None = None,
        conditioning: ConditioningSpec | Conditioner | None = None,
        query: dict[str, Any] | None = None,
        unknown_quantile: float | None = unknown_mod.QUANTILE,
    ) -> ReferenceIndex:
        """Build the search structure over (N, D) float32 vectors.

        ``structure="auto"`` picks exact search up to ``hnsw_above`` references
        and HNSW above (Canberra is always exact). ``conditioning``: a spec is
        fitted on these reference vectors (and nothing else); a fitted
        :class:`Conditioner` is used as it is. The search structure then holds
        the conditioned vectors. HNSW: ``probe`` picks efSearch for recall@k_max
        (EWC's largest k) on held-out references and the index keeps it (None:
        ``hnsw.ef_search`` as given). ``unknown_quantile``: the unknown-cell
        distance is this quantile of the references' leave-one-out
        neighbour distances in the raw space (:mod:`monitor.index.unknown`;
        None: no unknown flag).

        Raises
        ------
        ValueError
            Inconsistent inputs: empty vectors, label or name counts that
            differ from the vector count, encoder dims that do not sum to D,
            bad HNSW parameters.
        """
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"need a non-empty (N, D) matrix of reference vectors (got shape {x.shape})")
        if len(labels) != x.shape[0]:
            raise ValueError(f"{len(labels)} labels for {x.shape[0]} vectors")
        reserved = [c for c in classes if str(c).lower() in COUNT_TALLIES]
        if reserved:
            raise ValueError(f"class name {reserved[0]!r} is reserved: the counts CSV's n_{str(reserved[0]).lower()} column holds "
                             f"another count ({', '.join(COUNT_TALLIES)}); rename that class")
        if query is not None and int(query.get("tta", 1)) not in (1, 8):
            raise ValueError(f"query tta must be 1 or 8 (got {query.get('tta')})")
        cond = Conditioner.fit(x, conditioning, np.asarray(labels)) if isinstance(conditioning, ConditioningSpec) else conditioning
        meta = IndexMeta(tuple(dict(e) for e in encoders), tuple(classes), metric, structure, ewc, hnsw, normalize,
                         dict(preprocessing) if preprocessing is not None else None,
                         cond.record() if cond is not None else None, dict(query) if query else None)
        if meta.dim != x.shape[1]:
            raise ValueError(f"encoder dims sum to {meta.dim} but vectors have {x.shape[1]} columns")
        if cond is not None and cond.in_dim != x.shape[1]:
            raise ValueError(f"conditioning expects {cond.in_dim} columns but vectors have {x.shape[1]}")
        if ref_names is not None and len(ref_names) != x.shape[0]:
            raise ValueError(f"{len(ref_names)} reference names for {x.shape[0]} vectors")
        if hnsw.ef_search < 1 or hnsw.m < 2 or hnsw.ef_construction < 1:
            raise ValueError(f"bad HNSW parameters {hnsw}")
        if structure == "auto":
            meta = replace(meta, structure="hnsw" if x.shape[0] > hnsw_above and metric != "canberra" else "flat")
        index, probed = build_faiss(_prepare(cond.apply(x) if cond is not None else x, metric, normalize), metric, meta.structure, hnsw,
                                    probe, ewc.k_max)
        if probed is not None:
            meta = replace(meta, hnsw=replace(hnsw, ef_search=probed.ef_search), search_probe=probed)
        searcher = VectorSearch(index, metric, meta.structure, meta.hnsw, normalize, cond)
        unknown = UnknownCheck.calibrate(x, unknown_quantile) if unknown_quantile is not None and x.shape[0] >= 2 else None
        if unknown is not None:
            meta = replace(meta, unknown=unknown.record())
        return cls(meta, labels, searcher, ref_names, unknown)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dim(self) -> int:
        """Length of the stored vectors (after conditioning, if any)."""
        return self.searcher.dim

    @property
    def class_counts(self) -> dict[str, int]:
        """Reference cells per class."""
        c = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, c, strict=True)}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids) of the k nearest references, nearest first (see :mod:`monitor.index.search`)."""
        return self.searcher.search(queries, k)

    # ---- persistence --------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the index folder (meta.json last, atomically, so a torn write is refused)."""
        import faiss


        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.faiss_index, str(folder / "vectors.faiss"))
        np.save(folder / "labels.npy", self.labels, allow_pickle=False)
        files = ["vectors.faiss", "labels.npy", *(f for f in self.extra_files if (folder / f).is_file())]
        if self.ref_names is not None:
            (folder / "ids.json").write_text(json.dumps(self.ref_names))
            files.append("ids.json")
        if self.conditioner is not None:
            files += self.conditioner.save(folder)
        if self.unknown is not None:
            files += self.unknown.save(folder)
        m = self.meta
        meta = MetaFile(
            format_version=FORMAT_VERSION, cellmonitor_version=__version__, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            encoders=[EncoderRecord.model_validate(e) for e in m.encoders], dim=self.dim, n_references=len(self),
            preprocessing=m.preprocessing, metric=m.metric, normalize=m.normalize, structure=m.structure, hnsw=asdict(m.hnsw),
            classes=list(m.classes), class_counts=self.class_counts, class_weights=[float(w) for w in self.weights],
            ewc=asdict(m.ewc), conditioning=m.conditioning, query=m.query,
            unknown=self.unknown.record() if self.unknown is not None else None, version=self.version,
            search_probe=SearchProbeRecord.model_validate(asdict(m.search_probe)) if m.search_probe is not None else None,
            reference_names=self.ref_names is not None, checksums={f: file_sha256(folder / f) for f in files},
        )
        write_meta(folder / "meta.json", meta)
        # corrections made so far are now in the main files: a later load must not add them again
        (folder / CORRECTIONS).unlink(missing_ok=True)
        if (folder / "corrections").is_dir():
            for old in (folder / "corrections").iterdir():
                old.unlink(missing_ok=True)
        self._corr = (self._corr[0][:0], self._corr[1][:0], [])
        self.saved_version = self.version
        self.base_sha = file_sha256(folder / "meta.json")
        return folder

    @classmethod
    def load(cls, folder: str | Path, encoders: Sequence[dict[str, Any]] | None = None) -> ReferenceIndex:
        """Load and validate an index folder.

        Raises
        ------
        IndexError_
            Fatal at start-up (exit 78), one line naming the folder: no or
            unreadable meta.json, unsupported format, a missing file or a
            checksum mismatch, labels that do not match the vectors, or
            ``encoders`` (ids and dims, in order) that differ from the ones
            the index was built with.
        """
        import faiss

        folder = Path(folder)

        def fail(msg: str) -> IndexError_:
            return IndexError_(f"{folder}: {msg}")

        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise fail("not a cellmonitor index (no meta.json); build one with 'cellmonitor index build'")
        try:
            meta = read_meta(meta_path)
        except ValueError as e:
            raise fail(str(e)) from None
        checks, crec, urec = meta.checksums, meta.conditioning, meta.unknown
        verify_files(folder, checks, "meta.json", fail)
        try:
            labels = np.load(folder / "labels.npy", allow_pickle=False)
            index = faiss.read_index(str(folder / "vectors.faiss"))
        except Exception as e:
            raise fail(f"cannot read index files ({e})") from None
        if labels.ndim != 1 or index.ntotal != labels.shape[0]:
            raise fail(f"{labels.shape[0]} labels for {index.ntotal} vectors")
        dim_sum = sum(e.dim for e in meta.encoders)
        cond = None
        if crec is not None:
            try:
                cond = Conditioner.load(folder, crec)
            except (ValueError, KeyError, TypeError) as e:
                raise fail(f"conditioning: {e}") from None
            if cond.in_dim != dim_sum:
                raise fail(f"the conditioning takes {cond.in_dim}-d vectors but the recorded encoders' dims sum to {dim_sum}")
        if (cond.dim if cond is not None else dim_sum) != index.d:
            raise fail(
                f"vectors have dim {index.d} but the recorded encoders' dims sum to {dim_sum}"
                + (f" (conditioned to {cond.dim})" if cond is not None else "")
            )
        query = meta.query
        classes = meta.classes
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise fail("labels refer to classes not listed in meta.json")
        if encoders is not None:
            want = [(e.id, e.dim) for e in meta.encoders]
            got = [(e["id"], int(e["dim"])) for e in encoders]
            if want != got:
                raise fail(
                    "built with encoders "
                    + ", ".join(f"{i} (dim {d})" for i, d in want)
                    + " but the configuration gives "
                    + ", ".join(f"{i} (dim {d})" for i, d in got)
                    + f"; fix: name the index's encoders in the config ({encoders_hint(meta.encoders)}), "
                    "or rebuild the index with the config's: cellmonitor index build DATA --out INDEX (--from-marker CONFIG for marker-labelled frames)"
                )
        names = None
        if (folder / "ids.json").is_file():
            names = json.loads((folder / "ids.json").read_text())
            if not isinstance(names, list) or len(names) != labels.shape[0]:
                raise fail(f"ids.json names {len(names) if isinstance(names, list) else '?'} references for {labels.shape[0]} vectors")
        try:
            ewc, hnsw = EWCParams(**meta.ewc), HNSWParams(**meta.hnsw)
        except TypeError as e:
            raise fail(f"meta.json: ewc or hnsw: {e}") from None
        m = IndexMeta(
            encoders=meta.encoder_dicts(),
            classes=tuple(classes),
            metric=meta.metric,  # type: ignore[arg-type]
            structure=meta.structure,
            ewc=ewc,
            hnsw=hnsw,
            normalize=meta.normalize,
            preprocessing=meta.preprocessing,
            conditioning=crec,
            query=query,
            unknown=urec,
            search_probe=meta.search_probe.result() if meta.search_probe is not None else None,
        )
        unknown = None
        if urec is not None:
            try:
                unknown = UnknownCheck.load(folder, urec, dim_sum)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise fail(f"unknown-cell calibration: {e}") from None
        out = cls(m, labels, VectorSearch(index, m.metric, m.structure, m.hnsw, m.normalize, cond), names, unknown)
        out.version = meta.version
        out.extra_files = [f for f in checks if f.startswith("fit/")]  # weights fitted for the index's encoders
        out.base_sha = file_sha256(meta_path)
        load_corrections(out, folder, fail)
        out.saved_version = out.version
        return out

    # ---- unknown cells and expert corrections ---------------------------
    @property
    def unknown_distance(self) -> float | None:
        """Distance beyond which a query is unknown (None: not calibrated; :mod:`monitor.index.unknown`)."""
        return self.unknown.distance if self.unknown is not None else None

    @property
    def correction_names(self) -> list[str]:
        """Names of the references added by expert corrections, in order."""
        return list(self._corr[2])

    @property
    def n_corrections(self) -> int:
        """References added by expert corrections since the build."""
        return int(self._corr[1].shape[0])

    def add(self, vectors: np.ndarray, labels: np.ndarray, names: Sequence[str] | None = None) -> int:
        """Add labelled references (raw encoder vectors) to the live index: the next search uses them.

        The conditioning and the unknown calibration are kept as built (no
        refit); class weights are recomputed. The index version grows by one.
        :meth:`save_corrections` persists them. Returns the new version.

        Raises
        ------
        ValueError
            Vectors of the wrong dimension, a label count that differs, or a
            label outside the index's classes.
        """
        if np.ndim(vectors) != 2 or np.shape(vectors)[1] != self.meta.dim:
            raise ValueError(f"corrections must be (N, {self.meta.dim}) raw encoder vectors (got shape {np.shape(vectors)})")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(y) != len(x):
            raise ValueError(f"{len(y)} labels for {len(x)} correction vectors")
        if len(y) and (y.min() < 0 or y.max() >= len(self.classes)):
            raise ValueError(f"correction labels must be class indices 0..{len(self.classes) - 1}")
        names = list(names) if names is not None else [f"correction-v{self.version + 1}-{i}" for i in range(len(y))]
        self.searcher.add_prepared(self.searcher.prepare(x))
        if self.unknown is not None:
            self.unknown.add(x)
        self.labels = np.concatenate([self.labels, y])
        if self.ref_names is not None:
            self.ref_names += names
        self.weights = classify.class_weights(self.labels, len(self.classes))
        cx, cy, cn = self._corr
        self._corr = (np.concatenate([cx, x]), np.concatenate([cy, y]), cn + names)
        self.version += 1
        return self.version

    def save_corrections(self, folder: str | Path) -> Path:
        """Persist the corrections beside the built index (:func:`monitor.index.corrections.save_corrections`)."""
        return save_corrections(self, Path(folder))
