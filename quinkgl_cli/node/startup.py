"""`quinkgl run`'s start-up: everything checked and loaded before the daemon's loop starts.

In order, each failure a one-line error with its exit code (`prepare`):
  1. manifest loaded and trusted under the policy (2 / 1 / 3 / 4), labelled for a model quinkgl can train (a
     tensorflow one: 5), then this node's admission: its certificate in
     a certified swarm, the revocation list (`quinkgl_cli.node.admission`; 2 / 1 / 3 / 4),
  2. peer script loaded, required hooks present (2 / 7),
  3. model built, its arch hash compared with the manifest's (5 under --strict-manifest, else a warning),
  4. loaders built (the optimizer comes from ``build_optimizer(manifest, model)`` when the node is wired,
     `quinkgl_cli.node.wiring`),
  5. checkpoint and node state directories taken (another daemon holding one: 7; a path that is a file: 1),
     and the newest checkpoint of this swarm found for resuming; another swarm's is refused (7) unless
     ``--no-resume``.

A dry run stops after step 4 having written nothing: under tofu the creator key is checked against the store, not
remembered, and a certified swarm's node key must exist already.

Owns the `Prepared` result, the seeding of the process's generators, where a node's directories are by default,
and how the IPv8 transport is made from the options.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quinkgl_cli.errors import ArchMismatch
from quinkgl_cli.events import emit
from quinkgl_cli.node.dirlock import HeldDirectory, lock_directory
from quinkgl_cli.node.options import DaemonOptions

# "custom" stays: the manifest create of a PyTorch script's model accepts it (a label of the user's choosing).
TRAINABLE_FRAMEWORKS = frozenset({"pytorch", "custom"})

log = logging.getLogger("quinkgl.daemon")


def refuse_untrainable(manifest: Any, source: Path | str) -> None:
    """ArchMismatch (5) for a manifest labelled with a framework quinkgl does not train (`run` and `simulate`): its arch
    hash may still name a PyTorch model, as `manifest create --model-framework tensorflow --model-arch-hash` makes."""
    if manifest.model.framework not in TRAINABLE_FRAMEWORKS:
        raise ArchMismatch(f"manifest {source} is for a {manifest.model.framework} model: quinkgl trains PyTorch models "
                           "only", "ask the swarm's creator for a manifest made with --model-framework pytorch")


@dataclass
class Prepared:
    options: DaemonOptions
    trusted: Any  # quinkgl_cli.manifest.trust.TrustedManifest
    script: Any  # PeerScript
    model: Any
    arch_hash: str
    train_loader: Any
    val_loader: Any
    own_loader: Any  # this peer's own test data, when the script returns it (`node.script.Loaders`)
    checkpoint_dir: Path
    resume_state: Any | None  # NodeState
    resume_file: Path | None
    seed: int
    admission: Any = None  # quinkgl_cli.transport.admission.AdmissionSettings
    locks: list[HeldDirectory] = field(default_factory=list)  # held for the process's life (node/dirlock.py)

    def abandon_directories(self) -> None:
        """Start-up failed before the node ran: let the directories go, removing those it created empty."""
        for held in self.locks:
            held.abandon()
        self.locks.clear()


def default_checkpoint_dir(options: DaemonOptions, swarm_id: str) -> Path:
    """``$QUINKGL_HOME/checkpoints/<first 12 hex of the swarm id>/<node id>``: one directory per swarm and node, so
    the same node id in another swarm neither resumes nor is refused by the wrong checkpoint."""
    from quinkgl_cli.paths import state_home

    return state_home(options.state_dir) / "checkpoints" / swarm_id.removeprefix("sha256:")[:12] / options.node_id


def node_state_dir(options: DaemonOptions) -> Path:
    """The node's own state (its IPv8 identity key): one per node id, so several peers on one machine never share
    a key."""
    return node_state_path(options.state_dir, options.node_id)


def node_state_path(state_dir: Path | None, node_id: str) -> Path:
    from quinkgl_cli.paths import state_home

    return state_home(state_dir) / "nodes" / node_id


def swarm_seed(swarm_id: str) -> int:
    # Every peer of a swarm starts from the same initial weights unless --seed says otherwise: averaging models
    # that began from one point works far better than averaging unrelated random initialisations.
    return int.from_bytes(hashlib.sha256(swarm_id.encode()).digest()[:4], "big")


def node_seed(seed: int, node_id: str) -> int:
    """The node's own generator's seed: the run's seed mixed with its id, so peers draw differently."""
    return seed ^ int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:4], "big")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def prepare(options: DaemonOptions) -> Prepared:
    """The start-up checks, in the documented order. Raises QuinkglError subclasses."""
    from quinkgl_cli.manifest.trust import load_trusted

    trust = options.trust
    # A dry run changes nothing on disk: under tofu it reports a creator key it sees first, and pins none.
    trusted = load_trusted(options.manifest, trust.trust_policy, tuple(trust.trusted_pubkeys), options.state_dir,
                           remember=not options.dry_run)
    manifest = trusted.manifest
    refuse_untrainable(manifest, options.manifest)

    from quinkgl_cli.node.admission import prepare_admission

    admission = prepare_admission(trusted, options.node_id, node_state_dir(options), trust.certificate, trust.revocations,
                                  create_key=not options.dry_run)

    from quinkgl_cli.node.script import load_script

    script = load_script(options.script)

    import torch

    if options.torch_threads:
        torch.set_num_threads(options.torch_threads)
    seed = options.seed if options.seed is not None else swarm_seed(trusted.swarm_id)
    seed_everything(seed)
    model = script.build_model(manifest, **options.script_args)

    from quinkgl_cli.manifest.arch_hash import compute_arch_hash

    arch_hash = compute_arch_hash(model)
    if arch_hash != manifest.model.arch_hash:
        if trust.strict_manifest:
            raise ArchMismatch(
                f"model from {Path(options.script).name} has arch hash {arch_hash}, the manifest requires {manifest.model.arch_hash}",
                "use the script the manifest was made for, or create a new manifest (--strict-manifest false only warns)",
            )
        emit(log, logging.WARNING, "arch-mismatch", model=arch_hash, manifest=manifest.model.arch_hash, strict="false")

    loaders = script.build_loaders(manifest, **options.script_args)

    ckpt = options.checkpoints
    checkpoint_dir = Path(ckpt.checkpoint_dir) if ckpt.checkpoint_dir else default_checkpoint_dir(options, trusted.swarm_id)
    prepared = Prepared(options, trusted, script, model, arch_hash, loaders.train, loaders.val, loaders.own, checkpoint_dir,
                        None, None, seed, admission)
    if options.dry_run:
        return prepared
    prepared.locks = lock_node_dirs(options, checkpoint_dir)
    try:
        if ckpt.resume:
            _find_resume_state(prepared, ckpt.keep_checkpoints)
    except BaseException:
        prepared.abandon_directories()
        raise
    return prepared


