"""Encoder calls in batches: chunking, a one-chunk prefetch, and the GPU out-of-memory policy.

The unit of work is one encoder over many crops (of one frame or of several
queued frames). Crops are cut into chunks of at most ``batch_size``; each
chunk's vectors depend only on its own crops, so where a crop falls in a
chunk never changes its vector beyond float rounding (tested).

Prefetch: an encoder may split its work into ``prepare(crops)`` (host side:
array to tensor, pinned memory; or, on the CPU, the resize and normalise) and
``encode_prepared(x)`` (the device side). Then chunk ``i + 1`` is prepared in a
helper thread while chunk ``i`` runs, so the GPU does not wait on Python.
Encoders with only ``encode`` are called plainly.

Out-of-memory policy (no frame is ever lost to it):

1. CUDA out of memory on a chunk of ``b`` crops: release the cache, halve
   ``b`` and retry the same crops; the smaller size is kept for this encoder
   from then on (in the :class:`OomPolicy` the pipeline holds).
2. Out of memory at ``b = 1``: move the encoder to the CPU
   (``to_device("cpu")``), log one WARNING, and go on there at the full batch
   size. An encoder that cannot move re-raises; the frame is quarantined.

Any other exception propagates unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.device import is_cuda_oom, release_cuda_cache
from monitor.protocols import Encoder

log = logging.getLogger(__name__)


@dataclass
class OomPolicy:
    """Per-encoder batch limits learnt from out-of-memory errors (held by the pipeline)."""

    limits: dict[int, int] = field(default_factory=dict)
    moved_to_cpu: set[int] = field(default_factory=set)

    def batch_for(self, enc: Encoder, batch_size: int) -> int:
        """The batch size for ``enc``: ``batch_size``, or the smaller one an out-of-memory error taught."""
        return min(batch_size, self.limits.get(id(enc), batch_size))


def encode_all(enc: Encoder, crops: np.ndarray, batch_size: int, policy: OomPolicy | None = None, prefetch: bool = True) -> np.ndarray:
    """``enc`` over all ``crops`` in chunks; (N, enc.dim) float32. See the module docstring for the policy."""
    policy = policy if policy is not None else OomPolicy()
    n = len(crops)
    if n == 0:
        return np.zeros((0, enc.dim), np.float32)
    prepare: Callable[[np.ndarray], Any] | None = enc.prepare if enc.prefetches else None
    run: Callable[[Any], np.ndarray] = enc.encode_prepared if prepare else enc.encode
    b = policy.batch_for(enc, batch_size)
    out: list[np.ndarray] = []
    start = 0
    pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prepare is not None and prefetch and n > b else None
    ahead: tuple[int, int, Future[Any]] | None = None  # (start, size, prepared chunk)
    try:
        while start < n:
            try:
                if prepare is None:
                    v = run(crops[start : start + b])
                else:
                    if ahead is not None and ahead[:2] == (start, b):
                        x = ahead[2].result()
                    else:
                        x = prepare(crops[start : start + b])
                    ahead = None
                    nxt = start + b
                    if pool is not None and nxt < n:
                        ahead = (nxt, b, pool.submit(prepare, crops[nxt : nxt + b]))
                    v = run(x)
            except Exception as e:
                if not is_cuda_oom(e):
                    raise
                ahead = None
                release_cuda_cache()
                b = _after_oom(enc, b, batch_size, policy, e)
                continue
            v = np.asarray(v, dtype=np.float32)
            if v.shape != (min(b, n - start), enc.dim):
                raise RuntimeError(f"encoder {enc.name} returned shape {v.shape}, expected ({min(b, n - start)}, {enc.dim})")
            out.append(v)
            start += b
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return np.concatenate(out, axis=0)


def _after_oom(enc: Encoder, b: int, batch_size: int, policy: OomPolicy, e: BaseException) -> int:
    """The batch size to retry with after an OOM at ``b`` (or the CPU move); re-raises when nothing is left."""
    if b > 1:
        policy.limits[id(enc)] = b // 2
        log.info("encoder %s: CUDA out of memory at batch %d; retrying at %d", enc.name, b, b // 2)
        return b // 2
    if id(enc) in policy.moved_to_cpu or not enc.to_device("cpu"):
        raise e
    policy.moved_to_cpu.add(id(enc))
    policy.limits.pop(id(enc), None)
    log.warning("encoder %s: CUDA out of memory even at batch 1 (%s); running it on the CPU from now on", enc.name, str(e).splitlines()[0][:120])
    return batch_size
