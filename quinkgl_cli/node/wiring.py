"""The one place a `Node` is wired from a peer script: `quinkgl run` (the daemon), `quinkgl simulate` and the
demo's solo baselines all build their nodes here, so a script's ``build_optimizer`` and ``loss_fn`` mean the same
thing everywhere.

Owns no state. What differs between drivers arrives as arguments: the model and loaders (the simulator splits one
dataset among its peers), the transport, the clock, whether the script's hooks are called, and the strategies and
policies a simulator mode injects (`NodePolicies`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.core import DEFAULT_POLICIES, Hooks, Node, NodeConfig, NodePolicies
from quinkgl_cli.node.lrschedule import left_out
from quinkgl_cli.node.personal import build_personal
from quinkgl_cli.node.script import PeerScript
from quinkgl_cli.strategies.base import Aggregator, Topology
from quinkgl_cli.transport.base import Transport


def build_node(script: PeerScript, manifest: Manifest, swarm_id: str, config: NodeConfig, model: nn.Module,
               train_loader: Iterable[Any], val_loader: Iterable[Any] | None, transport: Transport, *,
               hooks: Hooks | None = None, clock: Callable[[], float] = time.monotonic,
               aggregator: Aggregator | None = None, topology: Topology | None = None,
               policies: NodePolicies = DEFAULT_POLICIES, own_loader: Iterable[Any] | None = None) -> Node:
    """A node for ``model``: its optimizer (and learning-rate scheduler, if it returns one) from the script's
    ``build_optimizer(manifest, model)``, its loss from the
    script's ``loss_fn``, its personalization policy from the manifest (APFL's local model gets its own
    ``build_optimizer``); ``hooks`` (usually the script itself) are called by the node, None calls none;
    ``own_loader`` is the peer's own test data, when its script has some (`node.script.Loaders`). An optimizer
    that steps only part of the model is said once (`lrschedule.left_out`)."""
    optimizer, scheduler = script.build_training(manifest, model)
    personal = build_personal(manifest.personalization, model, lambda local: script.build_training(manifest, local))
    node = Node(config, manifest, swarm_id, model, train_loader, val_loader, optimizer, transport, hooks=hooks,
                clock=clock, loss_fn=script.loss_fn, aggregator=aggregator, topology=topology, policies=policies,
                personal=personal, own_loader=own_loader, scheduler=scheduler)
    if (unstepped := left_out(model, optimizer)) is not None:
        node.log(logging.WARNING, "optimizer-leaves-out", **unstepped)
    return node
