"""The driver's bookkeeping: units (one frame's files), their queue, and the actors' calls in flight."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from monitor.errors import Unavailable
from monitor.intake.files import Retry

log = logging.getLogger(__name__)


@dataclass
class Unit:
    """One frame's files, in the order the local replay records them."""

    seq: int
    paths: tuple[str, ...]
    solo: bool = False
    attempts: int = 0  # worker deaths while processing it
    retry: Retry = field(default_factory=lambda: Retry(time.monotonic()))  # not-ready reads

    @property
    def not_before(self) -> float:
        return self.retry.next_try


class UnitQueue:
    """Units to send: due ones in order (O(1) at both ends), and ones waiting for a retry time."""

    def __init__(self, units: Sequence[Unit] = ()):
        self.due: deque[Unit] = deque(units)
        self.waiting: list[Unit] = []

    def __len__(self) -> int:
        return len(self.due) + len(self.waiting)

    def front(self, u: Unit) -> None:
        """Next to go (a unit sent again)."""
        self.due.appendleft(u)

    def later(self, u: Unit) -> None:
        """Not before ``u.not_before``."""
        self.waiting.append(u)

    def take(self, n: int, now: float) -> list[Unit]:
        """The next call: a unit that goes alone, or up to ``n`` units in order."""
        if self.waiting:
            back = [u for u in self.waiting if u.not_before <= now]
            self.waiting = [u for u in self.waiting if u.not_before > now]
            self.due.extendleft(reversed(back))
        if not self.due:
            return []
        if self.due[0].solo:
            return [self.due.popleft()]
        batch: list[Unit] = []
        while self.due and len(batch) < n and not self.due[0].solo:
            batch.append(self.due.popleft())
        return batch


@dataclass
class Call:
    actor: int
    units: list[Any]
    t0: float
    timed_out: bool = False
    innocent: bool = False  # queued behind the call that lost its actor: uses no attempt
    probe: bool = False  # an ``info`` call: is the (restarted) actor back?


@dataclass
class ReplayStats:
    """What a cluster replay did (for the log line, the tests and the benchmark)."""

    workers: int = 0
    files: int = 0
    frames: int = 0
    resubmitted: int = 0
    actor_pids: list[int] = field(default_factory=list)
    startup_s: float = 0.0  # connect, workers built (models and index loaded), sinks opened
    seconds: float = 0.0


class Pool:
    """The actors and the calls in flight; at most ``depth`` calls queued per actor.

    Ray runs an actor's calls one after another, so when an actor dies only
    its oldest call was running: that call's frames use an attempt, the
    calls queued behind it do not. A lost actor gets no work until a probe
    shows it restarted (with the pipeline rebuilt).
    """

    def __init__(self, ray: ModuleType, actors: list[Any], stats: ReplayStats, depth: int = 2):
        self.ray = ray
        self.actors = actors
        self.stats = stats
        self.depth = depth
        self.load = [0] * len(actors)
        self.down = [False] * len(actors)
        self.busy_since = [0.0] * len(actors)  # when the actor's oldest call began to run
        self.inflight: dict[Any, Call] = {}

    @property
    def working(self) -> bool:
        """Some call other than a probe is in flight."""
        return any(not c.probe for c in self.inflight.values())

    def free(self) -> int | None:
        """The least loaded live actor with room for a call, or None."""
        up = [j for j in range(len(self.actors)) if not self.down[j]]
        if not up:
            return None
        i = min(up, key=lambda j: self.load[j])
        return i if self.load[i] < self.depth else None

    def submit(self, method: str, units: list[Any], *args: Any) -> None:
        i = self.free()
        assert i is not None
        self._send(i, method, units, *args)

    def _send(self, i: int, method: str, units: list[Any], *args: Any, probe: bool = False) -> None:
        ref = getattr(self.actors[i], method).remote(*args)
        now = time.monotonic()
        if self.load[i] == 0:
            self.busy_since[i] = now
        self.inflight[ref] = Call(i, units, now, probe=probe)
        self.load[i] += 1

    def _oldest(self, i: int) -> Call | None:
        calls = [c for c in self.inflight.values() if c.actor == i]
        return min(calls, key=lambda c: c.t0) if calls else None

    def _lose(self, i: int, blamed: Call | None) -> None:
        """Actor ``i`` died: only ``blamed`` (its running call) is at fault; probe for the restart."""
        if self.down[i]:
            return
        self.down[i] = True
        for c in self.inflight.values():
            if c.actor == i and c is not blamed:
                c.innocent = True
        self._send(i, "info", [], probe=True)

    def wait(self, timeout: float) -> list[tuple[Call, Any, BaseException | None]]:
        """Finished work calls: (call, result, None) or (call, None, the error that lost it)."""
        if not self.inflight:
            time.sleep(min(timeout, 0.05))  # only units waiting for a retry
            return []
        ready, _ = self.ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=timeout, fetch_local=True)
        out: list[tuple[Call, Any, BaseException | None]] = []
        for ref in sorted(ready, key=lambda r: self.inflight[r].t0):
            call = self.inflight.pop(ref)
            i = call.actor
            self.load[i] -= 1
            self.busy_since[i] = time.monotonic()
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:
                if call.probe:
                    if isinstance(e, self.ray.exceptions.ActorDiedError):  # not restarting (node gone, restarts spent)
                        log.error("worker %d is gone for good (%s)", i, " ".join(str(e).split())[:200])
                        if all(self.down):
                            raise Unavailable(f"every Ray worker is gone ({' '.join(str(e).split())[:200]})") from None
                        continue
                    time.sleep(0.2)
                    self._send(i, "info", [], probe=True)
                    continue
                if not isinstance(e, self.ray.exceptions.RayTaskError):  # the actor died, not the call's code
                    oldest = self._oldest(i)
                    blamed = call if oldest is None or call.t0 <= oldest.t0 else oldest
                    call.innocent = call.innocent or blamed is not call or self.down[i]
                    self._lose(i, blamed)
                out.append((call, None, e))
                continue
            if call.probe:
                self.down[i] = False
                self.stats.actor_pids[i] = int(result["pid"])
                log.info("worker %d is back (pid %d)", i, result["pid"])
                continue
            out.append((call, result, None))
        return out

    def kill_overdue(self, limit_s: float) -> None:
        """Kill (Ray restarts it) an actor whose running call is past ``limit_s`` per frame."""
        now = time.monotonic()
        for i in range(len(self.actors)):
            call = self._oldest(i)
            if call is None or call.probe or call.timed_out or self.down[i]:
                continue
            if now - max(call.t0, self.busy_since[i]) > limit_s * max(1, len(call.units)):
                call.timed_out = True
                log.error("a call of %d frame(s) on worker %d still running after %.0fs (service.frame_timeout_s = %g each); killing the worker",
                          len(call.units), i, now - max(call.t0, self.busy_since[i]), limit_s)
                self.ray.kill(self.actors[i], no_restart=False)
                self._lose(i, call)


