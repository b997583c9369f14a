"""Strategies inside real Nodes over the in-memory transport (the simulator): what they need from the wire
(control variates, shuffles, fingerprints, label entropies) really travels through the node's encode/decode path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from quinkgl_cli.manifest.arch_hash import compute_arch_hash
from quinkgl_cli.manifest.create import build_manifest
from quinkgl_cli.node.script import PeerScript, load_script
from quinkgl_cli.sim.simulator import SimConfig, Simulator
from quinkgl_cli.strategies.aggregation import CONTROL_VARIATE_KEY, LABEL_ENTROPY_KEY
from quinkgl_cli.strategies.topology import AffinityTopology, CyclonTopology

SCRIPT = Path(__file__).resolve().parent.parent / "peer_scripts" / "digits_peer_script.py"


@pytest.fixture(scope="module")
def script() -> PeerScript:
    return load_script(SCRIPT)


def _sim(script: PeerScript, aggregation: str, topology: str, peers: int, rounds: int,
         topology_params: dict[str, str] | None = None, partition: str = "shards:2") -> Simulator:
    manifest = build_manifest(
        name="strategies-sim", task_type="classification", input_shape="64", output_shape="10", label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)), aggregation=aggregation,
        topology=topology, topology_params=topology_params, training_params={"local_epochs": "1"},
    )
    sim = Simulator(script, manifest, SimConfig(peers=peers, rounds=rounds, partition=partition, seed=3))
    sim.build()
    return sim


def _record_aggregations(sim: Simulator) -> dict[str, list[list[Any]]]:
    """Wrap every node's aggregator to keep the updates it was given."""
    seen: dict[str, list[list[Any]]] = {}
    for node in sim.nodes:
        agg = node.aggregator
        original = agg.aggregate
        calls: list[list[Any]] = []
        seen[node.node_id] = calls

        def wrapped(local: Any, others: Any, current_round: int, _orig: Any = original, _calls: Any = calls) -> Any:
            _calls.append([local, *others])
            return _orig(local, others, current_round)

        agg.aggregate = wrapped  # type: ignore[method-assign]
    return seen


def test_scaffold_control_variates_travel_with_the_models(script: PeerScript) -> None:
    sim = _sim(script, "Scaffold", "FullTopology", peers=3, rounds=3)
    seen = _record_aggregations(sim)
    sim.run()
    for node in sim.nodes:
        calls = seen[node.node_id]
        assert calls, node.node_id
        for updates in calls:
            remote = [u for u in updates if not u.is_local]
            assert remote and all(CONTROL_VARIATE_KEY in u.extras for u in remote), node.node_id
            for u in remote:
                c = u.extras[CONTROL_VARIATE_KEY]
                assert c.numel() == sum(q.numel() for q in node.model.parameters()) and bool(c.abs().sum() > 0)
        state = node.aggregator.state_dict()
        assert set(state) == {"c_local", "c_global"} and not torch.equal(state["c_local"], state["c_global"])


def test_label_entropy_reaches_entropy_weighted_avg(script: PeerScript) -> None:
    sim = _sim(script, "EntropyWeightedAvg", "FullTopology", peers=3, rounds=2)
    seen = _record_aggregations(sim)
    sim.run()
    for node in sim.nodes:
        for updates in seen[node.node_id]:
            values = [u.meta.get(LABEL_ENTROPY_KEY) for u in updates]
            assert all(isinstance(v, float) and 0.0 < v <= 16.0 for v in values), (node.node_id, values)


def test_cyclon_shuffles_round_trip_through_nodes(script: PeerScript) -> None:
    sim = _sim(script, "FedAvg", "CyclonTopology", peers=8, rounds=4,
               topology_params={"fanout": "2", "view_size": "3", "shuffle_length": "2"}, partition="iid")
    handled: dict[str, list[str]] = {}
    for node in sim.nodes:
        topo = node.topology
        assert isinstance(topo, CyclonTopology)
        original = topo.on_control
        kinds: list[str] = []
        handled[node.node_id] = kinds

        def wrapped(sender: str, kind: str, body: dict[str, Any], _orig: Any = original, _kinds: Any = kinds) -> Any:
            _kinds.append(kind)
            return _orig(sender, kind, body)

        topo.on_control = wrapped  # type: ignore[method-assign]
    sim.run()
    for node in sim.nodes:
        topo = node.topology
        assert isinstance(topo, CyclonTopology)
        assert handled[node.node_id].count(CyclonTopology.REPLY) >= 3, (node.node_id, handled[node.node_id])
        assert 1 <= len(topo.view) <= 3 and node.node_id not in topo.view
    assert sum(k == CyclonTopology.SHUFFLE for kinds in handled.values() for k in kinds) >= 8 * 3


def test_affinity_gets_every_fingerprint_and_its_own(script: PeerScript) -> None:
    sim = _sim(script, "FedAvg", "AffinityTopology", peers=4, rounds=1, topology_params={"fanout": "1"})
    sim.run()
    for node in sim.nodes:
        topo = node.topology
        assert isinstance(topo, AffinityTopology)
        assert topo.own is not None and set(topo.fingerprints) == {n.node_id for n in sim.nodes} - {node.node_id}
