"""compute_arch_hash: structure (not weights) decides the hash, and the hash is stable across processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from quinkgl_cli.errors import NodeConfigError, UsageError
from quinkgl_cli.manifest import compute_arch_hash
from quinkgl_cli.manifest.shapes import probe_shapes

REPO = Path(__file__).resolve().parents[1]


def mlp(act: type[nn.Module] = nn.ReLU, hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), act(), nn.Linear(hidden, 10))


def test_format_and_weights_do_not_matter() -> None:
    torch.manual_seed(0)
    a = mlp()
    torch.manual_seed(1)
    b = mlp()
    assert not torch.equal(a[1].weight, b[1].weight)
    h = compute_arch_hash(a)
    assert h.startswith("sha256:") and len(h) == 7 + 64
    assert compute_arch_hash(b) == h
    a.eval()
    assert compute_arch_hash(a) == h  # train/eval mode is not structure


@pytest.mark.parametrize(
    "left, right",
    [
        (lambda: mlp(nn.ReLU), lambda: mlp(nn.Tanh)),
        (lambda: mlp(hidden=16), lambda: mlp(hidden=17)),
        (lambda: nn.LeakyReLU(0.01), lambda: nn.LeakyReLU(0.2)),
        (lambda: nn.Conv2d(1, 4, 3), lambda: nn.Conv2d(1, 4, 5)),
        (lambda: nn.Conv2d(1, 4, 3), lambda: nn.Conv2d(1, 4, 3, stride=2)),
        (lambda: nn.Conv2d(1, 4, 3), lambda: nn.Conv2d(1, 4, 3, padding=1)),
        (lambda: nn.MaxPool2d(2), lambda: nn.AvgPool2d(2)),
        (lambda: nn.Dropout(0.1), lambda: nn.Dropout(0.5)),
        (lambda: nn.BatchNorm1d(8), lambda: nn.BatchNorm1d(8, eps=1e-3)),
        (lambda: nn.BatchNorm1d(8), lambda: nn.BatchNorm1d(8, momentum=0.3)),
        (lambda: nn.GELU(), lambda: nn.GELU(approximate="tanh")),
        (lambda: nn.Linear(4, 4), lambda: nn.Linear(4, 4, bias=False)),
        (lambda: nn.Linear(4, 4), lambda: nn.Linear(4, 4).double()),
        (lambda: nn.MultiheadAttention(8, 2), lambda: nn.MultiheadAttention(8, 4)),
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()), lambda: nn.Sequential(nn.ReLU(), nn.Linear(4, 4))),
    ],
)
def test_behaviour_changing_settings_change_the_hash(left, right) -> None:
    assert compute_arch_hash(left()) != compute_arch_hash(right())


def test_inplace_is_not_structure() -> None:
    assert compute_arch_hash(nn.Sequential(nn.ReLU(inplace=True), nn.Dropout(0.2, inplace=True))) == compute_arch_hash(
        nn.Sequential(nn.ReLU(), nn.Dropout(0.2))
    )


def test_function_attributes_count() -> None:
    class Act(nn.Module):
        def __init__(self, fn) -> None:
            super().__init__()
            self.fn = fn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fn(x)

    assert compute_arch_hash(Act(torch.relu)) != compute_arch_hash(Act(torch.tanh))


class Act(nn.Module):
    """A user's module that picks its activation by name: the string is behaviour."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._calls = 0  # private: bookkeeping, not structure

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) if self.kind == "relu" else torch.tanh(x)


class Scale(nn.Module):
    def __init__(self, factor: float, dims: tuple[int, ...] = (1,)) -> None:
        super().__init__()
        self.factor = factor
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@pytest.mark.parametrize(
    "left, right",
    [
        (lambda: Act("relu"), lambda: Act("tanh")),
        (lambda: Scale(1.0), lambda: Scale(2.0)),
        (lambda: Scale(1.0, (1,)), lambda: Scale(1.0, (1, 2))),
        (lambda: nn.Sequential(nn.Linear(4, 4), Act("relu")), lambda: nn.Sequential(nn.Linear(4, 4), Act("tanh"))),
    ],
)
def test_plain_attributes_of_user_modules_change_the_hash(left, right) -> None:
    assert compute_arch_hash(left()) != compute_arch_hash(right())


def test_private_attributes_and_mode_of_user_modules_do_not_count() -> None:
    a, b = Act("relu"), Act("relu")
    b._calls = 7
    b.eval()
    assert compute_arch_hash(a) == compute_arch_hash(b)


def test_not_a_module() -> None:
    with pytest.raises(NodeConfigError):
        compute_arch_hash(object())


_SCRIPT = textwrap.dedent(
    """
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
            self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(4 * 4 * 4, 10))

        def forward(self, x):
            return self.head(self.features(x))

    def build_model(manifest, **kwargs):
        return Net()

    def build_loaders(manifest, **kwargs):
        return [], []
    """
)


def test_stable_across_processes(tmp_path: Path) -> None:
    script = tmp_path / "peer_script.py"
    script.write_text(_SCRIPT)
    code = (
        "import sys; from quinkgl_cli.node.script import load_script; from quinkgl_cli.manifest import compute_arch_hash;"
        "print(compute_arch_hash(load_script(sys.argv[1]).build_model(None)))"
    )
    env_hashes = []
    for seed in ("12345",):  # another hash seed: nothing may depend on the iteration order of str-keyed sets
        out = subprocess.run(
            [sys.executable, "-c", code, str(script)],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
            timeout=120,
        )
        env_hashes.append(out.stdout.strip())
    from quinkgl_cli.node.script import load_script

    here = compute_arch_hash(load_script(script).build_model(None))
    assert env_hashes == [here]


def test_probe_shapes() -> None:
    assert probe_shapes(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)), None) == ((64,), (3,))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 8 * 8, 5))
    conv.train()
    assert probe_shapes(conv, (1, 8, 8)) == ((1, 8, 8), (5,))
    assert conv.training  # mode restored
    with pytest.raises(UsageError, match="cannot infer the input shape"):
        probe_shapes(conv, None)
    with pytest.raises(NodeConfigError, match="rejects inputs"):
        probe_shapes(conv, (1, 9, 9))


def test_importing_manifest_package_does_not_import_torch() -> None:
    code = (
        "import sys, quinkgl_cli.manifest as m, quinkgl_cli.manifest.trust, quinkgl_cli.manifest.create;"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "from quinkgl_cli.manifest import compute_arch_hash; assert callable(compute_arch_hash)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, timeout=60)


def test_probe_shapes_embedding_takes_token_ids() -> None:
    model = nn.Sequential(nn.Embedding(100, 8), nn.Flatten(), nn.Linear(8 * 5, 3))
    assert probe_shapes(model, (5,)) == ((5,), (3,))


def test_lazy_layers_are_refused_with_a_hint() -> None:
    with pytest.raises(NodeConfigError, match="lazy"):
        compute_arch_hash(nn.Sequential(nn.LazyLinear(3)))
