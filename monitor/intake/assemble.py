"""Group per-file acquisitions into frames across channels.

Policy
------
* Identity: files with the same :class:`~monitor.records.FrameKey`
  (experiment, well, field, timepoint) belong to one frame.
* No channels configured: every file is a frame of its own, at once.
* Channels configured (``[assembly] channels``): a frame is released as soon
  as every configured channel has arrived (channel names compare without
  regard to case and surrounding spaces; the configured spelling is kept).
  Channels that are not configured are left out of the frame (logged once per
  name), so an unexpected extra export cannot change what is segmented.
* Roles: a named ``primary``/``control`` is fixed by the configuration;
  ``auto`` uses the roles each reader declares for its channels
  (``transmitted`` / ``fluorescence``, :attr:`Acquisition.roles`), in the
  configured channel order, never file arrival order (see :func:`resolve_roles`).
* Timeout: a frame still incomplete ``wait_s`` seconds after its first file
  is released by :meth:`FrameAssembler.due` with what arrived; its
  ``missing_channels`` says what was absent, the release is logged and
  counted in :attr:`FrameAssembler.stats`. A control channel that is missing
  gives ``control=None``.
* A frame whose *primary* channel never arrived cannot be segmented: it is
  dropped instead of released (logged, counted, and returned as a
  ``dropped`` :class:`~monitor.intake.events.FileEvent` so the caller
  quarantines its files). A file for a frame that was already released or
  dropped is dropped the same way (a late channel cannot join a frame that
  has been counted).
* Every call says what happened in its result, typed: :meth:`FrameAssembler.add`
  returns the frame it completed, a :class:`~monitor.intake.events.FileEvent`
  (``skip``: no configured channel; ``dropped``: late; ``assemble``: the
  channels could not be merged, naming every file of that frame), or None
  (waiting for more channels); :meth:`FrameAssembler.due` returns frames and
  events. No caller compares counters before and after.
* The same file added twice (a rescan, a retry) replaces its earlier copy.
* Channels are resampled onto the primary channel's pixel grid (area
  interpolation when shrinking), and the frame takes the primary's pixel
  size, source, instrument and acquisition time.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from monitor.config import Config
from monitor.errors import ConfigError
from monitor.imaging import resize
from monitor.intake.events import FileEvent
from monitor.records import Acquisition, ChannelRole, Frame, FrameKey, channel_key

log = logging.getLogger(__name__)

#: how many released/dropped frame keys are remembered to recognise late files
_REMEMBER = 4096


def resolve_roles(
    names: Sequence[str], primary: str = "auto", control: str = "auto", roles: Mapping[str, ChannelRole] | None = None
) -> tuple[str, str | None]:
    """Pick the primary (segmented) and control (fluorescence) channels of a frame.

    ``auto`` primary: the first channel its reader declared ``transmitted``,
    else the first channel without a declared role, else the first channel.
    ``auto`` control: the first other channel declared a death ``marker``, else
    ``fluorescence``, else ``nuclear``, else the first other channel without a
    declared role, else none.
    ``control = "none"`` disables it; a named control that is absent gives
    none.

    Raises
    ------
    KeyError
        A named primary that is not among ``names``.
    ValueError
        No channels at all.
    """
    names = list(names)
    roles = roles or {}
    if not names:
        raise ValueError("frame has no channels")
    if primary == "auto":
        primary = next((n for n in names if roles.get(n) == "transmitted"), None) or next((n for n in names if n not in roles), names[0])
    elif primary not in names:
        raise KeyError(f"primary channel {primary!r} not in frame (channels: {', '.join(names)})")
    others = [n for n in names if n != primary]
    ctrl: str | None
    if control == "none":
        ctrl = None
    elif control == "auto":
        ctrl = next((n for role in ("marker", "fluorescence", "nuclear") for n in others if roles.get(n) == role), None) or next(
            (n for n in others if n not in roles), None)
    else:
        ctrl = control if control in names and control != primary else None
    return primary, ctrl


def merge(parts: Sequence[Acquisition], primary: str = "auto", control: str = "auto", expected: Sequence[str] = ()) -> Frame:
    """One frame from acquisitions of the same key.

    Every channel is resampled onto the primary channel's grid; the frame
    takes the primary's pixel size and its source. Parts whose pixel size
    differs while their grid is the same are logged (they cannot show the
    same field of view). ``expected`` lists the channels that should have
    been there; the absent ones become ``missing_channels``.
    """
    if not parts:
        raise ValueError("no acquisitions to merge")
    channels: dict[str, np.ndarray] = {}
    owner: dict[str, Acquisition] = {}
    for a in parts:
        for name, img in a.channels.items():
            channels[name] = img
            owner[name] = a
    if expected:  # configured order, not arrival order
        order = [n for n in expected if n in channels] + [n for n in channels if n not in expected]
        channels = {n: channels[n] for n in order}
    p, c = resolve_roles(list(channels), primary, control, _roles(parts))
    base = owner[p]
    shape = channels[p].shape[:2]
    for name, img in list(channels.items()):
        if img.shape[:2] != shape:
            channels[name] = resize(img, shape)
        elif abs(owner[name].pixel_size_um - base.pixel_size_um) > 1e-3 * base.pixel_size_um:
            log.warning(
                "%s: channel %r is %.4g um/px but %r is %.4g um/px on the same grid",
                base.key, name, owner[name].pixel_size_um, p, base.pixel_size_um,
            )
    acquired = base.acquired_at or min((a.acquired_at for a in parts if a.acquired_at), default=None)
    return Frame(
        key=base.key,
        channels=channels,
        primary=p,
        control=c,
        pixel_size_um=base.pixel_size_um,
        pixel_size_source=base.pixel_size_source,
        instrument=base.instrument,
        acquired_at=acquired,
        sources=tuple(dict.fromkeys(a.path for a in parts)),
        missing_channels=tuple(n for n in expected if n not in channels),
    )


def _roles(parts: Sequence[Acquisition]) -> dict[str, ChannelRole]:
    return {n: r for a in parts for n, r in a.roles.items() if n in a.channels}


@dataclass
class _Pending:
    parts: list[Acquisition]
    first_seen: float


@dataclass
class FrameAssembler:
    """Collects acquisitions until their frame is complete or overdue (module docstring).

    ``clock`` is injectable (seconds, monotonic) so tests need not sleep.
    Not thread-safe: one worker owns it.
    """

    channels: Sequence[str] = ()
    primary: str = "auto"
    control: str = "auto"
    wait_s: float = 120.0
    clock: Callable[[], float] = time.monotonic
    _pending: dict[FrameKey, _Pending] = field(default_factory=dict)
    stats: Counter[str] = field(default_factory=Counter)
    _closed: OrderedDict[FrameKey, str] = field(default_factory=OrderedDict)
    _warned: set[str] = field(default_factory=set)
    _dropped_paths: OrderedDict[Path, None] = field(default_factory=OrderedDict)

    @classmethod
    def from_config(cls, cfg: Config) -> FrameAssembler:
        """The assembler ``[assembly]`` describes: every engine groups files the same way."""
        a = cfg.assembly
        return cls(a.channels, a.primary, a.control, a.wait_s)

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        self._canon = {channel_key(c): c for c in self.channels}
        self._primary: str | None = None
        self._control: str | None = None
        if self.channels:
            primary = self._canon.get(channel_key(self.primary), self.primary) if self.primary != "auto" else "auto"
            control = self._canon.get(channel_key(self.control), self.control) if self.control not in ("auto", "none") else self.control
            listed = ", ".join(self.channels)
            if primary != "auto" and primary not in self.channels:
                raise ConfigError(f"assembly.primary: {self.primary!r} is not one of assembly.channels ({listed})")
            if control not in ("auto", "none") and control not in self.channels:
                raise ConfigError(f"assembly.control: {self.control!r} is not one of assembly.channels ({listed})")
            self._primary = primary
            self._control = control

    # -- intake -----------------------------------------------------------------------------

    def _configured(self, acq: Acquisition) -> Acquisition | None:
        """The acquisition with channel names in configured spelling, unconfigured ones left out."""
        kept: dict[str, np.ndarray] = {}
        for name, img in acq.channels.items():
            canon = self._canon.get(channel_key(name))
            if canon is None:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning(
                        "%s: channel %r is not in assembly.channels (%s); left out",
                        acq.path, name, ", ".join(self.channels),
                    )
                continue
            kept[canon] = img
        if not kept:
            return None
        if list(kept) == list(acq.channels):
            return acq
        roles = {self._canon[channel_key(n)]: r for n, r in acq.roles.items() if channel_key(n) in self._canon}
        return replace(acq, channels=kept, roles=roles)

    def _drop(self, key: FrameKey, sources: tuple[Path, ...], reason: str) -> FileEvent | None:
        """The ``dropped`` event for ``sources`` (None when each was reported before: a rescan)."""
        new = tuple(s for s in sources if s not in self._dropped_paths)
        self._remember(key, "dropped")
        if not new:  # the same file again (a rescan): already reported
            log.debug("%s: %s dropped again (%s)", key, ", ".join(map(str, sources)), reason)
            return None
        log.warning("%s: dropped (%s): %s", key, reason, ", ".join(str(s) for s in new))
        self.stats["dropped"] += 1
        for s in new:
            self._dropped_paths[s] = None
        while len(self._dropped_paths) > _REMEMBER:
            self._dropped_paths.popitem(last=False)
        return FileEvent("dropped", tuple(map(str, new)), reason, key)

    def _remember(self, key: FrameKey, what: str) -> None:
        self._closed[key] = what
        self._closed.move_to_end(key)
        while len(self._closed) > _REMEMBER:
            self._closed.popitem(last=False)

    def add(self, acq: Acquisition) -> Frame | FileEvent | None:
        """Add one file's channels: the frame it completes, what became of the file, or None (waiting).

        Returns
        -------
        Frame
            Every configured channel is there (or none is configured).
        FileEvent
            ``skip``: none of the file's channels is configured; ``dropped``:
            its frame was already released or dropped; ``assemble``: the
            frame's channels could not be merged (every file of it is named).
        None
            The frame waits for more channels (or a late file already reported).
        """
        if not self.channels:
            self.stats["complete"] += 1
            return self._merge(acq.key, [acq], self.primary, self.control)
        kept = self._configured(acq)
        if kept is None:
            self.stats["ignored_files"] += 1
            names = ", ".join(repr(c) for c in acq.channels)
            return FileEvent("skip", (str(acq.path),), f"channel {names} is not in assembly.channels", acq.key)
        if acq.key in self._closed and acq.key not in self._pending:
            return self._drop(acq.key, (acq.path,), f"arrived after the frame was {self._closed[acq.key]}")
        pend = self._pending.setdefault(acq.key, _Pending([], self.clock()))
        pend.parts = [a for a in pend.parts if a.path != acq.path] + [kept]
        have = {n for a in pend.parts for n in a.channels}
        if all(c in have for c in self.channels):
            del self._pending[acq.key]
            self._remember(acq.key, "released")
            self.stats["complete"] += 1
            return self._merge(acq.key, pend.parts, self._primary or "auto", self._control or "auto", self.channels)
        return None

    def _merge(self, key: FrameKey, parts: Sequence[Acquisition], primary: str, control: str,
               expected: Sequence[str] = ()) -> Frame | FileEvent:
        """:func:`merge`, or the ``assemble`` event naming every file of the frame
        (resampling a channel, e.g. to a huge declared size, must not stop the caller)."""
        try:
            return merge(parts, primary, control, expected)
        except Exception as e:
            paths = tuple(dict.fromkeys(str(a.path) for a in parts))
            return FileEvent("assemble", paths, f"channels could not be assembled: {type(e).__name__}: {e}", key)

    def due(self, force: bool = False) -> list[Frame | FileEvent]:
        """Frames whose wait ran out (or all, with ``force``), released incomplete.

        A frame without its primary channel is dropped instead, and one whose
        channels cannot be merged fails on its own: each is a
        :class:`~monitor.intake.events.FileEvent` in the list, in place.
        """
        now = self.clock()
        out: list[Frame | FileEvent] = []
        for key, pend in list(self._pending.items()):
            if not (force or now - pend.first_seen >= self.wait_s):
                continue
            del self._pending[key]
            have = {n for a in pend.parts for n in a.channels}
            missing = [c for c in self.channels if c not in have]
            sources = tuple(a.path for a in pend.parts)
            primary = self._primary_of(pend.parts)
            if primary not in have:
                ev = self._drop(key, sources, f"primary channel {primary!r} never arrived (missing: {', '.join(missing)})")
                if ev is not None:
                    out.append(ev)
                continue
            control = self._control if self._control in have or self._control in ("auto", "none") else "none"
            frame = self._merge(key, pend.parts, primary, control or "auto", self.channels)
            self._remember(key, "released")
            if isinstance(frame, FileEvent):
                out.append(frame)
                continue
            self.stats["incomplete"] += 1
            log.warning(
                "%s: released after %.0fs without channel(s) %s",
                key, now - pend.first_seen, ", ".join(frame.missing_channels),
            )
            out.append(frame)
        return out

    @property
    def configured_roles(self) -> tuple[str | None, str | None]:
        """(primary, control) as configured, in configured spelling (``auto``/``none`` as given)."""
        return self._primary, self._control

    def _primary_of(self, parts: Sequence[Acquisition]) -> str:
        """The configured primary, or (``auto``) the configured channel its reader declares transmitted.

        With ``auto`` and no part declaring any transmitted channel, the first
        configured channel that is not declared fluorescence is the primary.
        """
        if self._primary not in (None, "auto"):
            return str(self._primary)
        roles = _roles(parts)
        return next((c for c in self.channels if roles.get(c) == "transmitted"), None) or next(
            (c for c in self.channels if roles.get(c) in (None, "transmitted")), self.channels[0]
        )

    @property
    def n_pending(self) -> int:
        """Frames waiting for channels."""
        return len(self._pending)

    def pending_paths(self) -> list[str]:
        """Files of the frames waiting for channels."""
        return [str(a.path) for p in self._pending.values() for a in p.parts]
