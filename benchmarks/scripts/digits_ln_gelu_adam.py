"""Benchmark peer script written as an outside user would, not tuned to quinkgl: digits, MLP 64-96-96-10 with
LayerNorm and GELU, Adam lr 3e-3."""

import torch
from digits_data import digits_loaders
from torch import nn


def build_model(manifest, **kwargs):
    return nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.GELU(), nn.Linear(96, 96), nn.LayerNorm(96),
                         nn.GELU(), nn.Linear(96, 10))


def build_loaders(manifest, **kwargs):
    return digits_loaders(kwargs)


def build_optimizer(manifest, model):
    return torch.optim.Adam(model.parameters(), lr=3e-3)
