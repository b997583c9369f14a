"""The bundled digits peer script: its data without importing scikit-learn, the shared validation split, and that it
ships inside the package (the demo must run from an installed wheel)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import quinkgl_cli
from quinkgl_cli.node import localswarm as ls
from quinkgl_cli.node.script import load_script
from quinkgl_cli.peer_scripts import digits_peer_script as digits

ROOT = Path(__file__).resolve().parents[1]


def test_arrays_equal_load_digits_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.datasets import load_digits

    want = load_digits()
    assert digits._digits_csv() is not None  # the fast path is the one exercised here
    for data, target in (digits.load_digits_arrays(), _fallback(monkeypatch)):
        assert data.dtype == want.data.dtype and data.shape == (1797, 64) and np.array_equal(data, want.data)
        assert target.dtype == want.target.dtype and np.array_equal(target, want.target)


def _fallback(monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray]:
    monkeypatch.setattr(digits, "_digits_csv", lambda: None)  # no CSV where expected: scikit-learn loads it
    return digits.load_digits_arrays()


def test_validation_split_takes_a_fifth_of_every_class_and_is_the_same_everywhere() -> None:
    y = digits.load_digits_arrays()[1]
    train, val = digits.validation_split(y)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(y)))  # disjoint, covering
    counts, val_counts = np.bincount(y), np.bincount(y[val], minlength=10)
    assert np.all(np.abs(val_counts - 0.2 * counts) <= 0.5) and val_counts.sum() == 359
    again = digits.validation_split(y)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    other = digits.validation_split(y, seed=1)[1]
    assert not np.array_equal(other, val)  # the seed picks the samples, not only the counts
    # Pinned: a peer on another machine (another NumPy) must validate on exactly these images.
    assert hashlib.sha256(val.astype("<i8").tobytes()).hexdigest() == (
        "83ac77e38f69c6509975508efe447b0492dde793cd6876336a89ed4df998808d")


def test_loaders_do_not_import_scikit_learn() -> None:
    code = ("import sys; from pathlib import Path; from quinkgl_cli.node.script import load_script\n"
            "train, val, _ = load_script(Path(sys.argv[1])).build_loaders(None, shard='1', num_shards='3', partition='shards:3')\n"
            "print(len(train.dataset), len(val.dataset), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "peer_scripts" / "digits_peer_script.py")],
                         capture_output=True, text=True, timeout=120, check=True)
    n_train, n_val, imported = out.stdout.split()
    assert imported == "False" and n_val == "359" and 0 < int(n_train) < 1438


def test_checkout_path_exposes_the_packaged_hooks() -> None:
    script = load_script(ROOT / "peer_scripts" / "digits_peer_script.py")
    assert script.build_loaders_fn is digits.build_loaders and script.build_optimizer_fn is digits.build_optimizer
    assert script.on_round_end is digits.on_round_end and script.on_peer_discovered is digits.on_peer_discovered
    assert ls.DIGITS_SCRIPT == Path(digits.__file__).resolve()


def test_wheel_ships_the_demo_script(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "quinkgl_cli", src / "quinkgl_cli", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    inside = ls.DIGITS_SCRIPT.relative_to(Path(quinkgl_cli.__file__).resolve().parent.parent).as_posix()
    assert inside == "quinkgl_cli/peer_scripts/digits_peer_script.py" and inside in names
