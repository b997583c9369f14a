"""Peer scripts shipped inside the package: the standard model and data set behind `quinkgl run --data NAME`
(the guide's mode A) and `quinkgl demo`, usable from an installed wheel. The checkout's ``peer_scripts/*.py``
re-export these.

- ``digits``: scikit-learn's bundled handwritten digits, MLP 64-32-10; offline.
- ``mnist``: torchvision's MNIST, MLP 784-128-64-10 (the guide's example).
- ``cifar10``: torchvision's CIFAR-10, a small CNN (the guide's example).

The torchvision data sets are read from ``--script-arg data_root=DIR`` and downloaded only with
``--script-arg download=true``; without torchvision or the files, start-up stops with a message saying so.
"""

from __future__ import annotations

from pathlib import Path

from quinkgl_cli.errors import UsageError

_HERE = Path(__file__).resolve().parent
DATASETS = ("digits", "mnist", "cifar10")


def builtin_script(name: str, flag: str = "--data") -> Path:
    """The shipped peer script for data set ``name`` (case-insensitive)."""
    key = name.strip().lower()
    if key not in DATASETS:
        raise UsageError(f"{flag} {name!r} is not a data set quinkgl ships", f"use one of {', '.join(DATASETS)}, or --script FILE")
    return _HERE / f"{key}_peer_script.py"
