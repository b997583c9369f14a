"""Peer script: MNIST digits with torchvision (the guide's example), MLP 784-128-64-10.

The script ships inside the package, so `quinkgl run --data mnist` works from an installed wheel: read
``quinkgl_cli/peer_scripts/mnist_peer_script.py`` for its hooks and script arguments. This file is the path the
guide and README use (``--script peer_scripts/mnist_peer_script.py``) and exposes the very same hooks.
"""

from quinkgl_cli.peer_scripts.mnist_peer_script import *  # noqa: F403
