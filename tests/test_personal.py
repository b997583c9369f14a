"""Personalized models (issue 14): the signed manifest section, FedRep's backbone/head split (the head never reaches
the wire; head first, then backbone), APFL's mixing weight learned by its gradient and checkpointed, accuracy on a
peer's own label distribution in round-end, hooks and simulator JSON, and the combinations refused."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from quinkgl_cli import wire
from quinkgl_cli.errors import NodeConfigError, UsageError
from quinkgl_cli.events import FIELDS_ATTR
from quinkgl_cli.manifest.arch_hash import compute_arch_hash
from quinkgl_cli.manifest.canonical import manifest_object, swarm_id
from quinkgl_cli.manifest.create import build_manifest
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.manifest.trust import load_trusted
from quinkgl_cli.node.core import Node, NodeConfig, NodeState, evaluate_merged
from quinkgl_cli.node.lrschedule import Training
from quinkgl_cli.node.owneval import label_shares, weighted_accuracy
from quinkgl_cli.node.personal import APFL, FedRep, Shared, build_personal
from quinkgl_cli.node.script import PeerScript, load_script
from quinkgl_cli.sim.config import Overrides
from quinkgl_cli.sim.report import to_json
from quinkgl_cli.sim.simulator import SimConfig, Simulator
from quinkgl_cli.tensors import flatten
from quinkgl_cli.transport.base import OutgoingUpdate
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport
from tests.helpers_manifest import NOW, make_manifest, write

H = "sha256:" + "0" * 64


def manifest(mode: str = "none", aggregation: str = "FedAvg", **params: str) -> Manifest:
    return build_manifest(
        name="personal-test", task_type="class", input_shape="4", output_shape="3", label_type="integer",
        framework="pytorch", arch_hash=H, aggregation=aggregation, topology="FullTopology",
        training_params={"local_epochs": "1", "final_consensus_steps": "0"}, personalization=mode,
        personalization_params=params, now=datetime(2026, 1, 1, tzinfo=UTC))


def loaders(labels: list[int], n: int = 30, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([labels[i % len(labels)] for i in range(n)])
    x = torch.randn(n, 4, generator=g) + nn.functional.one_hot(y, 4).float() * 3.0
    vy = torch.arange(60) % 3
    vx = torch.randn(60, 4, generator=g) + nn.functional.one_hot(vy, 4).float() * 3.0
    return DataLoader(TensorDataset(x, y), batch_size=10), DataLoader(TensorDataset(vx, vy), batch_size=60)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def node(net: MemoryNetwork, node_id: str, m: Manifest, labels: list[int], seed: int = 0, hooks: Any = None,
         model: nn.Module | None = None) -> Node:
    torch.manual_seed(seed)
    model = model if model is not None else mlp()
    train, val = loaders(labels, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    personal = build_personal(m.personalization, model, lambda local: Training(torch.optim.SGD(local.parameters(), lr=0.05)))
    transport = MemoryTransport(net, node_id, swarm_id="s", arch_hash=H)
    n = Node(NodeConfig(node_id, rounds=5, seed=seed, noise_seed=seed), m, "sha256:swarm", model, train, val, opt,
             transport, hooks=hooks, clock=lambda: 0.0, personal=personal)
    transport.start_sync(n)
    return n


def run_round(net: MemoryNetwork, nodes: list[Node]) -> None:
    net.deliver_all()  # introductions first
    for n in nodes:
        n.begin_round()
        n.train_round()
    for n in nodes:
        n.share(0)
    net.deliver_all()
    for n in nodes:
        n.aggregate()
        n.evaluate()
        n.end_round()


# ---------------------------------------------------------------------------------------------- the manifest


def test_the_section_is_signed_round_trips_and_changes_the_swarm(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    plain = make_manifest("p", key=key)
    fedrep = make_manifest("p", key=key, personalization="fedrep",
                           personalization_params={"head_prefixes": "fc3, out.", "head_epochs": "3"})
    assert "personalization" not in manifest_object(plain)  # manifests without it keep their bytes and ids
    loaded = load_trusted(write(tmp_path / "f.qgl", fedrep), "open", now=NOW)
    spec = loaded.manifest.personalization
    assert (spec.mode, spec.head_prefixes, spec.head_epochs) == ("fedrep", ("fc3", "out."), 3)
    assert loaded.swarm_id == swarm_id(fedrep) != swarm_id(plain)
    obj = json.loads((tmp_path / "f.qgl").read_text())
    obj["personalization"]["head_epochs"] = 4
    (tmp_path / "t.qgl").write_text(json.dumps(obj))
    with pytest.raises(Exception, match="signature"):
        load_trusted(tmp_path / "t.qgl", "pinned", (fedrep.creator_pubkey or "",), tmp_path / "state", now=NOW)
    apfl = make_manifest("p", personalization="APFL", personalization_params={"alpha": "0.3", "alpha_lr": "0.05"})
    assert (apfl.personalization.mode, apfl.personalization.alpha, apfl.personalization.alpha_lr) == ("apfl", 0.3, 0.05)


@pytest.mark.parametrize(("mode", "params", "needle"), [
    ("none", {"alpha": "0.5"}, "alpha does nothing with personalization none"),
    ("apfl", {"head_epochs": "2"}, "head_epochs does nothing with personalization apfl"),
    ("fedrep", {"alpha_lr": "0.1"}, "alpha_lr does nothing with personalization fedrep"),
    ("apfl", {"alpha": "1.5"}, "alpha"),
    ("fedrep", {"head_epochs": "0"}, "head_epochs"),
    ("ditto", {}, "not a personalization mode"),
    ("apfl", {"mode": "fedrep"}, "mode=... is not a parameter"),
])
def test_bad_or_idle_settings_are_one_line_usage_errors(mode: str, params: dict[str, str], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        make_manifest(personalization=mode, personalization_params=params)


def test_manifest_create_flags(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from quinkgl_cli.cli.app import app

    out = tmp_path / "m.qgl"
    result = CliRunner().invoke(app, [
        "manifest", "create", "--name", "x", "--output", str(out), "--aggregation", "FedAvg",
        "--topology", "RandomTopology", "--task-type", "class", "--label-type", "integer", "--input-shape", "4",
        "--output-shape", "3", "--model-arch-hash", H, "--personalization", "fedrep",
        "--personalization-param", "head_prefixes=2", "--personalization-param", "head_epochs=1"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["personalization"]["head_prefixes"] == ["2"]


# ---------------------------------------------------------------------------------------------- FedRep


def test_fedrep_wire_bytes_carry_no_head_tensor() -> None:
    net = MemoryNetwork(auto_deliver=False)
    m = manifest("fedrep")
    a, b = node(net, "a", m, [0], seed=1), node(net, "b", m, [1], seed=2)
    sent: list[OutgoingUpdate] = []
    original = a.transport.send_model

    def record(peer: str, update: OutgoingUpdate) -> None:
        sent.append(update)
        original(peer, update)

    a.transport.send_model = record  # type: ignore[method-assign]
    run_round(net, [a, b])
    assert sent
    whole = a.trainer.model.state_dict()
    head = {"2.weight", "2.bias"}
    for update in sent:
        tensors, _ = wire.decode(update.payload)
        assert set(tensors) == {"0.weight", "0.bias"}
        for name in head:  # not under another name either: the head's bytes appear nowhere in the payload
            assert whole[name].detach().numpy().tobytes() not in update.payload
    assert flatten(a.model).numel() == 8 * 4 + 8  # what is aggregated, noised and compressed: the backbone
    # The heads stayed personal: trained on different labels, they differ after aggregation made backbones equal.
    assert torch.equal(flatten(a.model), flatten(b.model))
    assert not torch.equal(a.trainer.model.state_dict()["2.weight"], b.trainer.model.state_dict()["2.weight"])


@pytest.mark.parametrize("compression", [{"top_k_ratio": "0.5"}, {"quantize_bits": "8"}])
def test_fedrep_compressed_updates_cover_the_backbone_only(compression: dict[str, str]) -> None:
    m = build_manifest(**{**_kwargs(), "compression_params": compression, "personalization": "fedrep"})
    net = MemoryNetwork(auto_deliver=False)
    a, b = node(net, "a", m, [0], seed=1), node(net, "b", m, [1], seed=2)
    run_round(net, [a, b])
    held = b.exchange.sharing.model_of("a")
    assert held is not None and held[0].numel() == 40  # a's reconstruction at b: the backbone's 40 values


def _kwargs() -> dict[str, Any]:
    return dict(name="personal-test", task_type="class", input_shape="4", output_shape="3", label_type="integer",
                framework="pytorch", arch_hash=H, aggregation="FedAvg", topology="FullTopology",
                training_params={"local_epochs": "1", "final_consensus_steps": "0"},
                now=datetime(2026, 1, 1, tzinfo=UTC))


class Probe(nn.Module):
    """Records, at each training forward, which parts train and the weights they hold."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.seen: list[tuple[bool, bool, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append((self.head.weight.requires_grad, self.body.weight.requires_grad,
                              self.head.weight.detach().clone(), self.body.weight.detach().clone()))
        return self.head(torch.relu(self.body(x)))


