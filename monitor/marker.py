"""A death marker's verdict on each cell: measured in its mask, labelled by the lab's rules.

Labs image a death marker (Apo-15 for apoptosis, propidium iodide for a
ruptured membrane) beside the label-free channel in calibration runs. This
module turns that marker into cell labels, used twice:

* ``cellmonitor index build --from-marker``: the references are labelled by
  the marker, not by hand (:mod:`monitor.index.from_marker`);
* live, on every frame that carries the marker channel: how many of the
  marker-labelled cells the classifier called the same state
  (:class:`~monitor.records.MarkerAgreement`, CSV and metrics), so a lab
  sees drift.

Measurement (:func:`measure`): the marker's mean inside each cell's mask,
minus the background (the median of the pixels outside every cell, the
masks grown by ``ring_um``; 0: outside every mask), divided by the
background noise (``noise = "sigma"``: 1.4826 x the median absolute
deviation of those pixels, a robust standard deviation; ``"mad"``: the MAD
itself, as some published scoring rules count): a signal-to-noise ratio, so
thresholds do not depend on exposure or gain.

Rules (:func:`label_cells`), from the config's ``[marker]`` table, tried in
order, first match wins::

    [marker]
    negative = "live"        # every rule negative
    margin = 0.25            # |value - threshold| < margin x threshold: ambiguous, left out
    [[marker.rules]]
    channel = "pi"
    state = "dead"
    threshold = 40.0         # SNR units, or "otsu" (fitted on the cells' values)
    [[marker.rules]]
    channel = "apo15"
    state = "apoptotic"
    threshold = "otsu"

A cell is labelled by the first rule it is above (by more than the margin);
a cell inside a rule's margin is ambiguous (no label) unless an earlier rule
already labelled it; below every rule it is ``negative``. A rule may give
its ambiguous band explicitly instead (``ambiguous_above = 3``: values
above 3 and below the threshold are ambiguous, values at or above the
threshold take the rule's state), for a published rule such as "dead at
>= 25 background MADs, live at <= 3, between not scored".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from monitor.records import Cells, Frame, MarkerAgreement, States

#: canonical states a rule may assign
STATES = ("live", "apoptotic", "necrotic", "dead")
#: the label of an ambiguous cell
AMBIGUOUS = ""


@dataclass(frozen=True)
class Rule:
    """``channel`` above ``threshold`` (SNR units) means ``state``."""

    channel: str
    state: str
    threshold: float
    #: the lower edge of the ambiguous band (None: the margin around the threshold)
    ambiguous_above: float | None = None


@dataclass(frozen=True)
class MarkerRules:
    """Resolved rules (every threshold a number), the negative state and the margin."""

    rules: tuple[Rule, ...]
    negative: str = "live"
    margin: float = 0.25
    ring_um: float = 3.0
    noise: str = "sigma"

    @property
    def channels(self) -> tuple[str, ...]:
        """Marker channels the rules read, in first-use order."""
        return tuple(dict.fromkeys(r.channel for r in self.rules))

    def record(self) -> dict[str, object]:
        """JSON-able form (stored in an index built from the marker)."""
        return {"rules": [{"channel": r.channel, "state": r.state, "threshold": r.threshold, "ambiguous_above": r.ambiguous_above}
                          for r in self.rules],
                "negative": self.negative, "margin": self.margin, "ring_um": self.ring_um, "noise": self.noise}


def measure(frame: Frame, cells: Cells, channel: str, ring_um: float = 3.0, noise: str = "sigma") -> np.ndarray:
    """Background-corrected mean marker signal of each cell, in background-noise units.

    Returns one float per cell of ``cells`` (in its order); NaN for a cell with
    no pixels. The background is every pixel farther than ``ring_um`` from
    any cell; a frame with no such pixels uses the whole channel.
    """
    return measure_channels(frame, cells, (channel,), ring_um, noise)[channel]


def measure_channels(frame: Frame, cells: Cells, channels: Sequence[str], ring_um: float = 3.0,
                     noise: str = "sigma") -> dict[str, np.ndarray]:
    """:func:`measure` for several marker channels of one frame (the background found once)."""
    grow = int(round(ring_um / cells.pixel_size_um))
    fg = cells.labels > 0
    background = ~(ndi.binary_dilation(fg, iterations=grow) if grow > 0 else fg)
    return {ch: _measure(frame, cells, ch, background, 1.0 if noise == "mad" else 1.4826) for ch in channels}


def _measure(frame: Frame, cells: Cells, channel: str, background: np.ndarray, mad_scale: float = 1.4826) -> np.ndarray:
    img = np.asarray(frame.channels[channel], dtype=np.float64)
    if img.ndim == 3:
        img = img.mean(axis=2)
    labels = cells.labels
    if img.shape != labels.shape:
        raise ValueError(f"marker channel {channel!r} is {img.shape[1]}x{img.shape[0]} px but the segmentation is {labels.shape[1]}x{labels.shape[0]} px")
    bg_px = img[background] if background.sum() >= 16 else img.ravel()
    bg = float(np.median(bg_px))
    sigma = mad_scale * float(np.median(np.abs(bg_px - bg)))
    if sigma <= 0:
        sigma = float(bg_px.std()) or 1.0
    ids = np.array([c.id for c in cells.cells], dtype=np.int64)
    if not len(ids):
        return np.zeros(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = ndi.mean(img, labels=labels, index=ids)
    return (np.asarray(means, dtype=np.float64) - bg) / sigma


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's split of the cells' values, placed in the middle of the gap it finds
    (at least two distinct finite values)."""
    from skimage.filters import threshold_otsu

    v = values[np.isfinite(values)]
    if len(np.unique(v)) < 2:
        raise ValueError(f"an 'otsu' marker threshold needs cells with different marker values (got {len(v)} cells)")
    t = float(threshold_otsu(v))
    below, above = v[v <= t], v[v > t]
    # the middle of the gap Otsu found (Otsu returns the top of the lower class's bin)
    return float((below.max() + above.min()) / 2) if len(below) and len(above) else t


