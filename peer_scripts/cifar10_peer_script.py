"""Peer script: CIFAR-10 with torchvision (the guide's example), a small CNN.

The script ships inside the package, so `quinkgl run --data cifar10` works from an installed wheel: read
``quinkgl_cli/peer_scripts/cifar10_peer_script.py`` for its hooks and script arguments. This file is the path
the guide and README use (``--script peer_scripts/cifar10_peer_script.py``) and exposes the very same hooks.
"""

from quinkgl_cli.peer_scripts.cifar10_peer_script import *  # noqa: F403
