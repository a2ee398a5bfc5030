"""A synthetic live-cell time-lapse with known cell states, for the demo and tests.

The images are synthetic (say so wherever they are shown). Each cell is a
phase-bright dome in a quantitative-phase-like channel; its state changes
over time the way a drug-treated culture does:

* live: round/elliptical, medium phase height, a nucleus bump;
* apoptotic: shrinks, gets phase-brighter, blebs (small domes on its rim);
* necrotic: swells, loses contrast, granular;
* dead: small, very bright, irregular remnant.

The fluorescence channel (an Apo-15/PI stand-in) is dark in live cells, lights
up in apoptotic and necrotic cells and is brightest in dead ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STATES = ("live", "apoptotic", "necrotic", "dead")


@dataclass(frozen=True)
class SynthCell:
    """One synthetic cell: position, shape, when it starts dying (never: inf) and whether necrotically."""

    y_um: float
    x_um: float
    radius_um: float
    angle: float
    aspect: float
    t_onset: float  # timepoint at which dying starts (inf: never)
    necrotic: bool
    seed: int


def state_at(cell: SynthCell, t: float, transition: float = 2.0) -> str:
    """live before onset; then necrotic for good (necrosis is its own absorbing branch, as in
    monitor.fate.smoothing), or apoptotic for ``transition`` timepoints and then dead."""
    if t < cell.t_onset:
        return "live"
    if cell.necrotic:
        return "necrotic"
    if t < cell.t_onset + transition:
        return "apoptotic"
    return "dead"


def _dome(h: int, w: int, cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = y - cy, x - cx
    c, s = np.cos(angle), np.sin(angle)
    u = (c * dx + s * dy) / max(rx, 0.5)
    v = (-s * dx + c * dy) / max(ry, 0.5)
    r2 = u * u + v * v
    return np.sqrt(np.clip(1.0 - r2, 0.0, None))


def render_cell(phase: np.ndarray, fluo: np.ndarray, cell: SynthCell, state: str, px_um: float) -> None:
    """Draw one cell in place (phase height and fluorescence)."""
    rng = np.random.default_rng(cell.seed)
    r = cell.radius_um / px_um
    cy, cx = cell.y_um / px_um, cell.x_um / px_um
    pad = int(r * 1.8) + 4
    y0, x0 = max(0, int(cy) - pad), max(0, int(cx) - pad)
    y1, x1 = min(phase.shape[0], int(cy) + pad), min(phase.shape[1], int(cx) + pad)
    if y1 <= y0 or x1 <= x0:
        return
    h, w = y1 - y0, x1 - x0
    ly, lx = cy - y0, cx - x0
    ry, rx = r * cell.aspect, r / cell.aspect
    if state == "live":
        body = 0.45 * _dome(h, w, ly, lx, ry, rx, cell.angle)
        body += 0.15 * _dome(h, w, ly + 0.1 * r, lx - 0.1 * r, 0.45 * r, 0.4 * r, cell.angle)
        glow = 0.02
    elif state == "apoptotic":
        s = 0.72
        body = 0.75 * _dome(h, w, ly, lx, ry * s, rx * s, cell.angle)
        for _ in range(rng.integers(5, 9)):
            a = rng.uniform(0, 2 * np.pi)
            br = r * rng.uniform(0.15, 0.25)
            by, bx = ly + np.sin(a) * r * s, lx + np.cos(a) * r * s
            body = np.maximum(body, 0.6 * _dome(h, w, by, bx, br, br, 0.0))
        glow = 0.5
    elif state == "necrotic":
        s = 1.3
        body = 0.22 * _dome(h, w, ly, lx, ry * s, rx * s, cell.angle)
        grain = rng.normal(0, 1, (h, w)).astype(np.float32)
        body *= 1.0 + 0.5 * grain
        glow = 0.6
    else:  # dead
        body = np.zeros((h, w), np.float32)
        for _ in range(3):
            oy, ox = rng.normal(0, 0.15 * r, 2)
            rr = r * rng.uniform(0.25, 0.4)
            body = np.maximum(body, 0.95 * _dome(h, w, ly + oy, lx + ox, rr, rr * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi)))
        glow = 1.0
    phase[y0:y1, x0:x1] += body.astype(np.float32)
    # stained area grows along the death path (live < apoptotic < necrotic < dead), as a
    # death marker's does: PI floods a necrotic or dead cell's whole former footprint
    if state == "dead":
        stain = _dome(h, w, ly, lx, r, r, 0.0) > 0
    elif state == "necrotic":
        stain = _dome(h, w, ly, lx, 0.9 * r, 0.9 * r, 0.0) > 0
    else:
        stain = body > 0.05
    fluo[y0:y1, x0:x1] += (glow * stain).astype(np.float32)


def make_cells(n: int, field_um: float, rng: np.random.Generator, onset_scale: float, n_timepoints: int, radius_um: float = 9.0) -> list[SynthCell]:
    """Non-overlapping cells; onset times exponential with scale ``onset_scale`` timepoints."""
    cells: list[SynthCell] = []
    tries = 0
    margin = radius_um * 1.5
    while len(cells) < n and tries < n * 200:
        tries += 1
        y, x = rng.uniform(margin, field_um - margin, 2)
        rad = radius_um * rng.uniform(0.85, 1.15)
        if any((c.y_um - y) ** 2 + (c.x_um - x) ** 2 < (2.9 * max(c.radius_um, rad)) ** 2 for c in cells):
            continue
        onset = rng.exponential(onset_scale) if onset_scale > 0 else np.inf
        cells.append(
            SynthCell(float(y), float(x), float(rad), float(rng.uniform(0, np.pi)), float(rng.uniform(0.85, 1.15)), float(onset), bool(rng.random() < 0.15), int(rng.integers(1 << 30)))
        )
    return cells


def render_field(cells: list[SynthCell], t: float, shape_px: tuple[int, int], px_um: float, seed: int, states: list[str] | None = None,
                 poor: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(phase uint16, fluorescence uint16, per-cell states) at timepoint ``t``.

    ``poor``: a frame taken out of focus, with more camera noise (as a time-lapse has now and
    then): the cells' states are unchanged, their appearance less clear, so per-frame calls
    flicker where a cell's track does not."""
    rng = np.random.default_rng(seed)
    h, w = shape_px
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = 0.15 + 0.05 * (xx / w) + 0.03 * (yy / h)  # uneven illumination
    fluo = np.zeros((h, w), np.float32)
    out_states = []
    for i, c in enumerate(cells):
        st = states[i] if states is not None else state_at(c, t)
        out_states.append(st)
        render_cell(phase, fluo, c, st, px_um)
    if poor:
        from scipy.ndimage import gaussian_filter

        phase = gaussian_filter(phase, 2.0) + rng.normal(0, 0.05, phase.shape).astype(np.float32)
    phase += rng.normal(0, 0.012, phase.shape).astype(np.float32)
    fluo = fluo * 0.8 + 0.05 + rng.normal(0, 0.02, fluo.shape).astype(np.float32)
    to16 = lambda a: (np.clip(a, 0, 1.5) / 1.5 * 65535).astype(np.uint16)  # noqa: E731
    return to16(phase), to16(fluo), out_states


