"""A binary classifier with one output column (a logit, BCEWithLogitsLoss's convention) against targets of shape
(batch, 1) or (batch,): its accuracy was the argmax of a single column, 0 for every sample, so a float (batch, 1)
target matched it always (accuracy 1.000 from round one) and an integer one counted the share of class 0."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from quinkgl_cli.node.owneval import class_hits, label_shares
from quinkgl_cli.node.trainer import _correct
from quinkgl_cli.sim.partition import dataset_labels

LOGITS = torch.tensor([[2.0], [-1.0], [0.5], [-0.2]])  # predicted 1, 0, 1, 0


def test_one_logit_is_predicted_positive_above_zero() -> None:
    as_column = torch.tensor([[1.0], [1.0], [0.0], [0.0]])  # right, wrong, wrong, right
    assert _correct(LOGITS, as_column) == 2
    assert _correct(LOGITS, torch.tensor([1, 1, 0, 0])) == 2
    assert _correct(LOGITS, torch.tensor([[1], [0], [1], [0]])) == 4
    correct, seen = class_hits(LOGITS, as_column)  # type: ignore[misc]
    assert correct.tolist() == [1, 1] and seen.tolist() == [2, 2]


def test_labels_in_one_column_are_class_ids_not_an_argmax() -> None:
    y = torch.tensor([[1.0], [0.0], [1.0], [1.0]])
    assert dataset_labels(TensorDataset(torch.zeros(4, 2), y)).tolist() == [1, 0, 1, 1]
    assert label_shares([(torch.zeros(4, 2), y)]) == {0: 0.25, 1: 0.75}
    assert np.array_equal(dataset_labels(TensorDataset(torch.zeros(2, 2), torch.eye(2))), [0, 1])  # one-hot still
