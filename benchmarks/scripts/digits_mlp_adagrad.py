"""Benchmark peer script written as an outside user would, not tuned to quinkgl: digits, MLP 64-64-10, Adagrad
lr 0.05."""

import torch
from digits_data import digits_loaders
from torch import nn


def build_model(manifest, **kwargs):
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def build_loaders(manifest, **kwargs):
    return digits_loaders(kwargs)


def build_optimizer(manifest, model):
    return torch.optim.Adagrad(model.parameters(), lr=0.05)
