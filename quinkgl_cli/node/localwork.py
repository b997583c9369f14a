"""How many passes over its data a peer's local training makes in a round: ``local_epochs``, or more where they take
fewer than the manifest's ``min_local_steps`` optimizer steps (0 by default: the floor is off).

Why: a peer with little data does little work a round when its work is counted in epochs (20 peers of two label
shards on digits hold about 72 images each: 3 batches, 12 steps in 4 epochs), and gossip averages what the peers
trained, so the swarm learns only as fast as each peer steps. Adam-type optimizers move each coordinate by about
the learning rate a step whatever the gradient, so their progress is bounded by their step count: MLP+Adam served
57% at rounds 10-15 against 97% for the same model trained on all the data, and star FedAvg did no better. A floor
of 48 steps lifts most families, but costs normalized models with Adam-type optimizers at lr 3e-3 (benchmarks/
LEARNING.md, "Local work counted in steps"; README, Learning): so it is the swarm's choice, in its signed manifest,
off unless set. A peer whose ``local_epochs`` passes take ``min_local_steps`` steps or more trains as before, and
the manifest's ``local_steps``, when set, still caps the round.

Not under personalization (FedRep's head passes are counted against the backbone's, and no personalized mode was
measured with the floor) nor DP-SGD (`node.dpsgd` plans its own steps against the privacy budget).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def local_passes(local_epochs: int, train_loader: Iterable[Any], min_steps: int) -> int:
    """``local_epochs``, or the fewest whole passes over ``train_loader`` that take at least ``min_steps`` batches
    (the manifest's ``min_local_steps``; 48 was measured against 24, 32 and 96 in benchmarks/LEARNING.md). A loader
    without a length (a stream) or without batches keeps ``local_epochs``: its pass length is unknown."""
    try:
        batches = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        return local_epochs
    if batches <= 0 or local_epochs * batches >= min_steps:
        return local_epochs
    return -(-min_steps // batches)
