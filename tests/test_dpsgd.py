"""Privacy mode dp_sgd: per-example clipping, the noise planned from a whole-run budget and its accountant, the
refusals (a budget that cannot cover the run, BatchNorm), the budget stopping a peer, checkpoints and manifests."""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quinkgl_cli.errors import ExitCode, NodeConfigError, UsageError
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.core import Node, NodeConfig
from quinkgl_cli.node.state import NodeState
from quinkgl_cli.strategies.dp_accountant import (
    BudgetTooSmall,
    SampleAccountant,
    Segment,
    epsilon_of,
    plan_noise_multiplier,
)
from quinkgl_cli.strategies.dpsgd import clip_and_sum, noisy_mean, per_sample_grads, unsupported_layers
from quinkgl_cli.transport.memory import MemoryNetwork, MemoryTransport

H = "sha256:" + "0" * 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dp_manifest(epsilon: float = 8.0, clip: float = 1.0, **training: Any) -> Manifest:
    return Manifest(
        name="dpsgd-test", created_at=datetime(2026, 1, 1, tzinfo=UTC),
        task={"type": "classification", "input_shape": (4,), "output_shape": (3,), "label_type": "integer"},
        data_schema_hash=H, model={"framework": "pytorch", "arch_hash": H},
        aggregation={"name": "FedAvg"}, topology={"name": "FullTopology"}, training=training,
        privacy={"mode": "dp_sgd", "dp_sgd": {"epsilon": epsilon, "clip_norm": clip}, "fingerprint": False},
    )


def data(label: int, n: int = 40, seed: int = 0, batch: int = 10) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) + label * 2.0
    return DataLoader(TensorDataset(x, torch.full((n,), label, dtype=torch.long)), batch_size=batch)


def make_node(net: MemoryNetwork, node_id: str, m: Manifest, label: int, rounds: int | None = 3,
              model: nn.Module | None = None) -> Node:
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    transport = MemoryTransport(net, node_id, swarm_id="s", arch_hash=H)
    node = Node(NodeConfig(node_id, rounds=rounds, seed=label, noise_seed=label), m, "sha256:swarm", model,
                data(label, seed=label), None, torch.optim.SGD(model.parameters(), lr=0.1), transport,
                clock=lambda: 0.0)
    transport.start_sync(node)
    return node


def run_round(net: MemoryNetwork, nodes: list[Node]) -> list[list[str]]:
    sent = []
    for n in nodes:
        n.begin_round()
        n.train_round()
    for n in nodes:
        sent.append(n.share(0))
    net.deliver_all()
    for n in nodes:
        n.aggregate()
        n.end_round()
    return sent


# ---------------------------------------------------------------------------------------------- the mechanism
def test_per_example_clipping_bounds_each_examples_contribution() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(8, 4)
    y = torch.randn(8, 3)
    x[3] *= 1e3  # one example whose gradient is thousands of times the others'
    ps = per_sample_grads(model, nn.MSELoss(), x, y)
    for i in (0, 3):  # per-example gradients are those of the example alone
        model.zero_grad()
        nn.MSELoss()(model(x[i:i + 1]), y[i:i + 1]).backward()
        assert torch.allclose(ps.grads["weight"][i], model.weight.grad, rtol=1e-4, atol=1e-4)
    clip = 0.5
    summed, norms = clip_and_sum(ps.grads, clip)
    assert norms[3] > 1000 * clip
    without = {k: torch.cat([g[:3], g[4:]]) for k, g in ps.grads.items()}
    summed_without, _ = clip_and_sum(without, clip)
    moved = math.sqrt(sum(float((summed[k] - summed_without[k]).pow(2).sum()) for k in summed))
    assert moved == pytest.approx(clip, rel=1e-4)  # the huge example moves the sum by exactly the clip norm
    total = math.sqrt(sum(float(s.pow(2).sum()) for s in summed.values()))
    assert total <= 8 * clip + 1e-5


def test_noise_is_sigma_times_clip_on_the_sum_divided_by_the_expected_batch() -> None:
    g = torch.Generator().manual_seed(1)
    zero = {"w": torch.zeros(200_000)}
    out = noisy_mean(zero, clip_norm=2.0, noise_multiplier=1.5, expected_batch=10.0, generator=g)
    assert float(out["w"].std()) == pytest.approx(2.0 * 1.5 / 10.0, rel=0.01)


