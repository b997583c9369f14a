"""``PyTorchModel``: the guide's wrapper that tells a model's architecture hash and data schema hash.

``PyTorchModel(model).get_data_schema_hash()`` is the ``data_schema_hash`` that ``quinkgl manifest create
--from-script`` writes for the same model (same task and label type): the input shape is probed from the model
(a flattening ``Linear(784)`` reads as 1,28,28) unless given, the output shape comes from one forward pass.
"""

from __future__ import annotations

from typing import Any

from quinkgl_cli.manifest.arch_hash import compute_arch_hash
from quinkgl_cli.manifest.canonical import data_schema_hash
from quinkgl_cli.manifest.create import LABEL_TYPES, TASK_TYPES
from quinkgl_cli.manifest.schema import TaskSpec
from quinkgl_cli.manifest.shapes import probe_shapes

__all__ = ["PyTorchModel"]


class PyTorchModel:
    """A ``torch.nn.Module`` with the hashes a swarm manifest records for it.

    ``task_type`` takes the CLI's forms (``class``, ``regr``, ``seg``, ``det`` or the long names) and
    ``label_type`` ``integer``, ``float`` or ``one_hot``; a wrong value raises ValueError. The shapes are probed
    once, on first use.
    """

    def __init__(
        self,
        model: Any,
        *,
        input_shape: tuple[int, ...] | None = None,
        output_shape: tuple[int, ...] | None = None,
        task_type: str = "classification",
        label_type: str = "integer",
    ) -> None:
        from torch import nn

        if not isinstance(model, nn.Module):
            raise TypeError(f"PyTorchModel needs a torch.nn.Module, got {type(model).__name__}")
        task = TASK_TYPES.get(task_type.strip().lower())
        label = LABEL_TYPES.get(label_type.strip().lower())
        if task is None:
            raise ValueError(f"task_type {task_type!r} is not one of {', '.join(sorted(set(TASK_TYPES)))}")
        if label is None:
            raise ValueError(f"label_type {label_type!r} is not one of integer, float, one_hot")
        self.model = model
        self.task_type = task
        self.label_type = label
        self._input_shape = tuple(input_shape) if input_shape is not None else None
        self._output_shape = tuple(output_shape) if output_shape is not None else None
        self._task: TaskSpec | None = None

    def get_arch_hash(self) -> str:
        """``sha256:<hex>`` of the model's structure, as ``compute_arch_hash`` gives it."""
        return compute_arch_hash(self.model)

    def get_task(self) -> TaskSpec:
        """The manifest ``task`` this model implies (input and output shapes probed where not given)."""
        if self._task is None:
            probed_in, probed_out = probe_shapes(self.model, self._input_shape)
            out = self._output_shape if self._output_shape is not None else probed_out
            if out is None:
                raise ValueError("the model's output is not one tensor with a per-sample shape: pass output_shape=")
            self._task = TaskSpec(type=self.task_type, input_shape=probed_in, output_shape=out, label_type=self.label_type)
        return self._task

    def get_input_shape(self) -> tuple[int, ...]:
        return self.get_task().input_shape

    def get_output_shape(self) -> tuple[int, ...]:
        return self.get_task().output_shape

    def get_data_schema_hash(self) -> str:
        """``sha256:<hex>`` of the task (type, input and output shapes, label type): a manifest's ``data_schema_hash``."""
        return data_schema_hash(self.get_task())
