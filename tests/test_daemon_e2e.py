"""`quinkgl run` as users run it: real daemon processes talking IPv8 on loopback.

Few and fast on purpose (every process imports torch): one 3-peer swarm, one kill -9 / resume / SIGTERM run, and
one batch of refusals started in parallel.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from quinkgl_cli.node import localswarm as ls
from quinkgl_cli.node.checkpoint import CheckpointStore, load_final_model

pytestmark = pytest.mark.e2e

ROUNDS = 10
INTERVAL = 0.6


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def swarm_manifest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("manifest")
    path, _key, pub, swarm_id = ls.digits_manifest(root)
    return path, pub, swarm_id


def test_three_peers_beat_solo_hooks_and_greps(tmp_path: Path, swarm_manifest: tuple[Path, str, str]) -> None:
    manifest, _pub, swarm_id = swarm_manifest
    peers = ls.start_swarm(tmp_path, manifest, 3, ROUNDS, INTERVAL, "shards:3", extra=["--log-level", "info"])
    try:
        solo = {p.name: ls.train_alone(manifest, ls.DIGITS_SCRIPT, p.script_args, ROUNDS, node_id=p.name) for p in peers}
        codes = ls.wait_all(peers, timeout=180)
    finally:
        ls.stop_all(peers)
    logs = {p.name: p.text() for p in peers}
    assert codes == [0, 0, 0], {n: t[-2000:] for n, t in logs.items()}
    for p in peers:
        text = logs[p.name]
        lines = text.splitlines()
        swarm_acc = p.finished_accuracy()
        alone = solo[p.name].val_accuracy
        assert swarm_acc is not None and alone is not None
        # Each peer holds a few digit classes: alone it cannot pass ~half; the swarm gets far beyond it.
        assert alone < 0.6, (p.name, alone)
        assert swarm_acc > alone + 0.2 and swarm_acc > 0.7, (p.name, alone, swarm_acc)
        # The guide's greps.
        aggregated = [ln for ln in lines if "aggregated models" in ln]
        assert len(aggregated) >= ROUNDS // 2  # a round may miss its peers' updates on a loaded machine
        assert all(re.search(r"\bround=\d+\b", ln) for ln in aggregated)
        assert len([ln for ln in lines if "round=" in ln]) >= ROUNDS
        discovered = [ln for ln in lines if "peer-discovered" in ln]
        others = {q.name for q in peers} - {p.name}
        assert {n for n in others if any(n in ln for ln in discovered)} == others
        # Hooks of the digits script ran, once per discovered peer and once per round.
        assert sum(ln.startswith("[peer-discovered] ") for ln in lines) == 2
        assert sum(ln.startswith("[aggregated] peers=") for ln in lines) == len(aggregated)
        hook_rounds = [int(ln[6:9]) for ln in lines if re.match(r"^round=\d{3} ", ln)]
        assert hook_rounds == sorted(set(hook_rounds)) and hook_rounds[-1] == ROUNDS and len(hook_rounds) >= ROUNDS - 2
        # Only loopback was ever addressed.
        assert "blocked_sends=0" in text
        tensors, meta = load_final_model(tmp_path / "ckpt" / p.name / "final_model.safetensors")
        assert meta["swarm_id"] == swarm_id and meta["round"] == ROUNDS and "0.weight" in tensors
        kept = [f.round for f in CheckpointStore(tmp_path / "ckpt" / p.name).files()]
        assert len(kept) == 3 and kept[-1] == ROUNDS  # --keep-checkpoints default 3
        assert CheckpointStore(tmp_path / "ckpt" / p.name).latest()[1].meta["final"] is True


# The digits script, plus a digest of the model and optimizer state printed at each round's end (on_round_end runs
# right before the daemon snapshots that round): a checkpoint must hold exactly that state.
DIGEST_SCRIPT = """
import hashlib, importlib.util
_spec = importlib.util.spec_from_file_location("digits_for_digest", {script!r})
digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits)
build_loaders = digits.build_loaders
_held = {{}}

def build_model(manifest, **kw):
    _held["model"] = digits.build_model(manifest, **kw)
    return _held["model"]

