"""Finds stages and providers by entry-point name or `package.module:Class` path, and builds them.

Built-ins register through entry points too (pyproject.toml), so third-party packages are peers.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any

from proxy.config import ConfigError

STAGES = "turnstile.stages"
PROVIDERS = "turnstile.providers"


def load(group: str, name: str, where: str) -> Any:
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{where}: cannot load {name!r}: {exc}") from None
        return obj
    found = entry_points(group=group, name=name)
    if not found:
        known = sorted(ep.name for ep in entry_points(group=group))
        raise ConfigError(f"{where}: no {group} named {name!r} (installed: {', '.join(known) or 'none'})")
    try:
        return next(iter(found)).load()
    except Exception as exc:  # a broken third-party package must name itself
        raise ConfigError(f"{where}: entry point {name!r} failed to load: {exc!r}") from None


def build(cls: Any, options: dict[str, Any], where: str, **provided: Any) -> Any:
    """`cls(**options)`, plus any of `provided` that the constructor asks for by name.

    Unknown or missing options fail here, at start-up, naming the stage.
    """
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [n for n in params if n not in provided and params[n].kind is not inspect.Parameter.VAR_KEYWORD]
    for key in options:
        if key in provided or (key not in params and not takes_any):
            raise ConfigError(f"{where}: unknown option {key!r} (options: {', '.join(accepted) or 'none'})")
    kwargs = dict(options)
    kwargs.update({k: v for k, v in provided.items() if k in params})
    try:
        inspect.signature(cls).bind(**kwargs) if params else None
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