def _find_resume_state(prepared: Prepared, keep: int) -> None:
    from quinkgl_cli.node.checkpoint import CheckpointStore

    store = CheckpointStore(prepared.checkpoint_dir, keep=keep)
    found = store.resume_point(prepared.trusted.swarm_id, prepared.options.node_id)
    if found is None:
        return
    ckpt, state = found
    prepared.resume_state, prepared.resume_file = state, ckpt.path


def lock_node_dirs(options: DaemonOptions, checkpoint_dir: Path) -> list[HeldDirectory]:
    """One daemon per checkpoint directory and per node identity, or the second is refused (7)."""
    held = [lock_directory(checkpoint_dir, "checkpoint directory",
                           "stop the other daemon, or give this one its own --checkpoint-dir")]
    try:
        held.append(lock_directory(node_state_dir(options), "node state directory",
                                   f"another daemon runs as --node-id {options.node_id}; give each peer its own --node-id"))
    except BaseException:
        held[0].abandon()
        raise
    return held


def make_ipv8_transport(prepared: Prepared) -> Any:
    from quinkgl_cli import wire
    from quinkgl_cli.paths import state_home
    from quinkgl_cli.tensors import shared_specs
    from quinkgl_cli.transport.ipv8 import IPv8Transport
    from quinkgl_cli.transport.rendezvous import Rendezvous

    o = prepared.options
    net = o.network
    bootstrap = list(dict.fromkeys([*net.bootstrap_peers, *prepared.trusted.manifest.bootstrap_peers]))
    rendezvous = Rendezvous(state_home(o.state_dir), prepared.trusted.swarm_id, o.node_id) if net.rendezvous else None
    return IPv8Transport(
        node_id=o.node_id,
        swarm_id=prepared.trusted.swarm_id,
        arch_hash=prepared.trusted.manifest.model.arch_hash,
        state_dir=node_state_dir(o),
        listen_host=net.listen,
        port=net.port,
        bootstrap=bootstrap,
        # Refuse offers far larger than this model can ever be: a peer cannot make us buffer gigabytes.
        max_model_bytes=wire.max_blob_bytes(shared_specs(prepared.model)) * 2,
        rendezvous=rendezvous,
        admission=prepared.admission,
        **net.transport_options,
    )
