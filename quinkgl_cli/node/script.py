"""Loading a user's peer script (`peer_script.py`) and calling its hooks.

A peer script is a plain Python file with two required hooks and four optional ones (the guide's contract):

    build_model(manifest, **script_args) -> nn.Module
    build_loaders(manifest, **script_args) -> (train_loader, val_loader[, own_loader])
    build_optimizer(manifest, model) -> optimizer | (optimizer, scheduler)  (optional)
    loss_fn(outputs, targets) -> loss tensor                               (optional)
    on_round_end(round_idx, metrics)                                       (optional)
    on_peer_discovered(peer_id)                                            (optional)
    on_aggregation_done(peer_ids, sample_count)                            (optional)

The script is the user's own code on the user's own machine: importing it runs it, by design. Nothing that
arrives from the network or from a checkpoint ever reaches this loader.

When ``build_optimizer`` is absent the node uses SGD with lr 0.05 and momentum 0.9 (the guide's scripts use
exactly that; it is a sound default for the small classifiers federated peers usually train); without
``loss_fn``, cross-entropy (mean squared error for regression). Both are used the same way wherever a node is
built (`quinkgl_cli.node.wiring`). A scheduler ``build_optimizer`` returns beside its optimizer steps once per round
after local training, and is checkpointed (`quinkgl_cli.node.lrschedule`).

``own_loader``, when a script returns one, is test data drawn from this peer's own distribution (say, a held-out
slice of its own data): the personal model's ``own_accuracy`` is measured on it. Without it, ``own_accuracy`` is
estimated on the validation set, reweighted to the peer's label shares (`quinkgl_cli.node.owneval`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from quinkgl_cli.errors import IOFailure, NodeConfigError

if TYPE_CHECKING:
    from quinkgl_cli.node.lrschedule import Training

REQUIRED_HOOKS = ("build_model", "build_loaders")
OPTIONAL_HOOKS = ("build_optimizer", "on_round_end", "on_peer_discovered", "on_aggregation_done")
DEFAULT_LR = 0.05
DEFAULT_MOMENTUM = 0.9


@dataclass
class PeerScript:
    """The hooks of one loaded peer script. Optional hooks are ``None`` when the script does not define them."""

    path: Path
    module: ModuleType
    build_model_fn: Callable[..., Any]
    build_loaders_fn: Callable[..., Any]
    build_optimizer_fn: Callable[..., Any] | None = None
    on_round_end: Callable[[int, dict[str, Any]], Any] | None = None
    on_peer_discovered: Callable[[str], Any] | None = None
    on_aggregation_done: Callable[[list[str], int], Any] | None = None
    _task_checked: bool = field(default=False, init=False, repr=False)

    @property
    def loss_fn(self) -> Callable[[Any, Any], Any] | None:
        """The script's ``loss_fn(outputs, targets)``, its return checked (`_checked_loss`), or None when it has none."""
        fn = getattr(self.module, "loss_fn", None)
        return _checked_loss(fn, self.path.name) if callable(fn) else None

    def build_model(self, manifest: Any, **script_args: str) -> Any:
        """Call ``build_model``; it must return a ``torch.nn.Module`` that fits the manifest's task shapes
        (ArchMismatch, 5, when it does not; not checked when ``manifest`` is None)."""
        from torch import nn

        with _hook(f"build_model in {self.path.name}", "fix the peer script or its --script-arg values"):
            model = self.build_model_fn(manifest, **script_args)
        if not isinstance(model, nn.Module):
            raise NodeConfigError(
                f"build_model in {self.path.name} returned {type(model).__name__}, not a torch.nn.Module",
                "return the model instance from build_model",
            )
        task = getattr(manifest, "task", None)
        if task is not None and not self._task_checked:
            # Once per script: the simulator builds one model per peer from the same hook and arguments.
            from quinkgl_cli.manifest.shapes import check_task_shapes

            check_task_shapes(model, task, self.path.name)
            self._task_checked = True
        return model

    def build_loaders(self, manifest: Any, **script_args: str) -> Loaders:
        """Call ``build_loaders``; it must return ``(train_loader, val_loader)`` or ``(train_loader, val_loader,
        own_loader)``, iterables of (x, y) batches.

        ``val_loader`` may be None (no validation data: the round's val_loss / val_accuracy stay empty), and so may
        ``own_loader`` (``own_accuracy`` is then estimated on the validation set)."""
        with _hook(f"build_loaders in {self.path.name}", "fix the peer script or its --script-arg values"):
            result = self.build_loaders_fn(manifest, **script_args)
        if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
            raise NodeConfigError(
                f"build_loaders in {self.path.name} must return (train_loader, val_loader) or (train_loader, "
                f"val_loader, own_loader), got {_shape(result)}",
                "return a 2-tuple (or a 3-tuple with the peer's own test data) of loaders",
            )
        loaders = Loaders(*result)
        for label, loader in zip(Loaders._fields, loaders, strict=True):
            if loader is None and label != "train":
                continue  # no validation (or own test) data: those metrics stay empty or are estimated
            if loader is None or not hasattr(loader, "__iter__"):
                raise NodeConfigError(
                    f"build_loaders in {self.path.name}: {label}_loader is not iterable ({type(loader).__name__})",
                    "return torch DataLoaders or any iterables of (inputs, targets) batches",
                )
        if _known_len(loaders.train) == 0:
            # A peer without training data would run every round, share an untrained model and exit 0.
            dropped = _dropped(loaders.train)
            raise NodeConfigError(
                f"build_loaders in {self.path.name} returned an empty train_loader (0 batches{dropped})"
                f"{_args(script_args)}", "build the loader with drop_last=False or a smaller batch_size" if dropped
                else "check the data path and --script-arg values the script reads",
            )
        return loaders

    def build_optimizer(self, manifest: Any, model: Any) -> Any:
        """The optimizer of `build_training`, for callers that train without rounds (benchmarks, warm-ups)."""
        return self.build_training(manifest, model).optimizer

    def build_training(self, manifest: Any, model: Any) -> Training:
        """The script's optimizer for ``model`` and its learning-rate scheduler, if it returns one
        (`quinkgl_cli.node.lrschedule`), or SGD(lr=0.05, momentum=0.9) and none when the hook is absent."""
        import torch

        from quinkgl_cli.node.lrschedule import Training, check_training

        if self.build_optimizer_fn is None:
            return Training(torch.optim.SGD(model.parameters(), lr=DEFAULT_LR, momentum=DEFAULT_MOMENTUM))
        where = f"build_optimizer in {self.path.name}"
        with _hook(where, "fix the peer script"):
            value = self.build_optimizer_fn(manifest, model)
        return check_training(value, where)


