"""Peer scripts written the way outside users write them, with models, optimizers and schedulers the shipped
scripts do not use: each case once broke a run after `manifest create` and `run --dry-run` had accepted it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quinkgl_cli import wire
from quinkgl_cli.cli.app import main
from quinkgl_cli.errors import NodeConfigError
from quinkgl_cli.manifest.arch_hash import compute_arch_hash
from quinkgl_cli.manifest.create import build_manifest
from quinkgl_cli.manifest.io import write_manifest
from quinkgl_cli.manifest.schema import Manifest
from quinkgl_cli.node.classes import class_reading
from quinkgl_cli.node.core import build_aggregator
from quinkgl_cli.node.exchange import build_sharing
from quinkgl_cli.node.lrschedule import check_training
from quinkgl_cli.node.owneval import class_hits
from quinkgl_cli.node.script import load_script
from quinkgl_cli.node.trainer import Trainer, _correct
from quinkgl_cli.sim.data import peer_loader
from quinkgl_cli.tensors import shared_specs


class TwoHeads(nn.Module):
    """A classifier with an auxiliary head: forward returns (class scores, parity scores)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.cls = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.body(x))
        return self.cls(h), self.aux(h)


def _two_head_loss(outputs: Any, y: torch.Tensor) -> torch.Tensor:
    cls, aux = outputs
    return F.cross_entropy(cls, y) + 0.5 * F.cross_entropy(aux, y % 2)


def _manifest(model: nn.Module, output_shape: str = "3") -> Manifest:
    return build_manifest(
        name="user", task_type="classification", input_shape="4", output_shape=output_shape, label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(model), aggregation="FedAvg", topology="FullTopology",
    )  # fmt: skip


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # classes 0..2
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]


def test_a_model_with_two_heads_trains_and_is_scored_by_the_head_the_task_describes() -> None:
    """Its tuple of outputs crashed training (`'tuple' object has no attribute 'detach'`, a traceback); now the
    class scores are the output shaped like the manifest's output shape (3 here, not the 2-column parity head)."""
    torch.manual_seed(0)
    model = TwoHeads()
    manifest = _manifest(model)
    data = _data()
    trainer = Trainer(manifest, model, data, data, torch.optim.SGD(model.parameters(), lr=0.2), _two_head_loss, 20, None)
    stats = trainer.train(1, build_aggregator(manifest), _no_sharing(manifest, model))
    assert stats.loss is not None and stats.accuracy is not None and stats.accuracy > 0.5
    evaluated = trainer.evaluate()
    assert evaluated is not None and evaluated.val_accuracy is not None
    x, y = data[0]
    with torch.no_grad():
        expected = float((model(x)[0].argmax(1) == y).float().mean())
    one_batch = Trainer(manifest, model, [data[0]], [data[0]], torch.optim.SGD(model.parameters(), lr=0.1),
                        _two_head_loss, 1, None).evaluate()
    assert one_batch is not None and one_batch.val_accuracy == expected


def _no_sharing(manifest: Manifest, model: nn.Module) -> Any:
    return build_sharing(manifest, model, shared_specs(model), 0, None)


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as done:
        main(list(args))
    return int(done.value.code or 0)


DATA = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
"""


def simulate_script(tmp_path: Path, body: str, *extra: str, output_shape: str = "3") -> int:
    """`quinkgl simulate` of three peers on a script of ``DATA`` + ``body``; its exit code."""
    tmp_path.mkdir(exist_ok=True)
    script = tmp_path / "user.py"
    script.write_text(DATA + body)
    path = tmp_path / "user.qgl"
    write_manifest(path, build_manifest(
        name="user-sim", task_type="classification", input_shape="4", output_shape=output_shape, label_type="integer",
        framework="pytorch", arch_hash=compute_arch_hash(load_script(script).build_model(None)), aggregation="FedAvg",
        topology="FullTopology", training_params={"local_epochs": "1", "final_consensus_steps": "1"},
    ))  # fmt: skip
    return run_cli("simulate", "--manifest", str(path), "--script", str(script), "--peers", "3", "--rounds", "2",
                   "--partition", "iid", *extra)  # fmt: skip


DOUBLE = """
def build_model(manifest, **kw):
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
def build_loaders(manifest, **kw):
    x, y = _data()
    return DataLoader(TensorDataset(x.double(), y), batch_size=16), DataLoader(TensorDataset(x.double(), y), batch_size=96)
