"""The guide's Python API: ``import quinkgl``, ``from quinkgl.manifest import compute_arch_hash``,
``from quinkgl.models import PyTorchModel``.

The code lives in ``quinkgl_cli`` (the distribution ``quinkgl-cli`` ships both packages); this package only
re-exports and adapts it under the names the guide documents, so the two can never disagree.
"""

from quinkgl_cli import GUIDE_VERSION, __version__

__all__ = ["GUIDE_VERSION", "__version__"]
