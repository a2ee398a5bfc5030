"""Plugin discovery: entry-point groups plus site-local ``"module:attr"`` names.

Listing never crashes: a plugin whose spec fails to import is listed with its
error. Loading a plugin that the configuration names, and failing, is a fatal
start-up :class:`~monitor.errors.PluginError` naming plugin, group and cause.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from monitor.config import Config, PluginRef, format_validation_error
from monitor.errors import ConfigError, PluginError
from monitor.protocols import BuildContext, complete, context_from

OptionsT = TypeVar("OptionsT", bound=BaseModel)

GROUPS = {
    "readers": "cellmonitor.readers",
    "segmenters": "cellmonitor.segmenters",
    "encoders": "cellmonitor.encoders",
    "sinks": "cellmonitor.sinks",
}


@dataclass(frozen=True)
class Spec(Generic[OptionsT]):
    """A plugin spec: what an entry point or ``"module:attr"`` names (see :mod:`monitor.protocols`).

    ``factory(options, ctx)`` builds the plugin; it should import heavy
    libraries (torch, transformers, faiss) itself, so importing the spec stays
    cheap and ``plugins list`` stays fast.
    """

    name: str
    description: str
    Options: type[OptionsT]
    factory: Callable[[OptionsT, BuildContext], Any]
    #: what ``models list`` shows without building (weights present, where, dim, dtype), or None
    describe: Callable[[OptionsT, BuildContext], dict[str, Any]] | None = None
    #: what ``check-config`` checks beyond the options without building (files the options name), or None:
    #: raises :class:`~monitor.errors.ConfigError` with the problem
    check: Callable[[OptionsT, BuildContext], None] | None = None

    def build(self, options: OptionsT, ctx: BuildContext) -> Any:
        """The plugin built from validated ``options``."""
        return self.factory(options, ctx)


def plugin_spec(
    name: str,
    description: str,
    options: type[OptionsT],
    factory: Callable[[OptionsT, BuildContext], Any],
    describe: Callable[[OptionsT, BuildContext], dict[str, Any]] | None = None,
    check: Callable[[OptionsT, BuildContext], None] | None = None,
) -> Spec[OptionsT]:
    """The one way a built-in plugin declares itself: ``PLUGIN = plugin_spec(...)``.

    ``describe(options, ctx)``, for heavy models, tells ``cellmonitor models
    list`` what it needs without loading the weights. ``check(options, ctx)``
    lets ``check-config`` find what only building would (a file the options
    name is missing or does not fit them), cheaply; it raises ConfigError.
    """
    return Spec(name, description, options, factory, describe, check)


@dataclass(frozen=True)
class PluginInfo:
    """One row of ``plugins list``: where a plugin comes from, and its error if broken."""

    kind: str
    name: str
    origin: str  # "entry point <dist> (<target>)" or "module:attr"
    description: str
    error: str | None


class Registry:
    """Finds plugin specs; built once by ``main()`` and passed down."""

    def __init__(self, plugin_paths: Iterable[Path] = ()):
        for p in plugin_paths:
            s = str(Path(p).resolve())
            if s not in sys.path:
                sys.path.insert(0, s)
        self._eps: dict[str, dict[str, metadata.EntryPoint]] = {k: {} for k in GROUPS}
        for kind, group in GROUPS.items():
            for ep in metadata.entry_points(group=group):
                self._eps[kind].setdefault(ep.name, ep)

    def names(self, kind: str) -> list[str]:
        """Installed plugin names of ``kind`` (entry points), sorted."""
        return sorted(self._eps[kind])

    def spec(self, kind: str, name: str) -> Any:
        """Import a plugin spec by entry-point name or ``"module:attr"``."""
        group = GROUPS[kind]
        try:
            if ":" in name:
                mod, _, attr = name.partition(":")
                obj: Any = importlib.import_module(mod)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            elif name in self._eps[kind]:
                obj = self._eps[kind][name].load()
            else:
                known = ", ".join(self.names(kind)) or "none"
                raise PluginError(
                    f"plugin {name!r} (group {group}): not found; known: {known}, or use 'module:attr'"
                )
        except PluginError:
            raise
        except Exception as e:  # import errors of third-party code are arbitrary
            raise PluginError(f"plugin {name!r} (group {group}): failed to load: {type(e).__name__}: {e}") from None
        for attr in ("Options", "build"):
            if not hasattr(obj, attr):
                raise PluginError(f"plugin {name!r} (group {group}): spec has no {attr!r}")
        return obj

    def options(self, kind: str, ref: PluginRef, source: str = "<config>", where: str = "") -> BaseModel:
        """``ref.options`` validated against the plugin's ``Options``.

        Raises
        ------
        PluginError
            Unknown plugin, or options that do not validate: one line per
            problem, ``source: where.options.key: message``; fatal (exit 78).
        """
        spec = self.spec(kind, ref.name)
        try:
            return spec.Options.model_validate(ref.options)
        except ValidationError as err:
            raise PluginError(format_validation_error(source, err, prefix=f"{where}.options")) from None

    def build(self, kind: str, ref: PluginRef, ctx: BuildContext, source: str = "<config>", where: str = "") -> Any:
        """Validate options and build the plugin; any failure is a PluginError."""
        spec = self.spec(kind, ref.name)
        opts = self.options(kind, ref, source, where or kind)
        try:
            return complete(kind, spec.build(opts, ctx))
        except PluginError:
            raise
        except Exception as e:
            raise PluginError(
                f"plugin {ref.name!r} (group {GROUPS[kind]}): failed to build: {type(e).__name__}: {e}"
            ) from None

    def list_plugins(self) -> list[PluginInfo]:
        """Every installed plugin; one that fails to import is listed with its error, never raised."""
        out = []
        for kind in GROUPS:
            for name, ep in sorted(self._eps[kind].items()):
                dist = ep.dist.name if ep.dist is not None else "?"
                origin = f"entry point {dist} ({ep.value})"
                try:
                    spec = ep.load()
                    out.append(PluginInfo(kind, name, origin, getattr(spec, "description", ""), None))
                except Exception as e:
                    out.append(PluginInfo(kind, name, origin, "", f"{type(e).__name__}: {e}"))
        return out

    def validate_config(self, cfg: Config, files: bool = True) -> list[str]:
        """Check every plugin the config names and its options; return problem lines.

        ``files``: also run each plugin's cheap ``check`` (files its options
        name exist and fit them); off for an example config whose files live
        on the lab's machine.
        """
        src = cfg.source_name
        problems: list[str] = []
        refs: list[tuple[str, PluginRef, str]] = [("segmenters", cfg.segmenter, "segmenter")]
        if cfg.reader.name != "auto":
            refs.append(("readers", cfg.reader, "reader"))
        for name, opts in cfg.readers.items():
            refs.append(("readers", PluginRef(name=name, options=opts), f"readers.{name}"))
        refs += [("encoders", r, f"encoders.{i}") for i, r in enumerate(cfg.encoders)]
        refs += [("sinks", r, f"sinks.{i}") for i, r in enumerate(cfg.sinks)]
        ctx = context_from(cfg, device="cpu")
        for kind, ref, where in refs:
            try:
                validated = self.options(kind, ref, src, where)
                check = getattr(self.spec(kind, ref.name), "check", None)
                if files and check is not None:
                    check(validated, ctx)
            except ConfigError as e:
                problems += [f"{src}: {where}: {line}" if not line.startswith(src) else line for line in e.lines]
            except Exception as e:  # a plugin's check must not crash check-config, run or replay
                problems.append(f"{src}: {where}: check failed: {type(e).__name__}: {' '.join(str(e).split())}")
        return problems
