"""The (inputs, targets) of one batch as a peer script's loader yields it: a sequence whose first two items are
those (more items, such as lengths or ids, are ignored), or a dict keyed ``x``/``input`` and ``y``/``target``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from quinkgl_cli.errors import NodeConfigError

INPUT_KEYS = ("x", "input")
TARGET_KEYS = ("y", "target")


def batch_parts(batch: Any) -> tuple[Any, Any]:
    """(inputs, targets) of ``batch``; a one-line `NodeConfigError` (exit 7) naming what it got otherwise."""
    if isinstance(batch, Mapping):
        x, y = _first(batch, INPUT_KEYS), _first(batch, TARGET_KEYS)
        if x is None or y is None:
            keys = ",".join(sorted(str(k) for k in batch)) or "none"
            raise NodeConfigError(
                f"a dict batch needs an inputs key ({' or '.join(INPUT_KEYS)}) and a targets key "
                f"({' or '.join(TARGET_KEYS)}); this one has keys {keys}",
                "rename the keys the dataset returns, or make it yield (inputs, targets) tuples")
        return x, y
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise NodeConfigError(f"a batch must be (inputs, targets), got {type(batch).__name__}",
                          "make build_loaders return loaders that yield (x, y) pairs")


def _first(batch: Mapping[Any, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if batch.get(key) is not None:
            return batch[key]
    return None