# ---------------------------------------------------------------------------------------------- the accountant
@pytest.mark.parametrize(("epsilon", "rate", "steps"), [(8.0, 0.25, 200), (1.0, 0.5, 60), (16.0, 0.1, 1000)])
def test_planned_noise_reproduces_the_budget_in_the_accountant(epsilon: float, rate: float, steps: int) -> None:
    sigma = plan_noise_multiplier(epsilon, 1e-5, rate, steps, 50.0)
    spent = epsilon_of([Segment(rate, sigma, steps)], 1e-5)
    assert spent <= epsilon
    assert spent >= 0.97 * epsilon  # the smallest noise that fits: the budget is used, not wasted
    assert epsilon_of([Segment(rate, sigma * 0.99, steps)], 1e-5) > epsilon
    accountant = SampleAccountant(epsilon, 1e-5, rate, sigma)
    assert accountant.max_steps >= steps
    accountant.spend(steps)
    assert accountant.spent() <= epsilon and accountant.remaining() >= 0.0


def test_a_budget_that_cannot_cover_the_steps_is_refused_with_the_numbers() -> None:
    with pytest.raises(BudgetTooSmall, match=r"epsilon 0\.01 .*10000 DP-SGD steps.*noise multiplier 5"):
        plan_noise_multiplier(0.01, 1e-5, 0.5, 10_000, 5.0)


# ---------------------------------------------------------------------------------------------- the node
def test_swarm_trains_spends_at_most_its_budget_and_reports_it() -> None:
    net = MemoryNetwork()
    m = dp_manifest(epsilon=4.0, local_epochs=2)
    nodes = [make_node(net, f"p{i}", m, i) for i in range(3)]
    for _ in range(3):
        run_round(net, nodes)
    for n in nodes:
        acc = n.exchange.sharing.sample_dp
        assert acc is not None and n.trainer.dpsgd is not None
        plan = n.trainer.dpsgd.plan
        assert plan.sampling_rate == pytest.approx(10 / 40) and plan.steps_per_round == 2 * 4
        assert acc.steps == 3 * plan.steps_per_round  # every planned step ran, and the budget covered them
        last = n.history[-1]
        assert 0.9 * 4.0 <= last["dp_epsilon_spent"] <= 4.0
        assert last["dp_epsilon_remaining"] == pytest.approx(4.0 - last["dp_epsilon_spent"], abs=1e-5)
        assert last["dp_steps"] == acc.steps and last["dp_noise_multiplier"] == pytest.approx(plan.noise_multiplier, rel=1e-5)
        assert n.history[0]["dp_epsilon_spent"] < last["dp_epsilon_spent"]


def test_spent_budget_stops_training_and_sharing_once_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    net = MemoryNetwork()
    m = dp_manifest(epsilon=2.0, local_epochs=1)
    nodes = [make_node(net, f"p{i}", m, i, rounds=2) for i in range(2)]
    net.deliver_all()
    for n in nodes:
        n.rounds = 4  # asked for more rounds than the budget was planned for (a resumed run with a larger --rounds)
    with caplog.at_level(logging.INFO, logger="quinkgl"):
        sent = [run_round(net, nodes) for _ in range(4)]
    assert all(sent[r][0] == ["p1"] for r in range(2)) and all(sent[r][0] == [] for r in range(2, 4))
    node = nodes[0]
    assert node.sharing.sharing_stopped and node.trainer.dpsgd is not None
    steps = node.trainer.dpsgd.accountant.steps
    assert steps == 2 * node.trainer.dpsgd.plan.steps_per_round  # no step past the budget
    assert node.history[-1]["sharing_stopped"] is True and node.history[-1]["dp_epsilon_spent"] <= 2.0
    before = [p.detach().clone() for p in node.model.parameters()]
    node.begin_round()
    assert node.train_round().steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, node.model.parameters(), strict=True))
    lines = [r.getMessage() for r in caplog.records if "dp-budget-exhausted" in r.getMessage()]
    assert len(lines) == 2 and all("no longer trains or shares" in ln for ln in lines), lines  # once per peer


def test_checkpoint_keeps_the_spent_budget_and_a_checkpoint_without_it_is_refused() -> None:
    net = MemoryNetwork()
    m = dp_manifest(epsilon=4.0, local_epochs=1)
    nodes = [make_node(net, f"p{i}", m, i) for i in range(2)]
    run_round(net, nodes)
    state = nodes[0].state_dict()
    saved = {k: v.clone() for k, v in state.tensors.items()}
    spent = nodes[0].exchange.sharing.sample_dp.spent()  # type: ignore[union-attr]
    fresh = make_node(MemoryNetwork(), "p0", m, 0)
    fresh.load_state_dict(NodeState(saved, json.loads(json.dumps(state.meta))))
    acc = fresh.exchange.sharing.sample_dp
    assert acc is not None and acc.steps == nodes[0].trainer.dpsgd.accountant.steps > 0  # type: ignore[union-attr]
    assert acc.spent() == pytest.approx(spent)
    stripped = {k: v for k, v in saved.items() if "dpsgd." not in k}
    with pytest.raises(ValueError, match="DP-SGD state"):
        make_node(MemoryNetwork(), "p0", m, 0).load_state_dict(NodeState(stripped, json.loads(json.dumps(state.meta))))