class Loaders(NamedTuple):
    """What ``build_loaders`` returned: training data, the swarm's validation data, this peer's own test data."""

    train: Any
    val: Any
    own: Any = None


def _dropped(loader: Any) -> str:
    """Why a loader over samples has no batch: ``drop_last`` dropped its one short batch (say so; else nothing)."""
    samples = _known_len(getattr(loader, "dataset", None))
    if getattr(loader, "drop_last", False) and samples:
        return f": drop_last=True drops all {samples} samples, fewer than batch_size={getattr(loader, 'batch_size', '?')}"
    return ""


def _args(script_args: dict[str, str]) -> str:
    """The script arguments a call was made with, for an error about one peer's data (the simulator calls
    build_loaders once per peer with its shard)."""
    return f" for {' '.join(f'{k}={v}' for k, v in script_args.items())}" if script_args else ""


def _known_len(loader: Any) -> int | None:
    """len(loader), or None for a loader that cannot tell (an iterable-style dataset, a generator)."""
    try:
        return len(loader)
    except TypeError:
        return None


def _shape(result: Any) -> str:
    """A wrong return value, named for the error: its type, and its length when it is a sequence."""
    if isinstance(result, (tuple, list)):
        return f"a {type(result).__name__} of {len(result)}"
    return type(result).__name__


def _checked_loss(fn: Callable[[Any, Any], Any], script: str) -> Callable[[Any, Any], Any]:
    """``fn`` with its return checked: training backpropagates one value computed from the outputs, so a float,
    per-sample losses or a detached tensor is a one-line NodeConfigError (7) at the batch that shows it (the dry
    run's first), not a traceback from ``loss.item()`` or ``backward()`` rounds later."""

    @functools.wraps(fn)
    def loss(outputs: Any, targets: Any) -> Any:
        value = fn(outputs, targets)
        problem = _loss_problem(value, outputs)
        if problem is not None:
            raise NodeConfigError(
                f"loss_fn in {script} returned {problem}",
                "return the batch's loss as one tensor computed from the outputs (a mean over the batch, as "
                "reduction='mean' gives)",
            )
        return value

    return loss


