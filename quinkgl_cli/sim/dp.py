"""Local differential privacy for simulated nodes, until the node applies the manifest's privacy stage itself.

The mechanism is the project's own (`quinkgl_cli.strategies.privacy.LocalDP`: clip the round's update, add
Gaussian noise calibrated from epsilon and delta, continue from the noised model), attached around
`Node.train_round` exactly where the node's sharing pipeline applies it (at the end of local training). A node that
already carries that pipeline (``node.sharing``) is left alone, so DP is never applied twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quinkgl_cli.errors import UsageError
from quinkgl_cli.strategies.privacy import LocalDP
from quinkgl_cli.tensors import flatten, load_flat


def install_local_dp(node: Any, seed: int) -> bool:
    """Noise ``node``'s training updates per its manifest; False when DP is off or the node does it itself."""
    if getattr(node, "sharing", None) is not None:
        return False
    dp = LocalDP(node.manifest.privacy, seed=seed)
    if not dp.enabled:
        return False
    if node.manifest.privacy.dp_total_epsilon is not None:
        raise UsageError("dp_total_epsilon needs the node's own privacy stage, which this build lacks",
                         "simulate without a total privacy budget")
    honest_train: Callable[..., Any] = node.train_round

    def train_round(*args: Any, **kwargs: Any) -> Any:
        start = flatten(node.model)
        stats = honest_train(*args, **kwargs)
        load_flat(node.model, dp.sanitize(start, flatten(node.model)))
        return stats

    node.train_round = train_round
    node.local_dp = dp
    return True