def test_fedrep_trains_the_head_first_then_the_backbone_with_the_head_frozen() -> None:
    net = MemoryNetwork(auto_deliver=False)
    probe = Probe()
    n = node(net, "a", manifest("fedrep", head_epochs="2"), [0, 1], model=probe)
    n.begin_round()
    n.train_round()
    seen = probe.seen
    assert [(h, b) for h, b, _, _ in seen] == [(True, False)] * 6 + [(False, True)] * 3  # 2 head epochs, then 1
    head_phase, body_phase = seen[:6], seen[6:]
    assert all(torch.equal(s[3], head_phase[0][3]) for s in head_phase)  # backbone untouched while the head trains
    assert not torch.equal(head_phase[0][2], head_phase[-1][2])  # ... and the head did train
    assert all(torch.equal(s[2], body_phase[0][2]) for s in body_phase)  # head untouched while the backbone trains
    assert not torch.equal(body_phase[0][3], probe.body.weight)  # ... and the backbone did train
    assert probe.head.weight.requires_grad and probe.body.weight.requires_grad  # flags restored


def test_fedrep_head_defaults_to_many_passes_per_backbone_pass() -> None:
    # The paper's schedule: many cheap head updates for each update of the representation (10 head epochs).
    assert manifest("fedrep").personalization.head_epochs == 10