def build_optimizer(manifest, model):
    _held["optimizer"] = digits.build_optimizer(manifest, model)
    return _held["optimizer"]

def digest(model_state, optim_state):
    h = hashlib.sha256()
    for _name, t in sorted(model_state.items()):
        h.update(t.detach().contiguous().numpy().tobytes())
    for _idx, t in sorted(optim_state.items()):
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()

def on_round_end(round_idx, metrics):
    opt = _held["optimizer"].state_dict()["state"]
    momentum = {{int(i): s["momentum_buffer"] for i, s in opt.items() if s.get("momentum_buffer") is not None}}
    print(f"state-digest round={{round_idx}} sha={{digest(_held['model'].state_dict(), momentum)}}", flush=True)
"""


def _checkpoint_digest(script: Path, tensors: dict) -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("digest_check", script)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("optim.") and k.endswith(".momentum_buffer")}
    return module.digest(model, optim)


def _digests(path: Path) -> dict[int, str]:
    # With --log-format json the script's prints arrive as script-output events.
    printed = "\n".join(e["text"] for e in _json_events(path, "script-output"))
    found = re.findall(r"^state-digest round=(\d+) sha=([0-9a-f]{64})$", printed, re.M)
    return {int(r): sha for r, sha in found}


def test_kill9_resume_then_sigterm_saves(tmp_path: Path, swarm_manifest: tuple[Path, str, str]) -> None:
    manifest, _pub, _swarm = swarm_manifest
    ckpt = tmp_path / "ck"
    script = tmp_path / "digest_peer_script.py"
    script.write_text(DIGEST_SCRIPT.format(script=str(ls.DIGITS_SCRIPT)))
    args = {"shard": "0", "num_shards": "3", "partition": "shards:3"}
    # Every other round checkpointed: a stop after an unsaved round must write that round's end-of-round state.
    cmd = ls.run_command(manifest, script, "lone", ls.free_port(), 200, 0.2, [], ckpt, args,
                         ["--log-format", "json", "--checkpoint-every", "2"])
    env = ls.child_env(tmp_path / "home")
    log1 = tmp_path / "first.log"
    with open(log1, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: len(_json_events(log1, "checkpoint-saved")) >= 2, 120, "two checkpoints")
        alone = _json_events(log1, "alone")
        assert alone and alone[0]["event"] == "alone" and "--bootstrap-peer" in alone[0]["hint"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Whatever moment the kill hit, the newest readable checkpoint is the last completed round it announced, or
    # one it was writing and finished (rename is atomic), and it holds that round's end-of-round state.
    announced = max(int(e["round"]) for e in _json_events(log1, "checkpoint-saved"))
    newest = CheckpointStore(ckpt).latest()
    assert newest is not None and newest[0].round in (announced, announced + 2)
    assert _checkpoint_digest(script, newest[1].tensors) == _digests(log1)[newest[0].round]

    log2 = tmp_path / "second.log"
    with open(log2, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: len(_json_events(log2, "checkpoint-saved")) >= 1, 120, "a checkpoint after resume")
        resumed = _json_events(log2, "resumed")
        assert resumed and resumed[0]["from_round"] == newest[0].round and resumed[0]["checkpoint"]
        first_round = min(int(e["round"]) for e in _json_events(log2, "round-end"))
        assert first_round == newest[0].round + 1
        # A second daemon on the same checkpoint directory would resume from the first one's rounds: refused.
        twin = subprocess.run([*cmd[:cmd.index("--port") + 1], str(ls.free_port()), *cmd[cmd.index("--port") + 2:]],
                              env=env, capture_output=True, text=True, timeout=120)
        assert twin.returncode == 7 and "in use by another running daemon" in twin.stdout + twin.stderr, twin.stdout[-1500:]
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        assert time.monotonic() - sent < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130
    # The round in progress was abandoned: the checkpoint is the last completed round's end-of-round state (written
    # at the stop when --checkpoint-every had skipped it), never the half-trained model.
    completed = max(int(e["round"]) for e in _json_events(log2, "round-end"))
    (stopped,) = _json_events(log2, "stopped")
    final, state = CheckpointStore(ckpt).latest()  # type: ignore[misc]
    assert stopped["completed_round"] == final.round == state.meta["round"] == completed, log2.read_text()[-1500:]
    assert _checkpoint_digest(script, state.tensors) == _digests(log2)[completed]
    stops = [e for e in _json_events(log2, "checkpoint-saved") if e.get("reason") == "stop"]
    assert bool(stops) == (completed % 2 == 1)


def _json_events(path: Path, event: str | None = None) -> list[dict]:
    """The JSON log lines of ``path`` whose event is ``event`` (all of them when None)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        obj = json.loads(line)
        if event is None or obj.get("event") == event:
            out.append(obj)
    return out