def test_resume_under_another_plan_still_charges_the_earlier_steps() -> None:
    acc = SampleAccountant(8.0, 1e-5, 0.25, 2.0)
    acc.spend(100)
    other = SampleAccountant(8.0, 1e-5, 0.5, 3.0)
    other.load_state_dict(acc.state_dict())
    assert other.steps == 0 and other.history == [Segment(0.25, 2.0, 100)]
    assert other.spent() == pytest.approx(acc.spent())
    assert other.max_steps < SampleAccountant(8.0, 1e-5, 0.5, 3.0).max_steps


def test_a_run_the_budget_cannot_cover_is_refused_at_build_with_exit_7() -> None:
    with pytest.raises(NodeConfigError, match=r"budget cannot cover the run: .*1000 rounds x 4 steps, batch 10 of 40") as exc:
        make_node(MemoryNetwork(), "p0", dp_manifest(epsilon=0.05, local_epochs=1), 0, rounds=1000)
    assert exc.value.code == ExitCode.NODE
    with pytest.raises(NodeConfigError, match="known number of rounds"):
        make_node(MemoryNetwork(), "p0", dp_manifest(), 0, rounds=None)


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(16), nn.SyncBatchNorm(16)])
def test_batchnorm_models_are_refused(layer: nn.Module) -> None:
    model = nn.Sequential(nn.Linear(4, 16), layer, nn.ReLU(), nn.Linear(16, 3))
    assert unsupported_layers(model)
    with pytest.raises(NodeConfigError, match=r"DP-SGD cannot train this model: 1 \(.*BatchNorm") as exc:
        make_node(MemoryNetwork(), "p0", dp_manifest(), 0, model=model)
    assert "GroupNorm or LayerNorm" in (exc.value.hint or "")