def _head_loss(n: Node) -> float:
    model = n.trainer.model
    with torch.no_grad():
        return sum(float(n.trainer.loss_fn(model(x), y)) for x, y in n.trainer.train_loader)


@pytest.mark.parametrize("mode", ["none", "fedrep"])
def test_fedrep_head_trains_on_the_merged_backbone_after_the_final_merge(mode: str) -> None:
    net = MemoryNetwork(auto_deliver=False)
    m = manifest(mode, **({"head_epochs": "3"} if mode == "fedrep" else {}))
    a, b = node(net, "a", m, [0, 1], seed=1), node(net, "b", m, [2], seed=2)
    run_round(net, [a, b])
    for n in (a, b):
        n.begin_consensus()
        n.share(1)
    net.deliver_all()
    for n in (a, b):
        n.aggregate()  # the merge moves the backbone under a's head
    before = {k: v.clone() for k, v in a.trainer.model.state_dict().items()}
    loss = _head_loss(a)
    evaluate_merged(a)
    after = a.trainer.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    if mode == "fedrep":
        assert moved == {"2.weight", "2.bias"}  # the head only: the merged backbone stays as the swarm made it
        assert _head_loss(a) < loss
    else:
        assert moved == set()  # nothing to fit: the whole model is the shared one


def test_fedrep_head_fit_on_a_broken_merged_backbone_keeps_the_head_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    net = MemoryNetwork(auto_deliver=False)
    a = node(net, "a", manifest("fedrep", head_epochs="2"), [0, 1], seed=1)
    run_round(net, [a])
    with torch.no_grad():
        a.trainer.model[0].weight.fill_(float("inf"))  # a merge that left the backbone non-finite
    before = {k: v.clone() for k, v in a.trainer.model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="quinkgl"):
        evaluate_merged(a)
    assert [r for r in caplog.records if r.getMessage().startswith("head-fit-rolled-back ")]
    after = a.trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in ("2.weight", "2.bias"))


