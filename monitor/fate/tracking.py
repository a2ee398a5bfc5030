"""Online linking of one field's cells across timepoints (laptrack), frame by frame.

Why laptrack: it is the linear-assignment (LAP) tracker of Jaqaman et al. (2008)
made for cells: frame-to-frame links, gap closing and divisions (splitting) in
one cost framework, pure Python on scipy, and it accepts links already decided
(``connected_edges``), which is what makes it usable online. trackpy links
particles but knows no divisions; btrack is a compiled Bayesian tracker with a
motion model and a configuration of its own, more than a field of slowly moving
cells needs.

Policy
------
* A frame's incoming links (each cell's predecessor, at most ``max_gap + 1``
  timepoints back) are decided once, from the frames present in the window
  ``[t - max_gap - 1, t]`` and the links already decided into them: laptrack
  links the previous timepoint to ``t`` (with divisions), then closes gaps
  between the cells still unlinked and the window's tracks that ended
  (:meth:`FieldTracks._link_window`). So a frame's links depend only on the
  frames present, never on the order they arrived in: a frame that arrives
  late (or out of order) re-decides the links of every later frame whose window
  it falls in, and of every frame after those whose window saw a changed link
  (:meth:`FieldTracks.add`), which gives the same links as in-order arrival.
* Divisions: a cell whose predecessor has two successors starts a new track
  (a daughter); its ``parent_track_id`` is the mother's track. Gaps: a cell
  missing for up to ``max_gap`` timepoints (or a frame that never arrives)
  keeps its track.
* Track ids are named after the cell that starts the track:
  ``timepoint * 1_000_000 + label`` (:func:`track_id_of`), so they are the same
  whichever process computes them and whichever order frames came in; a late
  frame that extends a track backwards renames it (and the caller rewrites the
  rows that changed).
* State: the cells (label, centroid) and each cell's predecessor. The cells
  sink keeps them in the per-cell rows themselves (``link_timepoint``,
  ``link_label``), so a restarted service rebuilds a field's tracker from its
  recorded rows (:meth:`FieldTracks.from_rows`) and continues the same tracks.
* Memory: a run of weeks must not keep every cell it ever saw. :meth:`FieldTracks.seal`
  drops the frames before a timepoint and fixes the track ids (and mothers) of the
  kept cells whose predecessor was dropped, so the kept frames' ids stay what they
  were. A frame whose links would need a dropped frame (it is older than the sealed
  timepoint plus ``max_gap + 1``) is refused with :class:`Sealed`; the caller
  rebuilds the field from its recorded rows and adds it there (what the cells sink
  does), so a late frame still gets the links it would have had.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

#: a track id is the start cell's timepoint times this plus its label
TRACK_ID_BASE = 1_000_000

#: one cell of a field: (timepoint, label)
Node = tuple[int, int]


def track_id_of(timepoint: int, label: int) -> int:
    """The id of a track that starts at cell ``label`` of ``timepoint``."""
    if not 0 <= label < TRACK_ID_BASE:
        raise ValueError(f"cell label {label} is outside 0..{TRACK_ID_BASE - 1}: it cannot name a track")
    return int(timepoint) * TRACK_ID_BASE + int(label)


class Sealed(ValueError):
    """A frame older than what a sealed tracker still holds the neighbours of."""


@dataclass(frozen=True)
class LinkParams:
    """How far a cell may move and be missing.

    ``max_step_um``: the farthest a cell's centroid moves between consecutive
    timepoints; ``max_gap``: timepoints a cell may be missing and keep its
    track; ``divisions``: link a new cell to a dividing mother (splitting);
    ``memory_timepoints``: the latest timepoints a field keeps in memory (older ones are
    sealed, :meth:`FieldTracks.seal`; 0: all of them)."""

    max_step_um: float = 25.0
    max_gap: int = 1
    divisions: bool = True
    memory_timepoints: int = 0


@dataclass
class FieldTracks:
    """One field's cells and links, updated frame by frame (module docstring)."""

    params: LinkParams = field(default_factory=LinkParams)
    #: timepoint -> (labels (n,), centroids (n, 2) in um)
    frames: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: cell -> its predecessor (absent: the cell starts a track)
    links: dict[Node, Node] = field(default_factory=dict)
    #: the frames before this timepoint were dropped (:meth:`seal`; None: none were)
    sealed_before: int | None = None
    #: track id of each kept cell whose predecessor was dropped, and the mother of such a daughter track
    fixed_ids: dict[Node, int] = field(default_factory=dict)
    fixed_parents: dict[int, int] = field(default_factory=dict)
    #: (track ids, daughter -> mother) as of the last change (None: to be computed)
    _cache: tuple[dict[Node, int], dict[int, int]] | None = field(default=None, repr=False, compare=False)

    # -- building -------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, timepoints: Iterable[int], labels: Iterable[int], y_um: Iterable[float], x_um: Iterable[float],
                  link_timepoints: Iterable[float | None], link_labels: Iterable[float | None],
                  params: LinkParams | None = None) -> FieldTracks:
        """A field's tracker from its recorded rows (one per cell; the link columns empty or
        NaN where a cell starts a track): what a restarted service continues from."""
        ft = cls(params or LinkParams())
        by_t: dict[int, list[tuple[int, float, float]]] = {}
        for t, lab, y, x, lt, ll in zip(timepoints, labels, y_um, x_um, link_timepoints, link_labels, strict=True):
            by_t.setdefault(int(t), []).append((int(lab), float(y), float(x)))
            if lt is not None and ll is not None and np.isfinite(lt) and np.isfinite(ll):
                ft.links[(int(t), int(lab))] = (int(lt), int(ll))
        for t, cells in by_t.items():
            cells.sort()
            ft.frames[t] = (np.array([c[0] for c in cells], dtype=np.int64),
                            np.array([[c[1], c[2]] for c in cells], dtype=float).reshape(-1, 2))
        return ft

    def add(self, timepoint: int, labels: np.ndarray, yx_um: np.ndarray) -> set[int]:
        """Add (or replace) one frame and link it; returns every timepoint whose links or
        track ids may have changed (the new frame included), so the caller can rewrite them."""
        t = int(timepoint)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        yx = np.asarray(yx_um, dtype=float).reshape(-1, 2)
        if len(labels) and not (0 <= labels.min() and labels.max() < TRACK_ID_BASE):
            raise ValueError(f"cell labels must be in 0..{TRACK_ID_BASE - 1} to name tracks (got {labels.min()}..{labels.max()})")
        if not self.accepts(t):
            raise Sealed(f"timepoint {t} is older than this field's tracker holds (sealed before {self.sealed_before})")
        order = np.argsort(labels, kind="stable")
        before = self.track_ids()
        replaced = t in self.frames
        self._cache = None
        self.frames[t] = (labels[order], yx[order])
        if replaced:  # links to and from the old frame's cells are decided again below
            self.links = {c: p for c, p in self.links.items() if c[0] != t and p[0] != t}
        self._relink_from(t)
        after = self.track_ids()
        changed = {t}
        for node, tid in after.items():
            if before.get(node) != tid:
                changed.add(node[0])
        return changed

    def accepts(self, timepoint: int) -> bool:
        """Whether a frame at ``timepoint`` can be linked here: every frame its links (and the
        later frames' links it may change) depend on is still held."""
        return self.sealed_before is None or int(timepoint) >= self.sealed_before + self.params.max_gap + 1

    def seal(self, keep_from: int) -> bool:
        """Drop the frames before ``keep_from``; the kept cells keep their track ids and mothers
        (fixed where their predecessor is dropped), and their links stay recorded. Returns
        whether anything was dropped."""
        keep_from = int(keep_from)
        if not any(t < keep_from for t in self.frames):
            return False
        ids, parents = self._ids()
        for node, par in self.links.items():
            if node[0] >= keep_from and par[0] < keep_from:
                tid = self.fixed_ids[node] = ids[node]
                if tid in parents:
                    self.fixed_parents[tid] = parents[tid]
        self.frames = {t: v for t, v in self.frames.items() if t >= keep_from}
        self.links = {c: p for c, p in self.links.items() if c[0] >= keep_from}
        self.fixed_ids = {c: i for c, i in self.fixed_ids.items() if c[0] >= keep_from}
        kept = set(self.fixed_ids.values())
        self.fixed_parents = {d: m for d, m in self.fixed_parents.items() if d in kept}
        self.sealed_before = max(keep_from, self.sealed_before or keep_from)
        self._cache = None
        return True

    def _relink_from(self, t0: int) -> None:
        """Decide the incoming links of ``t0`` and of every later frame they can affect."""
        span = self.params.max_gap + 1
        later = sorted(s for s in self.frames if s >= t0)
        changed_at: set[int] = set()
        for s in later:
            if s - span > t0 and not any(u in changed_at for u in range(s - span, s)):
                break  # the window of s sees neither t0 nor a changed link: its links stand
            old = {c: p for c, p in self.links.items() if c[0] == s}
            new = self._link_window(s)
            if new != old:
                changed_at.add(s)
                for c in old:
                    del self.links[c]
                self.links.update(new)

    def _link_window(self, s: int) -> dict[Node, Node]:
        """The links into frame ``s``, in two laptrack solves that depend only on the frames
        present and on the links already decided into earlier frames:

        1. frame-to-frame: the previous timepoint to ``s``, with divisions (splitting);
        2. gap closing: the cells of ``s`` still unlinked to the cells of the window's
           earlier frames that have no successor yet (their track ended), at most
           ``max_gap + 1`` timepoints back.

        (laptrack's gap closing over a whole window costs ten times the frame-to-frame
        solve; the second solve sees only the few open ends.)"""
        p = self.params
        if s not in self.frames or len(self.frames[s][0]) == 0:
            return {}
        labels_s, yx_s = self.frames[s]
        out: dict[Node, Node] = {}
        cutoff = float(p.max_step_um) ** 2
        prev = s - 1
        if prev in self.frames and len(self.frames[prev][0]):
            labels_p, yx_p = self.frames[prev]
            edges = self._solve([yx_p, yx_s], cutoff, gaps=False, split=False)
            if p.divisions and len({b[1] for a, b in edges if b[0] == 1}) < len(labels_s):
                # laptrack's splitting step only attaches cells that start a segment, so a frame
                # whose cells all link one to one gives the same links without it (and it is the
                # slow part): it runs when a cell of s is still unlinked
                edges = self._solve([yx_p, yx_s], cutoff, gaps=False, split=True)
            for a, b in edges:
                if a[0] == 0 and b[0] == 1:
                    out[(s, int(labels_s[b[1]]))] = (prev, int(labels_p[a[1]]))
        if p.max_gap < 1:
            return out
        has_succ = {par for c, par in self.links.items() if c[0] < s}
        open_rows = [i for i, lab in enumerate(labels_s) if (s, int(lab)) not in out]
        lo = s - p.max_gap - 1
        ends: list[tuple[int, np.ndarray]] = []
        for u in range(lo, s - 1):
            if u in self.frames:
                labs_u = self.frames[u][0]
                ends.append((u, np.array([i for i, lab in enumerate(labs_u) if (u, int(lab)) not in has_succ], dtype=np.int64)))
        if not open_rows or not any(len(e) for _, e in ends):
            return out
        rows = np.array(open_rows, dtype=np.int64)
        coords = [np.zeros((0, 2)) for _ in range(lo, s + 1)]
        for u, e in ends:
            coords[u - lo] = self.frames[u][1][e]
        coords[s - lo] = yx_s[rows]
        for a, b in self._solve(coords, cutoff, gaps=True, split=False):
            if b[0] == s - lo and a[0] < s - lo - 1:
                u = a[0] + lo
                e = dict(ends)[u]
                out[(s, int(labels_s[rows[b[1]]]))] = (u, int(self.frames[u][0][e[a[1]]]))
        return out

    def _solve(self, coords: list[np.ndarray], cutoff: float, *, gaps: bool, split: bool) -> list[tuple[Node, Node]]:
        """laptrack's links over ``coords`` (one array per frame), each as (earlier, later)
        ``(frame index, row)``; a solve that fails is logged and links nothing."""
        from laptrack import LapTrack

        if sum(len(c) > 0 for c in coords) < 2:
            return []
        lt = LapTrack(cutoff=cutoff, gap_closing_cutoff=cutoff if gaps else False,
                      gap_closing_max_frame_count=len(coords) - 1, splitting_cutoff=cutoff if split else False)
        try:
            graph = lt.predict(coords, split_merge_validation=False)
        except Exception as e:  # noqa: BLE001 - a frame the solver cannot link starts fresh tracks, logged
            log.warning("tracking: laptrack failed (%s): cells left unlinked", e)
            return []
        return [(a, b) if a[0] < b[0] else (b, a) for a, b in graph.edges()]

    # -- reading --------------------------------------------------------------------------
    def successors(self) -> dict[Node, list[Node]]:
        """Each cell's successors (two for a division)."""
        succ: dict[Node, list[Node]] = {}
        for c, par in self.links.items():
            succ.setdefault(par, []).append(c)
        return succ

    def track_ids(self) -> dict[Node, int]:
        """Every cell's track id: a cell continues its predecessor's track when it is that
        predecessor's only successor; otherwise (no predecessor, or a division) it starts one."""
        return self._ids()[0]

    def parents(self) -> dict[int, int]:
        """Daughter track -> mother track, for every division."""
        return self._ids()[1]

    def _ids(self) -> tuple[dict[Node, int], dict[int, int]]:
        """Track ids and divisions, computed once per change (the caller must not modify them)."""
        if self._cache is None:
            n_succ: dict[Node, int] = {}
            for mother in self.links.values():
                n_succ[mother] = n_succ.get(mother, 0) + 1
            ids: dict[Node, int] = {}
            parents: dict[int, int] = {}
            for t in sorted(self.frames):
                for lab in self.frames[t][0].tolist():
                    node = (t, lab)
                    par = self.links.get(node)
                    if par is not None and par in ids and n_succ[par] == 1:
                        ids[node] = ids[par]
                    elif par is not None and node in self.fixed_ids and par[0] < (self.sealed_before or 0):
                        ids[node] = tid = self.fixed_ids[node]  # its predecessor was sealed away
                        if tid in self.fixed_parents:
                            parents[tid] = self.fixed_parents[tid]
                    else:
                        ids[node] = tid = track_id_of(t, lab)
                        if par is not None and par in ids:
                            parents[tid] = ids[par]
            self._cache = (ids, parents)
        return self._cache

    def frame_columns(self, timepoint: int, labels: Iterable[int]) -> dict[str, list[float]]:
        """The tracking columns of one frame's rows, in the order of ``labels``:
        ``track_id``, ``parent_track_id`` (NaN unless the track is a daughter),
        ``link_timepoint``/``link_label`` (the predecessor; NaN where the cell starts a track)."""
        ids = self.track_ids()
        parents = self.parents()
        cols: dict[str, list[float]] = {"track_id": [], "parent_track_id": [], "link_timepoint": [], "link_label": []}
        for lab in labels:
            node = (int(timepoint), int(lab))
            tid = ids.get(node)
            cols["track_id"].append(tid if tid is not None else np.nan)
            cols["parent_track_id"].append(parents.get(tid, np.nan) if tid is not None else np.nan)
            par = self.links.get(node)
            cols["link_timepoint"].append(par[0] if par else np.nan)
            cols["link_label"].append(par[1] if par else np.nan)
        return cols


def link_all(frames: Mapping[int, tuple[np.ndarray, np.ndarray]], params: LinkParams | None = None,
             order: Iterable[int] | None = None) -> FieldTracks:
    """Link a whole field, frame by frame in ``order`` (default: timepoint order), as the
    service would: used by the benchmarks and the tests of order independence."""
    ft = FieldTracks(params or LinkParams())
    for t in (order if order is not None else sorted(frames)):
        labels, yx = frames[t]
        ft.add(t, labels, yx)
    return ft