def with_fitted(table: Mapping[str, Any], fitted: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of a config's ``[marker]`` table whose ``"otsu"`` thresholds are the numbers an index
    built ``--from-marker`` fitted (``fitted``: its ``preprocessing["marker"]`` record); a rule that
    index did not fit keeps ``"otsu"``. What the service applies (:func:`resolve` of the result)."""
    numbers = {(r["channel"], r["state"]): r["threshold"] for r in (fitted or {}).get("rules", [])}
    rules = [dict(r) for r in table["rules"]]
    for r in rules:
        if r["threshold"] == "otsu" and (r["channel"], r["state"]) in numbers:
            r["threshold"] = numbers[(r["channel"], r["state"])]
    return {**table, "rules": rules}


def resolve(table: Mapping[str, object], values: Mapping[str, np.ndarray] | None = None) -> MarkerRules:
    """Rules from a config ``[marker]`` table; ``"otsu"`` thresholds are fitted on ``values``.

    Each ``"otsu"`` rule is fitted on the cells no earlier rule decided (labelled
    or ambiguous), so that dead cells that are also Apo-15 bright do not pull the
    apoptotic split above the apoptotic cells.

    Raises
    ------
    ValueError
        An ``"otsu"`` threshold without values to fit it on (for example in the
        live service, where an index built ``--from-marker`` supplies the
        fitted numbers), or a channel with no values.
    """
    rules = []
    margin = float(table.get("margin", 0.25))  # type: ignore[arg-type]
    n = len(next(iter(values.values()))) if values else 0
    decided = np.zeros(n, bool)
    for r in table["rules"]:  # type: ignore[attr-defined]
        thr = r["threshold"]
        if thr == "otsu":
            if values is None:
                raise ValueError(f"marker rule for {r['channel']!r}: threshold 'otsu' is fitted at 'index build --from-marker'; give a number here")
            if r["channel"] not in values:
                raise ValueError(f"marker rule for {r['channel']!r}: no cell had that channel")
            thr = otsu_threshold(values[r["channel"]][~decided])
        if values is not None and r["channel"] in values:
            v = values[r["channel"]]
            decided |= ~np.isfinite(v) | (v >= float(thr) - margin * abs(float(thr)))
        low = r.get("ambiguous_above")
        rules.append(Rule(str(r["channel"]), str(r["state"]), float(thr), float(low) if low is not None else None))
    return MarkerRules(tuple(rules), str(table.get("negative", "live")), margin, float(table.get("ring_um", 3.0)),  # type: ignore[arg-type]
                       str(table.get("noise", "sigma")))


def label_cells(values: Mapping[str, np.ndarray], rules: MarkerRules) -> np.ndarray:
    """The marker's state of each cell (object array of state names; ``""`` = ambiguous).

    ``values`` maps each rule channel to the cells' :func:`measure` values
    (same cell order). See the module docstring for the rule order.
    """
    n = len(next(iter(values.values()))) if values else 0
    out = np.full(n, None, dtype=object)
    for r in rules.rules:
        v = values[r.channel]
        undecided = np.array([o is None for o in out], dtype=bool)
        if r.ambiguous_above is not None:  # an explicit band: (low, threshold) ambiguous, threshold and up the state
            above = undecided & np.isfinite(v) & (v >= r.threshold)
            near = undecided & (~np.isfinite(v) | ((v > r.ambiguous_above) & (v < r.threshold)))
        else:
            band = rules.margin * abs(r.threshold)
            above = undecided & np.isfinite(v) & (v > r.threshold + band)
            near = undecided & (~np.isfinite(v) | (np.abs(v - r.threshold) <= band))
        out[above] = r.state
        out[near] = AMBIGUOUS
    out[np.array([o is None for o in out], dtype=bool)] = rules.negative
    return out


@dataclass(frozen=True)
class MarkerCheck:
    """Live agreement between the classifier and the marker on frames that carry it."""

    rules: MarkerRules
    #: reference class -> canonical state (the service's class roles)
    roles: Mapping[str, str]

    def verdicts(self, frame: Frame, cells: Cells) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
        """Each cell's marker values (per rule channel) and verdict; None when the frame lacks a marker channel."""
        if any(ch not in frame.channels for ch in self.rules.channels):
            return None
        values = measure_channels(frame, cells, self.rules.channels, self.rules.ring_um, self.rules.noise)
        return values, label_cells(values, self.rules)

    def agreement(self, frame: Frame, cells: Cells, states: States,
                  verdicts: tuple[dict[str, np.ndarray], np.ndarray] | None = None) -> MarkerAgreement | None:
        """Classifier vs marker on one frame; None when the frame lacks a marker channel."""
        got = verdicts if verdicts is not None else self.verdicts(frame, cells)
        if got is None:
            return None
        marker = got[1]
        called = np.array([self.roles.get(states.classes[int(i)], "other") for i in states.predicted], dtype=object)
        labelled = marker != AMBIGUOUS
        return MarkerAgreement(int(labelled.sum()), int((labelled & (marker == called)).sum()), int((~labelled).sum()))


def summarise(labels: Sequence[str]) -> dict[str, int]:
    """Cells per marker label (``ambiguous`` for the left-out ones)."""
    out: dict[str, int] = {}
    for lab in labels:
        key = lab or "ambiguous"
        out[key] = out.get(key, 0) + 1
    return out
