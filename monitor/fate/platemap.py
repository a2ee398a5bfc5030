"""The plate map: which compound at which concentration is in each well (a CSV).

Format (a header row, then one row per well; extra columns are ignored)::

    well,compound,concentration,unit,role
    A1,DMSO,0,uM,control
    A2,staurosporine,0.1,uM,treated
    A3,staurosporine,1 uM,,treated      # a unit may follow the number instead

Policy
------
* Wells are written as the reader names them (``A1``, ``A01`` and ``a1`` are
  the same well: letters upper-cased, leading zeros dropped).
* Concentrations are converted to one unit per kind: molar ones (``pM``,
  ``nM``, ``uM``/``µM``, ``mM``, ``M``) to µM, mass ones (``ng/mL``,
  ``ug/mL``, ``mg/mL``) to µg/mL. A compound given in both kinds is a unit
  mix: one error, and that compound's wells are left out of dose response.
* Role: ``control`` (or ``vehicle``, ``negative``) marks the plate's control
  wells (concentration 0 when not given); anything else is a treated well.
* Every bad row is one line ``file:row N: message (got X)``; good rows are
  kept. A bad map never stops the service (:class:`PlateMapFile` logs the
  errors and keeps the last good map) and is re-read when the file changes.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from monitor.readkit import well_name

log = logging.getLogger(__name__)

_MOLAR = {"pm": 1e-6, "nm": 1e-3, "um": 1.0, "µm": 1.0, "μm": 1.0, "mm": 1e3, "m": 1e6}
_MASS = {"ng/ml": 1e-3, "ug/ml": 1.0, "µg/ml": 1.0, "μg/ml": 1.0, "mg/ml": 1e3}
_CONTROL_ROLES = frozenset({"control", "vehicle", "negative", "negative control", "untreated"})


@dataclass(frozen=True)
class Well:
    """One well of the plate map: compound, concentration (in ``unit``) and role."""

    well: str
    compound: str
    concentration: float
    unit: str
    role: str

    @property
    def control(self) -> bool:
        return self.role in _CONTROL_ROLES


@dataclass(frozen=True)
class PlateMap:
    """The wells read, and one line per problem found."""

    wells: dict[str, Well] = field(default_factory=dict)
    errors: tuple[str, ...] = ()

    def controls(self) -> list[str]:
        """The control wells, in plate order."""
        return [w for w, x in self.wells.items() if x.control]

    def compounds(self) -> list[str]:
        """The treated compounds (control-only compounds such as the vehicle left out)."""
        return sorted({x.compound for x in self.wells.values() if not x.control})


def _unit(u: str) -> tuple[str, float] | None:
    key = u.strip().lower().replace(" ", "")
    if key in _MOLAR:
        return "uM", _MOLAR[key]
    if key in _MASS:
        return "ug/mL", _MASS[key]
    return None


def parse_plate_map(path: Path) -> PlateMap:
    """Read a plate-map CSV (module docstring); never raises on bad rows."""
    errors: list[str] = []
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        return PlateMap({}, (f"{name}: cannot be read ({e})",))
    rows = list(csv.DictReader(text.splitlines()))
    if rows and not {"well", "compound", "concentration"} <= {(k or "").strip().lower() for k in rows[0]}:
        return PlateMap({}, (f"{name}: the header must name well, compound and concentration (got {list(rows[0])})",))
    wells: dict[str, Well] = {}
    seen_row: dict[str, int] = {}
    kinds: dict[str, dict[str, int]] = {}
    for i, raw in enumerate(rows, start=2):
        r = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        w = well_name(r.get("well", ""))
        if not re.fullmatch(r"[A-Z]{1,2}\d+", w):
            errors.append(f"{name}:row {i}: well is not a well name like A1 (got {r.get('well', '')!r})")
            continue
        if w in seen_row:
            errors.append(f"{name}:row {i}: well {w} is named twice (first on row {seen_row[w]}); this row is ignored")
            continue
        role = (r.get("role") or "treated").lower()
        compound = r.get("compound", "") or ("control" if role in _CONTROL_ROLES else "")
        if not compound:
            errors.append(f"{name}:row {i}: no compound (got an empty cell)")
            continue
        conc_text = r.get("concentration", "")
        unit_text = r.get("unit", "")
        m = re.fullmatch(r"([-+0-9.eE]+)\s*(.*)", conc_text)
        if not conc_text and role in _CONTROL_ROLES:
            value, unit_text = 0.0, unit_text or "uM"
        elif m is None:
            errors.append(f"{name}:row {i}: concentration is not a number (got {conc_text!r})")
            continue
        else:
            try:
                value = float(m.group(1))
            except ValueError:
                errors.append(f"{name}:row {i}: concentration is not a number (got {conc_text!r})")
                continue
            if m.group(2):
                if unit_text and unit_text.lower() != m.group(2).lower():
                    errors.append(f"{name}:row {i}: two units (got {m.group(2)!r} in concentration and {unit_text!r} in unit)")
                    continue
                unit_text = m.group(2)
        if value < 0 or value != value:
            errors.append(f"{name}:row {i}: concentration must be 0 or more (got {conc_text!r})")
            continue
        if not unit_text:
            if value == 0:
                unit_text = "uM"
            else:
                errors.append(f"{name}:row {i}: concentration has no unit (got {conc_text!r})")
                continue
        u = _unit(unit_text)
        if u is None:
            errors.append(f"{name}:row {i}: unknown unit (got {unit_text!r}; molar pM..M or ng/mL..mg/mL)")
            continue
        unit, factor = u
        if value > 0 or role not in _CONTROL_ROLES:
            kinds.setdefault(compound, {}).setdefault(unit, i)
        seen_row[w] = i
        wells[w] = Well(w, compound, value * factor, unit, role)
    for compound, units in kinds.items():
        if len(units) > 1:
            desc = ", ".join(f"{u} (row {r})" for u, r in units.items())
            errors.append(f"{name}: compound {compound} mixes units: {desc}; its wells are left out of dose response")
            wells = {w: x for w, x in wells.items() if x.compound != compound}
    return PlateMap(wells, tuple(errors))


class PlateMapFile:
    """A plate map that can be edited while the service runs: :meth:`current` re-reads the
    file when its modification time or size changes, logs each problem once per read, and
    keeps the last map that had wells when the file disappears or loses every row."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._map = PlateMap()
        self._missing_said = False

    def current(self) -> PlateMap:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime, st.st_size)
        except OSError:
            if self._stamp is not None:
                log.warning("plate map %s: cannot be read any more; keeping the last one read", self.path)
                self._stamp = None
            elif not self._missing_said:
                log.warning("plate map %s: no such file (yet): no dose response until it is there", self.path)
            self._missing_said = True
            return self._map
        self._missing_said = False
        if stamp != self._stamp:
            new = parse_plate_map(self.path)
            for line in new.errors:
                log.warning("plate map %s", line)
            first = self._stamp is None and not self._map.wells
            self._stamp = stamp
            if new.wells or not self._map.wells:
                self._map = new
                log.info("plate map %s %s: %d wells, %d problems", self.path, "read" if first else "re-read",
                         len(new.wells), len(new.errors))
        return self._map
