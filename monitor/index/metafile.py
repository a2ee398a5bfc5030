"""``meta.json``, the index folder's description: one schema for writing and reading it.

The same pydantic model is dumped when an index is saved and validated when
it is loaded (as the configuration is), so what is written and what is
checked cannot drift apart. A problem is one line naming the field
(:func:`read_meta`). Keys a later version adds are kept, not refused, so an
older cellmonitor still names the problem that matters (the format version).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from monitor.index import unknown as unknown_mod
from monitor.index.search import ProbeResult

#: the format written now
FORMAT_VERSION = 2
#: formats this version reads (1: before conditioning and query options)
READABLE_FORMATS = (1, 2)


class EncoderRecord(BaseModel):
    """One encoder of the concatenation, in order: what a configuration must match (``id``, ``dim``)."""

    model_config = ConfigDict(extra="allow")

    id: str
    dim: int = Field(gt=0)
    name: str | None = None
    version: str | None = None


class SearchProbeRecord(BaseModel):
    """How an HNSW index chose its efSearch (:class:`~monitor.index.search.ProbeResult`); absent in older indexes."""

    model_config = ConfigDict(extra="allow")

    k: int = Field(gt=0)
    ef_search: int = Field(gt=0)
    recall: float = Field(ge=0.0, le=1.0)
    target: float = Field(gt=0.0, le=1.0)
    queries: int = Field(gt=0)
    met: bool
    tried: list[tuple[int, float]] = Field(default_factory=list)
    seconds: float | None = None

    def result(self) -> ProbeResult:
        """The record as the index holds it."""
        return ProbeResult(self.k, self.ef_search, self.recall, self.target, self.queries, self.met,
                           tuple((int(e), float(r)) for e, r in self.tried), float(self.seconds or 0.0))


class MetaFile(BaseModel):
    """Every field of ``meta.json``; the checks on load are these types and validators."""

    model_config = ConfigDict(extra="allow")

    format_version: int
    cellmonitor_version: str | None = None
    created_at: str | None = None
    encoders: list[EncoderRecord] = Field(min_length=1)
    dim: int | None = None
    n_references: int | None = None
    preprocessing: dict[str, Any] | None = None
    metric: str
    normalize: bool = False
    structure: str
    hnsw: dict[str, Any]
    classes: list[str] = Field(min_length=1)
    class_counts: dict[str, int] | None = None
    class_weights: list[float] | None = None
    ewc: dict[str, Any]
    conditioning: dict[str, Any] | None = None
    query: dict[str, Any] | None = None
    unknown: dict[str, Any] | None = None
    search_probe: SearchProbeRecord | None = None
    version: int = 1
    reference_names: bool = False
    checksums: dict[str, str]

    @field_validator("query")
    @classmethod
    def _query(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and int(v.get("tta", 1)) not in (1, 8):
            raise ValueError(f"unsupported query options {v!r} (tta is 1 or 8)")
        return v

    def encoder_dicts(self) -> tuple[dict[str, Any], ...]:
        """The encoders as plain dicts, as :class:`~monitor.index.store.IndexMeta` holds them."""
        return tuple(e.model_dump(exclude_none=True) for e in self.encoders)

    def needed_files(self) -> list[str]:
        """The files whose checksums this record must list (vectors, labels, conditioning, unknown)."""

        files = ["vectors.faiss", "labels.npy", *((self.conditioning or {}).get("files") or [])]
        if self.unknown is not None:
            files.append(str(self.unknown.get("file", unknown_mod.FILE)))
        return files


def toml_value(v: Any) -> str:
    """A TOML literal of a JSON-able value (strings quoted, booleans lower-case)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


def encoders_hint(encoders: list[EncoderRecord]) -> str:
    """The config's ``[[encoders]]`` an index was built with, on one line (what to paste)."""
    parts = []
    for e in encoders:
        opts = (e.model_extra or {}).get("options") or {}
        inline = ", ".join(f"{k} = {toml_value(v)}" for k, v in opts.items())
        parts.append(f'[[encoders]] name = "{e.name or e.id.split("@")[0]}"' + (f" options = {{ {inline} }}" if inline else ""))
    return "; ".join(parts)


def read_meta(path: Path) -> MetaFile:
    """``meta.json`` validated; :class:`ValueError` with one line (``field: problem``) when it is not.

    The format version is checked first, so an index from another version
    is told as that, not as a list of fields that moved.
    """
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"meta.json is unreadable ({e})") from None
    got = raw.get("format_version") if isinstance(raw, dict) else None
    if got not in READABLE_FORMATS:
        raise ValueError(f"index format {got!r} is not supported (expected {FORMAT_VERSION}); rebuild it with 'cellmonitor index build'")
    try:
        meta = MetaFile.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'meta.json'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"meta.json: {problems}") from None
    for f in meta.needed_files():
        if f not in meta.checksums:
            raise ValueError(f"meta.json has no checksum for {f}")
    return meta


def write_meta(path: Path, meta: MetaFile) -> None:
    """Write atomically (a temporary file renamed over ``meta.json``): a torn write is never read."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta.model_dump(mode="json", exclude_none=False), indent=2))
    tmp.replace(path)
