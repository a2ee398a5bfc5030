"""Replay an archive on a Ray cluster: workers read and process, the driver alone records.

``cellmonitor replay CONFIG --engine ray`` runs the service's straight line
on a pool of Ray actors. Ray is imported only here, only when this engine
is chosen (``pip install 'cellmonitor[cluster]'``).

Design
------
* **Workers** are Ray actors (:class:`FrameWorker`), one model replica each
  (``num_cpus`` / ``num_gpus`` per actor). Each builds the readers and the
  pipeline once, with the service's own :func:`~monitor.service.wiring.build_pipeline`
  and warm-up, and runs the same :func:`~monitor.pipeline.process_frames`.
  Workers read the frames themselves: the driver ships file paths (shared
  storage is the normal layout), a worker ships back :class:`Counts`, never
  pixels.
* **The driver** alone writes the record of truth, through the same
  :class:`~monitor.service.recording.Recorder`, ledger and sinks as
  ``cellmonitor run``, and records frames in the order a local replay does
  (a reorder buffer behind a bounded window of frames in flight), so the
  CSV is the local replay's row for row.
* **Frames** are the local ones: with ``[assembly] channels`` configured, a
  first pass has the workers decode each file's identity (key, channels,
  roles; pixels stay on the worker) and the driver runs the real
  :class:`~monitor.intake.assemble.FrameAssembler` on identity-only
  acquisitions, which gives the local grouping, order, skips and drops;
  each released frame's files are then read and assembled again on one
  worker. Without channels every file is a frame and is read once.

Exactly-once and resumable
--------------------------
* A file the ledger finished is not shipped; a frame the ledger has done is
  not recorded again (its files are marked done); the CSV sink never writes
  a key twice. A driver killed at any moment leaves its frames in flight
  unfinished in the ledger, so the next replay does them again, once.
* A worker that dies (killed, out of memory, node lost) fails its call; the
  driver sends each of that call's frames again, alone, to a live (or
  restarted: actors restart without limit) worker. A frame whose worker
  died ``service.max_frame_attempts`` times is quarantined as having
  crashed it, as the local service does for a frame found in flight at
  that many start-ups.
* A call running past ``service.frame_timeout_s`` per frame has its actor
  killed (Ray can stop a process where a thread cannot be stopped): one
  frame alone is quarantined (``hung``); frames sharing the call are each
  sent again alone, none blamed.
* Bad files and frames are quarantined exactly as locally (one line each),
  a file still being written is retried until ``service.ready_deadline_s``.
* A record-of-truth failure stops the replay (exit 74); nothing unrecorded
  is marked done.

Rooms
-----
``worker.py``: the Ray actor (reads, assembles and processes through intake
and the pipeline, as the local loop does); ``pool.py``: units, their queue
and the actors' calls in flight; ``driver.py``: the replay (scan, grouping,
recording in order through
:meth:`~monitor.service.recording.Recorder.apply`). What crosses the wire
is :mod:`monitor.intake.events`.
"""

from monitor.service.cluster.driver import INSTALL, ClusterReplay, import_ray
from monitor.service.cluster.pool import ReplayStats
from monitor.service.cluster.worker import FrameWorker

__all__ = ["INSTALL", "ClusterReplay", "FrameWorker", "ReplayStats", "import_ray"]