MISSING_HOOK = "def build_model(manifest, **kw):\n    return None\n"
OTHER_ARCH = (
    "import torch\n"
    "def build_model(manifest, **kw):\n    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))\n"
    "def build_loaders(manifest, **kw):\n"
    "    batch = (torch.zeros(4, 64), torch.zeros(4, dtype=torch.long))\n"
    "    return [batch], [batch]\n"
)


def test_refusals_at_run_have_their_exit_codes(tmp_path: Path, swarm_manifest: tuple[Path, str, str]) -> None:
    from quinkgl_cli import keys
    from quinkgl_cli.manifest.io import load_manifest, write_manifest
    from quinkgl_cli.manifest.signing import sign_manifest

    manifest, pub, _swarm = swarm_manifest
    good = load_manifest(manifest).manifest
    tampered = tmp_path / "tampered.qgl"
    tampered.write_text(manifest.read_text().replace('"local_epochs": 1', '"local_epochs": 2'))
    assert tampered.read_text() != manifest.read_text()
    resigned = tmp_path / "resigned.qgl"  # same name, another creator: a TOFU conflict once the first was seen
    write_manifest(resigned, sign_manifest(good, keys.generate()))
    (tmp_path / "missing_hook.py").write_text(MISSING_HOOK)
    other_key = keys.public_key_text(keys.generate())
    home = tmp_path / "home"
    # TOFU learns the real creator first, then each refusal runs as its own `quinkgl run` process, in parallel.
    from quinkgl_cli.manifest.trust import load_trusted

    assert load_trusted(manifest, "tofu", state_dir=home).tofu == "first-use"

    base = ["--script", str(ls.DIGITS_SCRIPT), "--rounds", "1", "--gossip-interval", "0.1"]
    cases = {
        "tampered": (["--manifest", str(tampered), *base], 3, "signature"),
        "tofu-conflict": (["--manifest", str(resigned), *base], 4, "was first seen signed by"),
        "wrong-pinned": (["--manifest", str(manifest), *base, "--trust-policy", "pinned", "--trusted-pubkey", other_key], 4,
                         "not a trusted key"),
        "missing-manifest": (["--manifest", str(tmp_path / "nope.qgl"), *base], 2, "not found"),
        "missing-script": (["--manifest", str(manifest), "--script", str(tmp_path / "nope.py")], 2, "not found"),
        "missing-hook": (["--manifest", str(manifest), "--script", str(tmp_path / "missing_hook.py")], 7, "build_loaders"),
        "bad-script-arg": (["--manifest", str(manifest), *base, "--script-arg", "shard"], 1, "--script-arg"),
        "bad-strict": (["--manifest", str(manifest), *base, "--strict-manifest", "maybe"], 1, "--strict-manifest"),
    }
    procs = {name: _start(args, home) for name, (args, _c, _m) in cases.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        args, code, needle = cases[name]
        assert proc.returncode == code, (name, out[-1500:])
        assert needle in out, (name, out[-1500:])
        errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in out, (name, out[-1500:])


def test_arch_hash_mismatch_strict_and_lenient(tmp_path: Path, swarm_manifest: tuple[Path, str, str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Through the CLI entry point in this process (the model-building ones import torch: a process each is slow)."""
    from quinkgl_cli.cli.app import main
    from quinkgl_cli.node.logs import FlushingHandler

    manifest, _pub, _swarm = swarm_manifest
    (tmp_path / "other_arch.py").write_text(OTHER_ARCH)
    args = ["run", "--manifest", str(manifest), "--script", str(tmp_path / "other_arch.py"), "--dry-run",
            "--trust-policy", "open"]
    try:
        with pytest.raises(SystemExit) as strict:
            main(args)
        assert strict.value.code == 5
        assert "arch hash" in capsys.readouterr().err
        with pytest.raises(SystemExit) as lenient:
            main([*args, "--strict-manifest", "false"])
        assert lenient.value.code == 0
        out = capsys.readouterr().out
        assert "arch-mismatch" in out and "dry-run-ok" in out and "arch_match=false" in out
        with pytest.raises(SystemExit) as good:
            main(["run", "--manifest", str(manifest), "--script", str(ls.DIGITS_SCRIPT), "--dry-run", "--trust-policy", "open"])
        assert good.value.code == 0 and "arch_match=true" in capsys.readouterr().out
    finally:
        root = __import__("logging").getLogger()
        for handler in [h for h in root.handlers if isinstance(h, FlushingHandler)]:
            root.removeHandler(handler)


def test_checkpoint_of_another_swarm_is_refused_unless_no_resume(tmp_path: Path, swarm_manifest: tuple[Path, str, str]) -> None:
    from quinkgl_cli.node.core import NodeState

    manifest, _pub, _swarm = swarm_manifest
    ckpt = tmp_path / "ck"
    CheckpointStore(ckpt).save(NodeState({"model.x": __import__("torch").zeros(1)},
                                         {"round": 4, "swarm_id": "sha256:" + "e" * 64, "optimizer": {}}))
    base = ["--manifest", str(manifest), "--script", str(ls.DIGITS_SCRIPT), "--rounds", "1", "--gossip-interval", "0.1",
            "--checkpoint-dir", str(ckpt), "--port", str(ls.free_port())]
    # One after the other: two daemons on one checkpoint directory is itself refused (see the kill -9 test).
    refused = _start(base, tmp_path / "home")
    out, _ = refused.communicate(timeout=120)
    assert refused.returncode == 7 and "belongs to swarm" in out and "--no-resume" in out
    fresh = _start([*base[:-1], str(ls.free_port()), "--no-resume"], tmp_path / "home")
    out, _ = fresh.communicate(timeout=120)
    assert fresh.returncode == 0, out[-1500:]
    assert "finished rounds=1" in out and "resumed" not in out
    assert CheckpointStore(ckpt).latest()[1].meta["swarm_id"] == _swarm


def _start(args: list[str], home: Path) -> subprocess.Popen[str]:
    policy = [] if "--trust-policy" in args else ["--trust-policy", "tofu"]
    return subprocess.Popen([sys.executable, "-m", "quinkgl_cli", "run", *policy, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ls.child_env(home))



SLOW_START = (
    "import pathlib, time\n"
    "def build_model(manifest, **kw):\n"
    "    pathlib.Path(kw['marker']).touch()\n"
    "    time.sleep(60)\n"
    "def build_loaders(manifest, **kw):\n"
    "    return [], None\n"
)


def _default_stop_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_during_start_up_exits_130(tmp_path: Path, swarm_manifest: tuple[Path, str, str], sig: int) -> None:
    """`systemctl stop` or `docker stop` while the daemon still loads its script: SIGTERM ended the process by the
    signal's default (143 in a shell) where Ctrl-C gave 130, the code README documents for an interrupt; SIGHUP (a
    closed terminal) gave 129."""
    manifest, _pub, _swarm = swarm_manifest
    script = tmp_path / "slow_start.py"
    script.write_text(SLOW_START)
    marker = tmp_path / "building"
    # Ctrl-C and a closed terminal reach a foreground process with SIGINT's and SIGHUP's default actions, whatever
    # the test runner set (a suite started under nohup ignores SIGHUP, and its children inherit that).
    proc = subprocess.Popen([sys.executable, "-m", "quinkgl_cli", "run", "--trust-policy", "open", "--manifest",
                             str(manifest), "--script", str(script), "--script-arg", f"marker={marker}",
                             "--checkpoint-dir", str(tmp_path / "ck")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ls.child_env(tmp_path / "home"),
                            preexec_fn=_default_stop_signals)
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, 120, "build_model to start")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-1500:]
    assert "Traceback" not in out, out[-1500:]
