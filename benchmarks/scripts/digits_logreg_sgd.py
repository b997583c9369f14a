"""Benchmark peer script: digits, multinomial logistic regression (one linear layer) trained with plain SGD, lr 0.1,
as a user would write it."""

import torch
from digits_data import digits_loaders
from torch import nn


def build_model(manifest, **kwargs):
    return nn.Linear(64, 10)


def build_loaders(manifest, **kwargs):
    return digits_loaders(kwargs)


def build_optimizer(manifest, model):
    return torch.optim.SGD(model.parameters(), lr=0.1)