"""


def test_a_float64_model_is_shared_as_float32(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A `.double()` model passed the dry run and then failed its first send (exit 6, `entry '0.weight' has
    unsupported dtype torch.float64`): its entries cross the wire as float32, as every strategy reads them."""
    assert simulate_script(tmp_path, DOUBLE) == 0, capsys.readouterr().err
    assert "final mean_accuracy=" in capsys.readouterr().out
    model = nn.Linear(2, 2).double()
    assert [s.dtype for s in wire.on_wire(shared_specs(model))] == [torch.float32, torch.float32]


PADDED = """
from torch.utils.data import Dataset
class Ragged(Dataset):  # samples of 2 to 4 features; the script's collate_fn pads them to 4
    def __init__(self):
        self.x, self.y = _data()
    def __len__(self):
        return len(self.y)
    def __getitem__(self, i):
        return self.x[i, : 2 + i % 3], int(self.y[i])
def pad(batch):
    x = torch.zeros(len(batch), 4)
    for row, (features, _) in enumerate(batch):
        x[row, : len(features)] = features
    return x, torch.tensor([label for _, label in batch])
def build_model(manifest, **kw):
    return nn.Linear(4, 3)
def build_loaders(manifest, **kw):
    return DataLoader(Ragged(), batch_size=16, collate_fn=pad), DataLoader(Ragged(), batch_size=96, collate_fn=pad)
"""


