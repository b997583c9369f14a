"""Benchmark peer script written as an outside user would, not tuned to quinkgl: digits, MLP 64-128-10 with dropout
0.2, RMSprop lr 1e-3."""

import torch
from digits_data import digits_loaders
from torch import nn


def build_model(manifest, **kwargs):
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))


def build_loaders(manifest, **kwargs):
    return digits_loaders(kwargs)


def build_optimizer(manifest, model):
    return torch.optim.RMSprop(model.parameters(), lr=1e-3)
