"""The one file-hash helper: SHA-256 of files' bytes, streamed in 1 MiB blocks."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(*paths: Path | None, separator: bytes | None = None) -> str:
    """Hex SHA-256 over the bytes of ``paths`` in order (``None`` entries skipped).

    With ``separator``, it is hashed after each file so that moving bytes from
    one file to the next changes the digest. Raises ``OSError`` if a file
    cannot be read.
    """
    h = hashlib.sha256()
    for p in paths:
        if p is None:
            continue
        with Path(p).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if separator is not None:
            h.update(separator)
    return h.hexdigest()