def reference_field(state: str, n: int, field_um: float, shape_px: tuple[int, int], px_um: float, seed: int) -> tuple[np.ndarray, np.ndarray, list[SynthCell]]:
    """A field in which every cell has the given state (a labelled reference frame)."""
    rng = np.random.default_rng(seed)
    cells = make_cells(n, field_um, rng, onset_scale=0, n_timepoints=1)
    phase, fluo, _ = render_field(cells, 0.0, shape_px, px_um, seed + 1, [state] * len(cells))
    return phase, fluo, cells


@dataclass(frozen=True)
class DoseSeries:
    """The demo's plate: one compound in a dose series beside vehicle controls.

    A cell in a well at concentration ``c`` dies (by the last timepoint) with
    probability ``p(c) = top / (1 + (ec50_um / c) ** hill)``; exactly
    ``round(p(c) n)`` of the well's ``n`` cells are drawn to die, so the dead
    fraction at the last timepoint follows the curve up to one cell, and the
    EC50 a fit recovers there is comparable with ``ec50_um``. Higher doses kill
    earlier (dose-dependent onset times)."""

    compound: str = "demo-drug"
    ec50_um: float = 1.5
    hill: float = 1.5
    top: float = 0.95
    #: the share of frames taken out of focus (monitor.demo.synthetic.render_field ``poor``)
    poor_frames: float = 0.25
    #: well -> concentration in uM (0: a vehicle control well)
    wells: tuple[tuple[str, float], ...] = (("A1", 0.0), ("A2", 0.0), ("A3", 0.1), ("A4", 0.3), ("A5", 1.0),
                                            ("A6", 3.0), ("A7", 10.0), ("A8", 30.0))

    def p_dead(self, conc_um: float) -> float:
        """The fraction of a well's cells that the generator lets die by the last timepoint."""
        return 0.0 if conc_um <= 0 else self.top / (1.0 + (self.ec50_um / conc_um) ** self.hill)

    def plate_csv(self) -> str:
        """The plate map (``[tracking] plate_map``) of this series."""
        lines = ["well,compound,concentration,unit,role"]
        for w, c in self.wells:
            lines.append(f"{w},{'DMSO' if c == 0 else self.compound},{c:g},uM,{'control' if c == 0 else 'treated'}")
        return "\n".join(lines) + "\n"


def dose_cells(series: DoseSeries, conc_um: float, n: int, field_um: float, rng: np.random.Generator, n_timepoints: int,
               transition: float = 2.0) -> list[SynthCell]:
    """A well's cells under ``conc_um``: ``round(p n)`` of them start dying at a time that is
    earlier the higher the dose, early enough to be dead by the last timepoint."""
    from dataclasses import replace

    cells = make_cells(n, field_um, rng, onset_scale=0, n_timepoints=n_timepoints)
    p = series.p_dead(conc_um)
    k = int(round(p * len(cells)))
    dying = set(rng.choice(len(cells), size=k, replace=False).tolist()) if k else set()
    last_onset = max(0.0, (n_timepoints - 1) - transition)
    out = []
    for i, c in enumerate(cells):
        if i in dying:
            onset = last_onset * (1.0 - 0.7 * p) * rng.uniform(0.4, 1.0)
            c = replace(c, t_onset=float(onset))
        out.append(c)
    return out


def moved(cells: list[SynthCell], t: int, step_um: float = 1.0) -> list[SynthCell]:
    """The cells at timepoint ``t`` after a random walk of ``step_um`` per timepoint (each
    cell's own, from its seed), so that tracks are not trivial."""
    from dataclasses import replace

    out = []
    for c in cells:
        steps = np.random.default_rng(c.seed + 17).normal(0.0, step_um, (max(int(t), 0), 2))
        dy, dx = steps.sum(axis=0) if len(steps) else (0.0, 0.0)
        out.append(replace(c, y_um=c.y_um + float(dy), x_um=c.x_um + float(dx)))
    return out
