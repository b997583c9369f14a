"""Shared set-up of the simulator benchmarks: the digits peer script and a manifest built from it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from quinkgl_cli.manifest.arch_hash import compute_arch_hash  # noqa: E402
from quinkgl_cli.manifest.create import build_manifest  # noqa: E402
from quinkgl_cli.manifest.schema import Manifest  # noqa: E402
from quinkgl_cli.node.script import PeerScript, load_script  # noqa: E402
from quinkgl_cli.sim.simulator import SimResult  # noqa: E402

DIGITS = ROOT / "peer_scripts" / "digits_peer_script.py"
RESULTS = ROOT / "benchmarks" / "results"


def quiet() -> None:
    """Benchmarks print their own table; robust aggregators' per-update warnings would drown it."""
    logging.getLogger("quinkgl").setLevel(logging.ERROR)


def digits_script() -> PeerScript:
    return load_script(DIGITS)


def digits_manifest(script: PeerScript, aggregation: str = "FedAvg", topology: str = "RandomTopology",
                    training: dict[str, Any] | None = None, topology_params: dict[str, Any] | None = None,
                    privacy: dict[str, Any] | None = None) -> Manifest:
    """The manifest `quinkgl manifest create --from-script digits_peer_script.py` makes, defaults unless given."""
    return build_manifest(
        name="digits-bench", task_type="classification", input_shape="64", output_shape="10", label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)),
        aggregation=aggregation, topology=topology,
        topology_params={k: str(v) for k, v in (topology_params or {}).items()},
        training_params={k: str(v) for k, v in (training or {}).items()},
        privacy_params=privacy or {},
    )


def row(result: SimResult) -> dict[str, Any]:
    """The numbers a learning table shows for one run."""
    from quinkgl_cli.sim.report import communication

    comm = communication(result)
    return {
        "final_mean_accuracy": result.final.mean_accuracy,
        "final_min_accuracy": result.final.min_accuracy,
        "last_round_mean_accuracy": result.rounds[-1].mean_accuracy,
        "last_round_min_accuracy": result.rounds[-1].min_accuracy,
        "curve": [r.mean_accuracy for r in result.rounds],
        "min_curve": [r.min_accuracy for r in result.rounds],
        "consensus_mean": result.consensus.mean_accuracy if result.consensus else None,
        "sends_per_peer_per_round": comm["sends_per_peer_per_round"],
        "consensus_sends_per_peer": comm["consensus_sends_per_peer"],
        "mb_sent": comm["bytes_sent_total"] / 1e6,
        "consensus_mb_sent": comm["consensus_bytes"] / 1e6,
        "run_s": result.timing["run_s"],
    }


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