def test_simulate_batches_each_peers_share_with_the_scripts_collate_fn(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The simulator re-splits the script's dataset among peers and batched each share with torch's default
    collation, so a script that pads ragged samples in its collate_fn crashed (`stack expects each tensor to be
    equal size`, a traceback) and one that transforms its batches there trained on other data than its daemons."""
    assert simulate_script(tmp_path, PADDED) == 0, capsys.readouterr().err


def test_a_peers_share_drops_its_last_short_batch_when_the_scripts_loader_does() -> None:
    x = torch.arange(10.0).reshape(10, 1)
    dataset = TensorDataset(x, torch.zeros(10, dtype=torch.long))
    script_loader = DataLoader(dataset, batch_size=4, drop_last=True)
    share = peer_loader(dataset, np.arange(10), 4, torch.Generator().manual_seed(0), script_loader)
    assert len(share) == 2 and [len(b[0]) for b in share] == [4, 4]
    assert [len(b[0]) for b in peer_loader(dataset, np.arange(10), 4, torch.Generator())] == [4, 4, 2]


def test_an_optimizer_that_needs_a_closure_is_refused_in_one_line() -> None:
    """LBFGS passed the dry run, then every run stopped at its first batch with torch's traceback (`LBFGS.step()
    missing 1 required positional argument: 'closure'`)."""
    model = nn.Linear(4, 3)
    with pytest.raises(NodeConfigError, match="returned LBFGS, whose step needs a closure"):
        check_training(torch.optim.LBFGS(model.parameters()), "build_optimizer in user.py")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert check_training(optimizer, "build_optimizer").optimizer is optimizer  # step(closure=None): fine


def _one_cycle_trainer(total_steps: int, rounds: int | None) -> Trainer:
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=total_steps)
    return Trainer(_manifest(model), model, _data(), None, optimizer, None, 1, None, rounds=rounds, scheduler=scheduler)


def test_a_scheduler_that_fails_at_its_step_stops_the_node_in_one_line() -> None:
    """A OneCycleLR stepped past its total_steps raised torch's ValueError out of the round, a traceback."""
    with pytest.raises(NodeConfigError, match="total_steps=2, fewer than the run's 3 rounds"):
        _one_cycle_trainer(2, rounds=3)
    trainer = _one_cycle_trainer(2, rounds=None)  # a daemon without --rounds: the length is unknown up front
    manifest = _manifest(trainer.model)
    aggregator, sharing = build_aggregator(manifest), _no_sharing(manifest, trainer.model)
    trainer.train(1, aggregator, sharing)
    trainer.train(2, aggregator, sharing)
    with pytest.raises(NodeConfigError, match=r"OneCycleLR scheduler from build_optimizer failed at its step after "
                                              r"round 3: ValueError: Tried to step 3 times"):
        trainer.train(3, aggregator, sharing)


def _multi_hot_bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out, y)


def test_a_multi_label_classifier_is_scored_label_by_label() -> None:
    """Several columns under a binary cross-entropy are labels, not class scores: the argmax reading scored a model
    right on every label 0.5 here (the highest logit is not the first positive label)."""
    out = torch.tensor([[3.0, 5.0, -2.0], [-1.0, 2.0, 4.0], [1.0, -3.0, -1.0], [2.0, 1.0, 3.0]])
    y = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # the last: one label wrong
    model = nn.Linear(2, 3)
    for loss in (nn.BCEWithLogitsLoss(), _multi_hot_bce):
        reading = class_reading(model, loss, (3,))
        assert reading.multilabel and _correct(reading, out, y) == 3
        assert class_hits(out, y, reading) is None  # a sample holds several classes: no per-class counts
    assert _correct(class_reading(model, nn.BCELoss(), (3,)), torch.sigmoid(out), y) == 3  # probabilities
    single = class_reading(model, nn.CrossEntropyLoss(), (3,))
    assert not single.multilabel and _correct(single, out, torch.tensor([1, 2, 0, 2])) == 4  # argmax as before
    assert not class_reading(model, nn.BCEWithLogitsLoss(), (1,)).multilabel  # one column: a binary classifier


def test_a_loader_that_drops_its_only_short_batch_is_named_with_the_peers_arguments(tmp_path: Path) -> None:
    """`drop_last=True` on a share smaller than a batch was refused as `returned an empty train_loader (0 batches)
    (check the data path ...)`, without the cause or which of the simulator's peers it was."""
    script = tmp_path / "few.py"
    script.write_text(DATA + """
def build_model(manifest, **kw):
    return nn.Linear(4, 3)
def build_loaders(manifest, **kw):
    x, y = _data()
    n = 10 if kw.get("shard") == "0" else 96
    return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=16, drop_last=True), None
""")
    loaded = load_script(script)
    with pytest.raises(NodeConfigError) as err:
        loaded.build_loaders(None, shard="0", num_shards="3")
    assert str(err.value) == ("build_loaders in few.py returned an empty train_loader (0 batches: drop_last=True drops "
                              "all 10 samples, fewer than batch_size=16) for shard=0 num_shards=3")
    assert err.value.hint == "build the loader with drop_last=False or a smaller batch_size"
    assert len(loaded.build_loaders(None, shard="1").train) == 6


STREAMED = """
from torch.utils.data import IterableDataset
class Stream(IterableDataset):
    def __iter__(self):
        x, y = _data()
        yield from zip(x, y)
def build_model(manifest, **kw):
    return nn.Linear(4, 3)
def build_loaders(manifest, **kw):
    return DataLoader(Stream(), batch_size=16), None
"""


def test_an_iterable_dataset_is_pointed_at_the_scripts_own_split(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """simulate cannot split a stream among peers; the script's own split (`--partition script`) can run it."""
    assert simulate_script(tmp_path, STREAMED) == 7
    assert "or pass --partition script to give each peer the script's own build_loaders" in capsys.readouterr().err
    assert simulate_script(tmp_path / "own", STREAMED, "--partition", "script") == 0


def test_the_input_shape_is_read_from_a_first_layer_under_weight_norm() -> None:
    """`manifest create --from-script` asked for --input-shape on a model starting with weight_norm(nn.Linear(64,
    32)): the parametrization's submodules hid the Linear from the inference."""
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    from quinkgl_cli.manifest.shapes import probe_shapes

    for wrap in (weight_norm, spectral_norm):
        model = nn.Sequential(wrap(nn.Linear(64, 32)), nn.PReLU(), nn.Linear(32, 10))
        assert probe_shapes(model, None) == ((64,), (10,))
    flattening = nn.Sequential(nn.Flatten(), weight_norm(nn.Linear(784, 10, bias=False)))
    assert probe_shapes(flattening, None) == ((1, 28, 28), (10,))


class Logits(nn.Module):
    """A Hugging Face style classifier: forward returns {"logits": scores, "hidden": features}."""

    def __init__(self, scores: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, scores)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {"hidden": h, "logits": self.head(h)}


def _logits_loss(outputs: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs["logits"], y)


def test_a_dict_of_outputs_is_scored_by_its_logits_and_unreadable_outputs_score_none_not_zero() -> None:
    """A model returning {"logits": ...} reported val_accuracy 0.000 on every round while its loss fell: outputs that
    read as no class scores counted as wrong answers."""
    torch.manual_seed(0)
    data = _data()
    model = Logits()
    trainer = Trainer(_manifest(model), model, data, data, torch.optim.SGD(model.parameters(), lr=0.2), _logits_loss,
                      20, None)
    stats = trainer.train(1, build_aggregator(_manifest(model)), _no_sharing(_manifest(model), model))
    evaluated = trainer.evaluate()
    assert stats.accuracy is not None and stats.accuracy > 0.5
    assert evaluated is not None and evaluated.val_accuracy is not None and evaluated.val_accuracy > 0.5
    # The manifest says 5 scores per sample and no output has them: no accuracy at all, rather than 0.0.
    unreadable = Trainer(_manifest(model, output_shape="5"), model, data, data,
                         torch.optim.SGD(model.parameters(), lr=0.1), _logits_loss, 1, None)
    assert unreadable.train(1, build_aggregator(_manifest(model)), _no_sharing(_manifest(model), model)).accuracy is None
    evaluated = unreadable.evaluate()
    assert evaluated is not None and evaluated.val_loss is not None and evaluated.val_accuracy is None


def test_dp_sgd_takes_per_example_gradients_of_a_model_with_several_outputs() -> None:
    """Under privacy mode dp_sgd a tuple or dict of outputs stopped the node (`DP-SGD cannot take per-example
    gradients of this model: AttributeError: 'tuple' object has no attribute 'detach'`)."""
    from quinkgl_cli.strategies.dpsgd import per_sample_grads

    x, y = _data()[0]
    for model, loss in ((TwoHeads(), _two_head_loss), (Logits(), _logits_loss)):
        ps = per_sample_grads(model, loss, x, y)
        assert ps.losses.shape == (16,) and all(g.shape[0] == 16 for g in ps.grads.values())
        assert _correct(class_reading(model, loss, (3,)), ps.outputs, y) is not None


class Bag(nn.Module):
    """Token ids from the four features, looked up in a sparse embedding (sparse gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(4 * 3, 8, sparse=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x > 0).long() + (x > 1).long() + 3 * torch.arange(4)
        return self.out(self.emb(ids).mean(1))


def test_a_sparse_embedding_trains_under_the_default_optimizer_and_a_wrong_one_is_named() -> None:
    """SGD with momentum (the default optimizer) keeps a sparse momentum buffer for a sparse embedding, and the
    aggregation's momentum rule crashed adding the dense movement into it (`add(sparse, dense) is not supported`, a
    traceback); Adam, which refuses sparse gradients, stopped training with torch's traceback."""
    from quinkgl_cli.node.moments import MomentRules

    torch.manual_seed(0)
    model = Bag()
    manifest = _manifest(model)
    data = _data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer(manifest, model, data, data, optimizer, None, 1, None)
    trainer.train(1, build_aggregator(manifest), _no_sharing(manifest, model))
    assert optimizer.state[model.emb.weight]["momentum_buffer"].layout == torch.sparse_coo
    rules = MomentRules()
    rules.training_begins(optimizer, model.parameters())
    rules.training_ended(4)
    with torch.no_grad():
        model.out.weight.add_(0.5)
    dense_before = optimizer.state[model.out.weight]["momentum_buffer"].clone()
    rules.model_replaced(optimizer, model.parameters())  # the dense buffers take in the movement, the sparse one stays
    assert not torch.equal(optimizer.state[model.out.weight]["momentum_buffer"], dense_before)
    adam = Trainer(manifest, model, data, data, torch.optim.Adam(model.parameters()), None, 1, None)
    with pytest.raises(NodeConfigError, match=r"^the Adam optimizer from build_optimizer failed at its step: "
                                              r"RuntimeError: Adam does not support sparse gradients"):
        adam.train(1, build_aggregator(manifest), _no_sharing(manifest, model))


def test_the_sparse_momentum_buffer_of_a_sparse_embedding_is_checkpointed_dense() -> None:
    """Every daemon of such a swarm died at its first checkpoint (`loop-died error="RuntimeError: unsupported memory
    format option Contiguous"`): the buffer is stored dense, made sparse again on load, and the resumed optimizer
    steps as the original."""
    from quinkgl_cli.node.state import load_optimizer_state, optimizer_state

    torch.manual_seed(0)
    model = Bag()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()[0]
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    tensors, meta = optimizer_state(optimizer, "optim.")
    tensors = {k: t.clone() for k, t in tensors.items()}  # as read back from the file (the state's are live views)
    assert all(t.layout == torch.strided for t in tensors.values()) and meta["sparse"] == {"0.momentum_buffer": 1}
    twin = Bag()
    twin.load_state_dict(model.state_dict())
    resumed = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    load_optimizer_state(resumed, tensors, meta, "optim.")
    for m, opt in ((model, optimizer), (twin, resumed)):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    assert torch.allclose(model.emb.weight, twin.emb.weight) and torch.allclose(model.out.weight, twin.out.weight)


PARTIAL = """
def build_model(manifest, **kw):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].bias.requires_grad_(False)  # frozen on purpose: not left out
    return model
