"""What `quinkgl run` was asked to do: the daemon's options, grouped by the part of the daemon that reads them.

Owns the option types only (values are validated by the CLI before they get here). `DaemonOptions.from_flags`
builds them from the flat flag names of `quinkgl run`, so a caller never needs to know the grouping.
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quinkgl_cli.ops.observer import OpsSettings

DEFAULT_GOSSIP_INTERVAL = 10.0


@dataclass(frozen=True)
class TrustOptions:
    trust_policy: str | None = None
    trusted_pubkeys: list[str] = field(default_factory=list)
    strict_manifest: bool = True
    certificate: Path | None = None  # this node's admission certificate (certified swarms)
    revocations: Path | None = None  # the creator's revocation list, read again when it changes


@dataclass(frozen=True)
class ScheduleOptions:
    rounds: int | None = None
    gossip_interval: float = DEFAULT_GOSSIP_INTERVAL
    local_epochs: int | None = None
    local_steps: int | None = None
    min_peers: int = 0  # wait (up to min_peers_timeout) until this many peers are known before round 1
    min_peers_timeout: float = 60.0


@dataclass(frozen=True)
class NetworkOptions:
    port: int = 0
    listen: str = "127.0.0.1"
    bootstrap_peers: list[str] = field(default_factory=list)
    transport_options: dict[str, Any] = field(default_factory=dict)  # discovery switches of the IPv8 transport
    rendezvous: bool = True  # same-host discovery through the state directory (no network traffic)


@dataclass(frozen=True)
class CheckpointOptions:
    checkpoint_dir: Path | None = None
    resume: bool = True
    checkpoint_every: int = 1
    keep_checkpoints: int = 3
    final_model: Path | None = None


_GROUPS: dict[str, type] = {"trust": TrustOptions, "schedule": ScheduleOptions, "network": NetworkOptions,
                            "checkpoints": CheckpointOptions}


@dataclass
class DaemonOptions:
    manifest: Path
    script: Path
    node_id: str
    script_args: dict[str, str] = field(default_factory=dict)
    trust: TrustOptions = field(default_factory=TrustOptions)
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    network: NetworkOptions = field(default_factory=NetworkOptions)
    checkpoints: CheckpointOptions = field(default_factory=CheckpointOptions)
    log_format: str = "text"
    log_level: str = "info"
    dry_run: bool = False
    state_dir: Path | None = None
    seed: int | None = None
    torch_threads: int | None = None
    log_file: Path | None = None
    log_max_bytes: int = 10_000_000
    log_backups: int = 5
    ops: OpsSettings = field(default_factory=OpsSettings)  # metrics endpoint and file; the status socket is always on
    trace: Path | None = None  # the run's trace file (`quinkgl_cli.node.trace`), appended as it goes

    @classmethod
    def from_flags(cls, **flags: Any) -> DaemonOptions:
        """Options from `quinkgl run`'s flag names (``port=``, ``rounds=``, ``checkpoint_dir=``, ...), each routed
        to its group; an unknown name is a TypeError."""
        groups = {}
        for name, kind in _GROUPS.items():
            names = {f.name for f in dataclasses.fields(kind)}
            groups[name] = kind(**{k: flags.pop(k) for k in list(flags) if k in names})
        return cls(**flags, **groups)


def default_node_id() -> str:
    return socket.gethostname().split(".")[0] or "peer"