def _loss_problem(value: Any, outputs: Any) -> str | None:
    import torch

    if not isinstance(value, torch.Tensor):
        return f"a {type(value).__name__}, not a tensor"
    if value.numel() != 1:
        return f"{value.numel()} values (shape {'x'.join(map(str, value.shape))}), not one: per-sample losses?"
    if isinstance(outputs, torch.Tensor) and outputs.requires_grad and not value.requires_grad:
        return "a tensor cut off from the model's outputs (no gradient reaches the model)"
    return None


@contextmanager
def _hook(what: str, hint: str) -> Iterator[None]:
    """Run a build hook: whatever it raises, or a ``sys.exit`` in it, is a one-line NodeConfigError (7).

    Only Ctrl-C passes through: a script must not end the daemon (or `manifest arch-hash`) silently with an exit
    code of its own.
    """
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise NodeConfigError(f"{what} failed: {_cause(exc)}", hint) from exc


def _cause(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _module_name(path: Path) -> str:
    digest = hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:12]
    stem = "".join(ch if ch.isalnum() else "_" for ch in path.stem)
    return f"quinkgl_peer_script_{stem}_{digest}"


def check_script_file(path: Path) -> Path:
    """``path`` (user expanded) when it is a readable file, else IOFailure (2); cheap, so the CLI checks it before
    the slow start-up (trust, torch) as well."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IOFailure(f"peer script {path} is a directory", "pass --script with the path of your peer_script.py")
    if not path.is_file():
        raise IOFailure(f"peer script {path} not found", "pass --script with the path of your peer_script.py")
    try:
        # Opened here so that a file we may not read is an I/O error (2), not an import failure inside the script (7).
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise IOFailure(f"cannot read peer script {path}: {exc.strerror}", "check its permissions") from exc
    return path


def load_script(path: Path) -> PeerScript:
    """Import the peer script at ``path`` under a module name unique to that path and collect its hooks.

    Missing or unreadable file: IOFailure (2). Syntax or import error inside the script: NodeConfigError (7) with the cause
    on one line. A required hook missing or not callable, or an optional hook that is not callable: NodeConfigError (7)
    naming it.
    """
    path = check_script_file(path).resolve()
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise NodeConfigError(f"cannot import peer script {path}", "it must be a .py file")
    module = importlib.util.module_from_spec(spec)
    # Registered before exec: dataclasses and typing inside the script look their module up in sys.modules.
    sys.modules[name] = module
    # The script's own directory goes on the path (and stays: hooks may import helpers lazily), so a script
    # can import modules that sit beside it.
    script_dir = str(path.parent)
    if script_dir not in sys.path:
        sys.path.insert(0, script_dir)
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # a sys.exit at import too: only Ctrl-C passes through
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        if isinstance(exc, SyntaxError):
            raise NodeConfigError(
                f"peer script {path.name} has a syntax error at line {exc.lineno}: {exc.msg}", "fix the script"
            ) from exc
        raise NodeConfigError(
            f"peer script {path.name} failed to import: {_cause(exc)}", "fix the script or install what it imports"
        ) from exc

    hooks: dict[str, Callable[..., Any] | None] = {}
    missing = [h for h in REQUIRED_HOOKS if not callable(getattr(module, h, None))]
    if missing:
        raise NodeConfigError(
            f"peer script {path.name} lacks required hook{'s' if len(missing) > 1 else ''} {', '.join(missing)} (or it is not callable)",
            "define build_model(manifest, **kwargs) and build_loaders(manifest, **kwargs)",
        )
    for hook in OPTIONAL_HOOKS:
        value = getattr(module, hook, None)
        if value is not None and not callable(value):
            raise NodeConfigError(f"peer script {path.name}: {hook} is not callable", f"make {hook} a function or remove it")
        hooks[hook] = value
    return PeerScript(
        path=path,
        module=module,
        build_model_fn=module.build_model,
        build_loaders_fn=module.build_loaders,
        build_optimizer_fn=hooks["build_optimizer"],
        on_round_end=hooks["on_round_end"],
        on_peer_discovered=hooks["on_peer_discovered"],
        on_aggregation_done=hooks["on_aggregation_done"],
    )