def build_optimizer(manifest, model):
    return torch.optim.SGD(STEPPED, lr=0.1)
def build_loaders(manifest, **kw):
    x, y = _data()
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x, y), batch_size=96)
"""


@pytest.mark.parametrize(("stepped", "warned"), [("model[2].parameters()", True),
                                                 ("[p for p in model.parameters() if p.requires_grad]", False)])
def test_an_optimizer_that_steps_part_of_the_model_is_said_once(
    tmp_path: Path, stepped: str, warned: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """`SparseAdam` built on an embedding only left a classifier's head at its initial values (0.505 against 0.93)
    with no word: the layers the optimizer does not step are named once per run (simulate: once for the swarm);
    a parameter frozen with requires_grad=False is not one of them."""
    assert simulate_script(tmp_path / "sim", PARTIAL.replace("STEPPED", stepped)) == 0, capsys.readouterr().err
    lines = [line for line in capsys.readouterr().err.splitlines() if "optimizer-leaves-out" in line]
    expected = 'WARNING - optimizer-leaves-out params=1 names=[0.weight] hint="build_optimizer'
    assert len(lines) == int(warned) and all(line.startswith(expected) and line.endswith(" peers=3") for line in lines), lines
    script = tmp_path / "sim" / "user.py"
    assert run_cli("run", "--manifest", str(tmp_path / "sim" / "user.qgl"), "--script", str(script),
                   "--trust-policy", "open", "--dry-run") == 0
    assert ("optimizer-leaves-out params=1 names=[0.weight]" in capsys.readouterr().out) == warned
