"""Peer script: handwritten digits (scikit-learn's bundled digits, offline), MLP 64-32-10.

The script itself ships inside the package, so `quinkgl demo` works from an installed wheel: read
``quinkgl_cli/peer_scripts/digits_peer_script.py`` for its hooks and script arguments. This file is the path the
guide and README use (``--script peer_scripts/digits_peer_script.py``) and exposes the very same hooks.
"""

from quinkgl_cli.peer_scripts.digits_peer_script import *  # noqa: F403
