"""Group per-file acquisitions into frames across channels.

A frame is complete when every configured channel has arrived; otherwise it
is released with what arrived after ``wait_s`` (its ``missing_channels`` say
what was absent). With no channels configured, each file is a frame.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from monitor.imaging import resize
from monitor.records import Acquisition, Frame, FrameKey

log = logging.getLogger(__name__)

_TRANSMITTED = re.compile(r"bright|phase|\bri\b|refractive|trans|dic|holo|grey|gray|image|bf\b", re.I)
_FLUORESCENCE = re.compile(r"apo|\bpi\b|propidium|fluo|tritc|texas|rfp|gfp|fitc|cy3|cy5|dapi|red|green|sytox|annexin", re.I)


def resolve_roles(names: Sequence[str], primary: str = "auto", control: str = "auto") -> tuple[str, str | None]:
    """Pick the primary (segmented) and control (fluorescence) channels.

    ``auto`` primary: the first channel whose name looks transmitted-light
    (bright field, phase, RI, ...), else the first channel. ``auto`` control:
    the first other channel whose name looks fluorescent, else the first other
    channel, else none. ``control = "none"`` disables it.
    """
    names = list(names)
    if not names:
        raise ValueError("frame has no channels")
    if primary == "auto":
        primary = next((n for n in names if _TRANSMITTED.search(n)), names[0])
    elif primary not in names:
        raise KeyError(f"primary channel {primary!r} not in frame (channels: {', '.join(names)})")
    others = [n for n in names if n != primary]
    ctrl: str | None
    if control == "none":
        ctrl = None
    elif control == "auto":
        ctrl = next((n for n in others if _FLUORESCENCE.search(n)), others[0] if others else None)
    else:
        ctrl = control if control in names else None
    return primary, ctrl


def merge(parts: Sequence[Acquisition], primary: str = "auto", control: str = "auto", expected: Sequence[str] = ()) -> Frame:
    """One frame from acquisitions of the same key; other channels resampled onto the primary's grid."""
    channels: dict[str, np.ndarray] = {}
    for a in parts:
        channels.update(a.channels)
    p, c = resolve_roles(list(channels), primary, control)
    base = next(a for a in parts if p in a.channels)
    shape = channels[p].shape[:2]
    for name, img in list(channels.items()):
        if img.shape[:2] != shape:
            channels[name] = resize(img, shape)
    return Frame(
        key=base.key,
        channels=channels,
        primary=p,
        control=c,
        pixel_size_um=base.pixel_size_um,
        pixel_size_source=base.pixel_size_source,
        instrument=base.instrument,
        acquired_at=base.acquired_at,
        sources=tuple(a.path for a in parts),
        missing_channels=tuple(n for n in expected if n not in channels),
    )


@dataclass
class _Pending:
    parts: list[Acquisition]
    first_seen: float


@dataclass
class FrameAssembler:
    channels: Sequence[str] = ()
    primary: str = "auto"
    control: str = "auto"
    wait_s: float = 120.0
    clock: Callable[[], float] = time.monotonic
    _pending: dict[FrameKey, _Pending] = field(default_factory=dict)

    def add(self, acq: Acquisition) -> Frame | None:
        """Add one file's channels; return the frame once it is complete."""
        if not self.channels:
            return merge([acq], self.primary, self.control)
        pend = self._pending.setdefault(acq.key, _Pending([], self.clock()))
        pend.parts.append(acq)
        have = {n for a in pend.parts for n in a.channels}
        if all(c in have for c in self.channels):
            del self._pending[acq.key]
            return merge(pend.parts, self.primary, self.control, self.channels)
        return None

    def due(self, force: bool = False) -> list[Frame]:
        """Frames whose wait ran out (or all, with ``force``), released incomplete."""
        now = self.clock()
        out = []
        for key, pend in list(self._pending.items()):
            if force or now - pend.first_seen >= self.wait_s:
                del self._pending[key]
                frame = merge(pend.parts, self.primary, self.control, self.channels)
                log.warning("%s: released after %.0fs without channel(s) %s", key, now - pend.first_seen, ", ".join(frame.missing_channels))
                out.append(frame)
        return out

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    def pending_paths(self) -> list[str]:
        return [str(a.path) for p in self._pending.values() for a in p.parts]