def test_simulator_fits_the_head_after_the_final_merge(blobs: PeerScript,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from quinkgl_cli.node.trainer import Trainer

    calls: list[int] = []
    fit = Trainer.fit_head

    def counted(self: Trainer) -> float | None:
        calls.append(self.personal.head_epochs)
        return fit(self)

    monkeypatch.setattr(Trainer, "fit_head", counted)
    cfg = SimConfig(peers=4, rounds=1, partition="classes:1", seed=1,
                    overrides=Overrides(personalization="fedrep", personalization_params={"head_epochs": "1"}))
    Simulator(blobs, _blobs_manifest(blobs), cfg).run()
    assert calls == [1] * 4  # once per peer, after the consensus exchanges


def test_fedrep_head_choice_manifest_then_model_attribute_then_last_layer() -> None:
    model = Probe()
    assert FedRep(model, manifest("fedrep").personalization).head_names == {"head.weight", "head.bias"}
    model.quinkgl_head = ("body",)  # type: ignore[assignment]
    assert FedRep(model, manifest("fedrep").personalization).head_names == {"body.weight", "body.bias"}
    spec = manifest("fedrep", head_prefixes="head.bias").personalization
    assert FedRep(model, spec).head_names == {"head.bias"}


@pytest.mark.parametrize(("prefixes", "needle"), [("nothing", "match none"), ("body,head", "whole model")])
def test_fedrep_refuses_a_head_it_cannot_split(prefixes: str, needle: str) -> None:
    with pytest.raises(NodeConfigError, match=needle):
        FedRep(Probe(), manifest("fedrep", head_prefixes=prefixes).personalization)


def test_fedrep_refuses_a_head_tied_to_the_backbone() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight  # tied: the head's tensor would leave with the backbone
    with pytest.raises(NodeConfigError, match="tied"):
        FedRep(model, manifest("fedrep", head_prefixes="1.").personalization)


def test_fedrep_checkpoint_holds_head_and_backbone_and_resumes() -> None:
    net = MemoryNetwork(auto_deliver=False)
    m = manifest("fedrep")
    a, b = node(net, "a", m, [0], seed=1), node(net, "b", m, [1], seed=2)
    run_round(net, [a, b])
    state = a.state_dict()
    assert {"model.2.weight", "model.2.bias", "model.0.weight"} <= set(state.tensors)
    fresh = node(MemoryNetwork(auto_deliver=False), "a", m, [0], seed=1)  # same data, the untrained model
    assert fresh.evaluate() != a.evaluate()
    fresh.load_state_dict(NodeState({k: v.clone() for k, v in state.tensors.items()}, json.loads(json.dumps(state.meta))))
    assert fresh.trainer.model.state_dict()["2.weight"].equal(a.trainer.model.state_dict()["2.weight"])
    assert fresh.evaluate() == a.evaluate()
    with pytest.raises(ValueError, match="personalization"):
        node(MemoryNetwork(), "a", manifest("apfl"), [0]).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- APFL


def test_apfl_alpha_steps_along_its_gradient() -> None:
    torch.manual_seed(0)
    w = mlp()
    apfl = APFL(w, manifest("apfl", alpha="0.4", alpha_lr="0.5").personalization,
                lambda local: Training(torch.optim.SGD(local.parameters(), lr=0.0)))  # v held still: only alpha moves
    with torch.no_grad():
        for p in apfl.local.parameters():
            p.add_(torch.randn_like(p))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()

    def loss_at(alpha: float) -> float:
        apfl.alpha = alpha
        with torch.no_grad():
            return float(loss_fn(apfl.personal_model(w)(x), y))

    eps = 1e-3
    grad = (loss_at(0.4 + eps) - loss_at(0.4 - eps)) / (2 * eps)
    apfl.alpha = 0.4
    apfl.after_step(x, y, loss_fn)
    assert apfl.alpha == pytest.approx(min(1.0, max(0.0, 0.4 - 0.5 * grad)), abs=1e-3)
    assert abs(grad) > 1e-3  # the test would notice an alpha that did not move


def test_apfl_steps_v_and_alpha_from_the_w_the_batch_saw_not_the_w_that_stepped_on_it() -> None:
    torch.manual_seed(0)
    w = mlp()
    apfl = APFL(w, manifest("apfl", alpha="0.4", alpha_lr="0.5").personalization,
                lambda local: Training(torch.optim.SGD(local.parameters(), lr=0.0)))
    with torch.no_grad():
        for p in apfl.local.parameters():
            p.add_(torch.randn_like(p))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()

    def alpha_grad() -> float:  # d loss(alpha*v + (1-alpha)*w) / d alpha at 0.4, for the current w
        def at(alpha: float) -> float:
            apfl.alpha = alpha
            with torch.no_grad():
                return float(loss_fn(apfl.personal_model(w)(x), y))
        return (at(0.4 + 1e-3) - at(0.4 - 1e-3)) / 2e-3

    before = alpha_grad()
    apfl.alpha = 0.4
    apfl.before_step()  # as the trainer calls it: then w's own step on the batch, then APFL's
    opt = torch.optim.SGD(w.parameters(), lr=2.0)
    opt.zero_grad()
    loss_fn(w(x), y).backward()
    opt.step()
    after = alpha_grad()
    assert abs(before - after) > 0.05  # w's step changed the gradient enough for the test to tell them apart
    apfl.alpha = 0.4
    apfl.after_step(x, y, loss_fn)
    assert apfl.alpha == pytest.approx(min(1.0, max(0.0, 0.4 - 0.5 * before)), abs=1e-3)


def test_apfl_trains_v_on_the_mixture_shares_only_w_and_serves_the_mixture() -> None:
    net = MemoryNetwork(auto_deliver=False)
    m = manifest("apfl", alpha="0.5", alpha_lr="0.05")
    a, b = node(net, "a", m, [0], seed=1), node(net, "b", m, [1], seed=2)
    for _ in range(3):
        run_round(net, [a, b])
    apfl = a.trainer.personal
    assert isinstance(apfl, APFL) and 0.0 <= apfl.alpha <= 1.0 and apfl.alpha != 0.5
    assert not torch.equal(flatten(apfl.local), flatten(a.model))  # v is its own model
    served = a.served_model()
    expected = apfl.alpha * flatten(apfl.local) + (1 - apfl.alpha) * flatten(a.serving.model(a.round))
    assert torch.allclose(flatten(served), expected, atol=1e-6)
    assert flatten(a.model).numel() == flatten(a.trainer.model).numel()  # w is shared whole
    last = a.history[-1]
    assert last["alpha"] == apfl.alpha and last["personal_val_accuracy"] is not None


def test_apfl_alpha_and_local_model_survive_a_checkpoint() -> None:
    net = MemoryNetwork(auto_deliver=False)
    m = manifest("apfl", alpha_lr="0.05")
    a, b = node(net, "a", m, [0], seed=1), node(net, "b", m, [1], seed=2)
    for _ in range(2):
        run_round(net, [a, b])
    state = a.state_dict()
    meta = json.loads(json.dumps(state.meta))  # what a checkpoint keeps is JSON
    fresh = node(MemoryNetwork(auto_deliver=False), "a", m, [0], seed=1)  # same data, the untrained models
    assert fresh.evaluate() != a.evaluate()
    fresh.load_state_dict(NodeState({k: v.clone() for k, v in state.tensors.items()}, meta))
    mine, theirs = fresh.trainer.personal, a.trainer.personal
    assert isinstance(mine, APFL) and isinstance(theirs, APFL)
    assert mine.alpha == theirs.alpha != m.personalization.alpha
    assert torch.equal(flatten(mine.local), flatten(theirs.local))
    assert mine.optimizer.state_dict()["state"].keys() == theirs.optimizer.state_dict()["state"].keys()
    assert fresh.evaluate() == a.evaluate()
    assert torch.equal(flatten(fresh.served_model()), flatten(a.served_model()))
    meta["personal"]["alpha"] = 1.5
    with pytest.raises(ValueError, match="alpha"):
        fresh.load_state_dict(NodeState(dict(state.tensors), meta))


# ---------------------------------------------------------------------------------------------- own accuracy


def test_label_shares_read_the_dataset_without_iterating_the_loader() -> None:
    data = TensorDataset(torch.zeros(10, 2), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2]))

    class NoIter(DataLoader):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            raise AssertionError("iterated")

    assert label_shares(NoIter(Subset(data, [0, 1, 3, 5]))) == {0: 0.5, 1: 0.25, 2: 0.25}
    counts = torch.tensor([3, 0, 1]), torch.tensor([4, 5, 2])
    assert weighted_accuracy(*counts, {0: 0.5, 2: 0.5}) == pytest.approx(0.5 * 0.75 + 0.5 * 0.5)
    assert weighted_accuracy(*counts, {7: 1.0}) is None  # a class the validation set lacks counts for nothing


