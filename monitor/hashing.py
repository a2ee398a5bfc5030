"""The one file-hash helper: SHA-256 of files' bytes, streamed in 1 MiB blocks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
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


def verify_files(folder: Path, checksums: dict[str, str], listed_in: str, fail: Callable[[str], Exception]) -> None:
    """Every file named in ``checksums`` is present and unchanged, or one line naming it."""
    for rel, digest in checksums.items():
        p = folder / rel
        if not p.is_file():
            raise fail(f"{rel} (listed in {listed_in}) is missing")
        if file_sha256(p) != digest:
            raise fail(f"{rel} does not match its checksum in {listed_in} (corrupt or edited)")
