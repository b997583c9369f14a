"""A binary classifier with one output column (a logit, BCEWithLogitsLoss's convention) against targets of shape
(batch, 1) or (batch,): its accuracy was the argmax of a single column, 0 for every sample, so a float (batch, 1)
target matched it always (accuracy 1.000 from round one) and an integer one counted the share of class 0.

A column of probabilities (a model ending in nn.Sigmoid, trained with nn.BCELoss) read as logits counted every sample
positive: the reading is chosen from the model and the loss (`node.classes.class_reading`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from quinkgl_cli.node.classes import ClassReading, class_reading
from quinkgl_cli.node.owneval import class_hits, label_shares
from quinkgl_cli.node.script import _checked_loss
from quinkgl_cli.node.trainer import _correct
from quinkgl_cli.sim.partition import dataset_labels

LOGITS = torch.tensor([[2.0], [-1.0], [0.5], [-0.2]])  # predicted 1, 0, 1, 0
PROBABILITIES = torch.sigmoid(LOGITS)  # the same predictions, from a model ending in nn.Sigmoid


def test_one_logit_is_predicted_positive_above_zero() -> None:
    as_column = torch.tensor([[1.0], [1.0], [0.0], [0.0]])  # right, wrong, wrong, right
    logits = ClassReading()
    assert _correct(logits, LOGITS, as_column) == 2
    assert _correct(logits, LOGITS, torch.tensor([1, 1, 0, 0])) == 2
    assert _correct(logits, LOGITS, torch.tensor([[1], [0], [1], [0]])) == 4
    correct, seen = class_hits(LOGITS, as_column, logits)  # type: ignore[misc]
    assert correct.tolist() == [1, 1] and seen.tolist() == [2, 2]


def test_one_probability_is_predicted_positive_above_one_half() -> None:
    probabilities = ClassReading(probabilities=True)
    assert _correct(probabilities, PROBABILITIES, torch.tensor([[1], [0], [1], [0]])) == 4
    assert _correct(probabilities, PROBABILITIES, torch.tensor([0.0, 0.0, 0.0, 0.0])) == 2
    correct, seen = class_hits(PROBABILITIES, torch.tensor([1, 1, 0, 0]), probabilities)  # type: ignore[misc]
    assert correct.tolist() == [1, 1] and seen.tolist() == [2, 2]


_criterion = nn.BCELoss()


def _module_bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _criterion(out, y)


def _functional_bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(out, y)


def _bce_of_sigmoid(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(torch.sigmoid(out), y)


def _with_logits(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out, y)


def test_the_reading_follows_the_model_and_the_loss() -> None:
    linear = nn.Sequential(nn.Linear(2, 1))
    assert class_reading(nn.Sequential(nn.Linear(2, 1), nn.Sigmoid()), nn.BCEWithLogitsLoss(), (1,)).probabilities
    for loss in (nn.BCELoss(), _module_bce, _functional_bce, _checked_loss(_functional_bce, "peer.py")):
        assert class_reading(linear, loss, (1,)).probabilities, loss
    for loss in (nn.BCEWithLogitsLoss(), nn.CrossEntropyLoss(), _with_logits, _bce_of_sigmoid,
                 _checked_loss(_with_logits, "peer.py")):
        assert not class_reading(linear, loss, (1,)).probabilities, loss


def test_labels_in_one_column_are_class_ids_not_an_argmax() -> None:
    y = torch.tensor([[1.0], [0.0], [1.0], [1.0]])
    assert dataset_labels(TensorDataset(torch.zeros(4, 2), y)).tolist() == [1, 0, 1, 1]
    assert label_shares([(torch.zeros(4, 2), y)]) == {0: 0.25, 1: 0.75}
    assert np.array_equal(dataset_labels(TensorDataset(torch.zeros(2, 2), torch.eye(2))), [0, 1])  # one-hot still


def test_a_sigmoid_model_trained_with_bce_is_scored_by_its_probabilities() -> None:
    """The trainer's evaluation reads the reading its node was built with: a Sigmoid model that is right on every
    sample scores 1.0, not the share of positives."""
    from quinkgl_cli.manifest.arch_hash import compute_arch_hash
    from quinkgl_cli.manifest.create import build_manifest
    from quinkgl_cli.node.trainer import Trainer

    model = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.fill_(10.0)
        model[0].bias.zero_()
    x = torch.tensor([[1.0], [-1.0], [-2.0], [-3.0]])
    loader = [(x, (x > 0).float())]
    manifest = build_manifest(
        name="sigmoid", task_type="classification", input_shape="1", output_shape="1", label_type="float",
        framework="pytorch", arch_hash=compute_arch_hash(model), aggregation="FedAvg", topology="FullTopology",
    )  # fmt: skip
    trainer = Trainer(manifest, model, loader, loader, torch.optim.SGD(model.parameters(), lr=0.1), nn.BCELoss(), 1, None)
    stats = trainer.evaluate()
    assert stats is not None and stats.val_accuracy == 1.0