class _DataDependent(nn.Module):
    """Branches on a value of its input: fine for plain training, impossible to take apart per example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if float(x.sum()) > -1e9 else -self.fc(x)


def test_a_model_per_example_gradients_cannot_handle_is_refused_at_build() -> None:
    with pytest.raises(NodeConfigError, match="DP-SGD cannot take per-example gradients of this model"):
        make_node(MemoryNetwork(), "p0", dp_manifest(), 0, model=_DataDependent())


def test_personalization_is_refused_under_dp_sgd() -> None:
    doc = dp_manifest().model_dump(mode="json")
    doc["personalization"] = {"mode": "apfl"}
    from quinkgl_cli.node.lrschedule import Training
    from quinkgl_cli.node.personal import build_personal

    m = Manifest.model_validate(doc)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    personal = build_personal(m.personalization, model, lambda local: Training(torch.optim.SGD(local.parameters(), lr=0.1)))
    transport = MemoryTransport(MemoryNetwork(), "p0", swarm_id="s", arch_hash=H)
    with pytest.raises(NodeConfigError, match="dp_sgd cannot be combined with personalization apfl"):
        Node(NodeConfig("p0", rounds=3), m, "sha256:swarm", model, data(0), None,
             torch.optim.SGD(model.parameters(), lr=0.1), transport, personal=personal)


def test_layernorm_and_dropout_models_train() -> None:
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 3))
    assert unsupported_layers(model) == []
    net = MemoryNetwork()
    node = make_node(net, "p0", dp_manifest(local_epochs=1), 0, model=model)
    node.begin_round()
    assert node.train_round().steps == 4


# ---------------------------------------------------------------------------------------------- the manifest
def _build(**privacy: Any) -> Manifest:
    from quinkgl_cli.manifest.create import build_manifest

    return build_manifest(name="dp", task_type="class", input_shape="4", output_shape="3", label_type="integer",
                          framework="pytorch", arch_hash=H, aggregation="FedAvg", topology="RandomTopology",
                          privacy_params=privacy)


def test_manifest_round_trip_and_signature_cover_the_dp_sgd_section(tmp_path: Path) -> None:
    from quinkgl_cli import keys
    from quinkgl_cli.errors import CryptoError
    from quinkgl_cli.manifest.io import load_manifest, write_manifest
    from quinkgl_cli.manifest.signing import sign_manifest, verify_signature

    m = _build(mode="dp_sgd", dp_total_epsilon=8.0, dp_delta=1e-6, dp_clip_norm=2.0, max_noise_multiplier=12.0)
    assert m.privacy.dp_sgd is not None and m.privacy.dp_sgd.epsilon == 8.0 and m.privacy.dp_sgd.delta == 1e-6
    assert m.privacy.dp_sgd.clip_norm == 2.0 and m.privacy.dp_sgd.sampling == "poisson" and not m.privacy.fingerprint
    path = tmp_path / "dp.qgl"
    write_manifest(path, sign_manifest(m, keys.generate()))
    loaded = load_manifest(path)
    assert loaded.manifest.privacy == m.privacy
    assert verify_signature(loaded.canonical, loaded.manifest.creator_pubkey, loaded.manifest.signature)
    raw = json.loads(path.read_text())
    raw["privacy"]["dp_sgd"]["epsilon"] = 80.0
    path.write_text(json.dumps(raw))
    tampered = load_manifest(path)
    with pytest.raises(CryptoError):
        verify_signature(tampered.canonical, tampered.manifest.creator_pubkey, tampered.manifest.signature)


@pytest.mark.parametrize(("privacy", "message"), [
    ({"mode": "dp_sgd"}, "needs --dp-total-epsilon"),
    ({"mode": "dp_sgd", "dp_total_epsilon": 8.0, "dp_epsilon": 1.0}, "per-round epsilon of privacy mode local_update"),
    ({"mode": "dp_sgd", "dp_total_epsilon": 8.0, "fingerprint": "true"}, "keeps data-derived fingerprints home"),
    ({"dp_epsilon": 1.0, "max_noise_multiplier": 5.0}, "dp_sgd only"),
])
def test_manifest_create_refuses_incoherent_dp_sgd_settings(privacy: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        _build(**privacy)


def test_schema_refuses_a_dp_sgd_manifest_that_would_leak() -> None:
    base = dp_manifest().model_dump(mode="json")
    for change, message in ((lambda d: d["privacy"].update(fingerprint=True), "fingerprints"),
                            (lambda d: d["privacy"].update(dp_epsilon=2.0), "belong to privacy mode local_update"),
                            (lambda d: d["privacy"].update(mode="local_update"), "needs privacy mode dp_sgd"),
                            (lambda d: d["aggregation"].update(name="Scaffold"), "Scaffold")):
        doc = json.loads(json.dumps(base))
        change(doc)
        with pytest.raises(ValueError, match=message):
            Manifest.model_validate(doc)


def test_cli_manifest_create_writes_the_dp_sgd_section(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from quinkgl_cli.cli.app import app

    out = tmp_path / "m.qgl"
    result = CliRunner().invoke(app, [
        "manifest", "create", "--name", "dp", "--output", str(out), "--aggregation", "FedAvg", "--topology",
        "RandomTopology", "--task-type", "class", "--label-type", "integer", "--input-shape", "4", "--output-shape", "3",
        "--model-arch-hash", H, "--privacy-mode", "dp_sgd", "--dp-total-epsilon", "8", "--dp-clip-norm", "0.5"])
    assert result.exit_code == 0, result.output
    privacy = json.loads(out.read_text())["privacy"]
    assert privacy["mode"] == "dp_sgd" and privacy["dp_sgd"]["epsilon"] == 8 and privacy["dp_sgd"]["clip_norm"] == 0.5
    bad = CliRunner().invoke(app, [
        "manifest", "create", "--name", "dp", "--output", str(tmp_path / "x.qgl"), "--aggregation", "FedAvg",
        "--topology", "RandomTopology", "--task-type", "class", "--label-type", "integer", "--input-shape", "4",
        "--output-shape", "3", "--model-arch-hash", H, "--privacy-mode", "dpsgd", "--dp-total-epsilon", "8"])
    assert isinstance(bad.exception, UsageError) and "not a privacy mode" in bad.exception.message


def test_dp_sgd_training_warns_of_inputs_of_another_shape_once(caplog: pytest.LogCaptureFixture) -> None:
    """The normal pass says input-shape-mismatch on its first batch; the DP-SGD pass trained on without a word."""
    m = dp_manifest(local_epochs=1)
    m = m.model_copy(update={"task": m.task.model_copy(update={"input_shape": (5,)})})  # the data gives 4 per sample
    net = MemoryNetwork()
    node = make_node(net, "p0", m, 0)
    with caplog.at_level(logging.WARNING, logger="quinkgl"):
        for _ in range(2):
            node.begin_round()
            assert node.train_round().steps > 0
            node.end_round()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("input-shape-mismatch")]
    assert lines == ["input-shape-mismatch manifest=[5] batch=[4] loaders=[train]"], lines
