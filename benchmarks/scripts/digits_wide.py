"""Benchmark peer script: digits with a deliberately wide MLP (64-38000-10, about 2.85M parameters, 11.4 MB of
float32) so that every model exchange moves about 10 MB (the NAT lab's figures, `bench_nat.py --daemons`)."""

from digits_data import digits_loaders
from torch import nn

WIDTH = 38000


def build_model(manifest, **kwargs):
    return nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))


def build_loaders(manifest, **kwargs):
    return digits_loaders(kwargs)
