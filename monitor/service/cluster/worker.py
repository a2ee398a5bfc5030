"""The Ray actor: builds the readers and the pipeline once; reads, assembles and processes frames.

Everything a worker decides about a file is intake's (:func:`read_file`, the
frame assembler's typed results) and ships back as
:mod:`monitor.intake.events`; exceptions never cross the wire.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from monitor import __version__
from monitor.config import Config
from monitor.device import resolve_device
from monitor.errors import CellmonitorError, StageError
from monitor.intake.assemble import FrameAssembler
from monitor.intake.events import Event, FileEvent, frame_result
from monitor.intake.readers import build_readers, read_file
from monitor.pipeline import process_frames
from monitor.protocols import context_from
from monitor.records import Acquisition, Counts, Frame
from monitor.registry import Registry
from monitor.service.wiring import build_pipeline, warm_up


def placeholder(acq: Acquisition) -> Acquisition:
    """An acquisition's identity without its pixels (1x1 channels), for grouping on the driver."""
    return replace(acq, channels={n: np.zeros((1, 1), np.uint8) for n in acq.channels})


class FrameWorker:
    """One Ray actor: the readers and the pipeline, built once; reads and processes frames.

    A build failure (a plugin, the index, the device) does not raise here:
    :meth:`info` reports it in one line and the driver stops with it.
    """

    def __init__(self, cfg: Config):
        logging.basicConfig(level=cfg.service.log_level, format="%(levelname)s %(name)s: %(message)s")
        self.cfg = cfg
        self.failure: str | None = None
        self.classes: tuple[str, ...] = ()
        try:
            registry = Registry(cfg.plugins.paths)
            self.device = resolve_device(cfg.pipeline.device)
            ctx = context_from(cfg, device=self.device)
            self.readers = build_readers(cfg, registry, ctx)
            self.pipeline = build_pipeline(cfg, registry, ctx)
            warm_up(self.pipeline)
            self.classes = tuple(self.pipeline.classifier.classes)
        except CellmonitorError as e:
            self.failure = str(e)
        except Exception as e:  # a plugin's own bug: still one line on the driver
            self.failure = f"{type(e).__name__}: {e}"

    def info(self) -> dict[str, Any]:
        """Where this worker runs and what it classifies into (or why it could not be built)."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "classes": self.classes, "failure": self.failure,
                "version": __version__}

    def identify(self, paths: Sequence[str]) -> list[Acquisition | FileEvent]:
        """Each file's identity (key, channel names, roles, pixel size), pixels left out."""
        out: list[Acquisition | FileEvent] = []
        for p in paths:
            r = read_file(self.readers, Path(p))
            out.append(placeholder(r) if isinstance(r, Acquisition) else r)
        return out

    def _assemble(self, paths: Sequence[str]) -> tuple[list[Event], list[Frame]]:
        """Read one frame's files and assemble them with the service's assembler."""
        asm = FrameAssembler.from_config(self.cfg)
        acqs = [read_file(self.readers, Path(p)) for p in paths]
        waiting = [e for e in acqs if isinstance(e, FileEvent) and e.kind == "not_ready"]
        if waiting:  # the frame waits for all its files
            return list(waiting), []
        outcomes = [a if isinstance(a, FileEvent) else asm.add(a) for a in acqs] + list(asm.due(force=True))
        events: list[Event] = [o for o in outcomes if isinstance(o, FileEvent)]
        return events, [o for o in outcomes if isinstance(o, Frame)]

    def process(self, units: Sequence[Sequence[str]], keep_calls: bool = False) -> list[list[Event]]:
        """Each unit (one frame's files) read, assembled and processed; crops share encoder calls.

        ``keep_calls``: a sink on the driver draws each cell (the overlay sink), so the counts
        carry the cells' calls and the segmented image back (the one case where pixels return).
        """
        if self.pipeline.keep_calls != keep_calls:
            self.pipeline = replace(self.pipeline, keep_calls=keep_calls)

        out: list[list[Event]] = []
        frames: list[Frame] = []
        owner: list[int] = []
        for i, paths in enumerate(units):
            events, fs = self._assemble(paths)
            out.append(events)
            frames += fs
            owner += [i] * len(fs)
        if not frames:
            return out
        try:
            results: list[Counts | StageError] = process_frames(frames, self.pipeline)
        except Exception as e:  # process_frames isolates frames and stages; a last resort
            results = [StageError("process", e)] * len(frames)
        for i, f, r in zip(owner, frames, results, strict=True):
            if isinstance(r, StageError) and r.retryable:  # a stage's input not there yet: the driver retries the unit
                out[i].append(FileEvent("not_ready", tuple(map(str, f.sources)), r.problem, f.key))
            else:
                out[i].append(frame_result(f, r))
        return out