class Always(nn.Module):
    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((x.shape[0],), self.label), 3).float() * 10 + self.bias * 0


def test_own_accuracy_is_reported_in_round_end_hooks_and_history(caplog: pytest.LogCaptureFixture) -> None:
    class Hooks:
        metrics: dict[str, Any] = {}

        def on_round_end(self, round_idx: int, metrics: dict[str, Any]) -> None:
            Hooks.metrics = metrics

    net = MemoryNetwork(auto_deliver=False)
    n = node(net, "a", manifest(), [0], hooks=Hooks(), model=Always(0))
    n.trainer.optimizer = torch.optim.SGD(n.trainer.model.parameters(), lr=0.0)
    with caplog.at_level(logging.INFO, logger="quinkgl"):
        run_round(net, [n])
    # Always class 0: right on every image of this peer's own distribution, on a third of the validation set.
    assert Hooks.metrics["own_accuracy"] == 1.0 and Hooks.metrics["val_accuracy"] == pytest.approx(1 / 3)
    ends = [r for r in caplog.records if r.getMessage().startswith("round-end") or getattr(r, FIELDS_ATTR, {}).get("own_accuracy")]
    assert any(getattr(r, FIELDS_ATTR, {}).get("own_accuracy") == 1.0 for r in ends)


def test_own_test_data_from_the_script_replaces_the_reweighted_estimate() -> None:
    """A third loader is scored as is: Always(0) on own test data of class 1 only is 0.0, where the label-share
    estimate (its training labels are all class 0) would say 1.0."""
    net = MemoryNetwork(auto_deliver=False)
    m = manifest()
    model = Always(0)
    train, val = loaders([0])
    own = DataLoader(TensorDataset(torch.randn(8, 4), torch.ones(8, dtype=torch.int64)), batch_size=4)
    transport = MemoryTransport(net, "a", swarm_id="s", arch_hash=H)
    n = Node(NodeConfig("a", rounds=1, seed=0), m, "sha256:swarm", model, train, val,
             torch.optim.SGD(model.parameters(), lr=0.0), transport, clock=lambda: 0.0, own_loader=own)
    transport.start_sync(n)
    stats = n.trainer.evaluate()
    assert stats is not None and stats.own_accuracy == 0.0 and stats.val_accuracy == pytest.approx(1 / 3)
    n.trainer.own_loader = None
    n.trainer.own_shares = label_shares(train)
    reweighted = n.trainer.evaluate()
    assert reweighted is not None and reweighted.own_accuracy == 1.0


