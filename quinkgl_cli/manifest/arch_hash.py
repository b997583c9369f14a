"""`compute_arch_hash(model)`: a hash of a PyTorch model's structure, never of its weights.

What is hashed, module by module in ``named_modules()`` order:
- the module's path in the tree and its class name;
- its ``extra_repr()`` (how torch itself describes a layer's settings: features, kernel size, stride, padding,
  eps, momentum, negative_slope, dropout p, approximate, ...), minus ``inplace`` (a memory choice that does
  not change results) and minus memory addresses;
- the module's plain public attributes (bool, int, float, str, None and tuples or lists of them), for torch's
  layers (``num_heads``, ``batch_first``, ``norm_first``...: some print none of them) and the user's own alike
  (``self.kind = "tanh"``, ``self.scale = 2.0``): they usually steer ``forward``. ``training`` and private
  (``_``) attributes are not hashed. So a user's module must not keep machine-specific values (a data path,
  ``"cuda"``) in public attributes, or peers on other machines get another hash;
- functions stored as attributes (``self.act = torch.tanh``), by name;
- the names, shapes and dtypes of its own parameters and buffers.

So an nn.ReLU and an nn.Tanh in the same place hash differently, as do two Linear layers of other sizes.
Functional calls made inside a user's ``forward`` (``F.relu(x)``) are code, not structure, and are not
seen: put activations in modules when the swarm must agree on them. The hash is stable across processes and
machines that run the same torch version (layers describe themselves through torch).
"""

from __future__ import annotations

import hashlib
import json
import re
import types
from typing import Any

from quinkgl_cli.errors import NodeConfigError

ARCH_HASH_VERSION = 1
_INPLACE = re.compile(r"(,\s*)?\binplace=(True|False)\b(,\s*)?")
_ADDRESS = re.compile(r"\s+at 0x[0-9a-fA-F]+")
_SKIP_ATTRS = frozenset({"training", "inplace"})


def compute_arch_hash(model: Any) -> str:
    """``sha256:<hex>`` of ``model``'s structure (a ``torch.nn.Module``)."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise NodeConfigError(
            f"compute_arch_hash needs a torch.nn.Module, got {type(model).__name__}", "pass the model instance"
        )
    from torch.nn.parameter import UninitializedParameter

    lazy = [name for name, p in model.named_parameters() if isinstance(p, UninitializedParameter)]
    if lazy:
        raise NodeConfigError(
            f"the model has uninitialized (lazy) parameters ({lazy[0]}): their shapes are not known yet",
            "give the layer sizes (nn.Linear instead of nn.LazyLinear), or run one forward pass in build_model",
        )
    doc = {"arch_hash_version": ARCH_HASH_VERSION, "modules": describe_model(model)}
    data = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return "sha256:" + hashlib.sha256(data.encode("ascii")).hexdigest()


def describe_model(model: Any) -> list[dict[str, Any]]:
    """The per-module records :func:`compute_arch_hash` hashes (useful to see why two hashes differ)."""
    return [_describe(path, module) for path, module in model.named_modules()]


def _describe(path: str, module: Any) -> dict[str, Any]:
    cls = type(module)
    attrs: dict[str, Any] = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name in _SKIP_ATTRS:
            continue
        if _is_plain(value):
            attrs[name] = _plain(value)
        elif _is_function(value):
            attrs[name] = "fn:" + _function_name(value)
    return {
        "path": path,
        "class": cls.__name__,
        "config": _config(module),
        "attrs": attrs,
        "params": [[n, list(p.shape), str(p.dtype)] for n, p in module.named_parameters(recurse=False)],
        "buffers": [[n, list(b.shape), str(b.dtype)] for n, b in module.named_buffers(recurse=False)],
    }


def _config(module: Any) -> str:
    text = module.extra_repr()
    text = _INPLACE.sub(lambda m: ", " if m.group(1) and m.group(3) else "", text)
    return _ADDRESS.sub("", text).strip()


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return type(value).__name__ == "dtype" and type(value).__module__ == "torch"


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _is_function(value: Any) -> bool:
    return isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType))


def _function_name(value: Any) -> str:
    module = getattr(value, "__module__", None) or ""
    qualname = str(getattr(value, "__qualname__", None) or getattr(value, "__name__", "?"))
    # A peer script's module name embeds its path, which differs between machines: torch's names are kept.
    prefix = module + "." if module.startswith("torch") else ""
    return prefix + qualname
