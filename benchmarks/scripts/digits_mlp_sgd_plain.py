"""Benchmark peer script written as an outside user would, not tuned to quinkgl: digits, MLP 64-100-10 with tanh,
plain SGD (no momentum) lr 0.1, weight decay 1e-4."""

import torch
from digits_data import digits_loaders
from torch import nn


def build_model(manifest, **kwargs):
    return nn.Sequential(nn.Linear(64, 100), nn.Tanh(), nn.Linear(100, 10))


def build_loaders(manifest, **kwargs):
    return digits_loaders(kwargs)


def build_optimizer(manifest, model):
    return torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