def test_digits_own_holdout_is_a_slice_of_the_peers_own_classes() -> None:
    from quinkgl_cli.peer_scripts import digits_peer_script as digits

    script = load_script(Path(digits.__file__))
    args = {"shard": "3", "num_shards": "20", "partition": "shards:2"}
    whole = script.build_loaders(None, **args)
    held = script.build_loaders(None, **args, own_holdout="0.25")
    assert whole.own is None and held.own is not None
    own_y = held.own.dataset.tensors[1]
    train_x, train_y = held.train.dataset.tensors
    assert set(own_y.tolist()) == set(train_y.tolist()) == set(whole.train.dataset.tensors[1].tolist())
    assert len(own_y) + len(train_y) == len(whole.train.dataset)
    own_rows = {tuple(r.tolist()) for r in held.own.dataset.tensors[0]}
    assert not own_rows & {tuple(r.tolist()) for r in train_x}  # held out, not trained on
    with pytest.raises(NodeConfigError, match="own_holdout"):
        script.build_loaders(None, **args, own_holdout="1")


def test_simulator_scores_own_accuracy_on_the_scripts_own_test_data(tmp_path: Path) -> None:
    from quinkgl_cli.peer_scripts import digits_peer_script as digits

    script = load_script(Path(digits.__file__))
    m = build_manifest(
        name="digits-own", task_type="classification", input_shape="64", output_shape="10", label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)), aggregation="FedAvg",
        topology="FullTopology", training_params={"local_epochs": "1", "final_consensus_steps": "0"},
        personalization="apfl", now=datetime(2026, 1, 1, tzinfo=UTC))
    args = {"partition": "shards:2", "own_holdout": "0.3"}
    cfg = SimConfig(peers=4, rounds=2, partition="script", seed=1, script_args=args)
    result = Simulator(script, m, cfg).run()
    held = [script.build_loaders(None, **args, shard=str(i), num_shards="4").own for i in range(4)]
    peers = result.rounds[-1].peers
    assert all(p.own_accuracy is not None for p in peers)
    # Each peer's figure is a fraction of its own held-out images, not of the 360 validation images.
    for p, own in zip(peers, held, strict=True):
        assert own is not None
        count = len(own.dataset)
        assert p.own_accuracy * count == pytest.approx(round(p.own_accuracy * count), abs=1e-6)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> PeerScript:
    from tests.test_learning import BLOBS_SCRIPT

    path = Path(tmp_path_factory.mktemp("scripts")) / "blobs_script.py"
    path.write_text(BLOBS_SCRIPT.replace("torch.nn.Linear(6, 4)", "torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))"))
    return load_script(path)


