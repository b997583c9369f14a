"""From a manifest's strategy spec to a strategy object: imports the implementation the catalogue names.

Names and parameter schemas live in `manifest.catalogue` (manifest vocabulary, no torch); this module is
the strategies' side of it, so nothing in the manifest layer imports strategy code.
"""

from __future__ import annotations

import importlib
from typing import Any

from quinkgl_cli.manifest import strategy_params as p
from quinkgl_cli.manifest.catalogue import StrategyEntry, names, resolve, validate_params

__all__ = ["StrategyEntry", "build_params", "load", "names", "resolve", "validate_params"]


def load(entry: StrategyEntry) -> Any:
    """The strategy class the entry names (imported here, on first use)."""
    module, _, attr = entry.impl.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_params(entry: StrategyEntry, raw: dict[str, Any]) -> p.Params:
    """The full parameter object (defaults filled in) for building the strategy."""
    validate_params(entry, raw)
    return entry.params.model_validate(raw)
