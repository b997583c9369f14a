"""Real daemons whose peer script puts the model on a CUDA device: they train there, exchange and aggregate the
weights (which travel through host memory), and keep the model on the device round after round. Skipped where no
CUDA device is present (CI has none); run on a GPU machine with `pytest tests/test_cuda_e2e.py`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from quinkgl_cli.node import localswarm as ls
from quinkgl_cli.node.checkpoint import load_final_model

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROUNDS = 6
INTERVAL = 0.8

# The digits script with its model moved to the GPU; each round's end prints where the model's weights are then
# (after that round's aggregation has loaded the partners' weights back into it).
CUDA_SCRIPT = """
import importlib.util
_spec = importlib.util.spec_from_file_location("digits_for_cuda", {script!r})
digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits)
build_loaders = digits.build_loaders
_held = {{}}

def build_model(manifest, **kw):
    _held["model"] = digits.build_model(manifest, **kw).cuda()
    return _held["model"]

def build_optimizer(manifest, model):
    return digits.build_optimizer(manifest, model)

def on_round_end(round_idx, metrics):
    devices = sorted({{str(p.device) for p in _held["model"].parameters()}})
    print(f"model-device round={{round_idx}} devices={{','.join(devices)}}", flush=True)
"""


def test_daemons_train_and_exchange_cuda_models(tmp_path: Path) -> None:
    manifest, _key, _pub, swarm_id = ls.digits_manifest(tmp_path / "manifest")
    script = tmp_path / "cuda_peer_script.py"
    script.write_text(CUDA_SCRIPT.format(script=str(ls.DIGITS_SCRIPT)))
    peers = ls.start_swarm(tmp_path, manifest, 2, ROUNDS, INTERVAL, "shards:2", script=script)
    try:
        codes = ls.wait_all(peers, timeout=240)
    finally:
        ls.stop_all(peers)
    logs = {p.name: p.text() for p in peers}
    assert codes == [0, 0], {n: t[-3000:] for n, t in logs.items()}
    for p in peers:
        text = logs[p.name]
        devices = re.findall(r"^model-device round=(\d+) devices=(\S+)$", text, re.M)
        assert len(devices) >= ROUNDS - 1 and {d for _, d in devices} == {"cuda:0"}, devices
        assert sum("aggregated models" in ln for ln in text.splitlines()) >= ROUNDS // 2, text[-3000:]
        accuracy = p.finished_accuracy()
        assert accuracy is not None and accuracy > 0.5, (p.name, accuracy)
        tensors, meta = load_final_model(tmp_path / "ckpt" / p.name / "final_model.safetensors")
        assert meta["swarm_id"] == swarm_id and all(t.device.type == "cpu" for t in tensors.values())
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
