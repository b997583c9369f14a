"""A model's per-sample input and output shapes: probed for `manifest create --from-script`, and checked against
a manifest's task at start-up, so a peer never trains a model its swarm's data cannot feed.

Both run one forward pass on zeros (batch of 2, eval mode, no gradients, on the model's device) and restore
the model's mode. torch is imported only when they run: the manifest package stays light.
"""

from __future__ import annotations

import math
from typing import Any

from quinkgl_cli.errors import ArchMismatch, NodeConfigError, UsageError
from quinkgl_cli.manifest.schema import TaskSpec

IMAGE_CHANNELS = (1, 3)  # grey and RGB: the image layouts a flattening model's first Linear may stand for


def probe_shapes(model: Any, input_shape: tuple[int, ...] | None) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """The per-sample input shape and the output shape ``model`` produces for it (None: not a single tensor; a
    regressor's one value per sample, a ``(batch,)`` output, is output shape 1 as `check_task_shapes` takes it).

    Without ``input_shape`` it is read from a leading ``nn.Linear``: ``in_features`` n is tried as a square
    image first (1,s,s) or (3,s,s) when n is s*s or 3*s*s, and kept only if the model accepts it (it flattens
    its input), else as the flat vector (n,). So MNIST's ``Flatten, Linear(784)`` gives 1,28,28 and a bare
    ``Linear(64)`` gives 64. Other first layers cannot tell their input size: a UsageError asks for
    ``--input-shape``.
    """
    from torch import nn

    if input_shape is not None:
        try:
            return input_shape, _per_sample(_output_shape(model, input_shape))
        except Exception as exc:  # the model's own code: any error means it refuses the shape
            raise NodeConfigError(
                f"the model rejects inputs of shape {_text(input_shape)}: {_cause(exc)}",
                "check --input-shape (per sample, without the batch dimension)",
            ) from exc
    first = _first_layer(model)
    if not isinstance(first, nn.Linear):
        raise _shape_error("the model's first layer does not tell its input size")
    candidates = [*_image_shapes(first.in_features), (first.in_features,)]
    failures: list[str] = []
    for shape in candidates:
        try:
            return shape, _per_sample(_output_shape(model, shape))
        except Exception as exc:  # a candidate the model refuses: the next one is tried, the causes are reported
            failures.append(f"{_text(shape)}: {_cause(exc)}")
    raise _shape_error(f"a forward pass failed on every guess ({'; '.join(failures)})")


def check_task_shapes(model: Any, task: TaskSpec, source: str) -> None:
    """Refuse (ArchMismatch, 5) a model that cannot take the task's input shape or gives another output shape.

    An output that is not one tensor (detection models return dicts or lists) is not compared.
    """
    try:
        out = _output_shape(model, task.input_shape)
    except Exception as exc:  # the model's own code: any error means it refuses the manifest's input shape
        raise ArchMismatch(
            f"the model from {source} does not accept the manifest's input shape {_text(task.input_shape)}: {_cause(exc)}",
            "use the script this manifest was made for, or recreate the manifest (--from-script fills the shapes)",
        ) from exc
    # A regressor's (batch,) output is one value per sample: the manifest writes it as output shape 1.
    if out is not None and out != task.output_shape and not (out == () and task.output_shape == (1,)):
        raise ArchMismatch(
            f"the model from {source} outputs {_text(out)} per sample, the manifest's output shape is {_text(task.output_shape)}",
            "use the script this manifest was made for, or recreate the manifest (--from-script fills the shapes)",
        )


def _per_sample(out: tuple[int, ...] | None) -> tuple[int, ...] | None:
    return (1,) if out == () else out


def output_kind(model: Any, input_shape: tuple[int, ...]) -> str:
    """The type name of what ``model`` returns for ``input_shape`` (says why a probe found no output shape)."""
    return type(_forward(model, input_shape)).__name__


def _output_shape(model: Any, input_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    import torch

    out = _forward(model, input_shape)
    return tuple(int(d) for d in out.shape[1:]) if isinstance(out, torch.Tensor) else None


def _forward(model: Any, input_shape: tuple[int, ...]) -> Any:
    import torch
    from torch import nn

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if isinstance(_first_layer(model), (nn.Embedding, nn.EmbeddingBag)):
        dtype = torch.long  # token ids
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.zeros((2, *input_shape), dtype=dtype, device=device))
    finally:
        model.train(was_training)


def _first_layer(model: Any) -> Any:
    """The first module holding parameters of its own and no submodules; a layer under ``weight_norm`` or
    ``spectral_norm`` (torch's parametrizations) counts as the layer it is, its ``parametrizations`` aside."""
    from torch.nn.utils import parametrize

    for m in model.modules():
        children = [name for name, _ in m.named_children() if name != "parametrizations"]
        if not children and (list(m.parameters(recurse=False)) or parametrize.is_parametrized(m)):
            return m
    return None


def _image_shapes(features: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for channels in IMAGE_CHANNELS:
        side = math.isqrt(features // channels)
        if features % channels == 0 and side > 1 and side * side * channels == features:
            shapes.append((channels, side, side))
    return shapes


def _text(shape: tuple[int, ...]) -> str:
    return ",".join(map(str, shape)) or "a scalar"


def _cause(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _shape_error(why: str) -> UsageError:
    return UsageError(f"cannot infer the input shape: {why}", "pass --input-shape, e.g. --input-shape 1,28,28")