def _blobs_manifest(script: PeerScript, **extra: Any) -> Manifest:
    return build_manifest(
        name="blobs", task_type="classification", input_shape="6", output_shape="4", label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)), aggregation="FedAvg",
        topology="RandomTopology", training_params={"local_epochs": "1", "final_consensus_steps": "1"}, **extra)


@pytest.mark.parametrize("mode", ["none", "apfl", "fedrep"])
def test_simulator_json_reports_own_accuracy(blobs: PeerScript, mode: str, tmp_path: Path) -> None:
    cfg = SimConfig(peers=4, rounds=2, partition="classes:1", seed=1, overrides=Overrides(personalization=mode))
    result = Simulator(blobs, _blobs_manifest(blobs), cfg).run()
    data = to_json(result)
    assert data["manifest"]["personalization"]["mode"] == mode
    assert data["final"]["mean_own_accuracy"] is not None
    assert all(p["own_accuracy"] is not None for r in data["rounds"] for p in r["peers"])
    assert (data["final"]["mean_personal_val_accuracy"] is not None) == (mode == "apfl")
    from quinkgl_cli.sim.report import plot_result

    plot_result(result, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("setting", [
    {"aggregation": "Scaffold"}, {"aggregation": "FedProx"}, {"aggregation": "MultiKrum"},
    {"topology": "RingTopology"}, {"compression_params": {"top_k_ratio": 0.5}}, {"dp_epsilon": 50.0},
])
@pytest.mark.parametrize("mode", ["apfl", "fedrep"])
def test_personalization_runs_with_other_settings(blobs: PeerScript, mode: str, setting: dict[str, Any]) -> None:
    ov = Overrides(personalization=mode, aggregation=setting.get("aggregation"), topology=setting.get("topology"),
                   compression_params={k: str(v) for k, v in setting.get("compression_params", {}).items()},
                   dp_epsilon=setting.get("dp_epsilon"))
    result = Simulator(blobs, _blobs_manifest(blobs), SimConfig(peers=4, rounds=2, partition="classes:1", seed=3,
                                                                overrides=ov)).run()
    assert result.final.mean_own_accuracy is not None
    assert sum(r.bytes_sent for r in result.rounds) > 0


def test_fedavg_simulation_refuses_personalization(blobs: PeerScript) -> None:
    cfg = SimConfig(peers=4, rounds=1, mode="fedavg", clients_per_round=2, overrides=Overrides(personalization="apfl"))
    with pytest.raises(UsageError, match="--mode fedavg cannot report personalization apfl"):
        Simulator(blobs, _blobs_manifest(blobs), cfg)


def test_none_is_the_whole_model_unchanged() -> None:
    model = mlp()
    policy = build_personal(manifest().personalization, model, lambda m: Training(torch.optim.SGD(m.parameters(), lr=0.1)))
    assert type(policy) is Shared and policy.shared is model and policy.personal_model(model) is model


# ---------------------------------------------------------------------------------------------- quinkgl run


@pytest.mark.parametrize("mode", ["apfl", "fedrep"])
def test_daemons_run_resume_and_report_personal_models(mode: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from quinkgl_cli.manifest.io import write_manifest
    from quinkgl_cli.node import localswarm as ls
    from quinkgl_cli.node.checkpoint import load_final_model
    from quinkgl_cli.node.daemon import Daemon, DaemonOptions, Prepared, prepare
    from quinkgl_cli.node.logs import LogContext

    script = load_script(ls.DIGITS_SCRIPT)
    m = build_manifest(name="daemon-personal", task_type="class", input_shape="64", output_shape="10",
                       label_type="integer", framework="pytorch", arch_hash=compute_arch_hash(script.build_model(None)),
                       aggregation="FedAvg", topology="FullTopology", personalization=mode,
                       training_params={"local_epochs": "1", "local_steps": "3", "final_consensus_steps": "1"})
    path = tmp_path / "m.qgl"
    write_manifest(path, m)
    net = MemoryNetwork()

    def make(p: Prepared) -> MemoryTransport:
        return MemoryTransport(net, p.options.node_id, swarm_id=p.trusted.swarm_id,
                               arch_hash=p.trusted.manifest.model.arch_hash)

    def daemon(i: int) -> Daemon:
        opts = DaemonOptions.from_flags(manifest=path, script=ls.DIGITS_SCRIPT, node_id=f"p{i}", trust_policy="open",
                                        rounds=2, gossip_interval=0.2, checkpoint_dir=tmp_path / f"p{i}", min_peers=1,
                                        script_args={"shard": str(i), "num_shards": "2", "partition": "shards:5",
                                                     **({"own_holdout": "0.2"} if mode == "fedrep" else {})})
        return Daemon(prepare(opts), LogContext(f"p{i}"), make)

    async def both(ds: list[Daemon]) -> list[int]:
        return list(await asyncio.gather(*(d.run() for d in ds)))

    from quinkgl_cli.node.trainer import Trainer

    fits: list[str] = []
    fit = Trainer.fit_head

    def counted(self: Trainer) -> float | None:
        fits.append(self.personal.mode)
        return fit(self)

    monkeypatch.setattr(Trainer, "fit_head", counted)
    daemons = [daemon(0), daemon(1)]
    with caplog.at_level(logging.INFO, logger="quinkgl"):
        assert asyncio.run(both(daemons)) == [0, 0]
    assert fits == [mode, mode]  # each daemon, after its final consensus (FedRep's head fits the merged backbone)
    finished = [getattr(r, FIELDS_ATTR) for r in caplog.records if r.getMessage().startswith("finished ")]
    assert len(finished) == 2 and all(0.0 <= f["own_accuracy"] <= 1.0 for f in finished)
    assert all(("alpha" in f) == (mode == "apfl") for f in finished)
    # FedRep's peers were started with their own test data (a third loader), APFL's without (the estimate).
    assert all((d.node.trainer.own_loader is not None) == (mode == "fedrep") for d in daemons)
    tensors, _ = load_final_model(tmp_path / "p0" / "final_model.safetensors")
    assert {"2.weight", "2.bias", "0.weight"} <= set(tensors)  # the personal model, head included
    for d in daemons:  # a daemon holds its directories for its process's life; the restart below needs them
        for lock in d.prepared.locks:
            lock.release()
    personal = daemons[0].node.trainer.personal
    again = daemon(0)  # a restart resumes the personal state from the checkpoint, then finds the run finished
    assert asyncio.run(both([again])) == [0]
    for lock in again.prepared.locks:
        lock.release()
    assert again.node.completed_round == 2
    if isinstance(personal, APFL):
        restored = again.node.trainer.personal
        assert isinstance(restored, APFL) and restored.alpha == personal.alpha
        assert torch.equal(flatten(restored.local), flatten(personal.local))
    else:
        assert torch.equal(again.node.trainer.model.state_dict()["2.weight"],
                           daemons[0].node.trainer.model.state_dict()["2.weight"])


def test_run_dry_run_checks_the_split_and_names_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    def dry(prefixes: str, name: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"{name}.qgl"
        result = subprocess.run([sys.executable, "-m", "quinkgl_cli", "manifest", "create", "--name", name, "--data",
                                 "digits", "--task-type", "class", "--label-type", "integer", "--aggregation", "FedAvg",
                                 "--topology", "RandomTopology", "--personalization", "fedrep", "--personalization-param",
                                 f"head_prefixes={prefixes}", "--output", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return subprocess.run([sys.executable, "-m", "quinkgl_cli", "run", "--manifest", str(path), "--data", "digits",
                               "--node-id", name, "--trust-policy", "open", "--dry-run", "--state-dir",
                               str(tmp_path / "state")], capture_output=True, text=True)

    ok = dry("2", "good")
    assert ok.returncode == 0 and "personalization=fedrep shared_params=2080" in ok.stdout, ok.stdout + ok.stderr
    bad = dry("nope", "bad")
    assert bad.returncode == 7 and "FedRep head prefixes nope match none" in bad.stdout + bad.stderr


def test_apfl_local_model_gets_the_scripts_scheduler_too() -> None:
    """v's optimizer comes from the same build_optimizer: a scheduler it returns steps with w's, once a round, and
    is checkpointed with v."""
    def training(local: nn.Module) -> Training:
        opt = torch.optim.SGD(local.parameters(), lr=0.1)
        return Training(opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))

    spec = manifest("apfl").personalization
    apfl = APFL(mlp(), spec, training)
    for _ in range(2):
        apfl.optimizer.step()  # a round's training (no gradients: nothing moves)
        apfl.round_trained()
    assert apfl.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    tensors, meta = apfl.state_dict()
    again = APFL(mlp(), spec, training)
    again.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert again.scheduler is not None and again.scheduler.last_epoch == 2
    again.round_trained()
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)
