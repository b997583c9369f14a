"""The (inputs, targets) of one batch as a peer script's loader yields it: a sequence whose first two items are
those (more items, such as lengths or ids, are ignored), or a dict keyed ``x``/``input`` and ``y``/``target``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
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


def batch_failed(exc: Exception, x: Any, y: Any, input_shape: tuple[int, ...], where: str,
                 class_ids: int | None = None) -> NodeConfigError:
    """The model or its loss raised ``exc`` on a batch of the ``where`` loader: a one-line error (exit 7) with the
    batch's shapes beside the task's, and the line of the peer script that raised, if one did. Integer targets
    outside the task's ``class_ids`` (0..class_ids-1; None for regression) are named instead: they are what the
    loss refused (cross-entropy's 'Target 12 is out of bounds')."""
    batch = f"{'an' if where[0] in 'aeiou' else 'a'} {where} batch"
    label = _label_outside(y, class_ids)
    if label is not None and class_ids is not None:
        return NodeConfigError(
            f"{batch} has label {label}, outside the task's {class_ids} "
            f"classes (labels 0..{class_ids - 1})",
            f"make build_loaders yield class ids 0..{class_ids - 1} (remap the labels), or recreate the manifest with "
            "one output per class",
        )
    want = "x".join(str(d) for d in input_shape)
    return NodeConfigError(
        f"the model failed on {batch} (inputs {_describe(x)}, targets {_describe(y)}; the manifest's "
        f"task takes inputs of {want} per sample): {type(exc).__name__}: {exc}{_script_line(exc)}",
        "make build_loaders yield what the model and the task's loss take, or fix the model",
    )


def _label_outside(y: Any, class_ids: int | None) -> int | None:
    """The first integer target outside 0..class_ids-1, or None."""
    import torch

    if class_ids is None or not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dtype == torch.bool:
        return None
    outside = y[(y < 0) | (y >= class_ids)]
    return int(outside.reshape(-1)[0]) if outside.numel() else None


def _describe(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {'x'.join(str(d) for d in value.shape) or 'scalar'}"
    return type(value).__name__


def _script_line(exc: BaseException) -> str:
    """`` at FILE:LINE`` of the innermost frame outside torch and quinkgl (the peer script's model), or ''."""
    import traceback

    inside = ("/torch/", "/quinkgl_cli/", "/quinkgl/")
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not any(p in f.filename.replace("\\", "/") for p in inside)]
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
