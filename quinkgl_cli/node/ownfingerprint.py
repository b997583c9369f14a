"""This peer's own data fingerprint: computed once at start when the manifest allows fingerprints.

Owns nothing mutable: the fingerprint body goes to each discovered peer (AffinityTopology), encoded once for all of
them (building 10,000 simulated peers encoded 2.5 million fingerprints before), and its label entropy rides on every
update (EntropyWeightedAvg). The entropy is a statistic of the label buckets, so with
``privacy.fingerprint`` false it stays home too and EntropyWeightedAvg weighs this peer by ``fallback_weight``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.nodelog import NodeLog, one_line
from quinkgl_cli.node.trainer import LossFn
from quinkgl_cli.strategies.fingerprint import fingerprint_for
from quinkgl_cli.transport.base import EncodedBody
from quinkgl_cli.transport.common import encoded


@dataclass(frozen=True)
class OwnFingerprint:
    body: dict[str, Any] | None = None
    label_entropy: float | None = None
    encoded: EncodedBody | None = None  # ``body`` as every send carries it


def own_fingerprint(manifest: Manifest, train_loader: Iterable[Any], model: nn.Module, loss_fn: LossFn,
                    noise_seed: int | None, log: NodeLog) -> OwnFingerprint:
    if not manifest.privacy.fingerprint:
        return OwnFingerprint()
    try:
        fp = fingerprint_for(manifest, train_loader, model=model, loss_fn=loss_fn, noise_seed=noise_seed)
        body = fp.to_body()
        sent = encoded(body)
    except Exception as exc:  # a fingerprint is an optimisation: the node works without one
        log(logging.WARNING, "fingerprint-unavailable", reason=one_line(exc))
        return OwnFingerprint()
    return OwnFingerprint(body, float(fp.entropy), sent)
