"""Benchmark peer script: the shipped digits script's MLP and data, its training set repeated ``repeat`` times
(script argument, default 7: 10,066 samples), so that 10,000 simulated peers each hold at least one sample
(`bench_scale.py`). Validation is digits' own validation fifth, unrepeated."""

import importlib.util
from pathlib import Path

from torch.utils.data import DataLoader, TensorDataset

_SPEC = importlib.util.spec_from_file_location(
    "digits_tiled_base", Path(__file__).resolve().parents[2] / "quinkgl_cli" / "peer_scripts" / "digits_peer_script.py")
_BASE = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_BASE)

build_model = _BASE.build_model
build_optimizer = _BASE.build_optimizer


def build_loaders(manifest, **kwargs):
    repeat = int(kwargs.pop("repeat", 7))
    train, val = _BASE.build_loaders(manifest, **kwargs)
    x, y = train.dataset.tensors
    tiled = TensorDataset(x.repeat(repeat, 1), y.repeat(repeat))
    return DataLoader(tiled, batch_size=train.batch_size, shuffle=True), val
