"""Benchmark peer script written as an outside user would, not tuned to quinkgl: digits as 8x8 images, a CNN with
batch normalization and dropout (two conv + BatchNorm + max pooling blocks, two linear layers), AdamW lr 3e-3,
weight decay 1e-2."""

import torch
from digits_data import digits_loaders
from torch import nn


def build_model(manifest, **kwargs):
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def build_loaders(manifest, **kwargs):
    return digits_loaders(kwargs, images=True)


def build_optimizer(manifest, model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
