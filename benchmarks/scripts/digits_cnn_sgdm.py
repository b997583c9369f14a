"""Benchmark peer script: digits as 8x8 images, a small CNN (conv 16 + max pooling + two linear layers) trained with
SGD, lr 0.05, momentum 0.9, as a user would write it."""

import torch
from digits_data import digits_loaders
from torch import nn


def build_model(manifest, **kwargs):
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def build_loaders(manifest, **kwargs):
    return digits_loaders(kwargs, images=True)


def build_optimizer(manifest, model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
