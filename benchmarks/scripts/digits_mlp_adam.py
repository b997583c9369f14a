"""Benchmark peer script: digits, MLP 64-64-10 trained with Adam (lr 1e-3), as a user would write it."""

import torch
from digits_data import digits_loaders
from torch import nn


def build_model(manifest, **kwargs):
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def build_loaders(manifest, **kwargs):
    return digits_loaders(kwargs)


def build_optimizer(manifest, model):
    return torch.optim.Adam(model.parameters(), lr=1e-3)
